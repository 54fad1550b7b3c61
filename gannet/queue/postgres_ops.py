"""The PostgreSQL store's operations: async functions of one connection.

Owns: every statement that changes the queue tables (the DDL is in
postgres_schema, the read-only views in postgres_views). Each function runs
inside a transaction the caller (postgres.PostgresStore, or the enqueue
writer) opened; none begins, commits or rolls back, and none reads a clock:
times arrive as arguments.

Several nodes run these at once against one database, at READ COMMITTED.
What keeps them apart:

- Claims pick rows with `FOR UPDATE SKIP LOCKED` in a CTE and lease them in
  the same statement: a row being claimed by another node is skipped, and a
  row another node leased after our snapshot is re-checked (its new due_at
  is the lease's end) and dropped. A live lease is never handed out twice.
- `record` is fenced: the UPDATE's WHERE clause (id, token, delivering) is
  the whole rule; a stale token matches nothing.
- Lock order, so that no two of these can deadlock: a message row before
  its recipients' rows (record, hold, release, quarantine, delete lock
  `messages` first, in queue_id order); several recipient rows in id order
  (`ORDER BY id FOR UPDATE` in a CTE: hold, retry, removal) or with SKIP
  LOCKED (claims, the sweeps, releases and per-destination backoff never
  wait). The one exception, record's fenced UPDATE, touches only rows leased
  to it, which no id-ordered locker waits for (they lock other states) and
  which two records reach only one message lock at a time.
- `record` locks the messages it touches before deciding which are complete:
  two nodes finishing the last two recipients of one message take turns, so
  the second sees the first's outcome and removes the message (without the
  lock each would see the other's recipient still delivering, and the
  message would stay forever).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gannet.queue.model import (
    Claim,
    ClaimedRecipient,
    Deferred,
    Delivered,
    NewMessage,
    NoSuchMessage,
    QueueError,
    RecipientOutcome,
    Transport,
)
from gannet.queue.postgres_schema import CHUNK

log = logging.getLogger("gannet.queue")

Conn = AsyncConnection[TupleRow]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A NewMessage with its content: in memory as bodies rows (`chunks`), or,
    for a body spooled to a file, that file (`spool`, `chunks` empty), copied
    in CHUNK rows by `copy_spooled_bodies` so that it is never held whole."""

    message: NewMessage
    chunks: tuple[bytes | memoryview, ...]
    spool: Path | None = None


# --- enqueue -------------------------------------------------------------------

