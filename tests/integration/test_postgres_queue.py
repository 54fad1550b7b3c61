"""`gannet serve` on the PostgreSQL queue, end to end: a real server process
(tests/peers/ GannetProcess) with `[queue] url = "postgresql://…"` on a
PostgreSQL started from the installed binaries (tests/conftest.py
`postgres_server`), mail sent with smtplib, delivered by the delivery worker
into Maildirs; the queue tools and `gannet db migrate` on the same database.
"""

from __future__ import annotations

import itertools
import json
import smtplib
from collections import Counter
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import peers

_databases = itertools.count(1)


def send(proc: peers.GannetProcess, rcpt: str, message_id: str, body: str = "hello\r\n") -> str:
    msg = EmailMessage()
    msg["From"] = "sender@remote.test"
    msg["To"] = rcpt
    msg["Subject"] = "pg"
    msg["Message-ID"] = f"<{message_id}>"
    msg.set_content(body)
    lst = proc.listeners[0]
    with smtplib.SMTP(lst.host, lst.port, timeout=30) as client:
        assert client.send_message(msg) == {}  # every recipient accepted (else it raises)
    return message_id


def test_serve_accepts_and_delivers_through_postgres(
    gannet: Callable[..., peers.GannetProcess], postgres_server: peers.PostgresServer
) -> None:
    name = f"gannet_serve_{next(_databases)}"
    url = postgres_server.create_database(name)
    proc = gannet(queue={"url": url, "node": "node-a", "inline_body_limit": 65536}, start=False)
    migrated = proc.cli("db", "migrate")  # ahead of the first start, as before a rolling upgrade
    assert "schema migrated from version 0 to 1" in migrated.stdout, migrated.stdout + migrated.stderr
    proc.start()
    sent = [
        send(proc, "alice@example.test" if i % 2 else "bob@example.test", f"m{i}@pg.test") for i in range(40)
    ]
    big = "x" * 76 + "\r\n"
    # ~1.25 MB: spooled on the way in, streamed out of a copy on the way to the Maildir
    sent.append(send(proc, "alice@example.test", "big@pg.test", big * 16000))
    maildir = proc.workdir / "mail"
    peers.wait_for(
        lambda: len(peers.maildir_files(maildir)) >= len(sent), 60, f"{len(sent)} messages in {maildir}"
    )
    counts = Counter(peers.message_ids(peers.maildir_files(maildir)))
    assert counts == Counter(f"<{m}>" for m in sent)
    delivered_big = next(p for p in peers.maildir_files(maildir) if b"big@pg.test" in p.read_bytes())
    assert delivered_big.read_bytes().count(b"x" * 76) == 16000
    # The queue is empty, every message is in `completed`, and nothing is left on this node's disk.
    peers.wait_for(
        lambda: postgres_server.sql("SELECT count(*) FROM messages", name) == [(0,)], 30, "the queue to empty"
    )
    assert postgres_server.sql("SELECT count(*) FROM completed", name) == [(len(sent),)]
    assert postgres_server.sql("SELECT count(*) FROM bodies", name) == [(0,)]
    spool = proc.workdir / "var" / "spool"
    assert (spool / "delivery").is_dir()  # the large body went through a copy …
    assert [p for p in spool.rglob("*") if p.is_file()] == []  # … removed with its message
    listed = proc.cli("queue", "list", "--json")
    assert json.loads(listed.stdout) == []
    assert "as node node-a (schema 1→current" in proc.log_text()  # found it migrated
    migrated = proc.cli("db", "migrate")
    assert "schema version 1 is current" in migrated.stdout, migrated.stdout + migrated.stderr
    assert proc.stop() == 0


def test_two_nodes_share_the_queue_and_its_admin_actions(
    gannet: Callable[..., peers.GannetProcess], postgres_server: peers.PostgresServer
) -> None:
    """Mail accepted by node A waits (its smarthost is down); node B's tools see it,
    hold it, and A's tools see that; delete on A removes it for B."""
    url = postgres_server.create_database(f"gannet_nodes_{next(_databases)}")
    dead = f"{peers.GANNET_HOST}:{peers.free_port()}"  # nothing listens there
    queue = {"url": url, "inline_body_limit": 65536}
    a = gannet(queue={**queue, "node": "node-a"}, relay={"smarthost": dead})
    b = gannet(queue={**queue, "node": "node-b"}, relay={"smarthost": dead})
    send(a, "carol@remote.test", "waiting@pg.test")

    def listed(node: peers.GannetProcess) -> list[dict[str, Any]]:
        return list(json.loads(node.cli("queue", "list", "--json").stdout))

    def states(node: peers.GannetProcess) -> list[str]:
        return [r["state"] for m in listed(node) for r in m["recipients"]]

    peers.wait_for(lambda: states(b) == ["deferred"], 60, "node A's attempt, seen from node B")
    (view,) = listed(b)
    b.cli("queue", "hold", view["id"])
    assert [m["id"] for m in listed(a)] == [view["id"]]
    assert states(a) == ["held"]
    a.cli("queue", "delete", view["id"])
    assert listed(b) == []
    assert a.stop() == 0 and b.stop() == 0
