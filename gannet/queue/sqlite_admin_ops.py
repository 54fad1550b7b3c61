"""The SQLite store's postmaster actions on one message or the whole queue:
hold, release, retry, delete, quarantine, and forgetting old history.

Same rules as sqlite_ops (split from it to keep each module to one concern):
plain functions `op(ctx, conn, txn, arg)` run by the writer inside its
transaction; never begin, commit or roll back; times arrive as arguments.
"""

from __future__ import annotations

import logging
import sqlite3

from gannet.queue.model import NoSuchMessage
from gannet.queue.sqlite_ops import INSERT_HISTORY, Ctx, remove_messages
from gannet.queue.sqlite_writer import Txn

log = logging.getLogger("gannet.queue")


def _flags(conn: sqlite3.Connection, queue_id: str) -> tuple[bool, bool]:
    row = conn.execute("SELECT held, quarantined FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    return bool(row[0]), bool(row[1])


def _set_held(conn: sqlite3.Connection, queue_id: str, held: bool, quarantined: bool) -> None:
    conn.execute("UPDATE messages SET held = ? WHERE queue_id = ?", (held, queue_id))
    conn.execute("UPDATE recipients SET parked = ? WHERE queue_id = ?", (held or quarantined, queue_id))


def hold(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: tuple[str, float]) -> None:
    queue_id, now = arg
    held, quarantined = _flags(conn, queue_id)
    if not held:
        _set_held(conn, queue_id, True, quarantined)
        conn.execute(INSERT_HISTORY, (queue_id, now, "", "held", ""))


def release(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: tuple[str, float]) -> None:
    queue_id, now = arg
    held, quarantined = _flags(conn, queue_id)
    if held:
        _set_held(conn, queue_id, False, quarantined)
        conn.execute(INSERT_HISTORY, (queue_id, now, "", "released", ""))


def retry(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: tuple[str | None, float]) -> int:
    queue_id, now = arg
    sql = "UPDATE recipients SET next_attempt = MIN(next_attempt, ?) WHERE state = 'deferred'"
    if queue_id is None:
        rows = conn.execute(sql + " RETURNING queue_id", (now,)).fetchall()
    else:
        _flags(conn, queue_id)
        rows = conn.execute(sql + " AND queue_id = ? RETURNING queue_id", (now, queue_id)).fetchall()
    messages = dict.fromkeys(row[0] for row in rows)
    conn.executemany(INSERT_HISTORY, [(qid, now, "", "retry", "") for qid in messages])
    return len(rows)


def delete(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: tuple[str, float]) -> None:
    queue_id, now = arg
    if not remove_messages(ctx, conn, txn, [(queue_id, now)]):
        raise NoSuchMessage(queue_id)
    conn.execute(INSERT_HISTORY, (queue_id, now, "", "deleted", ""))


_PRUNABLE = "SELECT queue_id FROM completed WHERE completed_at < ? ORDER BY completed_at LIMIT ?"


def prune_history(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: tuple[float, int]) -> int:
    """Forget up to `limit` messages that left the queue before `before`."""
    before, limit = arg
    ids = [(row[0],) for row in conn.execute(_PRUNABLE, (before, limit)).fetchall()]
    conn.executemany("DELETE FROM history WHERE queue_id = ?", ids)
    conn.executemany("DELETE FROM completed WHERE queue_id = ?", ids)
    return len(ids)


def quarantine(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, arg: tuple[str, str, float]) -> None:
    """Park a message whose body cannot be read: never claimed, never deleted here."""
    queue_id, reason, at = arg
    _held, quarantined = _flags(conn, queue_id)
    if quarantined:
        return
    conn.execute("UPDATE messages SET quarantined = 1 WHERE queue_id = ?", (queue_id,))
    conn.execute("UPDATE recipients SET parked = 1 WHERE queue_id = ?", (queue_id,))
    conn.execute(INSERT_HISTORY, (queue_id, at, "", "quarantined", reason))
    log.error("queue: %s quarantined: %s", queue_id, reason)