# One statement for a whole batch (data-modifying CTEs): in autocommit mode it is
# its own transaction, so a batch costs one round trip and one WAL flush. The
# bodies' bytea travels in binary (the one %b): no hex doubling on the wire.
_INSERT_BATCH = """
    WITH m AS (
        INSERT INTO messages (queue_id, sender, received_at, size, envid, ret, smtputf8, body_8bit,
            client, auth_user, message_id, node, held)
        SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[], %s::int8[], %s::text[], %s::text[],
            %s::bool[], %s::bool[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bool[])
    ), r AS (
        -- recipient ids follow the order given (views list recipients by id)
        INSERT INTO recipients (queue_id, address, transport, domain, mailbox, original, orcpt, notify,
            state, next_attempt, parked)
        SELECT q, a, t, d, mb, o, oc, n, 'queued', na, p
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::int4[], %s::float8[], %s::bool[]) WITH ORDINALITY AS u(q, a, t, d, mb, o, oc, n, na, p, ord)
        ORDER BY ord
    ), b AS (
        INSERT INTO bodies (queue_id, seq, data) SELECT * FROM unnest(%s::text[], %s::int4[], %b::bytea[])
    ), h AS (
        INSERT INTO history (queue_id, at, recipient, event, detail)
        SELECT * FROM unnest(%s::text[], %s::float8[], %s::text[], %s::text[], %s::text[])
    )
    SELECT 1
"""
_INSERT_HISTORY = """
    INSERT INTO history (queue_id, at, recipient, event, detail)
    SELECT * FROM unnest(%s::text[], %s::float8[], %s::text[], %s::text[], %s::text[])
"""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Row tuples → one list per column (what unnest takes)."""
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


async def insert_messages(conn: Conn, node: str, batch: Sequence[Prepared]) -> None:
    """Insert whole messages (rows, recipients, bodies, events) in one statement
    for the whole batch. A duplicate queue ID raises UniqueViolation."""
    messages, recipients, bodies, events = [], [], [], []
    for p in batch:
        m = p.message
        if not m.recipients:
            raise ValueError(f"message {m.queue_id} has no recipients")
        messages.append(
            (m.queue_id, m.sender, m.received_at, m.body.size, m.envid, m.ret, m.smtputf8, m.body_8bit,
             m.client, m.auth_user, m.message_id, node, m.held)
        )  # fmt: skip
        recipients += [
            (m.queue_id, r.address, r.transport.value, r.domain, r.mailbox, r.original, r.orcpt, r.notify,
             m.received_at, m.held)
            for r in m.recipients
        ]  # fmt: skip
        bodies += [(m.queue_id, seq, chunk) for seq, chunk in enumerate(p.chunks)]
        events += [(m.queue_id, m.received_at, "", event, detail) for event, detail in m.events]
        if m.report_for:
            # On the reported message's history (it may have left the queue already).
            to = ", ".join(f"<{r.address}>" for r in m.recipients)
            events.append((m.report_for, m.received_at, "", "dsn", f"report queued as {m.queue_id} to {to}"))
    params = _columns(messages, 13) + _columns(recipients, 10) + _columns(bodies, 3) + _columns(events, 5)
    await conn.execute(_INSERT_BATCH, params)


_COPY_BODIES = "COPY bodies (queue_id, seq, data) FROM STDIN (FORMAT BINARY)"


async def copy_spooled_bodies(conn: Conn, batch: Sequence[Prepared]) -> None:
    """The bodies of the batch's spooled messages, CHUNK by CHUNK from their
    files into bodies rows (COPY: one row in memory at a time). Must run in the
    transaction that then inserts the batch (insert_messages), so that a body
    is stored if and only if its message is. The files are read in the
    default executor: the event loop never waits on the disk."""
    spooled = [p for p in batch if p.spool is not None]
    if not spooled:
        return
    loop = asyncio.get_running_loop()
    async with conn.cursor().copy(_COPY_BODIES) as copy:
        copy.set_types(["text", "int4", "bytea"])
        for p in spooled:
            assert p.spool is not None
            seq = size = 0
            try:
                with await loop.run_in_executor(None, open, p.spool, "rb") as f:
                    while chunk := await loop.run_in_executor(None, f.read, CHUNK):
                        await copy.write_row((p.message.queue_id, seq, chunk))
                        seq += 1
                        size += len(chunk)
            except OSError as exc:  # gone since _prepare's check: this message fails, not the process
                raise QueueError(f"{p.message.queue_id}: cannot read the spooled body: {exc}") from exc
            if seq == 0:  # an empty body is one empty row, as in memory
                await copy.write_row((p.message.queue_id, 0, b""))
            expected = p.message.body.size
            if size != expected:  # changed since _prepare's check: not ours to store
                raise QueueError(f"{p.message.queue_id}: spool file has {size} bytes, not {expected}")


# --- claim ---------------------------------------------------------------------

# A claim is ONE statement, run in autocommit mode (its own transaction): pick
# due rows with SKIP LOCKED, lease them, return them with their messages and,
# for small messages (up to `prefetch` bytes, one bodies row), their content:
# the delivery that follows would read it at once, one round trip each. It
# commits without waiting for the WAL flush (`lazy` sets synchronous_commit off
# for that transaction alone): a claim lost in a database crash costs nothing
# but a later attempt (the recipient is simply due again).
_CLAIM_TEMPLATE = """
    WITH lazy AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),
    picked AS ({picked}),
    leased AS (
        UPDATE recipients r
        SET state = 'delivering', lease_owner = %(owner)s, lease_token = %(token)s, lease_until = %(until)s
        FROM picked WHERE r.id = picked.id
        RETURNING r.id, r.queue_id, r.address, r.transport, r.domain, r.mailbox, r.original, r.orcpt,
            r.notify, r.attempts, r.warned, picked.sort_key
    )
    SELECT l.*, m.sender, m.received_at, m.envid, m.ret, m.smtputf8, m.body_8bit, m.size,
        CASE WHEN m.size <= %(prefetch)s AND row_number() OVER (PARTITION BY l.queue_id ORDER BY l.id) = 1
            THEN (SELECT b.data FROM bodies b WHERE b.queue_id = l.queue_id AND b.seq = 0) END
    FROM leased l JOIN messages m ON m.queue_id = l.queue_id CROSS JOIN lazy
    ORDER BY l.sort_key, l.id
