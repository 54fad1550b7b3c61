"""The sweep: a periodic pass over the queue that does not trust the delivery
loops. A peer MTA's worst bug was mail stuck for days with no event; here
every recipient ends delivered, failed (with a DSN) or expired by its
deadline, whatever happened to the loop that should have handled it.

Each pass (every `interval`, and once at start):
1. Stuck claims: a recipient whose lease ended more than `grace` ago and that
   nobody claimed again (its worker died, hangs, or its transport is no
   longer served) is released, due now, and logged; the delivery loops are
   woken.
2. Expired mail: every unfinished, unheld recipient of a message older than
   `delivery.give_up_after` — whatever its next attempt says, e.g. pushed
   out by a destination's backoff — fails with 4.4.7 and its sender gets the
   failure DSN, in one store transaction per batch.
3. Old history: messages that left the queue more than `keep_history` ago
   are forgotten (their `gannet trace`), PRUNE_BATCH per transaction so that
   the writer is never held for long. The hot path never deletes history.
   Whatever `keep_history` says, a message stays known for HISTORY_FLOOR
   after it left: see there.

Held messages are the postmaster's: the sweep leaves them alone. Must never
raise out of `run()`: a failed pass is logged and tried again next time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gannet import maillog
from gannet.clock import Clock
from gannet.config import DeliveryConfig
from gannet.delivery import attempts
from gannet.delivery.bounces import Bounces
from gannet.delivery.outcome_log import log_outcome
from gannet.queue.model import NewMessage, RecipientOutcome
from gannet.queue.store import QueueStore

log = logging.getLogger("gannet.delivery.sweep")

OWNER = "sweep"
BATCH = 500
PRUNE_BATCH = 1000
# A session whose enqueue writer process died mid-commit asks the store
# whether its message got in (enqueue_unless_stored: queued, or completed
# since). A message delivered and forgotten in that moment would be stored
# and delivered twice, so even `keep_history = 0` keeps this much.
HISTORY_FLOOR = 60.0


@dataclass(slots=True)
class SweepResult:
    released: int = 0
    expired: int = 0
    pruned: int = 0


class Sweep:
    def __init__(
        self,
        store: QueueStore,
        *,
        delivery: DeliveryConfig,
        clock: Clock,
        bounces: Bounces | None,
        interval: float = 60.0,
        grace: float = 60.0,
        keep_history: float | None = None,  # None: never prune (the store keeps everything)
        on_released: Callable[[], None] = lambda: None,  # work became due: wake the delivery loops
        owner: str = OWNER,  # the lease owner name (agents.py: "NODE/sweep" on a shared queue)
        lease_seconds: float = 300.0,  # its claims are recorded at once: never renewed
    ) -> None:
        self._lease_seconds = lease_seconds
        self._owner = owner
        self._store = store
        self._delivery = delivery
        self._clock = clock
        self._bounces = bounces
        self._interval = interval
        self._grace = grace
        self._keep_history = keep_history
        self._on_released = on_released
        self._stopping = asyncio.Event()
        self.total = SweepResult()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.once()
            except Exception:
                log.exception("queue sweep failed; trying again in %.0fs", self._interval)
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            except TimeoutError:
                pass

    async def once(self) -> SweepResult:
        result = SweepResult()
        now = self._clock.now()
        stuck = await self._store.release_expired_leases(now, expired_before=now - self._grace)
        for queue_id, address, owner in stuck:
            log.warning("%s: to=<%s> was stuck in a claim of %s; released, due now", queue_id, address, owner)
        result.released = len(stuck)
        if stuck:
            self._on_released()
        cutoff = now - self._delivery.give_up_after
        days = self._delivery.give_up_after / 86400
        while not self._stopping.is_set():
            claims = await self._store.claim_expired(
                now, received_before=cutoff, limit=BATCH, lease_seconds=self._lease_seconds, owner=self._owner
            )
            if not claims:
                break
            outcomes: list[RecipientOutcome] = []
            dsns: list[NewMessage] = []
            for claim in claims:
                reason = f"4.4.7 message expired after {days:g} days in the queue"
                verdicts = [
                    attempts.failed(claim, r, reason, now=now, delivery=self._delivery)
                    for r in claim.recipients
                ]
                delay = now - claim.received_at
                for v in verdicts:
                    log_outcome(claim.queue_id, v.rcpt.address, v.outcome, relay="none", delay=delay, now=now)
                    outcomes.append(RecipientOutcome(v.rcpt.recipient_id, v.rcpt.lease_token, v.outcome, now))
                reports = [v.report for v in verdicts if v.report is not None]
                if reports and self._bounces is not None:
                    dsns += await self._bounces.reports(claim, reports, now=now)
            for queue_id in await self._store.record(outcomes, dsns):
                maillog.removed(queue_id)
            if dsns:
                self._on_released()
            result.expired += len(outcomes)
        result.pruned = await self._prune(now)
        self.total.released += result.released
        self.total.expired += result.expired
        self.total.pruned += result.pruned
        return result

    async def _prune(self, now: float) -> int:
        if self._keep_history is None:
            return 0
        pruned = 0
        while not self._stopping.is_set():
            before = now - max(self._keep_history, HISTORY_FLOOR)
            n = await self._store.prune_history(before, limit=PRUNE_BATCH)
            pruned += n
            if n < PRUNE_BATCH:
                break
            await asyncio.sleep(0)  # let the delivery loops' store calls in between
        if pruned:
            log.info("queue sweep: forgot the history of %d message(s) finished over %.0fs ago",
                     pruned, self._keep_history)
        return pruned
