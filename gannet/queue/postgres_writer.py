"""Group commit for the PostgreSQL store's enqueues.

Owns: the tasks that turn many sessions' `enqueue` calls into few COMMITs.
Called only by postgres.PostgresStore (submit, start, stop).

Why: each COMMIT with `synchronous_commit = on` waits for a WAL flush (an
fsync on the database host, plus a round trip). One transaction per message
would cap acceptance at the flush rate. Instead `writers` tasks (default 2)
each take whatever enqueues are waiting (up to `max_batch`), insert them with
one statement per table, and COMMIT; while one task's COMMIT is flushing, the
other gathers the next batch. A lone enqueue still costs one COMMIT.

Invariants:
- A caller's future is resolved only after the COMMIT that holds its message
  has returned: "250" follows durability. A caller that goes away meanwhile
  (the client hung up) does not undo the commit: at worst a duplicate.
- A batch is ONE statement (postgres_ops.insert_messages) in autocommit mode:
  its own transaction, one round trip, one WAL flush. A batch holding a
  spooled body is a transaction of two: its bodies copied from their files
  (postgres_ops.copy_spooled_bodies), then that statement.
- A message that fails (duplicate queue ID) fails alone: the batch is retried
  one message per transaction, and the others still commit.
- A connection or server failure fails every message of that batch with
  QueueError (nothing of it was committed, or the server cannot tell us: a
  COMMIT lost in flight may have happened, which again means at worst a
  duplicate, since the client retries after 451).
- Spooled body files are removed only after the COMMIT that copied them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from gannet.queue import postgres_ops as ops
from gannet.queue.model import QueueError, SpooledBody

log = logging.getLogger("gannet.queue")


@dataclass(slots=True)
class WriterStats:
    """Counters for tests, metrics and the shutdown log line."""

    commits: int = 0  # enqueue transactions committed
    messages: int = 0  # messages committed by them
    max_batch: int = 0  # most messages in one commit
    failed_commits: int = 0
    retried_batches: int = 0  # batches redone one message per transaction
    commit_seconds: float = 0.0  # wall time spent in enqueue transactions

    def summary(self) -> str:
        per = self.messages / self.commits if self.commits else 0.0
        return (
            f"{self.commits} enqueue commits for {self.messages} messages ({per:.1f} per commit, "
            f"largest {self.max_batch}), {self.failed_commits} failed, {self.retried_batches} retried "
            f"one by one, {self.commit_seconds:.1f}s in transactions"
        )


_Item = tuple[ops.Prepared, "asyncio.Future[None]"]
_DEAD_CONNECTION = (psycopg.OperationalError, psycopg.InterfaceError)


class EnqueueWriter:
    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]],
        node: str,
        *,
        writers: int = 2,
        max_batch: int = 256,
        stats: WriterStats | None = None,
    ) -> None:
        self._pool = pool
        self._node = node
        self._writers = max(1, writers)
        self._max_batch = max_batch
        self._inbox: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = stats or WriterStats()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"queue-writer-{i}") for i in range(self._writers)
        ]

    async def stop(self) -> None:
        """Commit what was submitted before this, then end the tasks."""
        for _ in self._tasks:
            self._inbox.put_nowait(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def submit(self, prepared: ops.Prepared) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait((prepared, future))
        await future

    async def _run(self) -> None:
        while True:
            first = await self._inbox.get()
            if first is None:
                return
            batch = [first]
            stop_after = False
            while len(batch) < self._max_batch and not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is None:  # finish this batch, then stop
                    stop_after = True
                    break
                batch.append(item)
            try:
                await self._commit(batch)
            except Exception as exc:  # a bug: never leave a session waiting for ever
                log.exception("queue writer: unexpected error")
                _resolve(batch, QueueError(f"queue writer: {exc}"))
            if stop_after:
                return

    async def _commit(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        try:
            try:
                async with self._pool.connection() as conn:
                    await _insert(conn, self._node, [p for p, _f in batch])
                failures: dict[int, BaseException] = {}
            except (psycopg.Error, QueueError) as exc:  # QueueError: a spool file gone bad
                if len(batch) == 1 or isinstance(exc, _DEAD_CONNECTION):
                    raise
                self.stats.retried_batches += 1
                failures = await self._one_by_one(batch)
        except (psycopg.Error, QueueError) as exc:
            self.stats.failed_commits += 1
            if isinstance(exc, QueueError):
                error = exc
            else:
                error = QueueError("duplicate queue ID" if _duplicate(exc) else f"queue database: {exc}")
            log.error("queue: enqueue of %d message(s) failed: %s", len(batch), exc)
            _resolve(batch, error)
            return
        finally:
            self.stats.commit_seconds += time.monotonic() - started
        done = len(batch) - len(failures)
        self.stats.commits += 1
        self.stats.messages += done
        self.stats.max_batch = max(self.stats.max_batch, done)
        for i, (prepared, future) in enumerate(batch):
            if i in failures:
                if not future.done():
                    future.set_exception(failures[i])
                continue
            if isinstance(prepared.message.body, SpooledBody):
                # The content is in the database now; the file was only its way in.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(prepared.message.body.path)
            if not future.done():
                future.set_result(None)

    async def _one_by_one(self, batch: list[_Item]) -> dict[int, BaseException]:
        """The batch again, one transaction per message: only the culprits fail."""
        failures: dict[int, BaseException] = {}
        async with self._pool.connection() as conn:
            for i, (prepared, _future) in enumerate(batch):
                try:
                    await _insert(conn, self._node, [prepared])
                except _DEAD_CONNECTION:
                    raise
                except (psycopg.Error, QueueError) as exc:
                    qid = prepared.message.queue_id
                    reason = "duplicate queue ID" if _duplicate(exc) else str(exc)
                    failures[i] = QueueError(f"{qid}: {reason}")
        return failures


async def _insert(conn: psycopg.AsyncConnection[TupleRow], node: str, batch: list[ops.Prepared]) -> None:
    """One statement in autocommit mode (its own transaction); a transaction
    of two when a body streams in from its spool file first."""
    if not any(p.spool is not None for p in batch):
        await ops.insert_messages(conn, node, batch)
        return
    async with conn.transaction():
        await ops.copy_spooled_bodies(conn, batch)
        await ops.insert_messages(conn, node, batch)


def _duplicate(exc: Exception) -> bool:
    return isinstance(exc, psycopg.errors.UniqueViolation)


def _resolve(batch: list[_Item], error: BaseException) -> None:
    for _prepared, future in batch:
        if not future.done():
            future.set_exception(error)
