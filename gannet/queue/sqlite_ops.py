"""The SQLite store's operations: plain synchronous functions of a connection.

Owns: every SQL statement that reads or changes the queue tables (the DDL is
in sqlite_schema; the postmaster's actions, hold to quarantine, are in
sqlite_admin_ops). Called only by the writer (sqlite_writer: its thread, or
the enqueue writer process), each call
inside a transaction and a savepoint that the writer opened; a function here
never begins, commits or rolls back, and never reads a clock: times arrive as
arguments (`Ctx.clock` is used only by crash recovery, which has no caller's
"now").

Signature of every operation: `op(ctx, conn, txn, arg)`, where `arg` is the
request (a record from gannet.queue.model, or a tuple). File removals go to
`txn.after_commit`, so a body file disappears only once the rows that named
it are gone for good.

Recipient transitions (docs/queue.md):

    queued ──claim──▶ delivering ──Delivered──▶ delivered (final)
    deferred ─claim─▶     │      ──Deferred───▶ deferred  (next_attempt = retry_at)
                          │      ──Failed─────▶ failed    (final)
                          └─ lease expired ──▶ claimable again (same state)

`record` applies an outcome only while the recipient is delivering under the
lease token the outcome carries (fencing). A message whose recipients are all
final is removed in the same transaction; its history stays, with a
`completed` row, until `prune_history` (store.py "History and trace").
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from gannet.queue.model import (
    Claim,
    ClaimedRecipient,
    Deferred,
    Delivered,
    NewMessage,
    QueueError,
    RecipientOutcome,
    SpooledBody,
    Transport,
)
from gannet.queue.sqlite_writer import Txn

log = logging.getLogger("gannet.queue")

# Recipient states as stored (RecipientState values).
QUEUED, DEFERRED, DELIVERING = "queued", "deferred", "delivering"
DELIVERED, FAILED = "delivered", "failed"


@dataclass(frozen=True, slots=True)
class Ctx:
    spool_dir: Path
    node: str
    clock: Callable[[], float]


# --- enqueue -------------------------------------------------------------------

_INSERT_MESSAGES = """
    INSERT INTO messages (queue_id, sender, received_at, size, envid, ret, smtputf8,
        body_8bit, client, auth_user, message_id, node, spool_path, held)
"""
_INSERT_RECIPIENTS = """
    INSERT INTO recipients (queue_id, address, transport, domain, mailbox, original, orcpt,
        notify, state, next_attempt, parked)
"""
_INSERT_BODIES = "INSERT INTO bodies (queue_id, data)"
INSERT_HISTORY = "INSERT INTO history (queue_id, at, recipient, event, detail) VALUES (?, ?, ?, ?, ?)"
_INSERT_HISTORIES = "INSERT INTO history (queue_id, at, recipient, event, detail)"
# Rows per INSERT statement in insert_rows (14 columns x 200 = 2,800 parameters).
_ROWS_PER_INSERT = 200


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """`head` (INSERT INTO table (columns)) with all of `rows` as one multi-row VALUES.

    Why not executemany: it steps SQLite once per row, and the sqlite3 module lets
    go of the GIL around every step. On the server's writer thread each retake
    of the GIL waits for the event loop to let go of it; with 50 busy sessions a
    batch of a dozen messages spent 3 ms of its 4.6 ms waiting so, while the
    sessions waited for its commit. One statement per table is one wait.
    """
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        conn.execute(f"{head} VALUES {', '.join([one] * len(chunk))}", [v for row in chunk for v in row])


def spool_name(ctx: Ctx, body: SpooledBody) -> str:
    """The body file's path relative to the spool directory (what is stored)."""
    if not body.path.is_absolute():
        raise ValueError(f"a spooled body needs an absolute path: {body.path}")
    if not body.path.is_relative_to(ctx.spool_dir) or ".." in body.path.parts:
        raise ValueError(f"spooled body {body.path} is not inside {ctx.spool_dir}")
    return str(body.path.relative_to(ctx.spool_dir))


def _checked_spool_path(ctx: Ctx, m: NewMessage, body: SpooledBody) -> str:
    spool_path = spool_name(ctx, body)
    # The session fsync'd the file; make sure it is there and is the one it said.
    size = os.stat(ctx.spool_dir / spool_path).st_size
    if size != body.size:
        raise QueueError(f"{m.queue_id}: spool file has {size} bytes, not {body.size}")
    return spool_path


