"""Local delivery by the enqueue writer process: fresh local mail goes into its
Maildirs right after the COMMIT that queued it, without a trip through the
delivery loop.

Why: the writer holds each message's body when it commits it. Delivered by the
delivery loop, the same message costs a wake-up, a claim transaction, a second
read of the body and a record transaction, all competing for the write lock
with the sessions' commits. Measured (bench/README.md, session 14, one
message per connection, three alternating pairs): +15 % accepted messages per
second at 50 sessions, +2.5 % at 10, and 8-12 % less CPU per message.

How (sqlite_enqueue_child drives it):
1. In the enqueue transaction the writer leases the new messages' local
   recipients to OWNER (`sqlite_ops.claim_fresh`), before the COMMIT makes
   them visible: no delivery loop can claim them first.
2. After answering the server, it hands the claims and their bodies to this
   object's thread (`hand`). The thread gathers GATHER seconds of them (so a
   stream of single messages is written in batches), writes every file
   unsynced and commits them all with two syncfs (`local.write_and_commit`),
   and logs each delivery as the delivery loop would.
3. The writer takes the results (`take_results`) into a transaction of their
   own, after answering the enqueues at hand: deliveries through
   `sqlite_ops.record`, the rest (a file that could not be written, a bad
   mailbox name) through `sqlite_ops.give_back`, due at once, for the
   delivery loop to retry with its whole logic (deferrals, DSNs); the server
   then wakes the loop.

What it takes: inline bodies only (never a spooled one: those are large, and
the delivery loop streams them), at most MAX_HELD bytes of them at once; past
that the writer leaves new mail to the delivery loop (`has_room`).

Invariants: a recipient is recorded delivered only after its file is durable;
if the process dies between the write and the record, the lease expires (or
the next writer releases it at start) and the delivery loop delivers it
again: a duplicate, never a loss.

Never: touch the database (the writer's thread does), or write for a recipient
it holds no lease on.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from gannet.config_model import Config
from gannet.delivery.local import RELAY, FileJob, write_and_commit
from gannet.delivery.maildir import SYNCFS_AVAILABLE, maildir_path, to_lf
from gannet.delivery.outcome_log import log_outcome
from gannet.queue.model import Claim, Delivered, RecipientOutcome

log = logging.getLogger("gannet.delivery.local")

OWNER = "enqueue-writer"  # the lease owner name (one writer per SQLite queue)
GATHER = 0.02  # seconds to collect claims after the first, before writing them
MAX_HELD = 32 * 1024 * 1024  # bytes of bodies waiting for or in a write


@dataclass(frozen=True, slots=True)
class Settings:
    """What the writer process needs to deliver: handed to it as JSON on its
    command line by the server (queue/configured.py)."""

    maildir_template: str
    lease_seconds: float
    log_format: str = "text"  # as the server's (gannet.logsetup)
    metric_domains: tuple[str, ...] = ()  # the local and relay domains (gannet.metrics.configure)
    owner: str = OWNER
    # All-local messages written before the reply, never queued (delivery/local_direct.py).
    direct: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        fields = json.loads(text)
        return cls(**{**fields, "metric_domains": tuple(fields["metric_domains"])})


def settings_for(config: Config, log_format: str) -> Settings | None:
    """The settings when `config` has the enqueue writer deliver local mail: asked
    for (`[delivery] local_at_enqueue`), a SQLite queue with its writer process,
    Maildirs (not LMTP) committed in batches (syncfs). Else None."""
    d = config.delivery
    if not (
        d.local_at_enqueue
        and config.queue.sqlite_path is not None
        and config.queue.writer_process
        and not config.mailboxes.lmtp
        and d.maildir_sync == "batch"
        and SYNCFS_AVAILABLE
    ):
        return None
    return Settings(
        maildir_template=config.mailboxes.maildir,
        lease_seconds=config.queue.lease,
        log_format=log_format,
        metric_domains=(*config.relay.local_domains, *config.relay.relay_domains),
        direct=d.local_direct,
    )


@dataclass(slots=True)
class Results:
    """What the thread hands back for the writer's next transaction."""

    delivered: list[RecipientOutcome] = field(default_factory=list)
    given_back: list[tuple[int, str]] = field(default_factory=list)  # (recipient id, lease token)


