"""The SQLite store's open-time work and body reading: schema, crash recovery.

Owns: what `SqliteStore.open()` does inside its first transaction (migrate,
remove unacknowledged spool files, quarantine messages whose body file is
gone) and the checks on a spooled body file. Called only by the writer thread
(sqlite_writer) through SqliteStore, except `body_file_problem`, which the
store also runs in an executor after reading a file.

Invariant restored by recovery: every file in the spool directory is named by
exactly one message, and every message's body can be read — or the message
is quarantined (kept, never claimed, never deleted by the store, logged).
Recovery never makes open() fail.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from gannet.queue.model import NoSuchMessage
from gannet.queue.sqlite_admin_ops import quarantine
from gannet.queue.sqlite_ops import Ctx
from gannet.queue.sqlite_schema import migrate
from gannet.queue.sqlite_writer import Txn

log = logging.getLogger("gannet.queue")


def body_source(conn: sqlite3.Connection, ctx: Ctx, queue_id: str) -> bytes | tuple[Path, int]:
    """The inline body, or (file path, expected size) to be read off the writer thread."""
    row = conn.execute(
        "SELECT m.spool_path, m.size, b.data FROM messages m "
        "LEFT JOIN bodies b ON b.queue_id = m.queue_id WHERE m.queue_id = ?",
        (queue_id,),
    ).fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    spool_path, size, data = row
    if spool_path is None:
        return bytes(data)
    return ctx.spool_dir / spool_path, int(size)


def body_file(conn: sqlite3.Connection, ctx: Ctx, queue_id: str) -> Path | None:
    """The spool file of a spooled body, or None for an inline one (not read)."""
    row = conn.execute("SELECT spool_path FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    if row is None:
        raise NoSuchMessage(queue_id)
    return None if row[0] is None else ctx.spool_dir / row[0]


def body_file_problem(path: Path, size: int) -> str | None:
    """Why a body file is unusable (missing, unreadable, wrong size), or None."""
    try:
        with open(path, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR):
            return f"body file {path}: {exc.strerror}"
        raise  # EIO, EMFILE…: not the message's fault; do not quarantine for it
    if actual != size:
        return f"body file {path} has {actual} bytes, {size} were stored"
    return None


@dataclass(frozen=True, slots=True)
class Recovery:
    schema_found: int
    removed_files: tuple[str, ...]
    quarantined: tuple[str, ...]
    released_leases: int = 0


# Back to the state before the claim; next_attempt is unchanged (it was due
# when claimed), so the recipient is claimable at once.
_RELEASE_LEASES = """
    UPDATE recipients SET
        state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
        lease_owner = NULL, lease_token = NULL, lease_until = NULL
    WHERE lease_owner IS NOT NULL AND state = 'delivering'
"""


def open_store(ctx: Ctx, conn: sqlite3.Connection, txn: Txn, flags: tuple[bool, bool]) -> Recovery:
    """Create or migrate the schema, then (if `recover`) tidy up after a crash:

    - a file in the spool directory that no message names belonged to a
      message that was never acknowledged (the crash came before its COMMIT):
      it is removed;
    - a message whose body file is missing, unreadable or of the wrong size is
      quarantined (kept, never claimed, logged) — open() never fails for it;
    - every lease is released: the opener with `recover` is the one process
      that delivers from this database, so whoever held a lease before is
      dead (its recipients would otherwise wait `lease_seconds` for nothing).
      A late outcome from the dead holder is fenced off like any stale one.
    """
    recover, release_leases = flags
    found = migrate(conn)
    if not recover:
        return Recovery(found, (), ())
    named = {
        path: (qid, size, bool(quarantined))
        for qid, path, size, quarantined in conn.execute(
            "SELECT queue_id, spool_path, size, quarantined FROM messages WHERE spool_path IS NOT NULL"
        )
    }
    removed = _remove_unnamed_files(ctx.spool_dir, named)
    quarantined = []
    for path, (qid, size, already) in named.items():
        if already:
            continue
        try:
            problem = body_file_problem(ctx.spool_dir / path, size)
        except OSError as exc:  # EIO, EMFILE…: not proof the body is bad; look next time
            log.error("queue: cannot check the body file of %s: %s", qid, exc)
            continue
        if problem is not None:
            quarantine(ctx, conn, txn, (qid, problem, ctx.clock()))
            quarantined.append(qid)
    released = conn.execute(_RELEASE_LEASES).rowcount if release_leases else 0
    return Recovery(found, tuple(removed), tuple(quarantined), released)


def _remove_unnamed_files(spool_dir: Path, named: Container[str]) -> list[str]:
    spool_dir.mkdir(parents=True, exist_ok=True)
    removed = []
    for root, _dirs, files in os.walk(spool_dir):
        for name in files:
            path = Path(root, name)
            relative = str(path.relative_to(spool_dir))
            if relative in named:
                continue
            try:
                path.unlink()
            except OSError as exc:  # not fatal: it is only litter
                log.warning("queue: cannot remove leftover spool file %s: %s", path, exc)
                continue
            log.info("queue: removed unacknowledged spool file %s", path)
            removed.append(relative)
    return removed
