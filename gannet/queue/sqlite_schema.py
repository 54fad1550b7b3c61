"""The SQLite queue's on-disk format: connection settings, tables, migrations.

Owns: the DDL and `PRAGMA user_version`. Called only by the writer thread of
`gannet.queue.sqlite` (through `connect` and `migrate`); nobody else opens the
database file.

Durability settings (per connection): `journal_mode=WAL` (readers never block
the writer, a commit is one sequential append) and `synchronous=FULL` (the
WAL is fsync'd at every COMMIT, so a committed enqueue survives power loss).

Tables (schema version 3; version 2 added `recipients.warned` and indexes,
version 3 the `completed` table and kept history):

  messages    one row per queued message (WITHOUT ROWID, keyed by queue_id).
              `spool_path` is the body file relative to the spool directory,
              or NULL when the body is a row in `bodies`. `held` and
              `quarantined` are the message-level flags.
  bodies      (queue_id, data BLOB): in-memory bodies, written in the same
              transaction as the message. Separate from `messages` so that
              scanning messages does not drag 4 KiB pages along.
  recipients  one row per recipient, INTEGER id (= ClaimedRecipient.recipient_id).
              `state` is a RecipientState value. `parked` mirrors
              "message held or quarantined" so that claiming needs no join.
              `due_at` is a generated column: when the recipient can next be
              claimed (next_attempt while queued/deferred, lease_until while
              delivering, NULL when final or parked). The partial indexes on
              `due_at` hold only claimable rows, so claim_due and next_due
              stay index range scans however many rows are final or far off.
  history     events per message (delivered, deferred, held, …). Kept when
              the message leaves the queue, until `prune_history` (the sweep,
              after `[queue] keep_history`). The "received" event is not
              stored: it is derived from messages (or completed).
  completed   one row per message that left the queue (all recipients final,
              or deleted): what `gannet trace` shows of it once its messages
              row is gone. Written in the transaction that removes the
              message; deleted with its history rows by `prune_history`.

Invariants the store keeps: every recipient and body row has a messages row;
a message with a spool_path owns exactly that file; `lease_token` is non-NULL
only while `state = 'delivering'`.

Migrations: MIGRATIONS[n] takes a database from version n to n+1; a database
newer than this code is refused (QueueError), never downgraded.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gannet.queue.model import QueueError

_V1 = (
    """
    CREATE TABLE messages (
        queue_id     TEXT PRIMARY KEY,
        sender       TEXT NOT NULL,
        received_at  REAL NOT NULL,
        size         INTEGER NOT NULL,
        envid        TEXT,
        ret          TEXT,
        smtputf8     INTEGER NOT NULL,
        body_8bit    INTEGER NOT NULL,
        client       TEXT NOT NULL,
        auth_user    TEXT NOT NULL,
        message_id   TEXT NOT NULL,
        node         TEXT NOT NULL,
        spool_path   TEXT,
        held         INTEGER NOT NULL DEFAULT 0,
        quarantined  INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE bodies (
        queue_id  TEXT PRIMARY KEY,
        data      BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE recipients (
        id            INTEGER PRIMARY KEY,
        queue_id      TEXT NOT NULL,
        address       TEXT NOT NULL,
        transport     TEXT NOT NULL,
        domain        TEXT NOT NULL,
        mailbox       TEXT NOT NULL,
        original      TEXT NOT NULL,
        orcpt         TEXT,
        notify        INTEGER,
        state         TEXT NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        next_attempt  REAL NOT NULL,
        last_error    TEXT NOT NULL DEFAULT '',
        lease_owner   TEXT,
        lease_token   TEXT,
        lease_until   REAL,
        parked        INTEGER NOT NULL DEFAULT 0,
        due_at        REAL GENERATED ALWAYS AS (
            CASE
                WHEN parked THEN NULL
                WHEN state IN ('queued', 'deferred') THEN next_attempt
                WHEN state = 'delivering' THEN lease_until
            END
        ) VIRTUAL
    )
    """,
    "CREATE INDEX recipients_by_message ON recipients (queue_id)",
    "CREATE INDEX recipients_due ON recipients (due_at) WHERE due_at IS NOT NULL",
    """
    CREATE INDEX recipients_due_by_transport ON recipients (transport, due_at)
        WHERE due_at IS NOT NULL
    """,
    """
    CREATE TABLE history (
        id         INTEGER PRIMARY KEY,
        queue_id   TEXT NOT NULL,
        at         REAL NOT NULL,
        recipient  TEXT NOT NULL,
        event      TEXT NOT NULL,
        detail     TEXT NOT NULL
    )
    """,
    "CREATE INDEX history_by_message ON history (queue_id)",
)

# Version 2 (relaying): `warned` (a delay DSN was sent for this recipient);
# indexes for per-destination backoff (defer_destination), for the expiry
# sweep (claim_expired, by message age) and for leases.
_V2 = (
    "ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0",
    """
    CREATE INDEX recipients_due_by_domain ON recipients (transport, domain, due_at)
        WHERE due_at IS NOT NULL
    """,
    "CREATE INDEX messages_by_age ON messages (received_at)",
    # Only leased rows (a few hundred), so that releasing a worker's leases and
    # the sweep's search for expired ones never scan a deep deferred queue.
    "CREATE INDEX recipients_leased ON recipients (lease_until) WHERE lease_owner IS NOT NULL",
)

# Version 3 (queue tools): history outlives the message. `completed` keeps the
# envelope summary; lookups by Message-ID for `gannet trace` (both tables), and
# by completion time for pruning. Indexing messages.message_id costs the accept
# path one more b-tree insert per message (measured: writer CPU per enqueued
# message 72.9 µs before, 72.2 µs after, three runs each of
# tests/unit/queue/bench_group_commit.py; bench/accept.py unchanged within its
# noise); the alternative, a full scan on the writer thread, would stall every
# session while a postmaster traces.
_V3 = (
    """
    CREATE TABLE completed (
        queue_id      TEXT PRIMARY KEY,
        message_id    TEXT NOT NULL,
        sender        TEXT NOT NULL,
        received_at   REAL NOT NULL,
        size          INTEGER NOT NULL,
        client        TEXT NOT NULL,
        completed_at  REAL NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX completed_by_message_id ON completed (message_id)",
    "CREATE INDEX completed_by_time ON completed (completed_at)",
    "CREATE INDEX messages_by_message_id ON messages (message_id)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path) -> sqlite3.Connection:
    """Open the database with the durability settings above.

    Autocommit mode (isolation_level=None): the writer issues BEGIN/COMMIT
    itself, so that a whole batch of requests is one transaction.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True, cached_statements=256)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise QueueError(f"{path}: cannot use WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")  # another process (CLI) may hold the lock
        conn.execute("PRAGMA cache_size=-32768")  # 32 MiB
        conn.execute("PRAGMA temp_store=MEMORY")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION inside the caller's transaction.

    Returns the version found before migrating (0 = a new database).
    """
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise QueueError(
            f"queue database has schema version {found}; this Gannet knows up to "
            f"{SCHEMA_VERSION} (was it written by a newer version?)"
        )
    for version in range(found, SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    if found != SCHEMA_VERSION:
        # PRAGMA takes no parameters; the value is our own integer.
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return found