_Batch = list[tuple[Claim, bytes]]  # claims with their bodies (CRLF)


class LocalAtEnqueue:
    """`start()` once, `hand()` many, `take_results()` after each ready(), `stop()` once."""

    def __init__(self, settings: Settings, ready: Callable[[], None]) -> None:
        """`ready`: called on the thread when results are waiting (it must only
        signal, e.g. write a byte to a pipe the writer watches)."""
        self.settings = settings
        self._ready = ready
        self._inbox: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._results = Results()
        self._held = 0  # bytes handed and not yet written; under _lock
        self._thread = threading.Thread(target=self._main, name="gannet-local-at-enqueue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def has_room(self) -> bool:
        """False while MAX_HELD bytes wait: the writer then leaves new mail to the loop."""
        with self._lock:
            return self._held < MAX_HELD

    def hand(self, batch: _Batch) -> None:
        if not batch:
            return
        with self._lock:
            self._held += sum(len(body) for _, body in batch)
        self._inbox.put(batch)

    def take_results(self) -> Results:
        with self._lock:
            results, self._results = self._results, Results()
        return results

    def stop(self) -> None:
        """Write what was handed, then end the thread (its last results stay to be taken)."""
        self._inbox.put(None)
        self._thread.join()

    # -- the thread ---------------------------------------------------------------

    def _main(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch, stopping = self._gather(first)
            try:
                results = self._deliver(batch)
            except Exception:  # a bug: hand everything back rather than sit on the leases
                log.exception("local delivery at enqueue: a batch crashed; the delivery loop takes it")
                leases = [(r.recipient_id, r.lease_token) for claim, _ in batch for r in claim.recipients]
                results = Results([], leases)
            self._publish(results, sum(len(body) for _, body in batch))
            if stopping:
                return

    def _gather(self, first: _Batch) -> tuple[_Batch, bool]:
        batch = list(first)
        deadline = time.monotonic() + GATHER
        while (left := deadline - time.monotonic()) > 0:
            try:
                more = self._inbox.get(timeout=left)
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch += more
        return batch, False

    def _deliver(self, batch: _Batch) -> Results:
        jobs: list[FileJob] = []
        given_back: list[tuple[int, str]] = []
        for claim, body in batch:
            lf_body = to_lf(body)
            for rcpt in claim.recipients:
                try:
                    maildir = maildir_path(self.settings.maildir_template, rcpt.mailbox or rcpt.address)
                except ValueError:  # the delivery loop fails it with a DSN
                    given_back.append((rcpt.recipient_id, rcpt.lease_token))
                    continue
                jobs.append(FileJob(claim, rcpt, maildir, lf_body))
        written = write_and_commit(jobs) if jobs else []
        now = time.time()
        delivered: list[RecipientOutcome] = []
        for job, result in zip(jobs, written, strict=True):
            rcpt = job.rcpt
            if isinstance(result, BaseException):
                # The delivery loop retries it and logs the deferral: it owns the retry schedule.
                log.warning(
                    "%s: local delivery at enqueue to %s failed (%s); left to the delivery loop",
                    job.claim.queue_id, rcpt.address, result,
                )  # fmt: skip
                given_back.append((rcpt.recipient_id, rcpt.lease_token))
                continue
            outcome = Delivered(detail=str(result))
            delay = now - job.claim.received_at
            log_outcome(job.claim.queue_id, rcpt.address, outcome, relay=RELAY, delay=delay, now=now)
            delivered.append(RecipientOutcome(rcpt.recipient_id, rcpt.lease_token, outcome, now))
        return Results(delivered, given_back)

    def _publish(self, results: Results, done_bytes: int) -> None:
        with self._lock:
            self._results.delivered += results.delivered
            self._results.given_back += results.given_back
            self._held -= done_bytes
        self._ready()