def enqueue_many(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, batch: list[NewMessage]) -> list[None]:
    """Insert whole messages: one statement per table for the whole batch (insert_rows)."""
    messages, recipients, bodies = [], [], []
    events: list[tuple[str, float, str, str, str]] = []
    spool_dirs: set[Path] = set()
    for m in batch:
        if not m.recipients:
            raise ValueError(f"message {m.queue_id} has no recipients")
        spool_path = None
        if isinstance(m.body, SpooledBody):
            spool_path = _checked_spool_path(ctx, m, m.body)
            spool_dirs.add(m.body.path.parent)
        else:
            bodies.append((m.queue_id, m.body.data))
        # Column order: _INSERT_MESSAGES, _INSERT_RECIPIENTS.
        messages.append(
            (m.queue_id, m.sender, m.received_at, m.body.size, m.envid, m.ret, m.smtputf8,
             m.body_8bit, m.client, m.auth_user, m.message_id, ctx.node, spool_path, m.held)
        )  # fmt: skip
        held = 1 if m.held else 0
        recipients += [
            (m.queue_id, r.address, r.transport.value, r.domain, r.mailbox, r.original, r.orcpt,
             r.notify, QUEUED, m.received_at, held)
            for r in m.recipients
        ]  # fmt: skip
        if m.events or m.report_for:  # rare: checks' results, DSNs
            events += _enqueue_events(m)
    if spool_dirs:
        _fsync_dirs(spool_dirs)
    try:
        insert_rows(conn, _INSERT_MESSAGES, messages)
    except sqlite3.IntegrityError as exc:
        raise QueueError(f"duplicate queue ID ({exc})") from exc
    insert_rows(conn, _INSERT_RECIPIENTS, recipients)
    insert_rows(conn, _INSERT_BODIES, bodies)
    # No "received" history row: the messages row says when and from whom, and
    # the views derive the event from it (a row fewer on the hot path).
    insert_rows(conn, _INSERT_HISTORIES, events)
    return [None] * len(batch)


def _enqueue_events(m: NewMessage) -> list[tuple[str, float, str, str, str]]:
    rows = [(m.queue_id, m.received_at, "", event, detail) for event, detail in m.events]
    if m.report_for:
        # On the reported message's history (it may have left the queue already).
        to = ", ".join(f"<{r.address}>" for r in m.recipients)
        rows.append((m.report_for, m.received_at, "", "dsn", f"report queued as {m.queue_id} to {to}"))
    return rows


def _fsync_dirs(directories: set[Path]) -> None:
    """Make the spool files' directory entries durable before the COMMIT names them.

    The session fsync'd each file's content; a new file's *name* is durable
    only once its directory is fsync'd too. One fsync per directory per batch.
    """
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def enqueue_one(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, message: NewMessage) -> None:
    enqueue_many(ctx, conn, txn, [message])


_STORED = "SELECT 1 FROM messages WHERE queue_id = ? UNION ALL SELECT 1 FROM completed WHERE queue_id = ?"


def enqueue_unless_stored(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, message: NewMessage) -> None:
    """Enqueue `message` unless it is already here, queued or (delivered since)
    completed: for a request whose transaction may or may not have committed
    before the process running it died (sqlite_enqueue_process.WriterGone)."""
    if conn.execute(_STORED, (message.queue_id, message.queue_id)).fetchone() is None:
        enqueue_many(ctx, conn, txn, [message])


# Messages the enqueue writer delivered before answering, never queued
# (delivery/local_direct.py): per message, the recipients delivered as
# (address, detail), whether none is left to queue, and when.
DirectArgs = Sequence[tuple[NewMessage, Sequence[tuple[str, str]], bool, float]]
_COMPLETED_COLUMNS = "queue_id, message_id, sender, received_at, size, client, completed_at"
_INSERT_COMPLETED = f"INSERT INTO completed ({_COMPLETED_COLUMNS})"


def record_direct(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: DirectArgs) -> None:
    """What the queue keeps of a delivered message: its history (the checks'
    events, each delivery) and, once none of it is left queued, its summary.
    A message with recipients left was enqueued with those, events and all."""
    history: list[tuple[str, float, str, str, str]] = []
    completed = []
    for m, delivered, complete, at in arg:
        if complete:
            history += _enqueue_events(m)
            completed.append((m.queue_id, m.message_id, m.sender, m.received_at, m.body.size, m.client, at))
        history += [(m.queue_id, at, address, "delivered", detail) for address, detail in delivered]
    insert_rows(conn, _INSERT_HISTORIES, history)
    insert_rows(conn, _INSERT_COMPLETED, completed)


