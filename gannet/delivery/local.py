"""Local delivery: the loop that moves Transport.LOCAL recipients from the
queue into their Maildirs.

Owns no on-disk state of its own: it reads the queue only through the
QueueStore protocol and writes mailboxes only through `maildir.py`.

The loop (one `LocalDelivery.run()` per process, started by `gannet serve`):

1. Claim up to `batch` due LOCAL recipients under a lease (`claim_due`).
2. For each claimed message, read its body once (`read_body`, CRLF), convert
   it to LF once, and stage it in each recipient's Maildir (tmp/, fsync,
   rename into new/) in a thread pool, at most `delivery.local_concurrency`
   file operations in flight: the writes are fsync-bound, and threads let the
   kernel fold their journal commits together.
3. fsync each new/ that received files in the batch, once (`dirs_to_sync`):
   for one busy mailbox that halves the fsyncs per message.
4. Turn each result into an Outcome with the pure `decide_outcome`, log it
   (maillog), and record the whole batch in ONE `store.record` call: a
   record is a durable commit, so one per recipient would cap throughput at
   the disk's commit rate.
5. Up to `max_batches` batches are in flight, so that the next claim and the
   writes of one batch overlap the record commit of another.
6. When nothing is due, sleep until `idle_delay(now, next_due)` or `wake()`.

Invariants: a recipient is recorded Delivered only after its file and its
new/ directory are fsync'd; a failed write is Deferred (retried), never
dropped, and becomes Failed only once the message is older than
`delivery.give_up_after`; if this process dies between the write and the
record, the lease expires and the recipient is delivered again (a duplicate,
never a loss). The decisions live in `local_decisions` (pure); this module
only carries them out.

Callers: `gannet serve` constructs one LocalDelivery and runs it; the SMTP
session calls `wake()` after each successful enqueue with a local recipient.
All methods must be called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gannet import maillog
from gannet.clock import Clock
from gannet.config import DeliveryConfig
from gannet.delivery.attempts import Verdict, verdict
from gannet.delivery.bounces import Bounces
from gannet.delivery.claim_loop import ClaimLoop
from gannet.delivery.dsn import RecipientReport
from gannet.delivery.leases import DEFAULT_LEASE
from gannet.delivery.local_decisions import (
    BadMailbox,
    TempError,
    WriteResult,
    Written,
    apply_sync_errors,
    decide_outcome,
    dirs_to_sync,
)
from gannet.delivery.maildir import (
    STREAM_CHUNK,
    SYNCFS_AVAILABLE,
    commit_batch,
    maildir_path,
    stage_checked,
    stage_file,
    stage_in_maildir,
    stage_unsynced,
    to_lf,
)
from gannet.delivery.maildir_journal import RenameJournal
from gannet.delivery.outcome_log import log_outcome
from gannet.queue.model import (
    Claim,
    ClaimedRecipient,
    Deferred,
    Delivered,
    NewMessage,
    RecipientOutcome,
    Transport,
)
from gannet.queue.store import QueueStore
from gannet.util.files import fsync_dir

log = logging.getLogger("gannet.delivery.local")

RELAY = "maildir"  # the relay= field of the mail log
RECORD_BACKOFF = (0.5, 1.0, 2.0, 4.0)  # retries of a failed record, then give up
BODY_BUDGET = 64 * 1024 * 1024  # bytes of bodies held in memory at once (at least one)
LF_IN_THREAD = 1024 * 1024  # convert bodies larger than this off the event loop
STREAM_ABOVE = 1024 * 1024  # bodies larger than this are streamed from their spool file


def _write_error(exc: OSError) -> str:
    return f"4.3.0 cannot write mailbox: {exc.strerror or exc}"


# -- the loop -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attempt:
    claim: Claim
    rcpt: ClaimedRecipient
    result: WriteResult


@dataclass(slots=True)
class DeliveryStats:
    """Counters since start (for /metrics and the benchmark)."""

    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    records: int = 0  # store.record commits
    record_errors: int = 0


class _ByteBudget:
    """Bounds the bytes of message bodies held at once; one body always fits,
    however large, so a big message waits for room but never forever."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._changed = asyncio.Condition()

    def _fits(self, size: int) -> bool:
        return self._used == 0 or self._used + size <= self._limit

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits(size))
            self._used += size
        try:
            yield
        finally:
            self._used -= size
            async with self._changed:
                self._changed.notify_all()


