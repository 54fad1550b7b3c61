"""SqliteStore: the embedded QueueStore (one SQLite file in WAL mode + a spool directory).

Owns: the store object the rest of Gannet holds. It implements
`gannet.queue.store.QueueStore`; callers are the SMTP session (enqueue), the
delivery scheduler (claim_due, read_body, record, next_due) and the admin
tools (list, show, hold, release, retry, delete), all on the asyncio loop.

Threads: no SQLite call ever runs on the event loop. Each method wraps its
work in a Job for the single writer thread (sqlite_writer), which owns the
only connection and commits jobs in batches (group commit): while one batch
is being fsync'd the next one gathers, so fifty sessions that finish DATA
together cost a handful of fsyncs, not fifty. A method returns only after the
COMMIT of its batch returned. Spooled body files are read in the default
executor, never on the loop nor on the writer thread. Small inline bodies
come with their claim (queue/prefetch.py): read_body hands each out once.

The server's store (`enqueue_process=True`) sends enqueues to a writer
process of their own instead (sqlite_enqueue_process, sqlite_enqueue_child):
the same transactions, under the same lock, without sharing the sessions' GIL.
The thread still does everything else, and the enqueues whenever that
process is not running.

On disk (see docs/queue.md and sqlite_schema):
  <path>, <path>-wal, <path>-shm   the database (schema in sqlite_schema)
  <spool_dir>/…                    large bodies, written and fsync'd by the
                                   session before enqueue; the store keeps the
                                   file where it is and records its path
                                   relative to spool_dir; it removes the file
                                   after the COMMIT that removed the message.

Invariants: see store.py's commit protocol. In short: enqueue returns only
when durable, nothing is claimable before that; leases fence record(); a
message leaves the store in the same transaction as its last final outcome.

Several SqliteStore objects may open the same files (say, the CLI while the
server runs): SQLite's locking keeps them consistent. Crash recovery at open
(`recover=True`, the default) removes unnamed spool files and releases every
lease, on the grounds that the opener is the one process delivering from this
database; so exactly one process (the server) opens with recover=True, and
any other (the CLI) with recover=False.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from gannet.queue import sqlite_admin_ops as admin_ops
from gannet.queue import sqlite_ops as ops
from gannet.queue import sqlite_recovery as recovery
from gannet.queue import sqlite_stats as stats
from gannet.queue import sqlite_views as views
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
from gannet.queue.prefetch import PREFETCH_BODY, PREFETCH_PER_CLAIM, Prefetched
from gannet.queue.sqlite_enqueue_process import EnqueueProcess, WriterGone
from gannet.queue.sqlite_reader import Reader
from gannet.queue.sqlite_schema import connect
from gannet.queue.sqlite_writer import Job, Writer, WriterStats

log = logging.getLogger("gannet.queue")
T = TypeVar("T")
READS, SCANS = "queue read", "queue statistics"  # the store's two Readers


class SqliteStore:
    """QueueStore on SQLite. Construct, `await open()`, use, `await close()`."""

    def __init__(
        self,
        path: Path,
        *,
        spool_dir: Path,
        node: str = "local",
        clock: Callable[[], float] = time.time,
        recover: bool = True,
        release_leases_on_open: bool = True,
        max_batch: int = 512,
        enqueue_process: bool = False,
        local_delivery: str = "",
    ) -> None:
        """`clock` is read only to date crash-recovery events (open() has no `now`).
        `max_batch` bounds how many requests one transaction carries.
        `release_leases_on_open=False` leaves leases to their owners: for a server
        whose delivery worker releases them itself, once it knows its predecessor
        has exited (it may still be finishing its last writes when the server
        restarts; releasing them under it would deliver those messages twice).
        `enqueue_process=True` runs enqueues in a child process (the server's store);
        `local_delivery` (delivery/local_at_enqueue.Settings as JSON) has that
        process deliver fresh local mail into Maildirs itself."""
        self.path = Path(path).absolute()
        self.spool_dir = Path(spool_dir).absolute()
        if self.path.is_relative_to(self.spool_dir):
            # Recovery removes unknown files under spool_dir: never the database.
            raise ValueError(f"the queue database {self.path} must not be inside {self.spool_dir}")
        self._ctx = ops.Ctx(self.spool_dir, node, clock)
        self._recover = recover
        self._release_leases = release_leases_on_open
        self._max_batch = max_batch
        self._writer: Writer | None = None
        self._enqueue_process = enqueue_process
        self._local_delivery = local_delivery
        self._enqueuer: EnqueueProcess | None = None
        self._closing = False
        self._stats = WriterStats()  # kept across close/open
        self._prefetched = Prefetched()
        # Reads off the writer thread and its lock (sqlite_reader), one Reader per kind:
        # READS (bodies, next due) never wait behind SCANS (the aggregate statistics).
        self._readers: dict[str, Reader] = {}
        # Built once: the writer combines consecutive jobs whose `bulk` is the same object.
        self._enqueue_many = partial(ops.enqueue_many, self._ctx)

    @property
    def enqueue_process(self) -> EnqueueProcess | None:
        """The enqueue writer process, when this store has one (tests, logs)."""
        return self._enqueuer

    @property
    def stats(self) -> WriterStats:
        """Writer counters (batches, commits, jobs, cpu_seconds) for tests and metrics."""
        return self._stats

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            raise QueueError("the queue store is already open")
        writer = Writer(
            partial(connect, self.path),
            lock_path=self.path.with_name(self.path.name + "-writelock"),
            max_batch=self._max_batch,
            name=str(self.path),
            stats=self._stats,
        )
        writer.start()
        self._writer = writer
        self._closing = False
        try:
            found = await self._call(recovery.open_store, (self._recover, self._release_leases))
        except BaseException:
            await self.close()
            raise
        log.info(
            "queue: opened %s (schema %d→current; removed %d leftover spool files; "
            "%d messages quarantined; %d leases released)",
            self.path,
            found.schema_found,
            len(found.removed_files),
            len(found.quarantined),
            found.released_leases,
        )
        if self._enqueue_process:
            # After recovery: the child must never race it for a spool file.
            self._enqueuer = EnqueueProcess(
                self.path, self.spool_dir, node=self._ctx.node, max_batch=self._max_batch, stats=self._stats,
                local_delivery=self._local_delivery,
            )  # fmt: skip
            await self._enqueuer.start()

    async def close(self) -> None:
        writer = self._writer
        if writer is None or self._closing:
            return
        self._closing = True
        if self._enqueuer is not None:
            await self._enqueuer.stop()
            self._enqueuer = None
        writer.stop()  # the thread finishes what was submitted before this
        await asyncio.get_running_loop().run_in_executor(None, writer.join)
        self._writer = None
        for reader in self._readers.values():
            await reader.close()
        self._readers.clear()

    async def _call(
        self,
        op: Callable[..., T],
        arg: Any,
        bulk: Callable[..., list[Any]] | None = None,
        *,
        durable: bool = True,
    ) -> T:
        writer = self._writer
        if writer is None or self._closing:
            raise QueueError("the queue store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        writer.submit(Job(partial(op, self._ctx), arg, future, bulk, durable))
        return await future

    async def _read(self, fn: Callable[..., T], *args: object, kind: str = READS) -> T:
        """`fn(connection, *args)`: a read of committed state, off the writer (see sqlite_reader)."""
        if self._writer is None or self._closing:
            raise QueueError("the queue store is not open")
        reader = self._readers.get(kind)
        if reader is None:
            reader = self._readers[kind] = Reader(self.path, what=kind)
        return await reader.run(fn, *args)

    # --- the hot path ----------------------------------------------------------

    async def enqueue(self, message: NewMessage) -> bool:
        if isinstance(message.body, SpooledBody):
            ops.spool_name(self._ctx, message.body)  # ValueError now, not in the writer
        enqueuer = self._enqueuer
        if enqueuer is not None and enqueuer.ready and not self._closing:
            try:
                return await enqueuer.enqueue(message)
            except WriterGone:
                # The process exited holding it: it committed it or not; look, on the thread.
                log.warning(
                    "queue: %s: the enqueue writer process exited; storing it again unless stored",
                    message.queue_id,
                )
                await self._call(ops.enqueue_unless_stored, message)
                return False
        await self._call(ops.enqueue_one, message, self._enqueue_many)
        return False

    async def claim_due(
        self,
        now: float,
        *,
        limit: int,
        lease_seconds: float,
        owner: str,
        transport: Transport | None = None,
    ) -> list[Claim]:
        # A claim need not survive a power cut (the recipient is simply due again).
        args = (now, limit, lease_seconds, owner, transport, PREFETCH_BODY, PREFETCH_PER_CLAIM)
        claims, bodies = await self._call(ops.claim_due, args, durable=False)
        self._prefetched.keep(bodies)
        return claims

    async def read_body(self, queue_id: str) -> bytes:
        prefetched = self._prefetched.take(queue_id)
        if prefetched is not None:  # came with its claim, a moment ago
            return prefetched
        source = await self._read(recovery.body_source, self._ctx, queue_id)
        if isinstance(source, bytes):
            return source
        path, size = source
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(None, path.read_bytes)
        except OSError as exc:
            problem = await loop.run_in_executor(None, recovery.body_file_problem, path, size)
            if problem is not None:
                await self._call(admin_ops.quarantine, (queue_id, problem, self._ctx.clock()))
            raise QueueError(f"{queue_id}: cannot read the body: {exc}") from exc
        if len(data) != size:
            problem = f"body file {path} has {len(data)} bytes, {size} were stored"
            await self._call(admin_ops.quarantine, (queue_id, problem, self._ctx.clock()))
            raise QueueError(f"{queue_id}: {problem}")
        return data

    async def body_file(self, queue_id: str) -> Path | None:
        return await self._read(recovery.body_file, self._ctx, queue_id)

    async def record(
        self, outcomes: Sequence[RecipientOutcome], enqueue: Sequence[NewMessage] = ()
    ) -> list[str]:
        for message in enqueue:
            if isinstance(message.body, SpooledBody):
                ops.spool_name(self._ctx, message.body)
        completed: list[str] = await self._call(ops.record, (tuple(outcomes), tuple(enqueue)))
        self._prefetched.forget(completed)
        return completed

    async def next_due(self, transport: Transport | None = None) -> float | None:
        return await self._read(ops.next_due, transport)

    async def release_leases(self, owner: str) -> int:
        return await self._call(ops.release_leases, owner)

    async def renew_leases(self, owner: str, leases: Sequence[tuple[int, str]], *, until: float) -> list[int]:
        # Not durable on its own (like a claim): lost in a power cut, the machine
        # that held the leases went down with it.
        return await self._call(ops.renew_leases, (owner, tuple(leases), until), durable=False)

    async def claim_expired(
        self, now: float, *, received_before: float, limit: int, lease_seconds: float, owner: str
    ) -> list[Claim]:
        return await self._call(
            ops.claim_expired, (now, received_before, limit, lease_seconds, owner), durable=False
        )

    async def release_expired_leases(
        self, now: float, *, expired_before: float
    ) -> list[tuple[str, str, str]]:
        return await self._call(ops.release_expired_leases, (now, expired_before))

    async def defer_destination(
        self, transport: Transport, domain: str | None, *, until: float, reason: str
    ) -> int:
        # Not durable on its own: if lost, the recipients are tried once more.
        return await self._call(ops.defer_destination, (transport, domain, until, reason), durable=False)

    # --- admin -------------------------------------------------------------------

    async def list_messages(self, filter: QueueFilter | None = None) -> list[QueuedMessageView]:
        return await self._call(views.list_messages, filter)

    async def get_message(self, queue_id: str) -> QueuedMessageView:
        return await self._call(views.get_message, queue_id)

    async def hold(self, queue_id: str, now: float) -> None:
        await self._call(admin_ops.hold, (queue_id, now))

    async def release(self, queue_id: str, now: float) -> None:
        await self._call(admin_ops.release, (queue_id, now))

    async def retry(self, queue_id: str | None, now: float) -> int:
        return await self._call(admin_ops.retry, (queue_id, now))

    async def delete(self, queue_id: str, now: float) -> None:
        self._prefetched.take(queue_id)
        await self._call(admin_ops.delete, (queue_id, now))

    async def queue_stats(self) -> QueueStats:
        return await self._read(stats.queue_stats, kind=SCANS)

    async def deferral_reasons(self, limit: int) -> list[DeferralReason]:
        return await self._read(stats.deferral_reasons, limit, kind=SCANS)

    async def trace(self, key: str) -> list[TraceEvent]:
        return await self._call(views.trace, key, durable=False)

    async def prune_history(self, before: float, *, limit: int) -> int:
        # Not durable on its own: if lost, the next sweep prunes the same rows.
        return await self._call(admin_ops.prune_history, (before, limit), durable=False)

    # --- tests -----------------------------------------------------------------------

    async def testing_call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Test-only: run `fn(connection)` on the writer thread, inside a batch."""
        return await self._call(_apply, fn)


def _apply(ctx: ops.Ctx, conn: sqlite3.Connection, txn: object, fn: Callable[[Any], T]) -> T:
    return fn(conn)