# --- claim ---------------------------------------------------------------------

# The message's columns come with each row (a join), not from one more SELECT
# per message: the claim is on the delivery worker's side of the write lock.
_CLAIM_COLUMNS = """
    SELECT r.id, r.queue_id, r.address, r.transport, r.domain, r.mailbox, r.original, r.orcpt,
           r.notify, r.attempts, r.warned,
           m.sender, m.received_at, m.envid, m.ret, m.smtputf8, m.body_8bit, m.size
    FROM recipients r JOIN messages m ON m.queue_id = r.queue_id
"""
# `due_at <= ?` implies `due_at IS NOT NULL`, so SQLite uses the partial indexes.
CLAIM_SQL = _CLAIM_COLUMNS + "WHERE r.due_at <= ? ORDER BY r.due_at LIMIT ?"
CLAIM_BY_TRANSPORT_SQL = _CLAIM_COLUMNS + "WHERE r.transport = ? AND r.due_at <= ? ORDER BY r.due_at LIMIT ?"
_LEASE = """
    UPDATE recipients SET state = 'delivering', lease_owner = ?, lease_token = ?, lease_until = ?
    WHERE id = ?
"""

ClaimArgs = tuple[float, int, float, str, Transport | None, int, int]
_INLINE_BODIES = "SELECT queue_id, data FROM bodies WHERE queue_id IN ({marks})"


def claim_due(
    ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: ClaimArgs
) -> tuple[list[Claim], dict[str, bytes]]:
    """The claims, and the inline bodies of those up to `prefetch` bytes each,
    `prefetch_total` in all (oldest due first): read here, in the claim's
    transaction, the delivery that follows needs no hop to a reader thread
    per message (queue/prefetch.py)."""
    now, limit, lease_seconds, owner, transport, prefetch, prefetch_total = arg
    if limit <= 0:
        return [], {}
    if transport is None:
        rows = conn.execute(CLAIM_SQL, (now, limit)).fetchall()
    else:
        rows = conn.execute(CLAIM_BY_TRANSPORT_SQL, (transport.value, now, limit)).fetchall()
    claims = _lease(conn, rows, now + lease_seconds, owner)
    wanted: list[str] = []
    for claim in claims:
        if claim.size <= min(prefetch, prefetch_total):
            wanted.append(claim.queue_id)
            prefetch_total -= claim.size
    bodies: dict[str, bytes] = {}
    for chunk in _chunks(wanted):
        # Spooled bodies have no `bodies` row: they stay where they are.
        bodies.update(conn.execute(_INLINE_BODIES.format(marks=_marks(len(chunk))), tuple(chunk)))
    return claims, bodies


# The sweep's claim: unfinished, unparked recipients of messages received before
# a cutoff, whatever their next_attempt, unless under a live lease.
_CLAIM_EXPIRED_SQL = (
    _CLAIM_COLUMNS
    + """
    WHERE m.received_at < ? AND r.due_at IS NOT NULL AND (r.state != 'delivering' OR r.lease_until <= ?)
    ORDER BY m.received_at LIMIT ?
"""
)

ClaimExpiredArgs = tuple[float, float, int, float, str]


def claim_expired(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: ClaimExpiredArgs) -> list[Claim]:
    now, received_before, limit, lease_seconds, owner = arg
    if limit <= 0:
        return []
    rows = conn.execute(_CLAIM_EXPIRED_SQL, (received_before, now, limit)).fetchall()
    return _lease(conn, rows, now + lease_seconds, owner)


# Local delivery by the enqueue writer (delivery/local_at_enqueue.py): the local
# recipients of messages inserted in this very transaction, leased before the
# COMMIT makes them visible, so that no delivery loop can claim them first.
# Parked (held) messages and NOTIFY=SUCCESS recipients (they need a DSN, which
# only the delivery loop writes) are left to the loop.
_CLAIM_FRESH_SQL = """
    UPDATE recipients SET state = 'delivering', lease_owner = ?, lease_token = ?, lease_until = ?
    WHERE queue_id IN ({marks}) AND transport = 'local' AND state = 'queued' AND parked = 0
      AND (notify IS NULL OR (notify & 1) = 0)
    RETURNING id, queue_id, address, transport, domain, mailbox, original, orcpt, notify
"""

ClaimFreshArgs = tuple[Sequence[NewMessage], float, str]


