"""A node that dies mid-delivery and never comes back: another node delivers its mail.

Two `gannet serve` nodes (tests/peers/ GannetProcess) share one PostgreSQL
queue started from the installed binaries (tests/conftest.py
`postgres_server`), with a short lease (`[queue] lease = "15s"`, renewed every
5 s). Node A relays to a black hole (tests/peers/ BlackHole: accepts TCP,
never greets), so its deliveries hang in flight (5 connections) or wait in
memory for one (the rest). Node B relays to Postfix's smtp-sink.

1. A accepts 30 messages and claims them all (node-a/smtp in PostgreSQL).
2. B starts. While A lives, its renewals keep its leases: every lease is
   seen extended past the end it had at the claim, still A's, while B runs
   and delivers nothing.
3. A's deliver-worker and then its server get SIGKILL; A is never restarted.
4. B delivers every message to smtp-sink — exactly once each, counted by
   Message-ID — within a generous deadline (a few lease lengths), and the
   shared queue ends empty.
No assertion is about time; the deadlines only bound the waits.
"""

from __future__ import annotations

import os
import signal
import smtplib
from collections import Counter
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import peers
import pytest

pytestmark = [pytest.mark.interop]

MESSAGES = 30
LEASE = 15.0


def send(node: peers.GannetProcess, message_id: str) -> str:
    msg = EmailMessage()
    msg["From"] = "sender@example.test"
    msg["To"] = "carol@remote.test"
    msg["Subject"] = "takeover"
    msg["Message-ID"] = f"<{message_id}>"
    msg.set_content("hello\n")
    with smtplib.SMTP(*node.address("mx"), timeout=30) as client:
        assert client.send_message(msg) == {}
    return f"<{message_id}>"


def worker_pid(node: peers.GannetProcess) -> int:
    for pid in peers.child_pids(node.pid):
        try:
            if b"deliver-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError("no delivery worker")


def test_a_dead_nodes_claims_are_taken_over_after_their_lease(
    gannet: Callable[..., peers.GannetProcess],
    postgres_server: peers.PostgresServer,
    smtp_sink: Callable[..., peers.SmtpSink],
) -> None:
    name = "gannet_takeover"
    queue = {"url": postgres_server.create_database(name), "lease": f"{LEASE:g}s"}
    sink = smtp_sink(dump=True)

    def sql(query: str) -> list[tuple[object, ...]]:
        return list(postgres_server.sql(query, name))

    with peers.BlackHole() as hole:
        a = gannet(
            queue={**queue, "node": "node-a"},
            relay={"smarthost": hole.target},
            delivery={"destination_concurrency": 5},
        )
        sent = [send(a, f"m{i}@takeover.test") for i in range(MESSAGES)]
        claimed = "SELECT count(*) FROM recipients WHERE state = 'delivering' AND lease_owner = 'node-a/smtp'"
        peers.wait_for(lambda: sql(claimed) == [(MESSAGES,)], 60, "node A to claim every recipient")
        peers.wait_for(lambda: hole.accepted >= 5, 30, "node A's connections to hang in the black hole")
        ((first_end,),) = sql("SELECT max(lease_until) FROM recipients")

        b = gannet(queue={**queue, "node": "node-b"}, relay={"smarthost": sink.target})
        renewed = (
            "SELECT count(*) FROM recipients WHERE lease_owner = 'node-a/smtp' "
            f"AND state = 'delivering' AND lease_until > {first_end!r}"
        )
        peers.wait_for(lambda: sql(renewed) == [(MESSAGES,)], 60, "node A to renew every lease it holds")
        assert sink.count() == 0, "node B took work from a live node"

        os.kill(worker_pid(a), signal.SIGKILL)  # first: the server would restart it
        a.kill()  # never started again

        peers.wait_for(lambda: len(sink.messages()) >= MESSAGES, 8 * LEASE, "node B to deliver A's mail")
        peers.wait_for(lambda: sql("SELECT count(*) FROM messages") == [(0,)], 60, "the queue to empty")
    delivered = Counter(peers.message_ids(sink.messages()))
    assert delivered == Counter(sent)  # every one, once: A never got a reply from the black hole
    assert sql("SELECT count(*) FROM completed") == [(MESSAGES,)]
    assert "Traceback" not in b.log_text(), b.log_text()[-3000:]
    assert b.stop() == 0
