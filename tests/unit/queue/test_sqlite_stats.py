"""The SQLite store's aggregate reads run beside the writer, not on it: a
queue scan for the dashboard never makes an enqueue wait, and the writer
being busy never makes the dashboard wait."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, QueueError, Transport
from gannet.queue.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    (tmp_path / "spool").mkdir()
    s = SqliteStore(tmp_path / "q.db", spool_dir=tmp_path / "spool")
    await s.open()
    yield s
    await s.close()


def message() -> NewMessage:
    rcpt = NewRecipient("b@far.test", Transport.SMTP, "far.test")
    return NewMessage(new_queue_id(), "a@x.test", (rcpt,), InlineBody(b"S: x\r\n\r\nx\r\n"), time.time())


async def test_stats_are_answered_while_the_writer_is_busy(store: SqliteStore) -> None:
    await store.enqueue(message())
    started, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> bool:
        started.set()
        return gate.wait(10)

    blocker = asyncio.ensure_future(store.testing_call(block))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    try:
        stats = await asyncio.wait_for(store.queue_stats(), 5)  # would hang behind the writer
        reasons = await asyncio.wait_for(store.deferral_reasons(5), 5)
    finally:
        gate.set()
    assert await blocker is True
    assert stats.messages == 1 and reasons == []


async def test_stats_use_a_read_only_connection_of_their_own(store: SqliteStore) -> None:
    writer_thread = await store.testing_call(lambda conn: threading.get_ident())
    await store.queue_stats()
    reader = store._stats_reader()
    loop = asyncio.get_running_loop()

    def facts() -> tuple[int, int]:
        return threading.get_ident(), reader._connection().execute("PRAGMA query_only").fetchone()[0]

    reader_thread, query_only = await loop.run_in_executor(reader._executor, facts)
    assert reader_thread != writer_thread
    assert query_only == 1


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