def claim_fresh(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: ClaimFreshArgs) -> list[Claim]:
    """Lease to `owner` until `lease_until` the local recipients of `messages`,
    enqueued in this transaction: one statement, the message columns taken from
    the messages themselves rather than read back."""
    messages, lease_until, owner = arg
    token = secrets.token_hex(12)
    by_message: dict[str, list[ClaimedRecipient]] = {}
    for chunk in _chunks([m.queue_id for m in messages]):
        sql = _CLAIM_FRESH_SQL.format(marks=_marks(len(chunk)))
        rows = conn.execute(sql, (owner, token, lease_until, *chunk))
        for rid, qid, address, tr, domain, mailbox, original, orcpt, notify in rows:
            by_message.setdefault(qid, []).append(
                ClaimedRecipient(
                    rid, address, Transport(tr), domain, mailbox, original, orcpt, notify, attempts=0,
                    lease_token=token,
                )
            )  # fmt: skip
    claims = []
    for m in messages:
        if m.queue_id in by_message:
            rcpts = tuple(sorted(by_message[m.queue_id], key=lambda r: r.recipient_id))
            claims.append(
                Claim(
                    m.queue_id, m.sender, m.received_at, m.envid, m.ret, m.smtputf8, m.body_8bit, m.body.size,
                    rcpts, lease_until,
                )
            )  # fmt: skip
    return claims


def _lease(conn: sqlite3.Connection, rows: list[Any], lease_until: float, owner: str) -> list[Claim]:
    """Lease `rows` (_CLAIM_COLUMNS) to `owner` and group them into Claims, in row order."""
    if not rows:
        return []
    # One fresh token per claim: a worker that lost its lease holds an older one.
    token = secrets.token_hex(12)
    conn.executemany(_LEASE, [(owner, token, lease_until, row[0]) for row in rows])
    by_message: dict[str, list[ClaimedRecipient]] = {}
    message_columns: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        rid, qid, address, tr, domain, mailbox, original, orcpt, notify, attempts, warned = row[:11]
        by_message.setdefault(qid, []).append(
            ClaimedRecipient(
                rid, address, Transport(tr), domain, mailbox, original, orcpt, notify, attempts, token,
                bool(warned),
            )
        )  # fmt: skip
        message_columns.setdefault(qid, row[11:])
    claims = []
    for qid, recipients in by_message.items():  # dicts keep the oldest-due-first order
        sender, received_at, envid, ret, smtputf8, body_8bit, size = message_columns[qid]
        claims.append(
            Claim(
                qid, sender, received_at, envid, ret, bool(smtputf8), bool(body_8bit), size,
                tuple(recipients), lease_until,
            )
        )  # fmt: skip
    return claims


NEXT_DUE_SQL = "SELECT MIN(due_at) FROM recipients WHERE due_at IS NOT NULL"
NEXT_DUE_BY_TRANSPORT_SQL = NEXT_DUE_SQL + " AND transport = ?"


def next_due(conn: sqlite3.Connection, transport: Transport | None) -> float | None:
    """Run by the store's Reader, off the writer: a hint for an idle wait."""
    if transport is None:
        row = conn.execute(NEXT_DUE_SQL).fetchone()
    else:
        row = conn.execute(NEXT_DUE_BY_TRANSPORT_SQL, (transport.value,)).fetchone()
    return None if row[0] is None else float(row[0])


# --- record --------------------------------------------------------------------

# Fencing: the WHERE clause is the whole rule. A stale token matches nothing.
_FENCE = "WHERE id = ? AND lease_token = ? AND state = 'delivering' RETURNING queue_id, address"
_CLEAR_LEASE = "lease_owner = NULL, lease_token = NULL, lease_until = NULL"
# Deliveries, the common outcome, in one statement per lease token (a claim's
# recipients share one): a statement per recipient cost the delivery worker
# most of its time under the write lock.
_SET_DELIVERED_MANY = (
    f"UPDATE recipients SET state = 'delivered', attempts = attempts + 1, {_CLEAR_LEASE} "
    "WHERE lease_token = ? AND state = 'delivering' AND id IN ({marks}) RETURNING id, queue_id, address"
)
_SET_DEFERRED = (
    "UPDATE recipients SET state = 'deferred', attempts = attempts + 1, next_attempt = ?, "
    f"last_error = ?, warned = MAX(warned, ?), {_CLEAR_LEASE} {_FENCE}"
)
_SET_FAILED = (
    "UPDATE recipients SET state = 'failed', attempts = attempts + 1, last_error = ?, "
    f"{_CLEAR_LEASE} {_FENCE}"
)
_UNFINISHED = (
    "SELECT DISTINCT queue_id FROM recipients "
    "WHERE queue_id IN ({marks}) AND state NOT IN ('delivered', 'failed')"
)
# Host parameters per statement: far below SQLite's limit (32766 since 3.32).
_CHUNK = 500

