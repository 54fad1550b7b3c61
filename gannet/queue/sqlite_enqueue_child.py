"""The enqueue writer process: the SQLite store's enqueue transactions, off the
server's interpreter.

Why a process: in the server, the writer thread and the session loop share one
GIL; every `execute` hands it over and must win it back from a busy loop, and
at 10 sessions the writer spent longer waiting for the GIL than working
(bench/README.md, session 9: 14 context switches per commit, 2.6 s of run-queue
wait per 10,000 messages). Here the inserts and the fsync'd COMMIT run on their
own interpreter; the loop only writes a frame and reads the answer.

Started by sqlite_enqueue_process with one end of a socketpair; it says READY
once the database and the write lock are open, then for each group of requests
that arrived together runs them as one transaction (the same Writer code as the
thread: savepoints, bulk insert, the cross-process flock, fsync) and answers
each request only after that COMMIT returned. It exits when the server closes
its end (after answering what it had read); the kernel kills it the moment
the server dies (gannet/util/parent_watch.py), so that nothing of it can commit once
a restarted server has begun its crash recovery.

With `--local-delivery` (`[delivery] local_at_enqueue`) it also delivers the
local mail it has just committed: `_Local` leases those recipients in the
enqueue transaction, hands them to delivery/local_at_enqueue.py's thread after
answering, and records that thread's results in a transaction of their own
(docs/queue.md, "Local delivery at enqueue"). With its `direct` setting
(`[delivery] local_direct`), a message whose every recipient is local is not
enqueued at all: delivery/local_direct.py writes its Maildir files before the
answer, and the queue gets only its history, after the answer. Their renames
into new/ are kept in a journal (`queue.db-renames`, delivery/maildir_journal.py)
until a syncfs after them: the next group's, or `settle`'s once no request has
come for SETTLE_AFTER; a new writer first finishes what a crash left there.

Never: accept requests from anything but its parent's socket (marshal), touch a
message the server did not hand it, or answer before the COMMIT (for a message
delivered before the reply: before its files are in new/ and their data and
journal lines durable).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from gannet import maillog, metrics
from gannet.delivery import local_direct, maildir_journal
from gannet.delivery.local_at_enqueue import LocalAtEnqueue, Settings
from gannet.delivery.maildir_journal import SETTLE_AFTER, RenameJournal
from gannet.logsetup import setup_logging
from gannet.queue import sqlite_enqueue_wire as wire
from gannet.queue import sqlite_ops as ops
from gannet.queue.model import Claim, InlineBody, Transport
from gannet.queue.sqlite_schema import connect
from gannet.queue.sqlite_writer import Job, Writer, WriterStats
from gannet.util.parent_watch import exit_with_parent

log = logging.getLogger("gannet.queue")

RECV_SIZE = 1 << 20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gannet-enqueue-writer")
    parser.add_argument("database", type=Path)
    parser.add_argument("spool_dir", type=Path)
    parser.add_argument("--node", default="local")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--local-delivery", metavar="JSON", help="deliver fresh local mail (Settings)")
    args = parser.parse_args(argv)
    if not exit_with_parent(args.parent_pid, sig=signal.SIGKILL, who="queue enqueue writer"):
        return 1
    sock = socket.socket(fileno=args.fd)
    commits: list[wire.Commit] = []
    db: Path = args.database
    writer = Writer(
        partial(connect, db),
        lock_path=db.with_name(db.name + "-writelock"),
        max_batch=args.max_batch,
        name="enqueue process",
        on_commit=lambda seconds, fsync: commits.append((seconds, fsync)),
    )
    try:
        writer.open_here()
    except Exception as exc:  # the server sees EOF, logs our stderr, keeps its thread writer
        print(f"gannet enqueue writer: cannot open {db}: {exc}", file=sys.stderr)
        return 1
    ctx = ops.Ctx(args.spool_dir, args.node, time.time)
    local = None
    try:
        if args.local_delivery:
            local = _Local.start(Settings.from_json(args.local_delivery), writer, ctx, _journal_path(db))
        sock.sendall(wire.frame(wire.READY))
        if local is not None and local.released_at_start:  # the delivery loop is to look again
            sock.sendall(wire.Reply(released=True).encode())
        _serve(sock, writer, ctx, commits, args.max_batch, local)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server is gone: nobody is waiting for an answer
    finally:
        if local is not None and local.journal is not None:
            local.journal.close()
        writer.close_here()
    return 0


def _journal_path(db: Path) -> Path:
    return db.with_name(db.name + "-renames")


@dataclass(slots=True)
class _Fresh:
    """The claim of one group's local recipients, waiting to be handed over."""

    bodies: dict[str, bytes]
    claims: list[Claim] = field(default_factory=list)