"""
# `due_at <= x` implies `due_at IS NOT NULL`: the planner uses the partial indexes.
_CLAIM = _CLAIM_TEMPLATE.format(
    picked="""
        SELECT id, due_at AS sort_key FROM recipients WHERE due_at <= %(now)s
        ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"""
)
_CLAIM_BY_TRANSPORT = _CLAIM_TEMPLATE.format(
    picked="""
        SELECT id, due_at AS sort_key FROM recipients WHERE transport = %(transport)s AND due_at <= %(now)s
        ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"""
)
# The sweep's claim: unfinished, unparked recipients of messages received
# before a cutoff, whatever their next_attempt, unless under a live lease.
_CLAIM_EXPIRED = _CLAIM_TEMPLATE.format(
    picked="""
        SELECT r.id, m.received_at AS sort_key
        FROM messages m JOIN recipients r ON r.queue_id = m.queue_id
        WHERE m.received_at < %(before)s AND r.due_at IS NOT NULL
          AND (r.state <> 'delivering' OR r.lease_until <= %(now)s)
        ORDER BY m.received_at LIMIT %(limit)s FOR UPDATE OF r SKIP LOCKED"""
)


Claimed = tuple[list[Claim], dict[str, bytes]]  # the claims, and the small bodies read with them


async def claim_due(
    conn: Conn,
    now: float,
    limit: int,
    lease_seconds: float,
    owner: str,
    transport: Transport | None,
    prefetch: int = 0,
) -> Claimed:
    if limit <= 0:
        return [], {}
    params: dict[str, Any] = {"now": now, "limit": limit, "owner": owner, "prefetch": prefetch}
    if transport is None:
        return await _lease(conn, _CLAIM, params, now + lease_seconds)
    params["transport"] = transport.value
    return await _lease(conn, _CLAIM_BY_TRANSPORT, params, now + lease_seconds)


async def claim_expired(
    conn: Conn, now: float, received_before: float, limit: int, lease_seconds: float, owner: str
) -> Claimed:
    if limit <= 0:
        return [], {}
    params: dict[str, Any] = {"now": now, "before": received_before, "limit": limit, "owner": owner}
    params["prefetch"] = 0  # the sweep fails recipients; it reads bodies only for some DSNs
    return await _lease(conn, _CLAIM_EXPIRED, params, now + lease_seconds)


async def _lease(conn: Conn, sql: str, params: dict[str, Any], lease_until: float) -> Claimed:
    # One fresh token per claim: a worker that lost its lease holds an older one.
    token = secrets.token_hex(12)
    # Binary results: the prefetched bodies arrive as bytes, not hex text.
    cur = conn.cursor(binary=True)
    await cur.execute(sql, {**params, "token": token, "until": lease_until})  # type: ignore[arg-type]
    by_message: dict[str, tuple[tuple[Any, ...], list[ClaimedRecipient]]] = {}
    bodies: dict[str, bytes] = {}
    for row in await cur.fetchall():
        rid, qid, address, tr, domain, mailbox, original, orcpt, notify, attempts, warned = row[:11]
        entry = by_message.setdefault(qid, (tuple(row[12:19]), []))
        if row[19] is not None and len(row[19]) == row[18]:  # the whole body (else read_body checks it)
            bodies[qid] = bytes(row[19])
        entry[1].append(
            ClaimedRecipient(
                rid, address, Transport(tr), domain, mailbox, original, orcpt, notify, attempts, token, warned
            )
        )
    claims = []
    for qid, (message, recipients) in by_message.items():  # dicts keep the oldest-due-first order
        sender, received_at, envid, ret, smtputf8, body_8bit, size = message
        claims.append(
            Claim(
                qid, sender, received_at, envid, ret, smtputf8, body_8bit, size, tuple(recipients),
                lease_until,
            )
        )  # fmt: skip
    return claims, bodies


_NEXT_DUE = "SELECT min(due_at) FROM recipients WHERE due_at IS NOT NULL"
_NEXT_DUE_BY_TRANSPORT = _NEXT_DUE + " AND transport = %s"


async def next_due(conn: Conn, transport: Transport | None) -> float | None:
    if transport is None:
        cur = await conn.execute(_NEXT_DUE)
    else:
        cur = await conn.execute(_NEXT_DUE_BY_TRANSPORT, (transport.value,))
    row = await cur.fetchone()
    return None if row is None or row[0] is None else float(row[0])


# --- record --------------------------------------------------------------------

_LOCK_MESSAGES_OF = """
    SELECT queue_id FROM messages
    WHERE queue_id IN (SELECT queue_id FROM recipients WHERE id = ANY(%s::int8[]))
    ORDER BY queue_id FOR NO KEY UPDATE
