"""For the queue tests: `occupy_writer` holds a SQLite store's writer thread
inside a transaction, for tests of what waits for it and what does not.

A plain module, imported by name (pytest puts this directory on sys.path): not
a conftest.py, whose module name "conftest" would shadow tests/conftest.py for
the tests that import from it, and not a package (it would be named `queue`)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

from gannet.queue.sqlite import SqliteStore


async def occupy_writer(store: SqliteStore) -> tuple[threading.Event, asyncio.Future[bool]]:
    """Keep the writer busy inside a transaction until the returned gate is set."""
    started, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> bool:
        started.set()
        return gate.wait(10)

    blocker = asyncio.ensure_future(store.testing_call(block))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    return gate, blocker