class _Local:
    """The writer's side of local delivery at enqueue (delivery/local_at_enqueue.py):
    which messages to claim, the jobs that claim them and record the results,
    and what the server is told (taken, released)."""

    def __init__(
        self, delivery: LocalAtEnqueue, ready_fd: int, released_at_start: int, journal: RenameJournal | None
    ) -> None:
        self.delivery = delivery
        self.ready_fd = ready_fd
        self.released_at_start = released_at_start
        self.journal = journal  # local_direct's renames (delivery/maildir_journal.py)
        self._fresh: _Fresh | None = None
        self._written: list[local_direct.Written] = []  # delivered before the reply, to record
        self._trace_due = 0.0  # time.monotonic() by which `_written` is to be recorded

    @classmethod
    def start(cls, settings: Settings, writer: Writer, ctx: ops.Ctx, journal_path: Path) -> _Local:
        """Set up logging and metrics as the server's, give back what a previous
        writer left claimed (it has exited: the server waited for it, or the
        kernel killed it with its server), finish the renames its journal
        names, start the thread."""
        setup_logging(settings.log_format, "info")
        if metrics.multiprocess():
            metrics.configure(settings.metric_domains)
        release = Job(partial(ops.release_leases, ctx), settings.owner, None)
        ((_, released, error),) = writer.run_here([release])
        if error is not None:
            raise error
        if released:
            log.info("queue: %d local recipient(s) a previous enqueue writer claimed are due again", released)
        # Even with local_direct turned off since: what a crash left is finished.
        maildir_journal.replay(journal_path)
        journal = RenameJournal(journal_path) if settings.direct else None
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_w, False)

        def ready() -> None:
            with contextlib.suppress(BlockingIOError):  # a byte is already waiting
                os.write(ready_w, b"!")

        delivery = LocalAtEnqueue(settings, ready)
        delivery.start()
        return cls(delivery, ready_r, released, journal)

    def write_direct(self, sock: socket.socket, group: list[wire.Request]) -> list[wire.Request]:
        """Deliver the group's all-local messages now (delivery/local_direct.py)
        and answer those written whole; returns what is left to enqueue: the
        requests not taken, and the taken messages with their recipients not
        written."""
        settings = self.delivery.settings
        if not settings.direct:
            return group
        taken, rest = local_direct.deliver(settings.maildir_template, group, self.journal)
        whole = [w.number for w in taken if w.complete]
        if whole:
            counted = WriterStats(direct_messages=len(whole), direct_groups=1)
            reply = wire.Reply(answers=[(n, None) for n in whole], taken=whole, stats=_stats(counted))
            sock.sendall(reply.encode())
        local_direct.log_deliveries(taken)
        if taken and not self._written:
            self._trace_due = time.monotonic() + TRACE_EVERY
        self._written += taken
        return rest + [(w.number, replace(w.message, recipients=tuple(w.left))) for w in taken if w.left]

    def claim_jobs(self, ctx: ops.Ctx, group: list[wire.Request]) -> list[Job]:
        """The job that leases the group's local recipients, in its transaction.
        Its `future` is its kind (a str; the requests' are ints), so that
        `conclude` can find its result."""
        bodies = {
            m.queue_id: m.body.data
            for _, m in group
            if isinstance(m.body, InlineBody)
            and not m.held
            and any(r.transport is Transport.LOCAL for r in m.recipients)
        }
        self._fresh = None
        if not bodies or not self.delivery.has_room():
            return []
        self._fresh = _Fresh(bodies)
        fresh = [m for _, m in group if m.queue_id in bodies]
        settings = self.delivery.settings
        claim = (fresh, time.time() + settings.lease_seconds, settings.owner)
        return [Job(partial(ops.claim_fresh, ctx), claim, _CLAIM)]

    def wait(self) -> float | None:
        """Seconds to wait for requests before there is something to do
        without them: renames to settle, or traces due to be recorded; None
        when there is nothing."""
        waits = [max(0.0, self._trace_due - time.monotonic())] if self._written else []
        if self.journal is not None and self.journal.unsettled:
            waits.append(SETTLE_AFTER)
        return min(waits, default=None)

    def settle(self, *, idle: bool) -> None:
        """Make the renames of the messages answered so far durable, when the
        writer is `idle` or the journal full (delivery/maildir_journal.py)."""
        if self.journal is not None and (idle or self.journal.full):
            self.journal.settle()

    def result_jobs(self, ctx: ops.Ctx, *, last: bool = False) -> list[Job]:
        """The jobs that record the deliveries done and give back the rest, in a
        transaction of their own after the enqueues' answers went out (a COMMIT
        without fsync measured no faster, and would leave an idle server's last
        records to a later commit); and, once due (or `last`), the traces of
        messages delivered before the reply."""
        results = self.delivery.take_results()
        jobs: list[Job] = []
        if self._written and (last or self._trace_due <= time.monotonic() or len(self._written) >= TRACE_MAX):
            # Not durable: losing it in a power cut loses a trace, never mail.
            written, self._written = self._written, []
            rows = [(w.message, [(r.address, str(path)) for r, path in w.delivered], w.complete, w.at)
                    for w in written]  # fmt: skip
            jobs.append(Job(partial(ops.record_direct, ctx), rows, _DIRECT, durable=False))
        if results.delivered:
            record = (results.delivered, ())
            jobs.append(Job(partial(ops.record, ctx), record, _RECORD))
        if results.given_back:
            back = (results.given_back, time.time())
            jobs.append(Job(partial(ops.give_back, ctx), back, _GIVE_BACK))
        return jobs

    def conclude(
        self, done: list[tuple[Any, Any, BaseException | None]], group: list[wire.Request]
    ) -> tuple[list[int], bool]:
        """Read the extra jobs' results. Returns the request numbers whose
        recipients are all claimed here (the server need not wake the delivery
        loop), and whether any recipient was given back (it must)."""
        taken: list[int] = []
        released = False
        for kind, result, error in done:
            if not isinstance(kind, str):
                continue  # a request's answer
            if error is not None:
                log.error("queue: local delivery at enqueue: %s failed: %s", kind, error)
                if kind == _CLAIM:
                    self._fresh = None  # nothing is leased: the delivery loop delivers them
                elif kind == _RECORD:
                    log.error("queue: those recipients will be delivered again when their leases expire")
                elif kind == _DIRECT:
                    log.error("queue: lost the history of messages delivered before the reply (not the mail)")
            elif kind == _CLAIM and self._fresh is not None:
                self._fresh.claims = result
                claimed = {claim.queue_id: len(claim.recipients) for claim in result}
                taken = [n for n, m in group if claimed.get(m.queue_id) == len(m.recipients)]
            elif kind == _RECORD:
                for queue_id in result:
                    maillog.removed(queue_id)
            elif kind == _GIVE_BACK:
                released = True
        return taken, released

    def hand_claims(self) -> None:
        fresh, self._fresh = self._fresh, None
        if fresh is not None and fresh.claims:
            self.delivery.hand([(claim, fresh.bodies[claim.queue_id]) for claim in fresh.claims])


