"""The PostgreSQL queue's format: tables, indexes, versioned migrations.

Owns: the DDL and the `schema_version` table. Called by `PostgresStore.open()`
and by `gannet db migrate` (both through `migrate`); nothing else creates or
alters the tables. It must never drop data: a migration only adds.

Tables (schema version 1); times are POSIX seconds in `double precision`,
as the store is handed them (the same values SQLite keeps as REAL):

  messages    one row per queued message, keyed by queue_id. `node` is the
              node that accepted it. `held` and `quarantined` are the
              message-level flags.
  bodies      (queue_id, seq, data bytea): the content, for every message,
              inline or spooled alike, so that any node can deliver any
              message. Small bodies are one row (seq 0); large ones are cut into
              CHUNK-sized rows, so that no single value nears bytea's 1 GB limit
              and a TOAST value stays modest. (Large objects were the other
              choice: they need their own cleanup (lo_unlink) on every delete,
              and are not removed with the rows that name them.)
  recipients  one row per recipient, bigint identity `id` (= recipient_id).
              `parked` mirrors "message held or quarantined"; `due_at` is a
              stored generated column: next_attempt while queued/deferred,
              lease_until while delivering, NULL when final or parked. The
              partial indexes on it hold only claimable rows, so claims and
              next_due stay index scans however deep the deferred queue.
  history     events per message (delivered, deferred, held, …); kept after
              the message leaves the queue, until prune_history.
  completed   the summary of each message that left the queue (for trace).
  schema_version  one row per applied version (the current one is the max).

Every text key uses COLLATE "C": byte order, the cheapest comparison, and
the order Crockford-base32 queue IDs sort in.

Concurrency: `migrate` takes a transaction-scoped advisory lock first, so
nodes that start together migrate one after the other; the second finds the
work done. A database newer than this code is refused (QueueError).
"""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gannet.queue.model import QueueError

CHUNK = 1024 * 1024  # bytes per bodies row of a large message

# pg_advisory_xact_lock key for migrations: "gannet" in ASCII. Database-wide
# (two queues in two schemas of one database migrate in turn: harmless).
MIGRATE_LOCK = 0x67616E6E6574

_V1 = (
    """
    CREATE TABLE messages (
        queue_id     text COLLATE "C" PRIMARY KEY,
        sender       text NOT NULL,
        received_at  double precision NOT NULL,
        size         bigint NOT NULL,
        envid        text,
        ret          text,
        smtputf8     boolean NOT NULL,
        body_8bit    boolean NOT NULL,
        client       text NOT NULL,
        auth_user    text NOT NULL,
        message_id   text NOT NULL,
        node         text NOT NULL,
        held         boolean NOT NULL DEFAULT false,
        quarantined  boolean NOT NULL DEFAULT false
    )
    """,
    "CREATE INDEX messages_by_age ON messages (received_at)",
    "CREATE INDEX messages_by_message_id ON messages (message_id)",
    """
    CREATE TABLE bodies (
        queue_id  text COLLATE "C" NOT NULL,
        seq       integer NOT NULL,
        data      bytea NOT NULL,
        PRIMARY KEY (queue_id, seq)
    )
    """,
    """
    CREATE TABLE recipients (
        id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        queue_id      text COLLATE "C" NOT NULL,
        address       text NOT NULL,
        transport     text COLLATE "C" NOT NULL,
        domain        text NOT NULL,
        mailbox       text NOT NULL,
        original      text NOT NULL,
        orcpt         text,
        notify        integer,
        state         text COLLATE "C" NOT NULL,
        attempts      integer NOT NULL DEFAULT 0,
        next_attempt  double precision NOT NULL,
        last_error    text NOT NULL DEFAULT '',
        lease_owner   text,
        lease_token   text COLLATE "C",
        lease_until   double precision,
        parked        boolean NOT NULL DEFAULT false,
        warned        boolean NOT NULL DEFAULT false,
        due_at        double precision GENERATED ALWAYS AS (
            CASE
                WHEN parked THEN NULL
                WHEN state IN ('queued', 'deferred') THEN next_attempt
                WHEN state = 'delivering' THEN lease_until
            END
        ) STORED
    )
    """,
    "CREATE INDEX recipients_by_message ON recipients (queue_id)",
    "CREATE INDEX recipients_due ON recipients (due_at) WHERE due_at IS NOT NULL",
    "CREATE INDEX recipients_due_by_transport ON recipients (transport, due_at) WHERE due_at IS NOT NULL",
    """
    CREATE INDEX recipients_due_by_domain ON recipients (transport, domain, due_at)
        WHERE due_at IS NOT NULL
    """,
    # Only leased rows (a few hundred): releasing an owner's leases and finding
    # expired ones never scan a deep deferred queue.
    "CREATE INDEX recipients_leased ON recipients (lease_until) WHERE lease_owner IS NOT NULL",
    """
    CREATE TABLE history (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        queue_id   text COLLATE "C" NOT NULL,
        at         double precision NOT NULL,
        recipient  text NOT NULL,
        event      text NOT NULL,
        detail     text NOT NULL
    )
    """,
    "CREATE INDEX history_by_message ON history (queue_id)",
    """
    CREATE TABLE completed (
        queue_id      text COLLATE "C" PRIMARY KEY,
        message_id    text NOT NULL,
        sender        text NOT NULL,
        received_at   double precision NOT NULL,
        size          bigint NOT NULL,
        client        text NOT NULL,
        completed_at  double precision NOT NULL
    )
    """,
    "CREATE INDEX completed_by_message_id ON completed (message_id)",
    "CREATE INDEX completed_by_time ON completed (completed_at)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)
SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version     integer PRIMARY KEY,
        applied_at  timestamptz NOT NULL DEFAULT now()
    )
"""


async def migrate(conn: AsyncConnection[TupleRow]) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction, under the migration
    lock. Returns the version found (0 = a new database). `conn` is in autocommit
    mode (this opens its own transaction)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        await conn.execute(_VERSION_TABLE)
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = await cur.fetchone()
        found = int(row[0]) if row is not None else 0
        if found > SCHEMA_VERSION:
            raise QueueError(
                f"queue database has schema version {found}; this Gannet knows up to "
                f"{SCHEMA_VERSION} (was it written by a newer version?)"
            )
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version + 1,))
    return found
