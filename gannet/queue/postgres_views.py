"""The PostgreSQL store's reads: views for `gannet queue list/show`, `gannet
trace` and the admin API, the aggregates for /metrics, and message bodies.

Owns: the SELECTs that build QueuedMessageView and TraceEvent lists, and the
read of a body's rows. Read-only; each call runs in one transaction of the
caller's (postgres.PostgresStore), so a view is one consistent snapshot
(REPEATABLE READ is not needed: a message and its recipients are read in one
statement each, and a list is best effort by nature).

A recipient's `state` is the stored one (a held message's recipients keep
theirs; `QueuedMessageView.held` says the message is held). `next_attempt` is
shown only for queued/deferred recipients. The "queued" history entry is
derived from the message row, as in the SQLite store.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from gannet.queue.model import (
    DeferralReason,
    NoSuchMessage,
    QueuedMessageView,
    QueueFilter,
    QueueStats,
    StateCount,
    TraceEvent,
)
from gannet.queue.postgres_ops import Conn
from gannet.queue.views import (
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    TRACE_COLUMNS,
    filter_where,
    message_view,
    trace_events,
    trace_keys,
)

_MESSAGE_VIEW = f"SELECT {MESSAGE_COLUMNS} FROM messages m"
_RECIPIENT_VIEW = f"""
    SELECT queue_id, {RECIPIENT_COLUMNS}
    FROM recipients WHERE queue_id = ANY(%s::text[]) ORDER BY id
"""
_HISTORY_VIEW = "SELECT at, recipient, event, detail FROM history WHERE queue_id = %s ORDER BY at, id"


async def _views(conn: Conn, rows: list[tuple[Any, ...]], history: bool) -> list[QueuedMessageView]:
    recipients: dict[str, list[tuple[Any, ...]]] = {row[0]: [] for row in rows}
    if rows:
        cur = await conn.execute(_RECIPIENT_VIEW, (list(recipients),))
        for qid, *recipient in await cur.fetchall():
            recipients[qid].append(tuple(recipient))
    views = []
    for row in rows:
        events = None
        if history:
            cur = await conn.execute(_HISTORY_VIEW, (row[0],))
            events = await cur.fetchall()
        views.append(message_view(row, recipients[row[0]], events))
    return views


async def list_messages(conn: Conn, f: QueueFilter | None) -> list[QueuedMessageView]:
    where, params = filter_where(f or QueueFilter(), "%s")
    sql = _MESSAGE_VIEW + where + " ORDER BY m.received_at, m.queue_id"
    if f is not None and f.limit is not None:
        sql += " LIMIT %s"
        params.append(f.limit)
    cur = await conn.execute(sql, params)  # type: ignore[arg-type]
    return await _views(conn, await cur.fetchall(), history=False)


async def get_message(conn: Conn, queue_id: str) -> QueuedMessageView:
    cur = await conn.execute(_MESSAGE_VIEW + " WHERE queue_id = %s", (queue_id,))
    row = await cur.fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    (view,) = await _views(conn, [row], history=True)
    return view


# --- bodies --------------------------------------------------------------------


async def read_size(conn: Conn, queue_id: str) -> int:
    """The size stored with the message. Raises NoSuchMessage."""
    cur = await conn.execute("SELECT size FROM messages WHERE queue_id = %s", (queue_id,))
    row = await cur.fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    return int(row[0])


async def read_body(conn: Conn, queue_id: str) -> tuple[int, bytes]:
    """(the size stored with the message, the content from its bodies rows), in
    one statement. Raises NoSuchMessage."""
    # Binary results: bytea arrives as is, not hex-encoded and decoded again.
    cur = conn.cursor(binary=True)
    await cur.execute(
        "SELECT m.size, b.data FROM messages m LEFT JOIN bodies b ON b.queue_id = m.queue_id "
        "WHERE m.queue_id = %s ORDER BY b.seq",
        (queue_id,),
    )
    rows = await cur.fetchall()
    if not rows:
        raise NoSuchMessage(queue_id)
    return int(rows[0][0]), b"".join(bytes(data) for _size, data in rows if data is not None)


async def body_rows(conn: Conn, queue_id: str) -> AsyncGenerator[bytes, None]:
    """The message's bodies rows in order, one at a time (never the whole body;
    a 50 MiB body read with a disk write per row peaks at +6 MiB of RSS)."""
    cur = conn.cursor(binary=True)
    async for (data,) in cur.stream("SELECT data FROM bodies WHERE queue_id = %s ORDER BY seq", (queue_id,)):
        yield bytes(data)


# --- trace ---------------------------------------------------------------------

_TRACE_IN_QUEUE = f"""
    SELECT {TRACE_COLUMNS}, NULL::float8 FROM messages
    WHERE queue_id = %s OR message_id IN (%s, %s)
"""
_TRACE_COMPLETED = f"""
    SELECT {TRACE_COLUMNS}, completed_at FROM completed
    WHERE queue_id = %s OR message_id IN (%s, %s)
"""
_TRACE_HISTORY = "SELECT at, recipient, event, detail, id FROM history WHERE queue_id = %s"


async def trace(conn: Conn, key: str) -> list[TraceEvent]:
    """Events of the messages `key` names (store.py "History and trace")."""
    keys = trace_keys(key)
    if keys is None:
        return []
    found: list[tuple[Any, ...]] = []
    for sql in (_TRACE_IN_QUEUE, _TRACE_COMPLETED):
        cur = await conn.execute(sql, keys)
        found += await cur.fetchall()
    history = {}
    for row in found:
        cur = await conn.execute(_TRACE_HISTORY, (row[0],))
        history[row[0]] = await cur.fetchall()
    return trace_events(found, history)


# --- aggregates (/metrics, the dashboard) ------------------------------------------

_STATE_COUNTS = """
    SELECT CASE WHEN m.quarantined THEN 'quarantined' WHEN m.held THEN 'held' ELSE r.state END AS shown,
           count(*), count(DISTINCT r.queue_id), min(m.received_at)
    FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
    WHERE r.state IN ('queued', 'deferred', 'delivering')
    GROUP BY shown
"""
_DEFERRAL_REASONS = """
    SELECT r.domain, r.last_error, count(*) AS n, min(m.received_at)
    FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
    WHERE r.state = 'deferred' AND NOT m.held AND NOT m.quarantined
    GROUP BY r.domain, r.last_error
    ORDER BY n DESC, r.domain COLLATE "C", r.last_error COLLATE "C"
    LIMIT %s
"""
STATE_ORDER = ("queued", "delivering", "deferred", "held", "quarantined")


async def queue_stats(conn: Conn) -> QueueStats:
    # One snapshot for both reads; a reader never blocks the nodes' writers.
    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    cur = await conn.execute(_STATE_COUNTS)
    rows = await cur.fetchall()
    cur = await conn.execute("SELECT count(*) FROM messages")
    row = await cur.fetchone()
    states = sorted(
        (StateCount(str(s), int(n), int(msgs), float(oldest)) for s, n, msgs, oldest in rows),
        key=lambda c: STATE_ORDER.index(c.state) if c.state in STATE_ORDER else len(STATE_ORDER),
    )
    return QueueStats(int(row[0]) if row else 0, tuple(states))


async def deferral_reasons(conn: Conn, limit: int) -> list[DeferralReason]:
    cur = await conn.execute(_DEFERRAL_REASONS, (limit,))
    return [
        DeferralReason(str(domain), str(reason), int(n), float(oldest))
        for domain, reason, n, oldest in await cur.fetchall()
    ]
