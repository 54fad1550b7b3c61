"""The SQLite store's read-only views for `gannet queue list/show`, `gannet trace`
and the admin API.

Owns: the SELECTs that build QueuedMessageView and TraceEvent lists. Called only by the writer
thread (sqlite_writer) through SqliteStore.list_messages/get_message, inside
the writer's transaction, so a view never shows uncommitted work to anyone
before the batch that contains it has committed.

A recipient's `state` is the stored one (a held message's recipients keep
theirs; `QueuedMessageView.held` says the message is held). `next_attempt` is
shown only for queued/deferred recipients.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from gannet.queue.model import NoSuchMessage, QueuedMessageView, QueueFilter, TraceEvent
from gannet.queue.sqlite_ops import Ctx
from gannet.queue.sqlite_writer import Txn
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
_RECIPIENT_VIEW = f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = ? ORDER BY id"
_HISTORY_VIEW = "SELECT at, recipient, event, detail FROM history WHERE queue_id = ? ORDER BY at, id"


def _view(conn: sqlite3.Connection, row: tuple[Any, ...], history: bool) -> QueuedMessageView:
    qid = row[0]
    events = conn.execute(_HISTORY_VIEW, (qid,)).fetchall() if history else None
    return message_view(row, conn.execute(_RECIPIENT_VIEW, (qid,)).fetchall(), events)


def list_messages(
    ctx: Ctx, conn: sqlite3.Connection, txn: Txn, f: QueueFilter | None
) -> list[QueuedMessageView]:
    where, params = filter_where(f or QueueFilter(), "?")
    sql = _MESSAGE_VIEW + where + " ORDER BY m.received_at, m.queue_id"
    if f is not None and f.limit is not None:
        sql += " LIMIT ?"
        params.append(f.limit)
    return [_view(conn, row, history=False) for row in conn.execute(sql, params).fetchall()]


def get_message(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, queue_id: str) -> QueuedMessageView:
    row = conn.execute(_MESSAGE_VIEW + " WHERE queue_id = ?", (queue_id,)).fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    return _view(conn, row, history=True)


# --- trace ---------------------------------------------------------------------

_TRACE_IN_QUEUE = f"""
    SELECT {TRACE_COLUMNS}, NULL FROM messages WHERE queue_id = ? OR message_id IN (?, ?)
"""
_TRACE_COMPLETED = f"""
    SELECT {TRACE_COLUMNS}, completed_at FROM completed WHERE queue_id = ? OR message_id IN (?, ?)
"""
_TRACE_HISTORY = "SELECT at, recipient, event, detail, id FROM history WHERE queue_id = ?"


def trace(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, key: str) -> list[TraceEvent]:
    """Events of the messages `key` names (store.py "History and trace")."""
    keys = trace_keys(key)
    if keys is None:
        return []
    found = conn.execute(_TRACE_IN_QUEUE, keys).fetchall()
    found += conn.execute(_TRACE_COMPLETED, keys).fetchall()
    history = {row[0]: conn.execute(_TRACE_HISTORY, (row[0],)).fetchall() for row in found}
    return trace_events(found, history)
