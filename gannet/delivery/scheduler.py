"""The outbound scheduler: moves due SMTP recipients (and, with `[mailboxes]
lmtp`, LOCAL ones) from the queue to their next hop over OutboundConnection.

The loop (one `Scheduler.run()` per transport, in the delivery worker):
1. Claim due recipients under a lease, up to `max_inflight` held at once.
2. Route each domain (routing.Router: MX or smarthost; DNS cached) and split
   each message into one Job per destination carrying all its recipients
   there (one transaction per message per destination).
3. Each destination (destination.Destination) has its own queue and up to
   `destination_concurrency` connections, all destinations together up to
   `remote_concurrency`. A connection delivers job after job (RSET between
   them) and is kept idle `connection_cache_time` for the next.
4. Every recipient's result becomes a Verdict (attempts.py, pure); DSNs are
   built (bounces.py) and the outcomes and DSNs go to the store in group
   commits (recorder.py). The mail log gets one line per recipient attempt.

Head of line: a dead destination (every hop failed, nothing else getting
through) has its waiting mail deferred at once and the store told to push
its queued mail to the end of its backoff (`defer_destination`); fresh mail
for it is deferred without an attempt until then. Nothing else waits for it.

Leases: claims are short (`[queue] lease`) and renewed while held, waiting
or in flight (claim_loop / leases.LeaseKeeper). A job whose lease was taken
over elsewhere (this process missed its renewals) is dropped unsent and its
outcome never recorded. A job still waiting when its lease is about to end
unrenewed (renewals failing: the database unreachable, this process stalled)
is handed back, due now, rather than started on a lease that may lapse.

Invariants: a recipient is Delivered only on the next hop's 2xx for it; any
error not understood is temporary (Deferred, retried) — never a drop; if
this process dies, the leases expire within one lease length (or the
restarted worker releases them) and the recipients are tried again: a
duplicate at worst.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gannet.clock import Clock
from gannet.config import DeliveryConfig
from gannet.delivery import attempts
from gannet.delivery.attempts import Verdict
from gannet.delivery.bounces import Bounces
from gannet.delivery.claim_loop import ClaimLoop
from gannet.delivery.destination import Destination, Job, SharedBody
from gannet.delivery.dns import DnsError
from gannet.delivery.leases import DEFAULT_LEASE
from gannet.delivery.outbound import OutboundConnection, OutboundOptions, SessionFailure
from gannet.delivery.outcome_log import log_outcome
from gannet.delivery.recorder import OutcomeRecorder
from gannet.delivery.routing import Route
from gannet.delivery.transaction import envelope_for, open_hop, reason, send_with_fallback
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

log = logging.getLogger("gannet.delivery.scheduler")

STREAM_ABOVE = 1024 * 1024  # bodies larger than this are streamed from their spool file


class RouteSource(Protocol):
    async def route(self, domain: str) -> Route: ...


@dataclass(slots=True)
class SchedulerStats:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    connections: int = 0  # opened
    reused: int = 0  # messages sent over an already used connection
    suspended: int = 0  # times a destination was found dead
    lost: int = 0  # recipients whose lease was taken over while held here (dropped, not recorded)


class Scheduler(ClaimLoop):
    """Delivers one transport's due recipients until `stop()`. Run once."""

    def __init__(
        self,
        store: QueueStore,
        *,
        transport: Transport,
        owner: str,
        router: RouteSource,
        options: Callable[[Route, str], OutboundOptions],
        delivery: DeliveryConfig,
        clock: Clock,
        bounces: Bounces | None = None,
        lmtp: bool = False,
        batch: int = 200,
        max_inflight: int = 20_000,
        lease_seconds: float = DEFAULT_LEASE,
        on_enqueued: Callable[[], None] = lambda: None,
        gather: float = 0.0,
        pace: float = 0.0,
    ) -> None:
        """`options(route, domain)`: the OutboundOptions for a destination.
        `lmtp`: the next hop is the final mailbox server (RCPT TO the mailbox;
        success reports say "delivered").
        `on_enqueued`: called when DSNs were enqueued (wakes the delivery loops).
        `gather`: after a wake-up, wait this long before claiming (batches).
        `pace`: the same after a claim that found less than half its limit
        (ClaimLoop._pace)."""
        super().__init__(
            store, clock, transport=transport, owner=owner, lease_seconds=lease_seconds,
            gather=gather, pace=pace,
        )  # fmt: skip
        self._router = router
        self._options = options
        self._delivery = delivery
        self._bounces = bounces
        self._lmtp = lmtp
        self._batch = batch
        self._max_inflight = max_inflight
        # A job still waiting this close to its lease's end is handed back. Renewed
        # every third of a lease, a held lease never gets closer than two thirds
        # to its end unless a renewal failed; a transaction once started is kept
        # alive by the renewals, so the margin need not cover its timeouts.
        self._stale_margin = lease_seconds / 3
        self._on_enqueued = on_enqueued
        self._recorder = OutcomeRecorder(store, clock, self._committed)
        self._destinations: dict[str, Destination] = {}
        self._starved: dict[str, None] = {}  # destinations waiting for a global connection slot
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers = 0
        self._inflight = 0
        self._room = asyncio.Event()
        self.stats = SchedulerStats()

    # -- control ----------------------------------------------------------------

    def flush(self) -> None:
        """Forget which destinations are dead (each is probed again by one
        connection before full concurrency), then look at the queue now."""
        for d in self._destinations.values():
            d.dead_until = 0.0
        self.wake()

    def _stopped(self) -> None:
        self._room.set()

    async def run(self) -> None:
        self._begin()
        try:
            await self._claim_loop()
            while self._tasks:
                await asyncio.wait(set(self._tasks))
            await self._recorder.drain()
            # Jobs never started (we stopped first) go back to the queue now,
            # not when their lease runs out.
            await self._store.release_leases(self._owner)
        except asyncio.CancelledError:
            for task in self._tasks:
                task.cancel()
            raise
        finally:
            for d in self._destinations.values():
                for conn in d.close_idle():
                    await conn.close()
            self._end()

    def _committed(self, outcomes: Sequence[RecipientOutcome], follow_ups: Sequence[NewMessage]) -> None:
        if follow_ups:
            self._on_enqueued()
        if any(isinstance(o.outcome, Deferred) for o in outcomes):
            # The idle sleep was computed while these were leased; their retry
            # time may be sooner, so let the claim loop look again.
            self._wake.set()

    # -- claiming -----------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            room = self._max_inflight - self._inflight
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            limit = min(self._batch, room)
            claims = await self._claim(limit)
            if claims is None:
                continue
            if claims:
                self._inflight += sum(len(c.recipients) for c in claims)
                self._spawn(self._dispatch(claims))
                await self._pace(claims, limit)
            else:
                await self._idle()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s delivery: task crashed", self._owner, exc_info=task.exception())

    # -- routing --------------------------------------------------------------------

    async def _dispatch(self, claims: list[Claim]) -> None:
        try:
            await self._route_claims(claims)
        except Exception:  # a bug: see _forget (jobs already queued are dropped at _send)
            self._leases.let_go(r for c in claims for r in c.recipients)
            raise

    async def _route_claims(self, claims: list[Claim]) -> None:
        domains = list(dict.fromkeys(r.domain for c in claims for r in c.recipients))
        found = await asyncio.gather(*(self._route(d) for d in domains))
        routes = dict(zip(domains, found, strict=True))
        now = self._clock.now()
        for claim in claims:
            groups: dict[str, list[ClaimedRecipient]] = {}
            unroutable: list[Verdict] = []
            for rcpt in claim.recipients:
                route = routes[rcpt.domain]
                if isinstance(route, DnsError):
                    unroutable.append(self._dns_verdict(claim, rcpt, route, now))
                else:
                    groups.setdefault(route.destination, []).append(rcpt)
            if unroutable:
                await self._finish(claim, unroutable, relay="dns")
            body = SharedBody(users=len(groups))
            for rcpts in groups.values():
                route = routes[rcpts[0].domain]
                assert not isinstance(route, DnsError)
                self._enqueue(Job(claim, tuple(rcpts), body), route, rcpts[0].domain)

    async def _route(self, domain: str) -> Route | DnsError:
        try:
            return await self._router.route(domain)
        except DnsError as exc:
            return exc
        except Exception as exc:  # a bug or an unexpected resolver error: retry later
            log.exception("routing %s failed", domain)
            return DnsError(True, 451, "4.4.3", f"routing {domain} failed: {type(exc).__name__}")

    def _dns_verdict(self, claim: Claim, rcpt: ClaimedRecipient, error: DnsError, now: float) -> Verdict:
        reason = error.reply_text()
        if error.temporary:
            return attempts.temporary(claim, rcpt, reason, now=now, delivery=self._delivery)
        return attempts.failed(claim, rcpt, reason, now=now, delivery=self._delivery)

    # -- destinations -----------------------------------------------------------------

    def _enqueue(self, job: Job, route: Route, domain: str) -> None:
        d = self._destinations.get(route.destination)
        if d is None:
            d = self._destinations[route.destination] = Destination(route.destination, route)
        d.route = route
        now = self._clock.now()
        if d.is_dead(now):
            self._spawn(self._defer_jobs([job], d, now))
            return
        d.jobs.append(job)
        self._kick(d)

    def _kick(self, d: Destination) -> None:
        limit = d.limit(self._delivery.destination_concurrency)
        while d.jobs and d.workers < limit and not self._stopping:
            if self._workers >= self._delivery.remote_concurrency and not d.idle:
                self._starved[d.name] = None
                return
            job = d.jobs.popleft()
            d.workers += 1
            self._workers += 1
            self._spawn(self._work(d, job))

    def _worker_done(self, d: Destination) -> None:
        d.workers -= 1
        self._workers -= 1
        self._kick(d)
        while self._starved and self._workers < self._delivery.remote_concurrency:
            name = next(iter(self._starved))
            del self._starved[name]
            if (other := self._destinations.get(name)) is not None:
                self._kick(other)
        if d.unused:
            self._destinations.pop(d.name, None)

    async def _work(self, d: Destination, first: Job) -> None:
        job: Job | None = first
        unfinished: Job | None = first  # ours and not yet given to _finish: abandoned if a bug escapes
        conn: OutboundConnection | None = None
        try:
            conn = await self._connection(d, first)
            if conn is None:
                return
            d.connected += 1
            used = False
            while job is not None:
                if used:
                    self.stats.reused += 1
                unfinished = job
                await self._send(d, conn, job)
                unfinished = None
                used = True
                if self._stopping or not conn.usable or not d.jobs:
                    break
                job = unfinished = d.jobs.popleft()
                if not await conn.reset():
                    d.jobs.appendleft(job)  # another connection takes it
                    unfinished = None
                    break
            d.connected -= 1
            if conn.usable and not self._stopping:
                d.idle.append((conn, self._clock.monotonic()))
                cache = self._delivery.connection_cache_time
                asyncio.get_running_loop().call_later(cache * 1.01, self._expire_idle, d)
                conn = None
        except Exception:
            if unfinished is not None:
                self._forget(unfinished, lost=False)
            raise
        finally:
            if conn is not None:
                await conn.close()
            self._worker_done(d)

    def _expire_idle(self, d: Destination) -> None:
        d.expire_idle(self._clock.monotonic(), self._delivery.connection_cache_time)
        if d.unused and self._destinations.get(d.name) is d:
            del self._destinations[d.name]

    async def _connection(self, d: Destination, job: Job) -> OutboundConnection | None:
        """An idle connection or a new one; None when every hop failed (the job
        and, if the destination is now dead, its waiting jobs are deferred)."""
        while (
            cached := d.take_idle(self._clock.monotonic(), self._delivery.connection_cache_time)
        ) is not None:
            # The peer may have hung up while it idled: reset() notices (EOF, a stray
            # reply) and says so, and then a new connection is opened instead.
            if await cached.reset():
                self.stats.reused += 1
                return cached
            await cached.close()
        options = self._options(d.route, job.recipients[0].domain)
        failure: SessionFailure | None = None
        for hop in d.route.hops:
            try:
                conn = await open_hop(hop, options)
            except SessionFailure as exc:
                log.info("%s: %s", d.name, exc.reason)
                failure = exc
                if not exc.try_next_hop:
                    break
                continue
            self.stats.connections += 1
            if d.probing:
                log.info("destination %s is reachable again", d.name)
            d.mark_alive()
            return conn
        now = self._clock.now()
        reason = failure.reason if failure is not None else f"4.4.4 no route to {d.name}"
        if failure is not None and not failure.temporary:
            await self._finish(
                job.claim,
                [
                    attempts.failed(job.claim, r, reason, now=now, delivery=self._delivery, remote_mta=d.name)
                    for r in job.recipients
                ],
                relay=d.name,
            )
            self._release(job)
            return None
        jobs = [job]
        if d.is_dead(now):
            # Another connection already found it dead: one finding, one backoff step.
            await self._defer_jobs(jobs, d, now)
            return None
        if d.connected == 0:  # nobody is getting through: the destination is dead
            backoff = attempts.destination_backoff(d.failures + 1, self._delivery.retry)
            jobs += d.mark_dead(now, backoff, reason)
            self.stats.suspended += 1
            log.warning(
                "destination %s is not responding (%s); its mail waits %.0fs (%d messages deferred now)",
                d.name, reason, backoff, len(jobs),
            )  # fmt: skip
            domain = job.recipients[0].domain if d.name == job.recipients[0].domain else None
            self._spawn(self._suspend_in_store(domain, d.dead_until, reason))
        await self._defer_jobs(jobs, d, now, reason)
        return None

    async def _suspend_in_store(self, domain: str | None, until: float, reason: str) -> None:
        try:
            moved = await self._store.defer_destination(
                self._transport, domain, until=until, reason=f"{reason} (destination suspended)"
            )
        except Exception:
            log.exception("deferring the queued mail of a dead destination failed")
            return
        if moved:
            log.info("%d queued recipient(s) for %s wait until the destination's backoff ends", moved, domain)

    async def _defer_jobs(self, jobs: Sequence[Job], d: Destination, now: float, reason: str = "") -> None:
        why = reason or f"{d.last_error} (delivery to {d.name} temporarily suspended)"
        for job in jobs:
            verdicts = [
                attempts.temporary(
                    job.claim,
                    r,
                    why,
                    now=now,
                    delivery=self._delivery,
                    remote_mta=d.name,
                    not_before=d.dead_until,
                )
                for r in job.recipients
            ]
            await self._finish(job.claim, verdicts, relay=d.name)
            self._release(job)

    # -- one transaction ----------------------------------------------------------------

    async def _send(self, d: Destination, conn: OutboundConnection, job: Job) -> None:
        claim = job.claim
        now = self._clock.now()
        if not self._leases.holds(job.recipients):
            self._forget(job, lost=True)
            return
        if now > self._leases.lease_end(claim) - self._stale_margin:
            # Waited in memory too long: hand it back before the lease runs out.
            verdicts = [
                Verdict(r, Deferred("4.4.0 not tried in time; due again now", now)) for r in job.recipients
            ]
            await self._finish(claim, verdicts, relay=conn.label)
            self._release(job)
            return
        try:
            body = await self._body(job)
        except Exception:
            log.exception("%s: cannot read the queued body", claim.queue_id)
            verdicts = [
                attempts.temporary(
                    claim, r, "4.3.0 cannot read queued message", now=now, delivery=self._delivery
                )
                for r in job.recipients
            ]
            await self._finish(claim, verdicts, relay=conn.label)
            self._release(job)
            return
        envelope = envelope_for(claim, job.recipients, lmtp=self._lmtp)
        options = self._options(d.route, job.recipients[0].domain)
        sent = await send_with_fallback(conn, d.route.hops, options, envelope, body)
        now = self._clock.now()
        if sent.failure is not None:
            judge = attempts.temporary if sent.failure.temporary else attempts.failed
            verdicts = [
                judge(claim, r, sent.failure.reason, now=now, delivery=self._delivery, remote_mta=sent.host)
                for r in job.recipients
            ]
        else:
            assert sent.results is not None
            verdicts = [
                attempts.by_reply(
                    claim,
                    r,
                    result.reply.code,
                    reason(result),
                    now=now,
                    delivery=self._delivery,
                    remote_mta=sent.host,
                    next_hop_has_dsn=sent.next_hop_has_dsn,
                    final=self._lmtp,
                )
                for r, result in zip(job.recipients, sent.results, strict=True)
            ]
        await self._finish(claim, verdicts, relay=sent.label, tls=sent.tls, content=body)
        self._release(job)

    async def _body(self, job: Job) -> bytes | Path:
        shared = job.body
        if shared.load is None:
            shared.load = asyncio.ensure_future(self._load_body(job.claim))
        return await asyncio.shield(shared.load)

    async def _load_body(self, claim: Claim) -> bytes | Path:
        if claim.size > STREAM_ABOVE:
            path = await self._store.body_file(claim.queue_id)
            if path is not None:
                return path
        return await self._store.read_body(claim.queue_id)

    def _release(self, job: Job) -> None:
        job.body.users -= 1
        if job.body.users <= 0:
            job.body.load = None

    def _forget(self, job: Job, *, lost: bool) -> None:
        """Give a job up unrecorded: its lease is someone else's now (`lost`), or a
        bug ended the task holding it: no longer renewed, it lapses and is tried
        again rather than being kept here for ever."""
        if lost:
            log.warning("%s: lease taken over elsewhere; not delivered here", job.claim.queue_id)
            self.stats.lost += len(job.recipients)
        self._leases.let_go(job.recipients)
        self._inflight -= len(job.recipients)
        self._room.set()
        self._release(job)

    async def _finish(
        self,
        claim: Claim,
        verdicts: Sequence[Verdict],
        *,
        relay: str,
        tls: str = "",
        content: bytes | Path | None = None,
    ) -> None:
        now = self._clock.now()
        delay = now - claim.received_at
        outcomes = []
        kept: list[Verdict] = []  # those whose lease is still ours: the others are not recorded
        for v in verdicts:
            log_outcome(claim.queue_id, v.rcpt.address, v.outcome, relay=relay, delay=delay, now=now, tls=tls)
            if self._leases.holds((v.rcpt,)):
                kept.append(v)
                outcomes.append(RecipientOutcome(v.rcpt.recipient_id, v.rcpt.lease_token, v.outcome, now))
            else:
                self.stats.lost += 1
            if isinstance(v.outcome, Delivered):
                self.stats.delivered += 1
            elif isinstance(v.outcome, Deferred):
                self.stats.deferred += 1
            else:
                self.stats.failed += 1
        if len(kept) < len(verdicts):
            log.warning("%s: lease taken over elsewhere meanwhile; outcome not recorded", claim.queue_id)
        reports = [v.report for v in kept if v.report is not None]
        dsns = []
        if reports and self._bounces is not None:
            dsns = await self._bounces.reports(
                claim, reports, now=now, content=content if isinstance(content, bytes) else None
            )
        if outcomes:  # renewed until recorded (or given up): until then they are still ours
            rcpts = [v.rcpt for v in kept]
            self._recorder.add(outcomes, dsns).add_done_callback(lambda _: self._leases.let_go(rcpts))
        self._inflight -= len(verdicts)
        self._room.set()
