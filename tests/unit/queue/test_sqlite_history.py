"""The SQLite store's side of history retention: the v2 → v3 migration keeps a
live queue working, and the trace and prune queries are index lookups (a
postmaster's `gannet trace` runs on the writer thread every session waits on,
so it must never scan a deep queue)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gannet.queue import sqlite_admin_ops, sqlite_views
from gannet.queue.ids import new_queue_id
from gannet.queue.model import Delivered, InlineBody, NewMessage, NewRecipient, RecipientOutcome, Transport
from gannet.queue.sqlite import SqliteStore
from gannet.queue.sqlite_schema import MIGRATIONS, SCHEMA_VERSION

T0 = 1_800_000_000.0


def message(message_id: str = "<m@a.test>") -> NewMessage:
    recipients = (NewRecipient("bob@b.test", Transport.SMTP, "b.test"),)
    return NewMessage(
        new_queue_id(),
        "a@a.test",
        recipients,
        InlineBody(b"Subject: x\r\n\r\nx\r\n"),
        T0,
        message_id=message_id,
    )


async def test_a_version_2_queue_is_migrated_and_its_messages_keep_their_history(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    conn = sqlite3.connect(db)
    for statement in MIGRATIONS[0] + MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version=2")
    conn.execute(
        "INSERT INTO messages (queue_id, sender, received_at, size, smtputf8, body_8bit, client, auth_user,"
        " message_id, node) VALUES ('OLD00000000000', 'a@a.test', ?, 3, 0, 0, 'c', '', '<old@a.test>', 'n')",
        (T0,),
    )
    conn.execute("INSERT INTO bodies VALUES ('OLD00000000000', x'787878')")
    conn.execute(
        "INSERT INTO recipients (queue_id, address, transport, domain, mailbox, original, state,"
        " next_attempt) VALUES ('OLD00000000000', 'bob@b.test', 'smtp', 'b.test', '', '', 'queued', ?)",
        (T0,),
    )
    conn.commit()
    conn.close()

    store = SqliteStore(db, spool_dir=tmp_path / "spool")
    await store.open()
    try:
        version = await store.testing_call(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
        assert version == SCHEMA_VERSION == 3
        (claim,) = await store.claim_due(T0, limit=10, lease_seconds=60, owner="w")
        r = claim.recipients[0]
        await store.record([RecipientOutcome(r.recipient_id, r.lease_token, Delivered("250 ok"), T0 + 1)])
        assert [e.event for e in await store.trace("old@a.test")] == ["received", "delivered", "completed"]
    finally:
        await store.close()


async def test_trace_and_prune_use_indexes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    await store.open()
    try:
        await store.enqueue(message())

        def plans(conn: sqlite3.Connection) -> list[str]:
            out = []
            for sql, params in (
                (sqlite_views._TRACE_IN_QUEUE, ("K", "k", "<k>")),
                (sqlite_views._TRACE_COMPLETED, ("K", "k", "<k>")),
                (sqlite_views._TRACE_HISTORY, ("K",)),
                (sqlite_admin_ops._PRUNABLE, (T0, 10)),
                ("DELETE FROM history WHERE queue_id = ?", ("K",)),
            ):
                rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
                out.append(" | ".join(str(r[-1]) for r in rows))
            return out

        for plan in await store.testing_call(plans):
            assert "SCAN" not in plan.replace("SCAN CONSTANT", ""), plan
    finally:
        await store.close()