RecordArgs = tuple[Sequence[RecipientOutcome], Sequence[NewMessage]]


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def record(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: RecordArgs) -> list[str]:
    outcomes, follow_ups = arg
    applied = _apply_deliveries(conn, [o for o in outcomes if isinstance(o.outcome, Delivered)])
    touched: dict[str, float] = {}  # message ID → its latest outcome's time, in first-seen order
    history = []
    for o in outcomes:  # in the caller's order, so that history reads as it happened
        result = o.outcome
        if isinstance(result, Delivered):
            event, detail = "delivered", result.detail
            row = applied.pop(o.recipient_id, None)
        else:
            if isinstance(result, Deferred):
                event, detail = "deferred", result.reason
                params = (result.retry_at, result.reason, result.warned, o.recipient_id, o.lease_token)
                rows = conn.execute(_SET_DEFERRED, params).fetchall()
            else:
                event, detail = "failed", result.reason
                rows = conn.execute(_SET_FAILED, (result.reason, o.recipient_id, o.lease_token)).fetchall()
            row = rows[0] if rows else None
        if row is None:
            log.info("queue: outcome for recipient %d ignored: lease lost", o.recipient_id)
            continue
        qid, address = row
        touched[qid] = max(touched.get(qid, o.at), o.at)
        history.append((qid, o.at, address, event, detail))
    insert_rows(conn, _INSERT_HISTORIES, history)
    if follow_ups:
        enqueue_many(ctx, conn, txn, list(follow_ups))
    unfinished: set[str] = set()
    for chunk in _chunks(list(touched)):
        unfinished.update(r[0] for r in conn.execute(_UNFINISHED.format(marks=_marks(len(chunk))), chunk))
    completed = [qid for qid in touched if qid not in unfinished]
    remove_messages(ctx, conn, txn, [(qid, touched[qid]) for qid in completed])
    return completed


def _apply_deliveries(
    conn: sqlite3.Connection, outcomes: list[RecipientOutcome]
) -> dict[int, tuple[str, str]]:
    """Mark fenced recipients delivered: recipient id → (queue ID, address) for each applied."""
    by_token: dict[str, list[int]] = {}
    for o in outcomes:
        by_token.setdefault(o.lease_token, []).append(o.recipient_id)
    applied: dict[int, tuple[str, str]] = {}
    for token, ids in by_token.items():
        for chunk in _chunks(ids):
            sql = _SET_DELIVERED_MANY.format(marks=_marks(len(chunk)))
            for rid, qid, address in conn.execute(sql, (token, *chunk)):
                applied[rid] = (qid, address)
    return applied


_KEEP_SUMMARY = f"""
    {_INSERT_COMPLETED}
    SELECT queue_id, message_id, sender, received_at, size, client, ? FROM messages WHERE queue_id = ?
"""


def remove_messages(
    ctx: Ctx, conn: sqlite3.Connection, txn: Txn, removals: Sequence[tuple[str, float]]
) -> set[str]:
    """Delete messages' rows (queue ID, time of removal), keeping a summary and their
    history for `trace`; body files go after the commit. Returns the IDs found."""
    found: set[str] = set()
    for chunk in _chunks(removals):
        marks = _marks(len(chunk))
        ids = [qid for qid, _ in chunk]
        rows = conn.execute(f"SELECT queue_id, spool_path FROM messages WHERE queue_id IN ({marks})", ids)
        for qid, spool_path in rows.fetchall():
            found.add(qid)
            if spool_path is not None:
                txn.after_commit.append(partial((ctx.spool_dir / spool_path).unlink, missing_ok=True))
        conn.executemany(_KEEP_SUMMARY, [(at, qid) for qid, at in chunk if qid in found])
        for table in ("recipients", "bodies", "messages"):
            conn.execute(f"DELETE FROM {table} WHERE queue_id IN ({marks})", ids)
    return found


