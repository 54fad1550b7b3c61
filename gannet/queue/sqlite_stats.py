"""The SQLite store's aggregate reads for /metrics and the dashboard: queue size and
oldest age by state, top deferral reasons by destination.

Why not through the writer thread like every other store call: these are scans
of the whole queue (1.3 s for a million recipients on the development VM), and
on the writer thread every enqueue would wait behind them. Here they run on a
connection of their own, in a thread of their own; in WAL mode a reader never
blocks the writer (nor the writer it), and sees only committed transactions.
Read-only (`PRAGMA query_only`); never writes, never holds a transaction open
between calls. Plain SQL so that the PostgreSQL store can use the same text.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gannet.queue.model import DeferralReason, QueueError, QueueStats, StateCount

T = TypeVar("T")

STATE_COUNTS_SQL = """
    SELECT CASE WHEN m.quarantined <> 0 THEN 'quarantined'
                WHEN m.held <> 0 THEN 'held'
                ELSE r.state END AS shown,
           COUNT(*), COUNT(DISTINCT r.queue_id), MIN(m.received_at)
    FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
    WHERE r.state IN ('queued', 'deferred', 'delivering')
    GROUP BY shown
"""
MESSAGES_SQL = "SELECT COUNT(*) FROM messages"
DEFERRAL_REASONS_SQL = """
    SELECT r.domain, r.last_error, COUNT(*) AS n, MIN(m.received_at)
    FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
    WHERE r.state = 'deferred' AND m.held = 0 AND m.quarantined = 0
    GROUP BY r.domain, r.last_error
    ORDER BY n DESC, r.domain, r.last_error
    LIMIT ?
"""
STATE_ORDER = ("queued", "delivering", "deferred", "held", "quarantined")


def queue_stats(conn: sqlite3.Connection) -> QueueStats:
    conn.execute("BEGIN")  # one snapshot for both reads
    try:
        rows = conn.execute(STATE_COUNTS_SQL).fetchall()
        (messages,) = conn.execute(MESSAGES_SQL).fetchone()
    finally:
        conn.execute("COMMIT")
    states = sorted(
        (StateCount(str(s), int(n), int(msgs), float(oldest)) for s, n, msgs, oldest in rows),
        key=lambda c: STATE_ORDER.index(c.state) if c.state in STATE_ORDER else len(STATE_ORDER),
    )
    return QueueStats(int(messages), tuple(states))


def deferral_reasons(conn: sqlite3.Connection, limit: int) -> list[DeferralReason]:
    return [
        DeferralReason(str(domain), str(reason), int(n), float(oldest))
        for domain, reason, n, oldest in conn.execute(DEFERRAL_REASONS_SQL, (limit,))
    ]


class StatsReader:
    """One read-only connection, used by one thread; calls are serialized."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-stats")
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        def call() -> T:
            try:
                return fn(self._connection(), *args)
            except sqlite3.Error as exc:
                raise QueueError(f"queue statistics: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def queue_stats(self) -> QueueStats:
        return await self._run(queue_stats)

    async def deferral_reasons(self, limit: int) -> list[DeferralReason]:
        return await self._run(deferral_reasons, limit)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