class LocalDelivery(ClaimLoop):
    """Delivers due LOCAL recipients into Maildirs until `stop()`. Run once."""

    def __init__(
        self,
        store: QueueStore,
        *,
        maildir_template: str,
        delivery: DeliveryConfig,
        clock: Clock,
        owner: str = "local",
        executor: Executor | None = None,
        lease_seconds: float = DEFAULT_LEASE,
        batch: int = 64,
        max_batches: int = 3,
        bounces: Bounces | None = None,
        gather: float = 0.0,
        pace: float = 0.0,
        batch_sync: bool = False,
        on_enqueued: Callable[[], None] = lambda: None,
    ) -> None:
        """`gather`: after an idle wait ended by wake(), wait this long before
        claiming, so that messages arriving one by one are claimed, written and
        recorded in batches (fewer write transactions competing with the
        sessions' commits; a few ms of delivery latency).
        `pace`: the same after a claim that found less than half a batch
        (ClaimLoop._pace).
        `batch_sync`: commit each batch's files with syncfs (maildir.commit_batch)
        instead of an fsync per file and per new/ directory.
        `on_enqueued`: called after a record that enqueued DSNs."""
        super().__init__(
            store, clock, transport=Transport.LOCAL, owner=owner, lease_seconds=lease_seconds,
            gather=gather, pace=pace,
        )  # fmt: skip
        self._template = maildir_template
        self._delivery = delivery
        self._executor = executor
        self._batch = max(1, batch)
        self._max_batches = max(1, max_batches)
        self._bounces = bounces
        self._on_enqueued = on_enqueued
        self._batch_sync = batch_sync and SYNCFS_AVAILABLE
        self._writes = asyncio.Semaphore(delivery.local_concurrency)
        self._bodies = _ByteBudget(BODY_BUDGET)
        self._batches: set[asyncio.Task[None]] = set()
        self.stats = DeliveryStats()

    async def run(self) -> None:
        """Deliver until `stop()`. Store errors are logged and waited out, never raised."""
        self._begin()
        own_executor = self._executor is None
        executor = self._executor or ThreadPoolExecutor(
            self._delivery.local_concurrency, thread_name_prefix="gannet-maildir"
        )
        try:
            await self._loop(executor)
            await self._drain()
        except asyncio.CancelledError:
            # Hard shutdown: unrecorded work is leased and will be redone
            # when the lease expires (a duplicate at worst, never a loss).
            for task in self._batches:
                task.cancel()
            raise
        finally:
            if own_executor:
                executor.shutdown(wait=False)
            self._end()

    async def _loop(self, executor: Executor) -> None:
        while not self._stopping:
            await self._wait_for_batch_slot()
            claims = await self._claim(self._batch)
            if claims is None:
                continue
            if claims:
                self._start_batch(claims, executor)
                await self._pace(claims, self._batch)
            else:
                await self._idle()

    async def _wait_for_batch_slot(self) -> None:
        while len(self._batches) >= self._max_batches:
            await asyncio.wait(self._batches, return_when=asyncio.FIRST_COMPLETED)

    async def _drain(self) -> None:
        while self._batches:
            await asyncio.wait(self._batches)

    def _start_batch(self, claims: list[Claim], executor: Executor) -> None:
        task = asyncio.create_task(self._run_batch(claims, executor))
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("local delivery: batch crashed", exc_info=task.exception())

    # -- one batch ------------------------------------------------------------

    async def _run_batch(self, claims: list[Claim], executor: Executor) -> None:
        try:
            await self._deliver_batch(claims, executor)
        finally:  # recorded, given up, or a bug: renewing them further would keep them here for ever
            self._leases.let_go(r for c in claims for r in c.recipients)

    async def _deliver_batch(self, claims: list[Claim], executor: Executor) -> None:
        if self._batch_sync:
            attempts = await self._write_batch(claims, executor)
        else:
            per_claim = await asyncio.gather(*(self._write_claim(c, executor) for c in claims))
            attempts = [a for claim_attempts in per_claim for a in claim_attempts]
            attempts = await self._sync_new_dirs(attempts, executor)
        verdicts = [(a.claim, self._conclude(a.claim, a.rcpt, a.result)) for a in attempts]
        # A lease taken over meanwhile (this process missed its renewals) is not
        # ours to record: the new holder delivers it (a duplicate, never a loss).
        kept = [(c, v) for c, v in verdicts if self._leases.holds((v.rcpt,))]
        if len(kept) < len(verdicts):
            lost = len(verdicts) - len(kept)
            log.warning("local delivery: %d outcome(s) not recorded: lease taken over", lost)
        now = self._clock.now()
        outcomes = [
            RecipientOutcome(v.rcpt.recipient_id, v.rcpt.lease_token, v.outcome, now) for _, v in kept
        ]
        dsns = await self._make_dsns(kept, now)
        await self._record(outcomes, dsns)
        if any(isinstance(o.outcome, Deferred) for o in outcomes):
            # The idle sleep was computed while these were leased; their new
            # retry time may be sooner, so let the loop look again.
            self._wake.set()

    async def _write_claim(self, claim: Claim, executor: Executor) -> list[_Attempt]:
        """Read the body once, stage it into each recipient's Maildir."""
        rcpts = [r for r in claim.recipients if r.transport is Transport.LOCAL]
        if not rcpts:
            return []
        if claim.size > STREAM_ABOVE:
            try:
                source = await self._store.body_file(claim.queue_id)
            except Exception:
                log.exception("%s: cannot find the queued body", claim.queue_id)
                source = None
            if source is not None:  # a large body in a file: stream it, never load it
                async with self._bodies.hold(2 * STREAM_CHUNK):
                    writes = (self._write_rcpt(claim, r, source, executor) for r in rcpts)
                    return list(await asyncio.gather(*writes))
        async with self._bodies.hold(claim.size):
            try:
                body = await self._store.read_body(claim.queue_id)
            except Exception:
                # The detail (paths, database errors) goes to the log, not
                # into last_error, which may end up in a DSN to the sender.
                log.exception("%s: cannot read the queued body", claim.queue_id)
                error = TempError("4.3.0 cannot read queued message")
                return [_Attempt(claim, r, error) for r in rcpts]
            if len(body) > LF_IN_THREAD:
                lf_body = await asyncio.get_running_loop().run_in_executor(executor, to_lf, body)
            else:
                lf_body = to_lf(body)
            del body  # only the LF copy is needed from here on
            writes = (self._write_rcpt(claim, r, lf_body, executor) for r in rcpts)
            return list(await asyncio.gather(*writes))

    async def _write_rcpt(
        self, claim: Claim, rcpt: ClaimedRecipient, lf_body: bytes | Path, executor: Executor
    ) -> _Attempt:
        """Write one recipient's copy: from memory (LF bytes) or streamed from a
        spool file (Path, CRLF)."""
        # An empty mailbox means routing did not name an account: the address is it.
        mailbox = rcpt.mailbox or rcpt.address
        try:
            maildir = maildir_path(self._template, mailbox)
        except ValueError:
            return _Attempt(claim, rcpt, BadMailbox(mailbox))
        stage: Callable[[], Path]
        if isinstance(lf_body, Path):
            stage = functools.partial(
                stage_file, maildir, lf_body, return_path=claim.sender, delivered_to=rcpt.address
            )
        else:
            stage = functools.partial(
                stage_in_maildir, maildir, lf_body, return_path=claim.sender, delivered_to=rcpt.address
            )
        result: WriteResult
        async with self._writes:
            try:
                result = Written(await asyncio.get_running_loop().run_in_executor(executor, stage))
            except OSError as exc:
                result = TempError(_write_error(exc))
            except Exception:
                # A bug, not the disk: still never drop the message.
                log.exception("%s: delivery to %s crashed", claim.queue_id, maildir)
                result = TempError("4.3.0 local delivery error")
        return _Attempt(claim, rcpt, result)

    async def _write_batch(self, claims: list[Claim], executor: Executor) -> list[_Attempt]:
        """Batch mode: read the bodies (together: the store batches the reads), then
        write every file unsynced and commit them all (maildir.commit_batch) in ONE
        trip to a thread. A hop per recipient cost ~20% of the worker's CPU in
        future and lock handling (py-spy, 10 sessions). Memory: the bodies held
        at once come out of the process's body budget, so a batch of large
        messages is written in pieces of at most its share per batch in flight
        (`_pieces`), and batches never wait on each other for small bodies;
        bodies over STREAM_ABOVE are streamed from their files."""
        attempts: list[_Attempt] = []
        for piece in _pieces(claims, BODY_BUDGET // self._max_batches):
            size = sum(_in_memory(c) for c in piece)
            if any(c.size > STREAM_ABOVE for c in piece):
                size += 2 * STREAM_CHUNK  # what streaming a file holds (stage_file)
            async with self._bodies.hold(size):
                attempts += await self._write_piece(piece, executor)
        return attempts

    async def _write_piece(self, claims: list[Claim], executor: Executor) -> list[_Attempt]:
        sources = await asyncio.gather(*(self._source(c, executor) for c in claims))
        attempts: list[_Attempt] = []
        jobs: list[FileJob] = []
        for claim, source in zip(claims, sources, strict=True):
            for rcpt in claim.recipients:
                if rcpt.transport is not Transport.LOCAL:
                    continue
                mailbox = rcpt.mailbox or rcpt.address
                try:
                    maildir = maildir_path(self._template, mailbox)
                except ValueError:
                    attempts.append(_Attempt(claim, rcpt, BadMailbox(mailbox)))
                    continue
                if isinstance(source, TempError):
                    attempts.append(_Attempt(claim, rcpt, source))
                else:
                    jobs.append(FileJob(claim, rcpt, maildir, source))
        if jobs:
            results = await asyncio.get_running_loop().run_in_executor(executor, write_and_commit, jobs)
            for job, result in zip(jobs, results, strict=True):
                attempts.append(_Attempt(job.claim, job.rcpt, _as_write_result(job, result)))
        return attempts

    async def _source(self, claim: Claim, executor: Executor) -> bytes | Path | TempError:
        """The content to write: the spool file of a large body (streamed later),
        or the body in LF form; TempError when it cannot be read."""
        if claim.size > STREAM_ABOVE:
            try:
                path = await self._store.body_file(claim.queue_id)
            except Exception:
                log.exception("%s: cannot find the queued body", claim.queue_id)
                path = None
            if path is not None:
                return path
        try:
            body = await self._store.read_body(claim.queue_id)
        except Exception:
            log.exception("%s: cannot read the queued body", claim.queue_id)
            return TempError("4.3.0 cannot read queued message")
        if len(body) > LF_IN_THREAD:
            return await asyncio.get_running_loop().run_in_executor(executor, to_lf, body)
        return to_lf(body)

    async def _sync_new_dirs(self, attempts: list[_Attempt], executor: Executor) -> list[_Attempt]:
        """fsync each new/ that received files in this batch, once: only then
        are the renames durable and the recipients delivered."""
        errors: dict[Path, str] = {}

        async def sync(new_dir: Path) -> None:
            async with self._writes:
                try:
                    await asyncio.get_running_loop().run_in_executor(executor, fsync_dir, new_dir)
                except OSError as exc:
                    errors[new_dir] = _write_error(exc)

        await asyncio.gather(*(sync(d) for d in dirs_to_sync(a.result for a in attempts)))
        return [_Attempt(a.claim, a.rcpt, apply_sync_errors(a.result, errors)) for a in attempts]

    def _conclude(self, claim: Claim, rcpt: ClaimedRecipient, result: WriteResult) -> Verdict:
        now = self._clock.now()
        outcome = decide_outcome(
            result, attempts=rcpt.attempts, received_at=claim.received_at, now=now, delivery=self._delivery
        )
        log_outcome(
            claim.queue_id, rcpt.address, outcome, relay=RELAY, delay=now - claim.received_at, now=now
        )
        if isinstance(outcome, Delivered):
            self.stats.delivered += 1
        elif isinstance(outcome, Deferred):
            self.stats.deferred += 1
        else:
            self.stats.failed += 1
        return verdict(claim, rcpt, outcome, now=now, delivery=self._delivery, final=True)

    async def _make_dsns(self, verdicts: list[tuple[Claim, Verdict]], now: float) -> list[NewMessage]:
        """The DSNs the batch calls for: one per message with reports."""
        if self._bounces is None:
            return []
        by_claim: dict[str, tuple[Claim, list[RecipientReport]]] = {}
        for claim, v in verdicts:
            if v.report is not None:
                by_claim.setdefault(claim.queue_id, (claim, []))[1].append(v.report)
        dsns: list[NewMessage] = []
        for claim, reports in by_claim.values():
            dsns += await self._bounces.reports(claim, reports, now=now)
        return dsns

    async def _record(self, outcomes: list[RecipientOutcome], dsns: list[NewMessage]) -> None:
        """One durable commit for the whole batch; retried while the store is down."""
        if not outcomes and not dsns:
            return
        for pause in (*RECORD_BACKOFF, None):
            try:
                for queue_id in await self._store.record(outcomes, dsns):
                    maillog.removed(queue_id)
            except Exception:
                self.stats.record_errors += 1
                log.exception("local delivery: recording %d outcomes failed", len(outcomes))
                if pause is None:
                    # The files are written; the leases will expire and the
                    # recipients be delivered again: duplicates, not losses.
                    return
                await self._clock.sleep(pause)
            else:
                self.stats.records += 1
                if dsns:
                    self._on_enqueued()  # the DSNs may be ours or the remote agent's
                return


def _device(path: Path) -> int:
    try:
        return os.stat(path).st_dev
    except OSError:
        return -1  # commit_batch reports the error for this file


class MaildirCopy(Protocol):
    """One file of a batch, as write_and_commit reads it."""

    @property
    def maildir(self) -> Path: ...
    @property
    def source(self) -> bytes | Path: ...  # LF content, or a spool file (CRLF) to stream
    @property
    def return_path(self) -> str: ...
    @property
    def delivered_to(self) -> str: ...


@dataclass(slots=True)
class FileJob:
    """One file to write in a batch: a recipient's copy of a claimed message."""

    claim: Claim
    rcpt: ClaimedRecipient
    maildir: Path
    source: bytes | Path  # LF content, or a spool file (CRLF) to stream

    @property
    def return_path(self) -> str:
        return self.claim.sender

    @property
    def delivered_to(self) -> str:
        return self.rcpt.address


def write_and_commit(
    jobs: Sequence[MaildirCopy], journal: RenameJournal | None = None
) -> list[Path | Exception]:
    """In a thread: stage every file unsynced, then commit them per filesystem:
    with `journal`, those on its filesystem through it (one syncfs before the
    answer, delivery/maildir_journal.py), any other with commit_batch (two).
    Per job: its path in new/ (durable, or redoable from the journal), or what went wrong."""
    staged: list[Path | Exception] = []
    checks: dict[int, tuple[int, int]] = {}  # job index: (size, CRC-32), for the journal
    for i, job in enumerate(jobs):
        sender, to = job.return_path, job.delivered_to
        try:
            if isinstance(job.source, Path):
                staged.append(
                    stage_file(job.maildir, job.source, return_path=sender, delivered_to=to, fsync=False)
                )
            elif journal is not None:
                file, size, crc = stage_checked(job.maildir, job.source, return_path=sender, delivered_to=to)
                staged.append(file)
                checks[i] = (size, crc)
            else:
                staged.append(stage_unsynced(job.maildir, job.source, return_path=sender, delivered_to=to))
        except Exception as exc:  # OSError mostly; a bug must still not drop the message
            staged.append(exc)
    by_device: dict[int, list[int]] = {}
    for i, item in enumerate(staged):
        if isinstance(item, Path):
            by_device.setdefault(_device(item), []).append(i)
    for device, indexes in by_device.items():
        tmps = [tmp for i in indexes if isinstance(tmp := staged[i], Path)]
        if journal is not None and all(i in checks for i in indexes) and journal.shares(device):
            committed: Sequence[Path | OSError] = journal.commit(
                [(tmp, *checks[i]) for i, tmp in zip(indexes, tmps, strict=True)]
            )
        else:
            committed = commit_batch(tmps)
        for i, result in zip(indexes, committed, strict=True):
            staged[i] = result
    return staged


def _in_memory(claim: Claim) -> int:
    """Bytes of `claim`'s body a batch holds in memory: none when it is streamed."""
    return claim.size if claim.size <= STREAM_ABOVE else 0


def _pieces(claims: list[Claim], limit: int) -> list[list[Claim]]:
    """`claims` in order, cut into runs whose in-memory bodies (those not streamed:
    at most STREAM_ABOVE each) add up to at most `limit`; one claim always makes a piece."""
    pieces: list[list[Claim]] = []
    used = 0
    for claim in claims:
        size = _in_memory(claim)
        if not pieces or used + size > limit:
            pieces.append([])
            used = 0
        pieces[-1].append(claim)
        used += size
    return pieces


def _as_write_result(job: FileJob, result: Path | Exception) -> WriteResult:
    if isinstance(result, Path):
        return Written(result)
    if isinstance(result, OSError):
        return TempError(_write_error(result))
    log.error("%s: delivery to %s crashed", job.claim.queue_id, job.maildir, exc_info=result)
    return TempError("4.3.0 local delivery error")
