"""The queue store a config asks for, opened the way each process needs it, and
the lease owner names of a node; `gannet db migrate`.

Owns: the choice between SqliteStore and PostgresStore from `[queue] url`, and
the three ways of opening one — the server (crash recovery), its delivery
worker, and a command-line tool (neither recovers: the server may be running).
Callers: runtime (serve), delivery.worker, cli. Construction only, plus the
migrate command; it never touches a message.
"""

from __future__ import annotations

import enum
from pathlib import Path

from gannet.config_model import QueueConfig
from gannet.queue.model import QueueError
from gannet.queue.store import QueueStore

PSYCOPG_MISSING = "the PostgreSQL store needs psycopg 3 and psycopg-pool: pip install 'gannet[postgres]'"


class Opener(enum.Enum):
    SERVER = "server"  # `gannet serve`: recovers (spool litter, quarantine); leaves leases to the worker
    WORKER = "worker"  # the delivery worker: no recovery; releases its own owners' leases itself
    TOOL = "tool"  # `gannet queue …`, `gannet db …`: no recovery


def make_store(queue: QueueConfig, data_dir: Path, opener: Opener, *, local_delivery: str = "") -> QueueStore:
    """A store for `queue` (not yet opened). `local_delivery`: for the server's
    SQLite store, the enqueue writer's local delivery settings (JSON, see
    delivery/local_at_enqueue.py), or "" for none."""
    spool_dir = data_dir / "spool"
    if queue.sqlite_path is not None:
        from gannet.queue.sqlite import SqliteStore

        return SqliteStore(
            queue.sqlite_path,
            spool_dir=spool_dir,
            recover=opener is Opener.SERVER,
            # Leases are the delivery worker's to release (delivery/worker.py), once it
            # holds the worker lock, i.e. once any previous worker has really exited.
            release_leases_on_open=False,
            enqueue_process=opener is Opener.SERVER and queue.writer_process,
            local_delivery=local_delivery if opener is Opener.SERVER else "",
        )
    try:
        from gannet.queue.postgres import PostgresStore
    except ImportError as exc:  # psycopg is an optional dependency (the "postgres" extra)
        raise QueueError(f"{PSYCOPG_MISSING} ({exc})") from exc
    return PostgresStore(
        queue.url,
        spool_dir=spool_dir,
        node=queue.node,
        recover=opener is Opener.SERVER,
        pool_size=queue.pool_size,
    )


def owner_name(queue: QueueConfig, agent: str) -> str:
    """The lease owner name of a delivery agent ("local", "smtp", …) on this node.

    With one node (SQLite) the agent's name alone; with a shared queue it is
    "NODE/agent", so that a node's restarted worker releases its own
    predecessor's leases (`release_leases(owner)`) and never another node's."""
    return f"{queue.node}/{agent}" if queue.node else agent


async def migrate(queue: QueueConfig, data_dir: Path) -> str:
    """`gannet db migrate`: create or update the schema; returns a line saying what
    was done. PostgreSQL: under the migration lock, so nodes starting at the same
    time (each `serve` migrates too) take turns and the later ones find it done."""
    if queue.sqlite_path is not None:
        store = make_store(queue, data_dir, Opener.TOOL)
        await store.open()  # migrates inside its first transaction
        await store.close()
        return f"queue database {queue.sqlite_path}: schema is current"
    try:
        import psycopg

        from gannet.queue.postgres import safe_url
        from gannet.queue.postgres_schema import SCHEMA_VERSION
        from gannet.queue.postgres_schema import migrate as migrate_schema
    except ImportError as exc:
        raise QueueError(f"{PSYCOPG_MISSING} ({exc})") from exc
    try:
        async with await psycopg.AsyncConnection.connect(queue.url, autocommit=True) as conn:
            found = await migrate_schema(conn)
    except psycopg.Error as exc:
        raise QueueError(f"cannot migrate the queue database {safe_url(queue.url)}: {exc}") from exc
    if found == SCHEMA_VERSION:
        return f"queue database {safe_url(queue.url)}: schema version {found} is current"
    return f"queue database {safe_url(queue.url)}: schema migrated from version {found} to {SCHEMA_VERSION}"