_CLAIM, _RECORD, _GIVE_BACK, _DIRECT = "claim", "record", "give back", "record direct"
# The traces of messages delivered before the reply are recorded together, at
# most TRACE_EVERY seconds after the first of them (or once TRACE_MAX wait):
# a transaction for each small group cost the writer 0.15 ms a message at 10
# sessions (bench/README.md, "Session 16"), as much as the queue work saved.
TRACE_EVERY = 0.2
TRACE_MAX = 2048


def _serve(
    sock: socket.socket,
    writer: Writer,
    ctx: ops.Ctx,
    commits: list[wire.Commit],
    max_batch: int,
    local: _Local | None,
) -> None:
    one, bulk = partial(ops.enqueue_one, ctx), partial(ops.enqueue_many, ctx)
    frames = wire.FrameBuffer()
    while True:
        ready_fd, wait = (local.ready_fd, local.wait()) if local is not None else (None, None)
        requests, open_ = _receive(sock, frames, ready_fd, wait)
        messages = [wire.message_of(r) for r in requests]
        for start in range(0, len(messages), max_batch):
            group = messages[start : start + max_batch]
            if local is not None:
                group = local.write_direct(sock, group)
            jobs = [Job(one, message, number, bulk) for number, message in group]
            if local is not None:  # the claim of their local recipients goes in the same transaction
                jobs += local.claim_jobs(ctx, group)
            _transaction(sock, writer, commits, jobs, group, local)
        if local is not None:
            local.settle(idle=not requests or not open_)
            if not open_:  # write what it holds, then record it all before going
                local.delivery.stop()
            # Apart from the enqueues, after their answers went out: the 250s do not
            # wait for these statements.
            _transaction(sock, writer, commits, local.result_jobs(ctx, last=not open_), [], local)
        if not open_:
            return


