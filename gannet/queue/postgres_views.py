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

import math
from typing import Any

from gannet.queue.model import (
    DeferralReason,
    HistoryEntry,
    NoSuchMessage,
    QueuedMessageView,
    QueueFilter,
    QueueStats,
    RecipientState,
    RecipientView,
    StateCount,
    TraceEvent,
)
from gannet.queue.postgres_ops import Conn

_MESSAGE_VIEW = """
    SELECT queue_id, sender, size, received_at, held, client, auth_user, message_id, envid, ret,
        quarantined
    FROM messages m
"""
_RECIPIENT_VIEW = """
    SELECT queue_id, id, address, state, attempts, next_attempt, last_error, original
    FROM recipients WHERE queue_id = ANY(%s::text[]) ORDER BY id
"""
_HISTORY_VIEW = "SELECT at, recipient, event, detail FROM history WHERE queue_id = %s ORDER BY at, id"
_WAITING = ("queued", "deferred")


def _where(f: QueueFilter) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    some_recipient = "EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND {})"
    if f.sender is not None:
        clauses.append("lower(m.sender) = lower(%s)")
        params.append(f.sender)
    if f.recipient is not None:
        clauses.append(some_recipient.format("lower(r.address) = lower(%s)"))
        params.append(f.recipient)
    if f.domain is not None:
        clauses.append(some_recipient.format("r.domain = %s"))
        params.append(f.domain.lower())
    if f.state is not None:
        clauses.append(some_recipient.format("r.state = %s"))
        params.append(f.state.value)
    if f.held is not None:
        clauses.append("m.held = %s")
        params.append(f.held)
    if f.quarantined is not None:
        clauses.append("m.quarantined = %s")
        params.append(f.quarantined)
    if f.older_than is not None:
        clauses.append("m.received_at < %s")
        params.append(f.older_than)
    newer_than = getattr(f, "newer_than", None)
    if newer_than is not None:
        clauses.append("m.received_at >= %s")
        params.append(newer_than)
    after = getattr(f, "after", None)
    if after is not None:
        clauses.append("(m.received_at, m.queue_id) > (%s, %s)")
        params += [after[0], after[1]]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


async def _views(conn: Conn, rows: list[tuple[Any, ...]], history: bool) -> list[QueuedMessageView]:
    recipients: dict[str, list[RecipientView]] = {row[0]: [] for row in rows}
    if rows:
        cur = await conn.execute(_RECIPIENT_VIEW, (list(recipients),))
        for qid, rid, address, state, attempts, next_attempt, last_error, original in await cur.fetchall():
            recipients[qid].append(
                RecipientView(
                    rid,
                    address,
                    RecipientState(state),
                    attempts,
                    next_attempt if state in _WAITING else None,
                    last_error,
                    original,
                )
            )
    views = []
    for qid, sender, size, received_at, held, client, auth_user, message_id, envid, ret, quar in rows:
        events: tuple[HistoryEntry, ...] = ()
        if history:
            queued = HistoryEntry(received_at, "", "queued", client)  # derived, not stored
            cur = await conn.execute(_HISTORY_VIEW, (qid,))
            events = (queued, *(HistoryEntry(*h) for h in await cur.fetchall()))
        views.append(
            QueuedMessageView(
                qid, sender, size, received_at, held, tuple(recipients[qid]), client, auth_user, message_id,
                envid, ret, events, quar,
            )
        )  # fmt: skip
    return views


async def list_messages(conn: Conn, f: QueueFilter | None) -> list[QueuedMessageView]:
    where, params = _where(f or QueueFilter())
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


# --- trace ---------------------------------------------------------------------

_TRACE_IN_QUEUE = """
    SELECT queue_id, received_at, sender, size, client, message_id, NULL::float8 FROM messages
    WHERE queue_id = %(key)s OR message_id IN (%(bare)s, %(angled)s)
"""
_TRACE_COMPLETED = """
    SELECT queue_id, received_at, sender, size, client, message_id, completed_at FROM completed
    WHERE queue_id = %(key)s OR message_id IN (%(bare)s, %(angled)s)
"""
_TRACE_HISTORY = "SELECT at, recipient, event, detail, id FROM history WHERE queue_id = %s"


async def trace(conn: Conn, key: str) -> list[TraceEvent]:
    """Events of the messages `key` names (store.py "History and trace")."""
    key = key.strip()
    bare = key[1:-1] if key.startswith("<") and key.endswith(">") else key
    if not bare:
        return []  # not "every message without a Message-ID"
    params = {"key": key, "bare": bare, "angled": f"<{bare}>"}
    found = []
    for sql in (_TRACE_IN_QUEUE, _TRACE_COMPLETED):
        cur = await conn.execute(sql, params)
        found += await cur.fetchall()
    # (time, recording order, event): "received" first and "completed" last among equal times.
    keyed: list[tuple[float, float, TraceEvent]] = []
    for qid, received_at, sender, size, client, message_id, completed_at in found:
        detail = f"from=<{sender}> size={size} client={client}"
        if message_id:
            detail += f" message-id={message_id}"
        keyed.append((received_at, -1.0, TraceEvent(received_at, qid, "", "received", detail)))
        deleted = False
        cur = await conn.execute(_TRACE_HISTORY, (qid,))
        for at, recipient, event, text, row_id in await cur.fetchall():
            keyed.append((at, float(row_id), TraceEvent(at, qid, recipient, event, text)))
            deleted = deleted or event == "deleted"
        if completed_at is not None and not deleted:
            keyed.append((completed_at, math.inf, TraceEvent(completed_at, qid, "", "completed", "")))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [event for _at, _order, event in keyed]


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
