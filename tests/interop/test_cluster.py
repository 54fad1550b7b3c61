"""Three Gannet nodes on one PostgreSQL queue, behind HAProxy: one is killed, nothing is lost.

The cluster (tests/cluster_peers.py): a private PostgreSQL started from the
installed binaries; nodes on 127.0.0.2, 127.0.0.3 and 127.0.0.4, each with its
own data_dir and the same `[queue] url`, each with a `proxy_protocol = true`
mx listener; HAProxy on 127.0.0.8 in front (send-proxy-v2, roundrobin,
health checks every 500 ms); every node relays to one smtp-sink (dump mode:
one file per message) as its smarthost.

`test_a_killed_node_loses_no_acknowledged_message`: Postfix's smtp-source
sends 20,000 messages through HAProxy (20 one-session processes, see
cluster_peers.SourceLanes for how each message's 250 is known). When about a
fifth has reached the sink, node 2's whole process group (serve and its
deliver-worker) gets SIGKILL; a few seconds later it is started again.
Then, counted by Message-ID over smtp-sink's files:
- every message that got a 250 is delivered (at least once);
- nothing is delivered that was not sent;
- duplicates are counted, printed and bounded: only what the killed node
  had leased when it died can be delivered twice (it may have reached the
  sink without its outcome being recorded); that lease count is read from
  PostgreSQL right after the kill, and the duplicates may not exceed it;
- the queue ends empty, and no node logged a traceback.

`test_queue_admin_on_any_node_acts_on_the_shared_queue`: a message that
cannot be delivered (the smarthost is down) is held on node 2, seen held in
`queue list` on node 3, released on node 1, deleted on node 2, gone on node 3.
"""

from __future__ import annotations

import json
import smtplib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import peers
import pytest
from cluster_peers import Cluster, SourceLanes, dumped_message_ids, source_keys

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MESSAGES = 20_000
LANES = 20
HELO = "source.client.test"
KILLED = 1  # node 2, on 127.0.0.3


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[peers.PostgresServer]:
    peers.need("initdb")
    server = peers.PostgresServer(tmp_path / "pg-work")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made) + 1}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def leases(pg: peers.PostgresServer, database: str) -> dict[str, int]:
    rows = pg.sql("SELECT lease_owner, count(*) FROM recipients WHERE lease_owner IS NOT NULL "
                  "GROUP BY lease_owner", database)
    return {str(owner): int(n) for owner, n in rows}


def queued_recipients(pg: peers.PostgresServer, database: str) -> int:
    return int(pg.sql("SELECT count(*) FROM recipients", database)[0][0])


def test_a_killed_node_loses_no_acknowledged_message(
        postgres: peers.PostgresServer, cluster: Callable[..., Cluster],
        smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    peers.need("haproxy")
    peers.raise_nofile(8192)
    url = postgres.create_database("gannet")
    sink = smtp_sink(dump=True, max_sessions=1000)
    c = cluster(queue_url=url, smarthost=sink.target)
    lanes = SourceLanes(c.target, MESSAGES, lanes=LANES, helo=HELO, timeout=240)
    started = time.monotonic()
    lanes.start()
    try:
        peers.wait_progress(sink.count, MESSAGES // 5, stall=60, what="the first fifth reaching smtp-sink")
        c.kill(KILLED)
        killed_at = time.monotonic() - started
        held = leases(postgres, "gannet")
        dead_leases = sum(n for owner, n in held.items() if owner.startswith(f"node{KILLED + 1}/"))
        time.sleep(5)
        c.restart(KILLED)
        lanes.wait()
    finally:
        lanes.stop()
    accepted_in = time.monotonic() - started
    acked, uncertain = lanes.acknowledged(), lanes.uncertain()
    failed = lanes.failed_runs()
    print(f"\nsmtp-source: {len(acked)} acknowledged, {len(uncertain)} uncertain, {len(failed)} runs cut "
          f"off by the kill, in {accepted_in:.1f}s; node {KILLED + 1} killed at {killed_at:.1f}s holding "
          f"{dead_leases} leases (all leases then: {held})")
    assert len(acked) + len(uncertain) == MESSAGES, [r.stderr for r in failed][:5]
    assert len(failed) < 50, [r.stderr for r in failed][:5]

    peers.wait_progress(sink.count, len(acked), stall=60, what="delivery of every acknowledged message")
    peers.wait_progress(lambda: MESSAGES - queued_recipients(postgres, "gannet"), MESSAGES, stall=60,
                        what="the shared queue to empty")
    delivered = Counter(source_keys(dumped_message_ids(sink.messages()), HELO))
    finished_in = time.monotonic() - started
    missing = acked - set(delivered)
    extra = set(delivered) - acked - uncertain
    duplicates = {k: n for k, n in delivered.items() if n > 1}
    print(f"delivered {sum(delivered.values())} files, {len(delivered)} distinct, in {finished_in:.1f}s; "
          f"{len(duplicates)} delivered twice or more (bound: {dead_leases} leases of the killed node); "
          f"{len(uncertain & set(delivered))} of {len(uncertain)} uncertain ones delivered")
    for key, n in sorted(duplicates.items())[:20]:
        print(f"  duplicate: smtp-source pid {key[0]}, message {key[1]}: {n} copies")
    assert not missing, f"{len(missing)} acknowledged messages never delivered, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} delivered messages were never sent, e.g. {sorted(extra)[:5]}"
    assert sum(n - 1 for n in duplicates.values()) <= dead_leases, duplicates
    log = c.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    assert c.cli(2, "queue", "list", "--json").stdout.strip() == "[]"


def test_queue_admin_on_any_node_acts_on_the_shared_queue(
        postgres: peers.PostgresServer, cluster: Callable[..., Cluster]) -> None:
    peers.need("haproxy")
    url = postgres.create_database("admin")
    down = f"{peers.SINK_HOST}:{peers.free_port(peers.SINK_HOST)}"  # nothing listens there
    c = cluster(queue_url=url, smarthost=down, delivery={"retry": ["1h"]})
    host, port = peers.split_address(c.target)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@client.test", "b@elsewhere.test", "admin"
    msg.set_content("stays queued")
    with smtplib.SMTP(host, port, "client.test", timeout=30) as s:
        s.send_message(msg)

    def listed(node: int) -> list[dict[str, Any]]:
        return list(json.loads(c.cli(node, "queue", "list", "--json").stdout or "[]"))

    (entry,) = peers.wait_for(lambda: [m for m in listed(2) if m["recipients"][0]["state"] == "deferred"],
                              30, "the message deferred (smarthost down)")
    queue_id = entry["id"]
    c.cli(1, "queue", "hold", queue_id)
    assert [r["state"] for m in listed(2) for r in m["recipients"]] == ["held"]
    c.cli(0, "queue", "release", queue_id)
    states = [r["state"] for m in listed(2) for r in m["recipients"]]
    assert states and states[0] in ("queued", "deferred", "delivering"), states
    assert queue_id in c.cli(0, "queue", "show", queue_id).stdout
    c.cli(1, "queue", "delete", queue_id)
    assert listed(0) == [] and listed(2) == []
    assert "Traceback" not in c.log_text()
