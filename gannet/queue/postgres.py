"""PostgresStore: the shared QueueStore (one PostgreSQL database, several Gannet nodes).

Owns: the store object a node holds when `[queue] url = "postgresql://…"`. It
implements `gannet.queue.store.QueueStore` exactly as the SQLite store does
(the contract suite in tests/contract/ runs against both); the callers are
the same: SMTP sessions (enqueue), the delivery worker (claim_due, read_body,
record, next_due, the sweeps), the admin tools.

How (docs/queue.md "PostgreSQL store"):
- psycopg 3, async, with a connection pool (psycopg_pool) per process; every
  connection runs with `synchronous_commit = on`, so a COMMIT returns only
  once its WAL is flushed — whatever the server's default.
- enqueue goes through the group-commit writer (postgres_writer): many
  sessions' messages in one transaction, each caller answered after COMMIT.
- Bodies live in the database (`bodies` rows), small and spooled alike: any
  node can deliver any message, and a node's disk holds nothing the cluster
  needs. A spooled body is copied from its spool file in CHUNK rows (COPY,
  the file read in an executor, never whole in memory) in the enqueue
  transaction, and its file removed after that COMMIT.
  A small body (≤ 64 KiB) comes with its claim, in the same statement, and
  read_body hands it out once from memory (`Prefetched`): the delivery that
  follows a claim would otherwise cost a round trip per message. A larger
  one is copied row by row into a file under the spool directory when
  delivery asks for `body_file` (postgres_body_files), so that it streams
  from there as from the SQLite store's spool: never whole in memory.
- Claims: `FOR UPDATE SKIP LOCKED` + a lease (owner, token, until) in one
  statement, committed with `synchronous_commit = off` (a claim lost in a
  database crash is simply due again). A lease that expires is claimable by
  any node; `record` is fenced by the token. Owner names must be unique per
  node (delivery/agents.py prefixes them with the node identity), because
  `release_leases(owner)` frees every lease of that name. A worker renews
  the leases it still holds (`renew_leases`, postgres_leases.py), so they
  can be short: a dead node's work is free again within one lease length.
- Everything nodes must agree on — per-destination backoff, held, retry,
  deleted — is a row in the database, never process memory.
- Crash recovery at open (`recover=True`, the serving process) only clears
  this node's spool directory: everything in it belonged to an enqueue that
  either committed (the body is in the database) or never did (no 250 was
  said). Leases are never released at open: other nodes' are alive; a dead
  node's expire, and its own restarted worker releases them by owner name.

Never: read a clock for decisions (times are passed in; `clock` only dates a
quarantine found by read_body), block the event loop on file I/O, or keep
state another node would need.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from gannet.queue import postgres_leases
from gannet.queue import postgres_ops as ops
from gannet.queue import postgres_views as views
from gannet.queue.model import (
    Claim,
    DeferralReason,
    NewMessage,
    QueuedMessageView,
    QueueError,
    QueueFilter,
    QueueStats,
    RecipientOutcome,
    SpooledBody,
    TraceEvent,
    Transport,
)
from gannet.queue.postgres_body_files import BodyFiles
from gannet.queue.postgres_schema import migrate
from gannet.queue.postgres_writer import EnqueueWriter, WriterStats
from gannet.queue.prefetch import PREFETCH_BODY, Prefetched

log = logging.getLogger("gannet.queue")
T = TypeVar("T")


class Mode(enum.Enum):
    """How `_run` runs an operation."""

    STATEMENT = "statement"  # one statement in autocommit mode: its own transaction, one round trip
    TRANSACTION = "transaction"  # BEGIN … COMMIT, durable (synchronous_commit on)
    LAZY = "lazy"  # a transaction committed without waiting for the WAL flush: work whose loss
    # in a database crash costs only a later attempt (claims do the same in one statement)


POOL_TIMEOUT = 10.0  # seconds to wait for a connection (the database is down or the pool exhausted)
BODY_FILE_ABOVE = PREFETCH_BODY  # body_file copies larger bodies into files (postgres_body_files)
BODY_FILES = "delivery"  # where, under the spool directory


class PostgresStore:
    """QueueStore on PostgreSQL. Construct, `await open()`, use, `await close()`."""

    def __init__(
        self,
        url: str,
        *,
        spool_dir: Path,
        node: str = "local",
        recover: bool = True,
        pool_size: int = 10,
        writers: int = 2,
        max_batch: int = 256,
        clock: Callable[[], float] = time.time,
        timeout: float = POOL_TIMEOUT,
    ) -> None:
        """`node` names this node in `messages.node` and in the connections'
        application_name. `pool_size` bounds this process's connections;
        `writers` is how many enqueue transactions may be in flight at once.
        `timeout`: how long to wait for a connection (at open, and for each call)."""
        self.url = url
        self.spool_dir = Path(spool_dir).absolute()
        self.node = node
        self.recover = recover
        self._pool_size = max(pool_size, writers + 1)
        self._writers = writers
        self._max_batch = max_batch
        self._clock = clock
        self._timeout = timeout
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] | None = None
        self._writer: EnqueueWriter | None = None
        self._stats = WriterStats()  # kept across close/open
        self._prefetched = Prefetched()
        self._body_files = BodyFiles(self.spool_dir / BODY_FILES)

    @property
    def stats(self) -> WriterStats:
        return self._stats

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            raise QueueError("the queue store is already open")
        pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True, "application_name": f"gannet {self.node}"[:63]},
            configure=_configure,
            open=False,
            timeout=self._timeout,
            name="gannet-queue",
        )
        try:
            await pool.open(wait=True, timeout=self._timeout)
            async with pool.connection() as conn:
                found = await migrate(conn)
        except (psycopg.Error, QueueError) as exc:
            await pool.close()
            if isinstance(exc, QueueError):
                raise
            raise QueueError(f"cannot open the queue database {safe_url(self.url)}: {exc}") from exc
        removed = []
        if self.recover:
            removed = await asyncio.get_running_loop().run_in_executor(None, _clear_spool, self.spool_dir)
        self._pool = pool
        self._writer = EnqueueWriter(
            pool, self.node, writers=self._writers, max_batch=self._max_batch, stats=self._stats
        )
        self._writer.start()
        log.info(
            "queue: opened %s as node %s (schema %d→current; removed %d leftover spool files)",
            safe_url(self.url),
            self.node,
            found,
            len(removed),
        )

    async def close(self) -> None:
        pool, writer = self._pool, self._writer
        if pool is None:
            return
        self._pool = self._writer = None
        if writer is not None:
            await writer.stop()
        await pool.close()

    async def _run(self, op: Callable[..., Awaitable[T]], *args: Any, mode: Mode = Mode.TRANSACTION) -> T:
        """`op(conn, *args)` on a pooled connection, as `mode` says (see Mode)."""
        pool = self._pool
        if pool is None:
            raise QueueError("the queue store is not open")
        try:
            async with pool.connection() as conn:
                if mode is Mode.STATEMENT:
                    return await op(conn, *args)
                # (Not pipelined: psycopg's pipeline mode measured 2-3x slower here.)
                async with conn.transaction():
                    if mode is Mode.LAZY:
                        await conn.execute("SET LOCAL synchronous_commit = off")
                    return await op(conn, *args)
        except psycopg.errors.UniqueViolation as exc:
            raise QueueError(f"duplicate queue ID ({exc.diag.message_detail or exc})") from exc
        except psycopg.Error as exc:
            raise QueueError(f"queue database: {exc}") from exc

    # --- the hot path ----------------------------------------------------------

    async def enqueue(self, message: NewMessage) -> bool:
        prepared = await self._prepare(message)
        writer = self._writer
        if writer is None:
            raise QueueError("the queue store is not open")
        await writer.submit(prepared)
        return False  # the delivery loops deliver everything here

    async def _prepare(self, message: NewMessage) -> ops.Prepared:
        """The message with its content: in memory as bodies rows, or its spool
        file, copied row by row in the enqueue transaction. Checks first what
        would be a caller's bug (ValueError), before anything is stored."""
        if not message.recipients:
            raise ValueError(f"message {message.queue_id} has no recipients")
        body = message.body
        if not isinstance(body, SpooledBody):
            return ops.Prepared(message, (body.data,))
        if (
            not body.path.is_absolute()
            or not body.path.is_relative_to(self.spool_dir)
            or (".." in body.path.parts)
        ):
            raise ValueError(f"spooled body {body.path} is not inside {self.spool_dir}")
        try:
            size = (await asyncio.get_running_loop().run_in_executor(None, body.path.stat)).st_size
        except OSError as exc:
            raise QueueError(f"{message.queue_id}: cannot read the spooled body: {exc}") from exc
        if size != body.size:
            raise QueueError(f"{message.queue_id}: spool file has {size} bytes, not {body.size}")
        return ops.Prepared(message, (), spool=body.path)

    async def claim_due(
        self,
        now: float,
        *,
        limit: int,
        lease_seconds: float,
        owner: str,
        transport: Transport | None = None,
    ) -> list[Claim]:
        # One statement that commits lazily by itself (postgres_ops._CLAIM_TEMPLATE).
        args = (now, limit, lease_seconds, owner, transport, PREFETCH_BODY)
        claims, bodies = await self._run(ops.claim_due, *args, mode=Mode.STATEMENT)
        self._prefetched.keep(bodies)
        return claims

    async def read_body(self, queue_id: str) -> bytes:
        prefetched = self._prefetched.take(queue_id)
        if prefetched is not None:  # came with its claim, a moment ago
            return prefetched
        size, data = await self._run(views.read_body, queue_id, mode=Mode.STATEMENT)
        if len(data) != size:
            await self._bad_body(queue_id, len(data), size)
        return data

    async def body_file(self, queue_id: str) -> Path | None:
        # NoSuchMessage, as the contract says
        size = await self._run(views.read_size, queue_id, mode=Mode.STATEMENT)
        if size <= BODY_FILE_ABOVE:
            return None  # small: read_body has it in one round trip, or from its claim
        path, found = await self._run(self._copy_body, queue_id, size, mode=Mode.STATEMENT)
        if path is None:
            await self._bad_body(queue_id, found, size)
        return path

    async def _copy_body(self, conn: ops.Conn, queue_id: str, size: int) -> tuple[Path | None, int]:
        return await self._body_files.copy(queue_id, size, views.body_rows(conn, queue_id))

    async def _bad_body(self, queue_id: str, found: int, size: int) -> NoReturn:
        """The stored rows do not hold what was accepted: quarantine the message."""
        await self._run(views.read_size, queue_id, mode=Mode.STATEMENT)  # deleted meanwhile: NoSuchMessage
        problem = f"the stored body has {found} bytes, {size} were accepted"
        await self._run(ops.quarantine, queue_id, problem, self._clock())
        raise QueueError(f"{queue_id}: {problem}")

    async def record(
        self, outcomes: Sequence[RecipientOutcome], enqueue: Sequence[NewMessage] = ()
    ) -> list[str]:
        follow_ups = [await self._prepare(m) for m in enqueue]
        completed = await self._run(ops.record, self.node, tuple(outcomes), follow_ups)
        self._prefetched.forget(completed)
        await self._body_files.forget(completed)
        for p in follow_ups:
            if isinstance(p.message.body, SpooledBody):
                p.message.body.path.unlink(missing_ok=True)
        return completed

    async def next_due(self, transport: Transport | None = None) -> float | None:
        return await self._run(ops.next_due, transport, mode=Mode.STATEMENT)

    async def release_leases(self, owner: str) -> int:
        return await self._run(ops.release_leases, owner, mode=Mode.STATEMENT)

    async def renew_leases(self, owner: str, leases: Sequence[tuple[int, str]], *, until: float) -> list[int]:
        return await self._run(postgres_leases.renew_leases, owner, leases, until, mode=Mode.STATEMENT)

    async def claim_expired(
        self, now: float, *, received_before: float, limit: int, lease_seconds: float, owner: str
    ) -> list[Claim]:
        args = (now, received_before, limit, lease_seconds, owner)
        claims, _bodies = await self._run(ops.claim_expired, *args, mode=Mode.STATEMENT)
        return claims

    async def release_expired_leases(
        self, now: float, *, expired_before: float
    ) -> list[tuple[str, str, str]]:
        return await self._run(ops.release_expired_leases, now, expired_before)

    async def defer_destination(
        self, transport: Transport, domain: str | None, *, until: float, reason: str
    ) -> int:
        # Not durable on its own: if lost, the recipients are tried once more.
        return await self._run(ops.defer_destination, transport, domain, until, reason, mode=Mode.LAZY)

    # --- admin -------------------------------------------------------------------

    async def list_messages(self, filter: QueueFilter | None = None) -> list[QueuedMessageView]:
        return await self._run(views.list_messages, filter)

    async def get_message(self, queue_id: str) -> QueuedMessageView:
        return await self._run(views.get_message, queue_id)

    async def hold(self, queue_id: str, now: float) -> None:
        await self._run(ops.hold, queue_id, now)

    async def release(self, queue_id: str, now: float) -> None:
        await self._run(ops.release, queue_id, now)

    async def retry(self, queue_id: str | None, now: float) -> int:
        return await self._run(ops.retry, queue_id, now)

    async def delete(self, queue_id: str, now: float) -> None:
        self._prefetched.take(queue_id)
        await self._run(ops.delete, queue_id, now)
        await self._body_files.forget([queue_id])

    async def trace(self, key: str) -> list[TraceEvent]:
        return await self._run(views.trace, key)

    async def prune_history(self, before: float, *, limit: int) -> int:
        return await self._run(ops.prune_history, before, limit, mode=Mode.LAZY)

    async def queue_stats(self) -> QueueStats:
        return await self._run(views.queue_stats)

    async def deferral_reasons(self, limit: int) -> list[DeferralReason]:
        return await self._run(views.deferral_reasons, limit, mode=Mode.STATEMENT)

    # --- tests -----------------------------------------------------------------------

    async def testing_call(self, fn: Callable[[ops.Conn], Awaitable[T]]) -> T:
        """Test-only: run `fn(connection)` in a transaction of this store's pool."""
        return await self._run(fn)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Durable COMMIT whatever the server's (or role's) default: "250" follows it.
    await conn.execute("SET synchronous_commit = on")


def _clear_spool(spool_dir: Path) -> list[str]:
    """Remove every file under the spool directory (see the module docstring)."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    removed = []
    for root, _dirs, files in os.walk(spool_dir):
        for name in files:
            path = Path(root, name)
            try:
                path.unlink()
            except OSError as exc:  # only litter: not fatal
                log.warning("queue: cannot remove leftover spool file %s: %s", path, exc)
                continue
            removed.append(str(path.relative_to(spool_dir)))
    return removed


def safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"
    return url
