"""The SQLite store's aggregate reads for /metrics and the dashboard: queue size and
oldest age by state, top deferral reasons by destination.

Why not through the writer thread like every other store call: these are scans
of the whole queue (1.3 s for a million recipients on the development VM), and
on the writer thread every enqueue would wait behind them. They run on a
`sqlite_reader.Reader` of their own (not the one for bodies, which must not
wait behind a scan). Read-only; plain SQL so that the PostgreSQL store can use
the same text.
"""

from __future__ import annotations

import sqlite3

from gannet.queue.model import DeferralReason, QueueStats, StateCount

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
