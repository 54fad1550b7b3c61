"""The SQLite store's reads run beside the writer, not on it (sqlite_reader): a
queue scan for the dashboard never makes an enqueue wait; the writer being
busy never makes the dashboard wait; and the delivery worker reads bodies and
the next due time without taking the write lock the sessions commit under."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlite_writer_gate import occupy_writer

from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, QueueError, Transport
from gannet.queue.sqlite import READS, SCANS, SqliteStore


def message() -> NewMessage:
    rcpt = NewRecipient("b@far.test", Transport.SMTP, "far.test")
    return NewMessage(new_queue_id(), "a@x.test", (rcpt,), InlineBody(b"S: x\r\n\r\nx\r\n"), time.time())


async def test_stats_are_answered_while_the_writer_is_busy(store: SqliteStore) -> None:
    await store.enqueue(message())
    gate, blocker = await occupy_writer(store)
    try:
        stats = await asyncio.wait_for(store.queue_stats(), 5)  # would hang behind the writer
        reasons = await asyncio.wait_for(store.deferral_reasons(5), 5)
    finally:
        gate.set()
    assert await blocker is True
    assert stats.messages == 1 and reasons == []


async def test_reads_use_read_only_connections_of_their_own(store: SqliteStore) -> None:
    writer_thread = await store.testing_call(lambda conn: threading.get_ident())
    queued = message()
    await store.enqueue(queued)
    await store.queue_stats()
    await store.read_body(queued.queue_id)

    def facts(conn: sqlite3.Connection) -> tuple[int, int]:
        return threading.get_ident(), conn.execute("PRAGMA query_only").fetchone()[0]

    stats_thread, stats_query_only = await store._readers[SCANS].run(facts)
    body_thread, body_query_only = await store._readers[READS].run(facts)
    assert len({writer_thread, stats_thread, body_thread}) == 3  # a scan never delays a body read
    assert stats_query_only == body_query_only == 1


async def test_bodies_and_next_due_are_read_while_another_process_holds_the_write_lock(
    store: SqliteStore,
) -> None:
    queued = message()
    await store.enqueue(queued)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # as a session's commit in the server would
        body = await asyncio.wait_for(store.read_body(queued.queue_id), 5)
        due = await asyncio.wait_for(store.next_due(Transport.SMTP), 5)
        assert await asyncio.wait_for(store.body_file(queued.queue_id), 5) is None  # inline
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert body == queued.body.data
    assert due == queued.received_at


async def test_a_closed_store_refuses(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    s = SqliteStore(tmp_path / "q.db", spool_dir=tmp_path / "spool")
    with pytest.raises(QueueError):
        await s.queue_stats()
    await s.open()
    await s.queue_stats()
    await s.close()
    with pytest.raises(QueueError):
        await s.deferral_reasons(3)
