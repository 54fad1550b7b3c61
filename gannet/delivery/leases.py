"""LeaseKeeper: keeps one delivery agent's claims alive while it holds the work.

Leases are short (`[queue] lease`, 2 minutes by default) so that the work of a
worker that dies — a node SIGKILLed, a machine gone — is free again for the
other nodes within about one lease length, instead of waiting out a lease
long enough for the slowest delivery. A worker that is alive therefore renews
what it still holds: claimed recipients waiting in memory for a connection,
and those in flight. Every `lease / 3` the keeper extends all of its owner's
live leases in ONE store call (`renew_leases`): a renewal may fail twice
before a lease lapses, and the hot path pays nothing per message.

Bookkeeping: recipient id → the lease token it was claimed under, added at
claim (`hold`), removed once its outcome is recorded (`let_go`; not before:
until the record commits, another node must not take it). A lease the store
reports gone (recorded meanwhile, released by the sweep, or taken over under
a new token after this process missed its renewals) is forgotten; `holds()`
then says False and the agent drops that work without recording it — a
record would be fenced off anyway, and delivering it here too would only
make a duplicate. Tokens are compared, not just ids: a recipient this agent
claimed again under a new token is a different lease.

Runs on the event loop's thread; never raises out of its task (a failed
renewal is logged and retried at the next tick).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from gannet.clock import Clock
from gannet.queue.model import Claim, ClaimedRecipient
from gannet.queue.store import QueueStore

log = logging.getLogger("gannet.delivery")

DEFAULT_LEASE = 120.0  # [queue] lease
RENEWALS_PER_LEASE = 3  # renew every third of a lease: two may fail before it lapses


class LeaseKeeper:
    def __init__(self, store: QueueStore, clock: Clock, *, owner: str, lease_seconds: float) -> None:
        self._store = store
        self._clock = clock
        self._owner = owner
        self.lease_seconds = lease_seconds
        self._held: dict[int, str] = {}  # recipient id → lease token
        self._renewed_until = 0.0  # every lease held at the last renewal lasts until then
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0  # store calls that succeeded
        self.lost = 0  # leases found gone while still held

    @property
    def interval(self) -> float:
        return self.lease_seconds / RENEWALS_PER_LEASE

    @property
    def held(self) -> int:
        return len(self._held)

    # -- bookkeeping ----------------------------------------------------------

    def hold(self, claims: Iterable[Claim]) -> None:
        for claim in claims:
            for r in claim.recipients:
                self._held[r.recipient_id] = r.lease_token

    def holds(self, recipients: Iterable[ClaimedRecipient]) -> bool:
        """Whether every one of these recipients is still ours under its token."""
        return all(self._held.get(r.recipient_id) == r.lease_token for r in recipients)

    def let_go(self, recipients: Iterable[ClaimedRecipient]) -> None:
        """Their outcome is recorded (or given up on): stop renewing them."""
        for r in recipients:
            if self._held.get(r.recipient_id) == r.lease_token:
                del self._held[r.recipient_id]

    def lease_end(self, claim: Claim) -> float:
        """When the lease of a claim still held ends, as far as this keeper knows:
        its own end, or that of the last renewal (which covered it, being held)."""
        return max(claim.lease_until, self._renewed_until)

    # -- renewal ----------------------------------------------------------------

    async def renew(self) -> int:
        """Extend every lease held now; forget those the store reports gone.
        Returns how many were lost. Raises what the store raises."""
        if not self._held:
            return 0
        leases = list(self._held.items())
        until = self._clock.now() + self.lease_seconds
        gone = await self._store.renew_leases(self._owner, leases, until=until)
        self.renewals += 1
        self._renewed_until = until
        sent = dict(leases)
        lost = 0
        for rid in gone:
            # Recorded meanwhile (let go already), or claimed again under a new
            # token since the snapshot: not a loss of what we hold now.
            if rid in sent and self._held.get(rid) == sent[rid]:
                del self._held[rid]
                lost += 1
        if lost:
            self.lost += lost
            log.warning(
                "%s delivery: %d lease(s) were taken over or released (renewals came too late); "
                "that work is dropped here, not recorded",
                self._owner,
                lost,
            )
        return lost

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lease-keeper {self._owner}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._clock.sleep(self.interval)
            try:
                await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "%s delivery: renewing %d lease(s) failed; trying again in %.0fs",
                    self._owner,
                    len(self._held),
                    self.interval,
                )
