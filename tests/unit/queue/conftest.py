"""Fixtures for the queue tests: `occupy_writer` holds a SQLite store's writer
thread inside a transaction, for tests of what waits for it and what does not."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable

import pytest

from gannet.queue.sqlite import SqliteStore


async def _occupy_writer(store: SqliteStore) -> tuple[threading.Event, asyncio.Future[bool]]:
    """Keep the writer busy inside a transaction until the returned gate is set."""
    started, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> bool:
        started.set()
        return gate.wait(10)

    blocker = asyncio.ensure_future(store.testing_call(block))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    return gate, blocker


Gate = tuple[threading.Event, asyncio.Future[bool]]


@pytest.fixture
def occupy_writer() -> Callable[[SqliteStore], Awaitable[Gate]]:
    return _occupy_writer