def _transaction(
    sock: socket.socket,
    writer: Writer,
    commits: list[wire.Commit],
    jobs: list[Job],
    group: list[wire.Request],
    local: _Local | None,
) -> None:
    """Run `jobs` (a group's enqueues, or local delivery's results) and tell the
    server: the answers, and with local delivery what was taken or released."""
    if not jobs:
        return
    writer.stats = WriterStats()
    done = writer.run_here(jobs)
    answers = [(number, wire.error_of(exc)) for number, _, exc in done if isinstance(number, int)]
    taken, released = local.conclude(done, group) if local is not None else ([], False)
    reply = wire.Reply(
        answers=answers,
        commits=commits[:],
        stats=_stats(writer.stats),
        taken=taken,
        released=released,
    )
    commits.clear()
    sock.sendall(reply.encode())
    if local is not None:
        local.hand_claims()  # after the answers: the 250s do not wait for the Maildirs


def _stats(counted: WriterStats) -> tuple[float, ...]:
    """`counted` as a reply carries it (wire.STAT_FIELDS), for the server's WriterStats."""
    return tuple(float(getattr(counted, f)) for f in wire.STAT_FIELDS)


def _receive(
    sock: socket.socket, frames: wire.FrameBuffer, ready_fd: int | None, timeout: float | None
) -> tuple[list[Any], bool]:
    """Wait for at least one request (or for local delivery's results, or until
    `timeout`: traces are due), then take everything else already sent (that is
    the group in group commit). Returns (requests, still open)."""
    watched = [sock.fileno()] if ready_fd is None else [sock.fileno(), ready_fd]
    readable, _, _ = select.select(watched, [], [], timeout)
    if ready_fd in readable:
        os.read(ready_fd, 4096)  # the results are taken by the group that follows
    requests: list[Any] = []
    try:
        while True:
            data = sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            if not data:
                return requests, False
            requests += frames.feed(data)
    except BlockingIOError:
        return requests, True


if __name__ == "__main__":
    sys.exit(main())