# A released recipient waits again in the state it was claimed from.
_UNLEASE = (
    f"UPDATE recipients SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END, {_CLEAR_LEASE}"
)
# ... and is due at once (`next_attempt` never moves later).
_UNLEASE_DUE = f"{_UNLEASE}, next_attempt = MIN(next_attempt, ?)"

_RELEASE_OWNER = f"{_UNLEASE} WHERE lease_owner IS NOT NULL AND lease_owner = ? AND state = 'delivering'"


def release_leases(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, owner: str) -> int:
    """A restarted worker gives back what its dead predecessor (same owner) claimed."""
    return conn.execute(_RELEASE_OWNER, (owner,)).rowcount


_GIVE_BACK = f"{_UNLEASE_DUE} WHERE id = ? AND lease_token = ? AND state = 'delivering'"


GiveBackArgs = tuple[Sequence[tuple[int, str]], float]


def give_back(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: GiveBackArgs) -> int:
    """Release single leases (recipient id, token), due at `now`: work a holder
    hands to the delivery loop instead of recording an outcome. Fenced like record."""
    leases, now = arg
    return sum(conn.execute(_GIVE_BACK, (now, rid, token)).rowcount for rid, token in leases)


# Renewal, fenced like record: only rows still delivering under the very token
# and owner the worker holds are extended. ONE statement for all of an owner's
# claims (the pairs travel as one JSON array; `id` is the rowid, so each is a
# primary-key lookup); the ids not renewed are worked out here, on the writer.
_RENEW = """
    UPDATE recipients SET lease_until = MAX(lease_until, ?)
    FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS token
          FROM json_each(?)) AS held
    WHERE recipients.id = held.id AND recipients.lease_token = held.token
      AND recipients.lease_owner = ? AND recipients.state = 'delivering'
    RETURNING recipients.id
"""

RenewArgs = tuple[str, tuple[tuple[int, str], ...], float]


def renew_leases(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: RenewArgs) -> list[int]:
    """Extend the leases `owner` still holds; returns the recipient ids it lost."""
    owner, leases, until = arg
    if not leases:
        return []
    renewed = {row[0] for row in conn.execute(_RENEW, (until, json.dumps(leases), owner)).fetchall()}
    return [rid for rid, _token in leases if rid not in renewed]


_EXPIRED_LEASES = (
    "SELECT id, queue_id, address, lease_owner FROM recipients "
    "WHERE lease_owner IS NOT NULL AND lease_until <= ? AND state = 'delivering'"
)
_RELEASE_ONE = f"{_UNLEASE_DUE} WHERE id = ?"


def release_expired_leases(
    ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: tuple[float, float]
) -> list[tuple[str, str, str]]:
    """The sweep: give back claims whose lease ended before `expired_before` (their
    worker died or hangs), due at `now`. Returns (queue_id, address, owner) of each."""
    now, expired_before = arg
    rows = conn.execute(_EXPIRED_LEASES, (expired_before,)).fetchall()
    conn.executemany(_RELEASE_ONE, [(now, rid) for rid, _q, _a, _o in rows])
    conn.executemany(
        INSERT_HISTORY,
        [(qid, now, address, "released", f"lease of {owner} expired") for _r, qid, address, owner in rows],
    )
    return [(str(q), str(a), str(o)) for _r, q, a, o in rows]


# Per-destination backoff: every waiting recipient of a destination waits until
# `until` at least. Leased rows are left alone (their worker will record them).
_DEFER_DOMAIN = """
    UPDATE recipients SET state = 'deferred', next_attempt = ?, last_error = ?
    WHERE transport = ? AND domain = ? AND due_at IS NOT NULL AND due_at < ?
      AND state IN ('queued', 'deferred')
"""
_DEFER_TRANSPORT = """
    UPDATE recipients SET state = 'deferred', next_attempt = ?, last_error = ?
    WHERE transport = ? AND due_at IS NOT NULL AND due_at < ? AND state IN ('queued', 'deferred')
"""

DeferArgs = tuple[Transport, str | None, float, str]


def defer_destination(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: DeferArgs) -> int:
    """Push the next attempt of every waiting recipient of `domain` (None: of the
    whole transport, e.g. a dead smarthost) to `until`. Not an attempt: the
    attempt count is unchanged. Returns how many recipients moved."""
    transport, domain, until, reason = arg
    if domain is None:
        return conn.execute(_DEFER_TRANSPORT, (until, reason, transport.value, until)).rowcount
    return conn.execute(_DEFER_DOMAIN, (until, reason, transport.value, domain, until)).rowcount
