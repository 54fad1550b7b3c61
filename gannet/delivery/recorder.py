"""OutcomeRecorder: gathers the outcomes (and DSNs) of many concurrent
deliveries into few `store.record` commits.

While one commit is in flight, new outcomes collect; when it ends they go in
the next one (group commit, as the queue's writer does for enqueues). A
commit per delivered message would cap the relay at the disk's commit rate.

Failure: a record that fails is retried with backoff; after the last try the
outcomes are dropped *from memory only* — their leases expire and the
recipients are delivered again (a duplicate, never a loss). Must never raise
into the delivery path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from gannet import maillog
from gannet.clock import Clock
from gannet.queue.model import NewMessage, RecipientOutcome
from gannet.queue.store import QueueStore

log = logging.getLogger("gannet.delivery")

BACKOFF = (0.5, 1.0, 2.0, 4.0)
MAX_PER_COMMIT = 2000


class OutcomeRecorder:
    def __init__(
        self,
        store: QueueStore,
        clock: Clock,
        on_committed: Callable[[Sequence[RecipientOutcome], Sequence[NewMessage]], None] = lambda o, f: None,
    ) -> None:
        """`on_committed(outcomes, follow_ups)`: called after each commit, e.g.
        to wake the delivery loops for new DSNs and new retry times."""
        self._store = store
        self._clock = clock
        self._on_committed = on_committed
        self._outcomes: list[RecipientOutcome] = []
        self._follow_ups: list[NewMessage] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0
        self.errors = 0

    @property
    def pending(self) -> int:
        return len(self._outcomes)

    def add(
        self, outcomes: Sequence[RecipientOutcome], follow_ups: Sequence[NewMessage] = ()
    ) -> asyncio.Future[None]:
        """Queue outcomes for the next commit; the future resolves once they are
        committed (or given up on). Callers need not await it."""
        self._outcomes.extend(outcomes)
        self._follow_ups.extend(follow_ups)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="outcome-recorder")
        return done

    async def drain(self) -> None:
        """Wait until everything added so far is committed."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush_all(self) -> None:
        while self._outcomes or self._follow_ups:
            outcomes, self._outcomes = self._outcomes[:MAX_PER_COMMIT], self._outcomes[MAX_PER_COMMIT:]
            follow_ups, self._follow_ups = self._follow_ups, []
            waiters = self._waiters if not self._outcomes else []
            if waiters:
                self._waiters = []
            await self._commit(outcomes, follow_ups)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _commit(self, outcomes: list[RecipientOutcome], follow_ups: list[NewMessage]) -> None:
        for pause in (*BACKOFF, None):
            try:
                for queue_id in await self._store.record(outcomes, follow_ups):
                    maillog.removed(queue_id)
            except Exception:
                self.errors += 1
                log.exception("recording %d delivery outcomes failed", len(outcomes))
                if pause is None:
                    return  # the leases expire; the recipients are tried again
                await self._clock.sleep(pause)
            else:
                self.commits += 1
                self._on_committed(outcomes, follow_ups)
                return
