"""Rows into views: the shapes both stores' reads share (`queue list/show`, `trace`).

Pure functions over the rows the stores' SELECTs return (same column order in
both: `MESSAGE_COLUMNS`, `RECIPIENT_COLUMNS`, `TRACE_COLUMNS`), so that SQLite
and PostgreSQL show a message, its history and its trace identically; and the
WHERE clause of a list filter, as text, so that both select the same messages.
Never runs SQL and never touches a connection: the stores fetch, this shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gannet.queue.model import (
    HistoryEntry,
    QueuedMessageView,
    QueueFilter,
    RecipientState,
    RecipientView,
    TraceEvent,
)

MESSAGE_COLUMNS = (
    "queue_id, sender, size, received_at, held, client, auth_user, message_id, envid, ret, quarantined"
)
RECIPIENT_COLUMNS = "id, address, state, attempts, next_attempt, last_error, original"
# Of `messages` (completed_at NULL) or `completed`; then history rows (at, recipient, event, detail, id).
TRACE_COLUMNS = "queue_id, received_at, sender, size, client, message_id"

_WAITING = (RecipientState.QUEUED.value, RecipientState.DEFERRED.value)


def filter_where(f: QueueFilter, mark: str) -> tuple[str, list[object]]:
    """` WHERE …` over `messages m` (or "") and its parameters; `mark` is the
    driver's placeholder ("?" for sqlite3, "%s" for psycopg). Written in SQL both
    dialects read alike: lower() for case-insensitive addresses (ASCII in SQLite,
    as COLLATE NOCASE is), a row comparison for keyset paging in list order."""
    clauses: list[str] = []
    params: list[object] = []

    def where(clause: str, *values: object) -> None:
        clauses.append(clause.replace("?", mark))
        params.extend(values)

    some_recipient = "EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND {})"
    if f.sender is not None:
        where("lower(m.sender) = lower(?)", f.sender)
    if f.recipient is not None:
        where(some_recipient.format("lower(r.address) = lower(?)"), f.recipient)
    if f.domain is not None:
        where(some_recipient.format("r.domain = ?"), f.domain.lower())
    if f.state is not None:
        where(some_recipient.format("r.state = ?"), f.state.value)
    if f.held is not None:
        where("m.held = ?", f.held)
    if f.quarantined is not None:
        where("m.quarantined = ?", f.quarantined)
    if f.older_than is not None:
        where("m.received_at < ?", f.older_than)
    if f.newer_than is not None:
        where("m.received_at >= ?", f.newer_than)
    if f.after is not None:
        where("(m.received_at, m.queue_id) > (?, ?)", f.after[0], f.after[1])
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def recipient_view(row: Sequence[Any]) -> RecipientView:
    rid, address, state, attempts, next_attempt, last_error, original = row
    # next_attempt means something only while the recipient waits for it.
    waiting = next_attempt if state in _WAITING else None
    return RecipientView(rid, address, RecipientState(state), attempts, waiting, last_error, original)


def message_view(
    row: Sequence[Any],
    recipients: Iterable[Sequence[Any]],
    history: Iterable[Sequence[Any]] | None = None,
) -> QueuedMessageView:
    """`row` in MESSAGE_COLUMNS order; `history` rows (at, recipient, event, detail), or None
    for a list view (no history)."""
    qid, sender, size, received_at, held, client, auth_user, message_id, envid, ret, quar = row
    events: tuple[HistoryEntry, ...] = ()
    if history is not None:
        queued = HistoryEntry(received_at, "", "queued", client)  # derived, not stored
        events = (queued, *(HistoryEntry(*h) for h in history))
    return QueuedMessageView(
        qid, sender, size, received_at, bool(held), tuple(recipient_view(r) for r in recipients),
        client, auth_user, message_id, envid, ret, events, bool(quar),
    )  # fmt: skip


def trace_keys(key: str) -> tuple[str, str, str] | None:
    """(queue ID as given, bare Message-ID, <Message-ID>) for a trace key, or None for an
    empty one (which must not mean "every message without a Message-ID")."""
    key = key.strip()
    bare = key[1:-1] if key.startswith("<") and key.endswith(">") else key
    return (key, bare, f"<{bare}>") if bare else None


def trace_events(
    found: Iterable[Sequence[Any]], history: Mapping[str, Iterable[Sequence[Any]]]
) -> list[TraceEvent]:
    """The timeline (store.py "History and trace"). `found`: rows in TRACE_COLUMNS order plus
    completed_at (None while queued); `history`: queue ID → (at, recipient, event, detail, id)."""
    # (time, recording order, event): "received" first and "completed" last among equal times.
    keyed: list[tuple[float, float, TraceEvent]] = []
    for qid, received_at, sender, size, client, message_id, completed_at in found:
        detail = f"from=<{sender}> size={size} client={client}"
        if message_id:
            detail += f" message-id={message_id}"
        keyed.append((received_at, -1.0, TraceEvent(received_at, qid, "", "received", detail)))
        deleted = False
        for at, recipient, event, text, row_id in history.get(qid, ()):
            keyed.append((at, float(row_id), TraceEvent(at, qid, recipient, event, text)))
            deleted = deleted or event == "deleted"
        if completed_at is not None and not deleted:
            keyed.append((completed_at, math.inf, TraceEvent(completed_at, qid, "", "completed", "")))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [event for _at, _order, event in keyed]