"""
# Fencing: the WHERE clause is the whole rule. A stale token matches nothing.
# The history rows of the outcomes that landed are written by the same statement.
_APPLY = """
    WITH u AS MATERIALIZED (
        SELECT * FROM unnest(%s::int8[], %s::text[], %s::text[], %s::float8[], %s::text[], %s::bool[],
            %s::float8[]) WITH ORDINALITY AS u(id, token, state, retry_at, reason, warned, at, ord)
    ), applied AS (
        UPDATE recipients r SET
            state = u.state,
            attempts = r.attempts + 1,
            next_attempt = CASE WHEN u.state = 'deferred' THEN u.retry_at ELSE r.next_attempt END,
            last_error = CASE WHEN u.state = 'delivered' THEN r.last_error ELSE u.reason END,
            warned = r.warned OR u.warned,
            lease_owner = NULL, lease_token = NULL, lease_until = NULL
        FROM u
        WHERE r.id = u.id AND r.lease_token = u.token AND r.state = 'delivering'
        RETURNING r.id, r.queue_id, r.address, u.state, u.reason, u.at, u.ord
    ), h AS (
        INSERT INTO history (queue_id, at, recipient, event, detail)
        SELECT queue_id, at, address, state, reason FROM applied ORDER BY ord
    )
    SELECT id, queue_id FROM applied
"""


async def record(
    conn: Conn, node: str, outcomes: Sequence[RecipientOutcome], follow_ups: Sequence[Prepared]
) -> list[str]:
    first: dict[int, RecipientOutcome] = {}
    for o in outcomes:  # the same recipient twice: the first outcome spends the token
        first.setdefault(o.recipient_id, o)
    rows = []
    for o in first.values():
        r = o.outcome
        if isinstance(r, Delivered):  # `reason` is the history detail; last_error keeps its value
            rows.append((o.recipient_id, o.lease_token, "delivered", 0.0, r.detail, False, o.at))
        elif isinstance(r, Deferred):
            rows.append((o.recipient_id, o.lease_token, "deferred", r.retry_at, r.reason, r.warned, o.at))
        else:
            rows.append((o.recipient_id, o.lease_token, "failed", 0.0, r.reason, False, o.at))
    applied: dict[int, str] = {}  # recipient id → queue ID, for the outcomes that landed
    if rows:
        await conn.execute(_LOCK_MESSAGES_OF, ([r[0] for r in rows],))
        cur = await conn.execute(_APPLY, _columns(rows, 7))
        applied = {int(rid): str(qid) for rid, qid in await cur.fetchall()}
    touched: dict[str, float] = {}  # message ID → its latest outcome's time, in outcome order
    for o in first.values():
        qid = applied.get(o.recipient_id)
        if qid is None:
            log.info("queue: outcome for recipient %d ignored: lease lost", o.recipient_id)
            continue
        touched[qid] = max(touched.get(qid, o.at), o.at)
    if follow_ups:
        await copy_spooled_bodies(conn, follow_ups)
        await insert_messages(conn, node, follow_ups)
    done = set(await remove_messages(conn, list(touched), list(touched.values()), only_complete=True))
    return [qid for qid in touched if qid in done]


# Removing messages, in one statement: a summary into `completed`, then the
# recipient rows (locked in id order first), bodies and message rows. Every
# part sees the statement's snapshot, so `kept` reads the rows being deleted.
_REMOVE = """
    WITH done AS MATERIALIZED (
        SELECT q, at FROM unnest(%s::text[], %s::float8[]) AS t(q, at) {}
    ), kept AS (
        INSERT INTO completed (queue_id, message_id, sender, received_at, size, client, completed_at)
        SELECT m.queue_id, m.message_id, m.sender, m.received_at, m.size, m.client, done.at
        FROM messages m JOIN done ON m.queue_id = done.q
    ), doomed AS MATERIALIZED (
        SELECT id FROM recipients WHERE queue_id IN (SELECT q FROM done) ORDER BY id FOR UPDATE
    ), gone_recipients AS (
        DELETE FROM recipients r USING doomed WHERE r.id = doomed.id
    ), gone_bodies AS (
        DELETE FROM bodies WHERE queue_id IN (SELECT q FROM done)
    ), gone AS (
        DELETE FROM messages WHERE queue_id IN (SELECT q FROM done) RETURNING queue_id
    )
    SELECT queue_id FROM gone
