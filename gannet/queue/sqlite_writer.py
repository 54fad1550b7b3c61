"""The SQLite store's writer thread: one connection, group commit.

Owns: the only `sqlite3.Connection` of a `SqliteStore`, and the thread it
lives on. Called only by `gannet.queue.sqlite` (through `Writer.submit`); the
asyncio event loop never touches the database. The enqueue writer process
(sqlite_enqueue_child) runs the same transactions without the thread:
`open_here`, `run_here`, `close_here`.

How it works. Callers put `Job`s (a function of the connection plus an
asyncio future) on an inbox. The thread takes the first job, then everything
else already waiting (up to `max_batch`), and runs the whole batch as ONE
transaction: BEGIN IMMEDIATE, each job inside its own SAVEPOINT, COMMIT.
While that COMMIT is being fsync'd, new jobs pile up in the inbox and form the
next batch. That is group commit: one fsync acknowledges many messages, and
an idle store still answers a lone request after a single fsync.

Invariants:
- A job's future is resolved only after the COMMIT of its transaction has
  returned (synchronous=FULL: the WAL is on disk). Reads are resolved then
  too, so nobody ever sees data that could still be rolled back.
- A job that raises is rolled back to its savepoint alone; the others in the
  batch still commit. If SQLite itself abandoned the transaction (disk full,
  I/O error), every job done so far in it fails and the rest start afresh.
- Jobs that share a `bulk` function and arrive one after another are first
  tried together in one call (executemany over all of them); if that raises,
  each is retried alone so the error reaches only the job that caused it.
- `Txn.after_commit` actions (removing body files) run only after a
  successful COMMIT, never for a rolled-back job.
- sqlite3.Error and OSError reach the caller as QueueError; QueueError
  passes through; anything else (a bug) passes through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gannet import metrics
from gannet.queue.model import QueueError

log = logging.getLogger("gannet.queue")

Op = Callable[[sqlite3.Connection, "Txn", Any], Any]
BulkOp = Callable[[sqlite3.Connection, "Txn", list[Any]], list[Any]]


@dataclass(slots=True)
class Txn:
    """What a job may ask of the transaction it runs in."""

    after_commit: list[Callable[[], None]] = field(default_factory=list)


@dataclass(slots=True)
class WriterStats:
    """Counters for tests and metrics. Written by the writer thread only."""

    batches: int = 0  # transactions attempted
    commits: int = 0  # transactions that changed the database and committed
    jobs: int = 0  # jobs run
    max_batch: int = 0  # largest number of jobs in one transaction
    failed_commits: int = 0
    unsynced_commits: int = 0  # commits made without fsync (claims only; see Job.durable)
    lock_waits: int = 0  # transactions that waited for another process's writer
    # Wall time spent waiting for the write lock, and holding it: the lock is the one
    # place the server's commits and the delivery worker's meet (bench/README.md, session 26).
    lock_wait_seconds: float = 0.0
    lock_held_seconds: float = 0.0
    cpu_seconds: float = 0.0  # writer-thread CPU time spent in batches
    # Messages the enqueue process wrote whole into their Maildirs before its reply, never
    # queued (delivery/local_direct.py), and the groups it wrote them in: none of the above.
    direct_messages: int = 0
    direct_groups: int = 0

    def summary(self) -> str:
        """One line for the log at shutdown (bench/_common.write_lock reads the lock's figures from it)."""
        line = (
            f"{self.commits} commits ({self.unsynced_commits} without fsync) for {self.jobs} requests, "
            f"{self.lock_waits} waits for the other process ({self.lock_wait_seconds:.1f}s), "
            f"held the write lock {self.lock_held_seconds:.1f}s, {self.failed_commits} failed, "
            f"{self.cpu_seconds:.1f}s CPU"
        )
        if self.direct_messages:
            line += (
                f"; {self.direct_messages} messages into their Maildirs before the reply, "
                f"in {self.direct_groups} groups"
            )
        return line


@dataclass(slots=True, eq=False)
class Job:
    op: Op
    arg: Any
    # Who is waiting: an asyncio.Future (the thread resolves it on its loop), or
    # in the enqueue process, the request's number (run_here hands it back).
    future: Any
    bulk: BulkOp | None = None
    # False for work whose loss in a power cut costs nothing (lease claims: a
    # lost claim is simply due again). A transaction made only of such jobs
    # commits without fsync; the next durable commit fsyncs the WAL, which
    # carries it too (the WAL is written in order).
    durable: bool = True


# (Job.future, result, exception) triples: handed back to an event loop, or by run_here.
_Resolution = tuple[Any, Any, BaseException | None]
# What a transaction leaves for Writer._finish: its resolutions, its Txn, committed or not.
_Finished = tuple[list[_Resolution], Txn, bool]


class _TransactionLost(Exception):
    """SQLite rolled the whole transaction back on its own (SQLITE_FULL, IOERR…).

    args: (the cause,); `first` and `count` say which jobs were running.
    """

    first = 0
    count = 1


class Writer:
    """The thread and its inbox. `start()` once, `submit()` many, `stop()` once."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        max_batch: int = 512,
        name: str = "",
        stats: WriterStats | None = None,
        lock_path: Path | None = None,
        on_commit: Callable[[float, bool], None] = metrics.store_commit,
    ) -> None:
        """`on_commit(seconds, fsync)` is told how long each COMMIT that changed
        the database took (the metrics histogram, unless the caller collects them)."""
        self._connect = connect
        self._max_batch = max_batch
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=f"gannet-queue {name}", daemon=True)
        self._conn: sqlite3.Connection | None = None
        self._connect_error: BaseException | None = None
        self._synchronous_full = True  # what connect() sets
        self._lock_path = lock_path
        self._lock_fd = -1
        self._on_commit = on_commit
        self.stats = stats if stats is not None else WriterStats()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def stop(self) -> None:
        """Ask the thread to finish the jobs already submitted, then exit."""
        self._inbox.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --- without the thread (the enqueue writer process) ---------------------

    def open_here(self) -> None:
        """Open the connection and the process lock on the calling thread; raises."""
        self._open()
        if self._connect_error is not None:
            raise self._connect_error

    def run_here(self, jobs: Sequence[Job]) -> list[_Resolution]:
        """Run `jobs` now, on the calling thread, as the writer thread would
        (group commit, savepoints, the process lock, after-commit actions), and
        return the (job.future, result, error) triples instead of resolving them."""
        conn = self._conn
        if conn is None:
            raise QueueError("the queue database is not open")
        cpu_start = time.thread_time()
        out: list[_Resolution] = []
        pending: Sequence[Job] = jobs
        try:
            while pending:
                with self._process_lock():
                    pending, finished = self._one_transaction(conn, pending)
                out += self._finish(*finished)
        finally:
            self.stats.cpu_seconds += time.thread_time() - cpu_start
        return out

    def close_here(self) -> None:
        self._close()

    # --- the thread -------------------------------------------------------

    def _open(self) -> None:
        try:
            self._conn = self._connect()
            if self._lock_path is not None:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException as exc:  # reported to every job; the thread still drains
            self._connect_error = exc

    def _main(self) -> None:
        self._open()
        stopping = False
        while not stopping:
            batch: list[Job] = []
            item = self._inbox.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= self._max_batch:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            if batch:
                self._run_batch(batch)
        self._close()

    def _close(self) -> None:
        # Anything submitted after stop() is refused rather than left hanging.
        leftovers: list[_Resolution] = []
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftovers.append((job.future, None, QueueError("the queue store is closed")))
        _resolve(leftovers)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA optimize")
                self._conn.close()
            except sqlite3.Error as exc:
                log.warning("queue: closing the database: %s", exc)
            self._conn = None

    def _run_batch(self, batch: list[Job]) -> None:
        cpu_start = time.thread_time()
        try:
            self._run_transactions(batch)
        except Exception as exc:  # a bug in this module: fail the batch, keep the thread
            log.exception("queue: writer batch failed")
            _resolve([(j.future, None, _as_queue_error(exc)) for j in batch])
            _rollback_quietly(self._conn)
        finally:
            self.stats.cpu_seconds += time.thread_time() - cpu_start

    def _run_transactions(self, batch: list[Job]) -> None:
        conn = self._conn
        if conn is None:
            unopened = QueueError(f"cannot open the queue database: {self._connect_error}")
            _resolve([(j.future, None, unopened) for j in batch])
            return
        pending: Sequence[Job] = batch
        while pending:
            with self._process_lock():
                pending, finished = self._one_transaction(conn, pending)
            # Outside the lock: removing body files and waking the callers need not
            # keep the other process's commit waiting.
            _resolve(self._finish(*finished))

    def _one_transaction(
        self, conn: sqlite3.Connection, pending: Sequence[Job]
    ) -> tuple[Sequence[Job], _Finished]:
        """Run `pending` in one transaction. Returns the jobs still to run (after a
        transaction SQLite lost on its own, the rest start afresh) and what
        `_finish` is to do with the ones that ran."""
        error: BaseException
        txn = Txn()
        done: list[_Resolution] = []
        self._set_durability(conn, any(j.durable for j in pending))
        try:
            # IMMEDIATE: take the write lock now, so a read-then-write job
            # cannot hit SQLITE_BUSY halfway because another process wrote.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            error = _as_queue_error(exc)
            return (), ([(j.future, None, error) for j in pending], txn, False)
        changes_before = conn.total_changes
        try:
            self._run_jobs(conn, txn, pending, done)
        except _TransactionLost as lost:
            # What was done went with the transaction; the rest start afresh.
            error = _as_queue_error(lost.args[0])
            lost_jobs = pending[lost.first : lost.first + lost.count]
            done = [(f, None, error) for f, _, _ in done]
            done += [(j.future, None, error) for j in lost_jobs]
            _rollback_quietly(conn)
            return pending[lost.first + lost.count :], (done, txn, False)
        committed = self._commit(conn, changes_before)
        if not committed:
            error = QueueError("the queue database could not commit")
            done = [(f, None, error) for f, _, _ in done]
        return (), (done, txn, committed)

    @contextlib.contextmanager
    def _process_lock(self) -> Iterator[None]:
        """Serialize write transactions across processes (the server and its
        delivery worker share the database) with a blocking flock: the kernel
        wakes a waiter the moment the lock is free. Left to SQLite, a writer
        that finds the database locked sleeps 1, 2, 5, 10… ms between retries
        (its default busy handler), which cost whole milliseconds per message
        whenever the two processes met."""
        fd = self._lock_fd
        if fd < 0:
            yield
            return
        stats = self.stats
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stats.lock_waits += 1
            waiting = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_EX)
            stats.lock_wait_seconds += time.perf_counter() - waiting
        taken = time.perf_counter()
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            stats.lock_held_seconds += time.perf_counter() - taken

    def _set_durability(self, conn: sqlite3.Connection, full: bool) -> None:
        """PRAGMA synchronous can only change between transactions: set it before BEGIN."""
        if full != self._synchronous_full:
            conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._synchronous_full = full

    def _commit(self, conn: sqlite3.Connection, changes_before: int) -> bool:
        started = time.perf_counter()
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("queue: COMMIT failed: %s", exc)
            self.stats.failed_commits += 1
            _rollback_quietly(conn)
            return False
        if conn.total_changes != changes_before:
            self._on_commit(time.perf_counter() - started, self._synchronous_full)
            self.stats.commits += 1
            if not self._synchronous_full:
                self.stats.unsynced_commits += 1
        return True

    def _finish(self, done: list[_Resolution], txn: Txn, committed: bool) -> list[_Resolution]:
        if committed:
            for action in txn.after_commit:
                try:
                    action()
                except Exception:  # a leftover file is cleaned at the next open()
                    log.exception("queue: after-commit action failed")
        self.stats.batches += 1
        self.stats.jobs += len(done)
        self.stats.max_batch = max(self.stats.max_batch, len(done))
        return done

    @staticmethod
    def _run_jobs(conn: sqlite3.Connection, txn: Txn, jobs: Sequence[Job], done: list[_Resolution]) -> None:
        i = 0
        while i < len(jobs):
            end = i + 1
            bulk = jobs[i].bulk
            while bulk is not None and end < len(jobs) and jobs[end].bulk is bulk:
                end += 1
            group = jobs[i:end]
            running = len(group)  # how many jobs a lost transaction takes with it
            try:
                if bulk is not None and len(group) > 1:
                    ok, value = _in_savepoint(conn, txn, bulk, [j.arg for j in group])
                    if ok:
                        done.extend((j.future, r, None) for j, r in zip(group, value, strict=True))
                        i = end
                        continue
                    # Retry each alone, so the error reaches only the job behind it.
                running = 1
                for job in group:
                    ok, value = _in_savepoint(conn, txn, job.op, job.arg)
                    done.append((job.future, value, None) if ok else (job.future, None, value))
                    i += 1
            except _TransactionLost as lost:
                lost.first, lost.count = i, running
                raise


def _in_savepoint(
    conn: sqlite3.Connection, txn: Txn, fn: Callable[[sqlite3.Connection, Txn, Any], Any], arg: Any
) -> tuple[bool, Any]:
    """Run `fn(conn, txn, arg)` inside a SAVEPOINT.

    Returns (True, result), or (False, error-for-the-caller) after rolling back
    to the savepoint. Raises _TransactionLost if SQLite dropped the transaction.
    """
    mark = len(txn.after_commit)
    try:
        conn.execute("SAVEPOINT job")
        result = fn(conn, txn, arg)
    except Exception as exc:
        if not _in_transaction(conn):
            raise _TransactionLost(exc) from exc
        try:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        except sqlite3.Error as rollback_error:
            raise _TransactionLost(exc) from rollback_error
        del txn.after_commit[mark:]
        return False, _as_queue_error(exc)
    try:
        conn.execute("RELEASE job")
    except sqlite3.Error as exc:
        raise _TransactionLost(exc) from exc
    return True, result


def _resolve(done: list[_Resolution]) -> None:
    """Hand results back: one call_soon_threadsafe per event loop per batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Resolution]] = {}
    for item in done:
        by_loop.setdefault(item[0].get_loop(), []).append(item)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(items: list[_Resolution]) -> None:
    """Runs on the event loop: complete the futures (skipping cancelled ones)."""
    for future, result, exc in items:
        if future.done():  # the caller gave up (cancelled); the work stands
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


def _as_queue_error(exc: BaseException) -> BaseException:
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, sqlite3.Error | OSError):
        error = QueueError(f"queue database error: {exc}")
        error.__cause__ = exc
        return error
    return exc  # a bug: let the caller see it as it is


def _in_transaction(conn: sqlite3.Connection) -> bool:
    try:
        return conn.in_transaction
    except sqlite3.Error:  # the connection is closed: nothing of it is left
        return False


def _rollback_quietly(conn: sqlite3.Connection | None) -> None:
    if conn is not None and _in_transaction(conn):
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("queue: ROLLBACK failed: %s", exc)
