"""Reads off the writer thread: one read-only SQLite connection in a thread of its own.

Why: every call through the writer (sqlite_writer) runs inside BEGIN IMMEDIATE
under the cross-process write lock, so a plain read there, say the delivery
worker fetching a body, takes the lock the sessions need for their commits.
Measured with 10 sessions of smtp-source: the worker's transactions held that
lock a quarter of the time and the sessions waited 0.7 ms per commit for it.
In WAL mode a reader never blocks the writer (nor the writer it) and sees only
committed transactions, which is all these reads need: the bodies of
recipients this process has claimed (committed before the read starts), the
next due time (a hint for an idle wait), and the aggregate scans behind
/metrics (sqlite_stats).

Never writes (`PRAGMA query_only`), never holds a transaction open between
calls; calls are serialized on the one thread, in order.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gannet.queue.model import QueueError

T = TypeVar("T")


class Reader:
    """One read-only connection to the database at `path`, used by one thread."""

    def __init__(self, path: Path, *, what: str = "queue read") -> None:
        self.path = path
        self._what = what
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-read")
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, cached_statements=64
            )
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            self._conn = conn
        return self._conn

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(connection, *args)` on the reader thread; sqlite3.Error becomes QueueError."""

        def call() -> T:
            try:
                return fn(self._connection(), *args)
            except sqlite3.Error as exc:
                raise QueueError(f"{self._what}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