"""
# In `record`: only the messages whose every recipient is now final (this
# transaction's own updates are visible to its next statement).
_REMOVE_COMPLETE = _REMOVE.format(
    "WHERE NOT EXISTS (SELECT 1 FROM recipients r "
    "WHERE r.queue_id = t.q AND r.state NOT IN ('delivered', 'failed'))"
)
_REMOVE_ANYWAY = _REMOVE.format("")


async def remove_messages(
    conn: Conn, queue_ids: Sequence[str], ats: Sequence[float], *, only_complete: bool = False
) -> list[str]:
    """Delete messages' rows and bodies, keeping a summary and their history for
    `trace`; with `only_complete`, only those with no unfinished recipient.
    Returns the queue IDs removed. The callers hold the messages' row locks."""
    if not queue_ids:
        return []
    sql = _REMOVE_COMPLETE if only_complete else _REMOVE_ANYWAY
    cur = await conn.execute(sql, (list(queue_ids), list(ats)))
    return [str(row[0]) for row in await cur.fetchall()]


# --- admin actions ---------------------------------------------------------------


async def _lock_flags(conn: Conn, queue_id: str) -> tuple[bool, bool]:
    """Lock the message row (first, as every writer does) and read its flags."""
    cur = await conn.execute(
        "SELECT held, quarantined FROM messages WHERE queue_id = %s FOR NO KEY UPDATE", (queue_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    return bool(row[0]), bool(row[1])


# A message's recipient rows, locked in id order (see the module docstring).
_PARK = """
    WITH locked AS MATERIALIZED (SELECT id FROM recipients WHERE queue_id = %s ORDER BY id FOR UPDATE)
    UPDATE recipients r SET parked = %s FROM locked WHERE r.id = locked.id
"""


async def _set_held(conn: Conn, queue_id: str, held: bool, quarantined: bool) -> None:
    await conn.execute("UPDATE messages SET held = %s WHERE queue_id = %s", (held, queue_id))
    await conn.execute(_PARK, (queue_id, held or quarantined))


async def _history(conn: Conn, queue_id: str, at: float, event: str, detail: str = "") -> None:
    await conn.execute(
        "INSERT INTO history (queue_id, at, recipient, event, detail) VALUES (%s, %s, %s, %s, %s)",
        (queue_id, at, "", event, detail),
    )


async def hold(conn: Conn, queue_id: str, now: float) -> None:
    held, quarantined = await _lock_flags(conn, queue_id)
    if not held:
        await _set_held(conn, queue_id, True, quarantined)
        await _history(conn, queue_id, now, "held")


async def release(conn: Conn, queue_id: str, now: float) -> None:
    held, quarantined = await _lock_flags(conn, queue_id)
    if held:
        await _set_held(conn, queue_id, False, quarantined)
        await _history(conn, queue_id, now, "released")


_RETRY = """
    WITH picked AS (
        SELECT id FROM recipients WHERE state = 'deferred' {} ORDER BY id FOR UPDATE
    )
    UPDATE recipients r SET next_attempt = least(r.next_attempt, %(now)s)
    FROM picked WHERE r.id = picked.id AND r.state = 'deferred'
    RETURNING r.queue_id
"""


async def retry(conn: Conn, queue_id: str | None, now: float) -> int:
    if queue_id is None:
        cur = await conn.execute(_RETRY.format(""), {"now": now})  # type: ignore[arg-type]
    else:
        await _lock_flags(conn, queue_id)
        sql = _RETRY.format("AND queue_id = %(qid)s")
        cur = await conn.execute(sql, {"now": now, "qid": queue_id})  # type: ignore[arg-type]
    rows = await cur.fetchall()
    messages = list(dict.fromkeys(row[0] for row in rows))
    if messages:
        events = [(qid, now, "", "retry", "") for qid in messages]
        await conn.execute(_INSERT_HISTORY, _columns(events, 5))
    return len(rows)


async def delete(conn: Conn, queue_id: str, now: float) -> None:
    await _lock_flags(conn, queue_id)
    await remove_messages(conn, [queue_id], [now])
    await _history(conn, queue_id, now, "deleted")


async def quarantine(conn: Conn, queue_id: str, reason: str, at: float) -> None:
    """Park a message whose body cannot be read: never claimed, never deleted here."""
    _held, quarantined = await _lock_flags(conn, queue_id)
    if quarantined:
        return
    await conn.execute("UPDATE messages SET quarantined = true WHERE queue_id = %s", (queue_id,))
    await conn.execute(_PARK, (queue_id, True))
    await _history(conn, queue_id, at, "quarantined", reason)
    log.error("queue: %s quarantined: %s", queue_id, reason)


# Back to the state before the claim, due as it was. SKIP LOCKED: a row being
# recorded right now is left to its recorder.
_RELEASE_OWNER = """
    WITH picked AS (
        SELECT id FROM recipients
        WHERE lease_owner IS NOT NULL AND lease_owner = %s AND state = 'delivering'
        ORDER BY id FOR UPDATE SKIP LOCKED
    )
    UPDATE recipients r SET state = CASE WHEN r.attempts = 0 THEN 'queued' ELSE 'deferred' END,
        lease_owner = NULL, lease_token = NULL, lease_until = NULL
    FROM picked WHERE r.id = picked.id
"""


async def release_leases(conn: Conn, owner: str) -> int:
    """A restarted worker gives back what its dead predecessor (same owner) claimed."""
    cur = await conn.execute(_RELEASE_OWNER, (owner,))
    return cur.rowcount


_RELEASE_EXPIRED = """
    WITH picked AS (
        SELECT id, lease_owner FROM recipients
        WHERE lease_owner IS NOT NULL AND lease_until <= %(before)s AND state = 'delivering'
        ORDER BY id FOR UPDATE SKIP LOCKED
    )
    UPDATE recipients r SET state = CASE WHEN r.attempts = 0 THEN 'queued' ELSE 'deferred' END,
        next_attempt = least(r.next_attempt, %(now)s),
        lease_owner = NULL, lease_token = NULL, lease_until = NULL
    FROM picked WHERE r.id = picked.id
    RETURNING r.queue_id, r.address, picked.lease_owner
"""


async def release_expired_leases(conn: Conn, now: float, expired_before: float) -> list[tuple[str, str, str]]:
    """The sweep: give back claims whose lease ended before `expired_before` (their
    worker died or hangs), due at `now`. Returns (queue_id, address, owner) of each."""
    cur = await conn.execute(_RELEASE_EXPIRED, {"now": now, "before": expired_before})
    rows = [(str(q), str(a), str(o)) for q, a, o in await cur.fetchall()]
    if rows:
        events = [(q, now, a, "released", f"lease of {o} expired") for q, a, o in rows]
        await conn.execute(_INSERT_HISTORY, _columns(events, 5))
    return rows


# Per-destination backoff: every waiting recipient of a destination waits until
# `until` at least. Leased rows are left alone (their worker will record them),
# and so are rows another node is locking (claiming them, or deferring them too).
_DEFER = """
    WITH picked AS (
        SELECT id FROM recipients
        WHERE transport = %(transport)s {} AND due_at IS NOT NULL AND due_at < %(until)s
          AND state IN ('queued', 'deferred')
        ORDER BY id FOR UPDATE SKIP LOCKED
    )
    UPDATE recipients r SET state = 'deferred', next_attempt = %(until)s, last_error = %(reason)s
    FROM picked WHERE r.id = picked.id
    RETURNING r.id
"""


async def defer_destination(
    conn: Conn, transport: Transport, domain: str | None, until: float, reason: str
) -> int:
    """Push the next attempt of every waiting recipient of `domain` (None: of the
    whole transport) to `until`. Not an attempt. Returns how many moved."""
    params: dict[str, Any] = {"transport": transport.value, "until": until, "reason": reason}
    if domain is None:
        cur = await conn.execute(_DEFER.format(""), params)  # type: ignore[arg-type]
    else:
        params["domain"] = domain
        cur = await conn.execute(_DEFER.format("AND domain = %(domain)s"), params)  # type: ignore[arg-type]
    return len(await cur.fetchall())  # (rowcount is not known yet in a pipeline)


_PRUNABLE = """
    WITH gone AS (
        DELETE FROM completed WHERE queue_id IN (
            SELECT queue_id FROM completed WHERE completed_at < %s ORDER BY completed_at LIMIT %s
            FOR UPDATE SKIP LOCKED)
        RETURNING queue_id
    )
    SELECT queue_id FROM gone
"""


async def prune_history(conn: Conn, before: float, limit: int) -> int:
    """Forget up to `limit` messages that left the queue before `before`."""
    cur = await conn.execute(_PRUNABLE, (before, limit))
    ids = [row[0] for row in await cur.fetchall()]
    if ids:
        await conn.execute("DELETE FROM history WHERE queue_id = ANY(%s::text[])", (ids,))
    return len(ids)
