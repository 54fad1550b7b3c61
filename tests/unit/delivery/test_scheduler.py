"""The outbound Scheduler against a real SqliteStore in tmp_path, a routing stub
and scripted SMTP peers on loopback (relay_helpers.Peer): transactions per
message and destination, connection reuse and limits, per-recipient outcomes
and their DSNs, DNS failures, dead destinations (head of line), shutdown and
the stale-job guard.

Time: a PinnedClock. Its `now` (what the store and the retry schedule see)
moves only when a test moves it, so retry times are exact and nothing comes
due behind a test's back; waits on the network use the real loop clock, with
short timeouts. No test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from gannet.config import DeliveryConfig, TlsPolicy
from gannet.delivery.bounces import Bounces
from gannet.delivery.dns import DnsError
from gannet.delivery.outbound import OutboundOptions
from gannet.delivery.routing import Route
from gannet.delivery.scheduler import Scheduler
from gannet.queue.model import Deferred, RecipientOutcome, RecipientState, Transport

from .relay_helpers import (
    DAY,
    SENDER,
    T0,
    Peer,
    PinnedClock,
    Routes,
    SpyStore,
    body_of,
    closed_port,
    open_store,
    parse,
    recipient,
    reports,
    route_to,
    rows,
    smtp_message,
    table,
    until,
)

CONFIG = DeliveryConfig(
    retry=(60.0, 600.0, 6000.0),
    give_up_after=5 * DAY,
    connect_timeout=5.0,
    command_timeout=10.0,
    data_timeout=10.0,
    connection_cache_time=30.0,  # idle connections outlive every test; stop() closes them
    tls=TlsPolicy.NONE,
)


@dataclass
class Relay:
    """A Scheduler for Transport.SMTP with its store, routes and clock; run in a task."""

    store: SpyStore
    routes: Routes
    clock: PinnedClock
    scheduler: Scheduler
    task: asyncio.Task[None] | None = None
    peers: list[Peer] = field(default_factory=list)

    def start(self) -> None:
        self.task = asyncio.create_task(self.scheduler.run())

    async def stop(self) -> None:
        await asyncio.wait_for(self.scheduler.stop(), 10)
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)

    async def enqueue(self, *messages: Any) -> None:
        for m in messages:
            await self.store.enqueue(m)

    @property
    def ended(self) -> int:
        """Recipient attempts that ended (any outcome)."""
        s = self.scheduler.stats
        return s.delivered + s.deferred + s.failed

    async def empty(self) -> bool:
        return not await self.store.list_messages()


MakeRelay = Callable[..., Awaitable[Relay]]
MakePeer = Callable[..., Awaitable[tuple[Peer, int]]]


@pytest.fixture
async def peer() -> AsyncIterator[MakePeer]:
    peers: list[Peer] = []

    async def make(**kwargs: Any) -> tuple[Peer, int]:
        p = Peer(**kwargs)
        peers.append(p)
        return p, await p.start()

    yield make
    for p in peers:
        await p.stop()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[MakeRelay]:
    made: list[Relay] = []
    stores: list[SpyStore] = []

    async def make(routes: dict[str, Route | Exception], *, start: bool = True, lease_seconds: float = 3600.0,
                   **config: Any) -> Relay:
        delivery = replace(CONFIG, **config)
        options = OutboundOptions(
            "relay.gannet.test", tls=TlsPolicy.NONE, connect_timeout=delivery.connect_timeout,
            command_timeout=delivery.command_timeout, data_timeout=delivery.data_timeout,
        )  # fmt: skip
        store = await open_store(tmp_path)
        stores.append(store)
        router = Routes(routes)
        clock = PinnedClock()
        scheduler = Scheduler(
            store,
            transport=Transport.SMTP,
            owner="smtp",
            router=router,
            options=lambda route, domain: options,
            delivery=delivery,
            clock=clock,
            bounces=Bounces(store, hostname="relay.gannet.test", table=table),
            lease_seconds=lease_seconds,
        )
        r = Relay(store, router, clock, scheduler)
        made.append(r)
        if start:
            r.start()
        return r

    yield make
    for r in made:
        if r.task is not None and not r.task.done():
            await r.stop()
    for s in stores:
        await s.close()


# -- transactions -----------------------------------------------------------------------------


async def test_one_transaction_carries_all_recipients_of_a_message_for_a_destination(
    relay: MakeRelay, peer: MakePeer
) -> None:
    p, port = await peer()
    r = await relay({"a.test": route_to("a.test", port)})
    await r.enqueue(smtp_message("Q1", "r1@a.test", "r2@a.test", "r3@a.test"))
    await until(r.empty, "the message to be delivered")
    assert p.connections == 1
    assert p.count("MAIL") == 1 and p.count("RCPT") == 3 and p.count("DATA") == 1
    (t,) = p.transactions
    assert t.sender == SENDER
    assert t.recipients == t.accepted == ["r1@a.test", "r2@a.test", "r3@a.test"]
    assert t.body == body_of("Q1")
    assert r.scheduler.stats.delivered == 3
    assert r.routes.asked == ["a.test"]


async def test_a_message_for_two_domains_is_two_transactions_with_the_body_read_once(
    relay: MakeRelay, peer: MakePeer
) -> None:
    pa, port_a = await peer()
    pb, port_b = await peer()
    r = await relay({"a.test": route_to("a.test", port_a), "b.test": route_to("b.test", port_b)})
    await r.enqueue(smtp_message("Q1", "x@a.test", "y@b.test", "z@a.test"))
    await until(r.empty, "the message to be delivered")
    assert [t.recipients for t in pa.transactions] == [["x@a.test", "z@a.test"]]
    assert [t.recipients for t in pb.transactions] == [["y@b.test"]]
    assert pa.transactions[0].body == pb.transactions[0].body == body_of("Q1")
    assert r.store.body_reads == ["Q1"]
    assert sorted(r.routes.asked) == ["a.test", "b.test"]


async def test_a_connection_is_reused_for_the_next_message(relay: MakeRelay, peer: MakePeer) -> None:
    p, port = await peer()
    r = await relay({"a.test": route_to("a.test", port)}, start=False, destination_concurrency=1)
    await r.enqueue(*(smtp_message(f"Q{i}", f"u{i}@a.test") for i in range(3)))
    r.start()
    await until(r.empty, "three messages to be delivered")
    assert p.connections == 1
    assert [t.recipients for t in p.transactions] == [["u0@a.test"], ["u1@a.test"], ["u2@a.test"]]
    transaction = ["MAIL", "RCPT", "DATA"]
    # RFC 5321 §4.1.1.4: the end of data ended each transaction: no RSET in between.
    assert p.verbs()[:10] == ["EHLO", *transaction, *transaction, *transaction]
    assert r.scheduler.stats.connections == 1 and r.scheduler.stats.reused == 2


async def test_destination_concurrency_bounds_the_connections(relay: MakeRelay, peer: MakePeer) -> None:
    p, port = await peer()
    r = await relay({"a.test": route_to("a.test", port)}, start=False, destination_concurrency=3)
    await r.enqueue(*(smtp_message(f"Q{i:02}", f"u{i}@a.test") for i in range(20)))
    r.start()
    await until(r.empty, "twenty messages to be delivered")
    assert len(p.transactions) == 20
    assert p.connections == 3 and p.max_open == 3
    assert r.scheduler.stats.connections == 3 and r.scheduler.stats.reused == 17


# -- outcomes ---------------------------------------------------------------------------------


async def test_per_recipient_results_and_a_failure_report_to_the_sender(
    relay: MakeRelay, peer: MakePeer
) -> None:
    p, port = await peer(rcpt={"bad@a.test": b"550 5.1.1 <bad@a.test>: no such user\r\n"})
    r = await relay({"a.test": route_to("a.test", port)})
    await r.enqueue(smtp_message("Q1", "good@a.test", "bad@a.test"))
    await until(lambda: r.ended == 2, "both recipients to be tried")
    await until(lambda: _only_reports(r), "the original to leave the queue")
    assert r.scheduler.stats.delivered == 1 and r.scheduler.stats.failed == 1
    (t,) = p.transactions
    assert t.recipients == ["good@a.test", "bad@a.test"] and t.accepted == ["good@a.test"]
    (dsn,) = await reports(r.store)
    assert [x.address for x in dsn.recipients] == [SENDER]  # a local account: Transport.LOCAL, stays here
    report = parse(await r.store.read_body(dsn.queue_id))
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"] == SENDER
    status = list(report.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    text = status.as_string()
    assert "Final-Recipient: rfc822; bad@a.test" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "good@a.test" not in text


async def _only_reports(r: Relay) -> bool:
    return all(m.sender == "" for m in await r.store.list_messages())


async def test_a_4xx_defers_on_the_retry_schedule(relay: MakeRelay, peer: MakePeer) -> None:
    p, port = await peer(rcpt={"slow@a.test": b"451 4.7.1 greylisted, come back later\r\n"})
    r = await relay({"a.test": route_to("a.test", port)})
    await r.enqueue(smtp_message("Q1", "slow@a.test"))
    await until(lambda: r.ended == 1, "the attempt to end")
    view = await recipient(r.store, "slow@a.test")
    assert view.state is RecipientState.DEFERRED
    assert view.attempts == 1
    assert view.next_attempt == T0 + 60
    assert view.last_error.startswith("451 4.7.1 greylisted, come back later")
    assert await reports(r.store) == []  # a fresh message: no delay report yet
    # Due again once the clock reaches the retry time; then the peer takes it.
    p.rcpt.clear()
    r.clock.t = T0 + 60
    r.scheduler.wake()
    await until(r.empty, "the retry to be delivered")
    assert len(p.transactions) == 1 and p.count("MAIL") == 2


async def test_dns_errors_defer_or_fail(relay: MakeRelay, peer: MakePeer) -> None:
    r = await relay({
        "temp.test": DnsError(True, 451, "4.4.3", "temp.test: SERVFAIL"),
        "gone.test": DnsError(False, 550, "5.1.2", "gone.test does not exist"),
        "bug.test": RuntimeError("resolver bug"),
    })  # fmt: skip
    await r.enqueue(smtp_message("Q1", "a@temp.test", "b@gone.test", "c@bug.test"))
    await until(lambda: r.ended == 3, "every recipient to be decided")
    await until(lambda: _has_report(r), "the failure report")
    temp = await recipient(r.store, "a@temp.test")
    assert temp.state is RecipientState.DEFERRED and temp.next_attempt == T0 + 60
    assert temp.last_error == "451 4.4.3 temp.test: SERVFAIL"
    bug = await recipient(r.store, "c@bug.test")  # not understood: temporary, never a bounce
    assert bug.state is RecipientState.DEFERRED and bug.next_attempt == T0 + 60
    assert bug.last_error == "451 4.4.3 routing bug.test failed: RuntimeError"
    gone = await recipient(r.store, "b@gone.test")
    assert gone.state is RecipientState.FAILED
    (dsn,) = await reports(r.store)
    text = (await r.store.read_body(dsn.queue_id)).decode()
    assert "Final-Recipient: rfc822; b@gone.test" in text and "Status: 5.1.2" in text
    assert "a@temp.test" not in text and "c@bug.test" not in text  # only the failure is reported


async def _has_report(r: Relay) -> bool:
    return bool(await reports(r.store))


# -- dead destinations ----------------------------------------------------------------------------


async def test_a_destination_whose_hops_all_refuse_is_dead(relay: MakeRelay, peer: MakePeer) -> None:
    refusal = b"554 5.7.1 no service here\r\n"
    p1, port1 = await peer(greeting=refusal)
    p2, port2 = await peer(greeting=refusal)
    r = await relay({"dead.test": route_to("dead.test", port1, port2)}, start=False,
                    destination_concurrency=1)
    # Mail already waiting for a retry (not claimed now): the store's backoff moves it too.
    await _waiting(r, "Q0", "waiting@dead.test")
    await r.enqueue(*(smtp_message(f"Q{i}", f"u{i}@dead.test") for i in range(1, 6)))
    r.start()

    async def all_deferred() -> bool:
        views = [v for _, v in await rows(r.store)]
        return all(v.state is RecipientState.DEFERRED and v.next_attempt == T0 + 60 for v in views)

    await until(all_deferred, "every recipient of dead.test to wait for the backoff")
    # One connection per hop, for the first job only; the four waiting jobs were deferred with it.
    assert (p1.connections, p2.connections) == (1, 1)
    stats = r.scheduler.stats
    assert stats.suspended == 1 and stats.connections == 0 and stats.deferred == 5
    for i in range(1, 6):
        view = await recipient(r.store, f"u{i}@dead.test")
        assert view.attempts == 1 and "554 5.7.1 no service here" in view.last_error
    moved = await recipient(r.store, "waiting@dead.test")
    assert moved.attempts == 1  # defer_destination is not an attempt
    assert moved.last_error.endswith("(destination suspended)")

    # New mail for it is deferred to the end of the backoff without a connection.
    await r.enqueue(smtp_message("Q9", "late@dead.test"))
    r.scheduler.wake()
    await until(lambda: r.ended == 6, "the new message to be decided")
    late = await recipient(r.store, "late@dead.test")
    assert late.state is RecipientState.DEFERRED and late.next_attempt == T0 + 60
    assert late.last_error.endswith("(delivery to dead.test temporarily suspended)")
    assert (p1.connections, p2.connections) == (1, 1)
    assert r.scheduler.stats.suspended == 1


async def test_two_connections_failing_together_count_as_one_finding(
    relay: MakeRelay, peer: MakePeer
) -> None:
    p, port = await peer(greeting=b"421 4.3.2 too busy\r\n")
    r = await relay({"dead.test": route_to("dead.test", port)}, start=False, destination_concurrency=2)
    await r.enqueue(smtp_message("Q1", "u1@dead.test"), smtp_message("Q2", "u2@dead.test"))
    r.start()
    await until(lambda: r.ended == 2, "both attempts to end")
    assert p.connections == 2  # both workers tried before either found the destination dead
    assert r.scheduler.stats.suspended == 1
    for address in ("u1@dead.test", "u2@dead.test"):
        # The first step of the backoff (60 s), not the second (600 s).
        await until(_state_is(r, address, RecipientState.DEFERRED), f"{address} to be recorded")
        assert (await recipient(r.store, address)).next_attempt == T0 + 60


async def _waiting(r: Relay, queue_id: str, address: str) -> None:
    """Enqueue a message and record a failed attempt: it waits for a retry at T0 + 30."""
    await r.enqueue(smtp_message(queue_id, address))
    (claim,) = await r.store.claim_due(T0, limit=10, lease_seconds=60, owner="earlier")
    (rcpt,) = claim.recipients
    retry = Deferred("451 4.3.0 busy", T0 + 30)
    await r.store.record([RecipientOutcome(rcpt.recipient_id, rcpt.lease_token, retry, T0)])


async def test_a_smarthost_takes_a_message_for_several_domains_in_one_transaction(
    relay: MakeRelay, peer: MakePeer
) -> None:
    p, port = await peer()
    smarthost = route_to("smarthost", port)
    r = await relay({"a.test": smarthost, "b.test": smarthost})
    await r.enqueue(smtp_message("Q1", "x@a.test", "y@b.test"))
    await until(r.empty, "the message to be delivered")
    assert [t.recipients for t in p.transactions] == [["x@a.test", "y@b.test"]]


async def test_a_dead_smarthost_holds_back_the_whole_transport(relay: MakeRelay) -> None:
    smarthost = route_to("smarthost", closed_port())
    r = await relay({"a.test": smarthost}, start=False)
    await _waiting(r, "Q0", "waiting@c.test")  # another domain, behind the same smarthost
    await r.enqueue(smtp_message("Q1", "x@a.test"))
    r.start()
    await until(lambda: r.ended == 1, "the attempt to end")

    async def moved() -> bool:
        return (await recipient(r.store, "waiting@c.test")).next_attempt == T0 + 60

    await until(moved, "the waiting mail to be pushed to the end of the backoff")
    assert (await recipient(r.store, "waiting@c.test")).last_error.endswith("(destination suspended)")
    await until(_state_is(r, "x@a.test", RecipientState.DEFERRED), "the deferral to be recorded")
    assert (await recipient(r.store, "x@a.test")).next_attempt == T0 + 60


def _state_is(r: Relay, address: str, state: RecipientState) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(v.address == address and v.state is state for _, v in await rows(r.store))

    return check


async def test_a_closed_port_makes_the_destination_dead(relay: MakeRelay) -> None:
    r = await relay({"gone.test": route_to("gone.test", closed_port())}, start=False,
                    destination_concurrency=1)
    await r.enqueue(*(smtp_message(f"Q{i}", f"u{i}@gone.test") for i in range(3)))
    r.start()
    await until(lambda: r.ended == 3, "every attempt to end")
    for i in range(3):
        await until(_state_is(r, f"u{i}@gone.test", RecipientState.DEFERRED), "the deferral")
        view = await recipient(r.store, f"u{i}@gone.test")
        assert view.next_attempt == T0 + 60
        assert view.last_error.startswith("4.4.1 connect to mx0.gone.test[127.0.0.1]")
    assert r.scheduler.stats.suspended == 1


async def test_a_live_destination_is_served_while_a_black_hole_hangs(
    relay: MakeRelay, peer: MakePeer
) -> None:
    hole, hole_port = await peer(greeting=None)
    live, live_port = await peer()
    routes: dict[str, Route | Exception] = {
        "hole.test": route_to("hole.test", hole_port),
        "live.test": route_to("live.test", live_port),
    }
    r = await relay(routes, start=False, destination_concurrency=2)
    await r.enqueue(*(smtp_message(f"Q{i}", f"u{i}@hole.test") for i in range(4)))
    await r.enqueue(smtp_message("Q9", "fresh@live.test"))
    r.start()
    await until(lambda: hole.connections == 2, "two connections to hang in the black hole")
    await until(_gone(r, "Q9"), "the fresh message to be delivered")
    assert [t.recipients for t in live.transactions] == [["fresh@live.test"]]
    # Nothing to the black hole has ended: the fresh message did not wait for it.
    hanging = [v for _, v in await rows(r.store)]
    assert len(hanging) == 4 and all(v.state is RecipientState.DELIVERING for v in hanging)
    assert r.scheduler.stats.deferred == 0 and r.scheduler.stats.delivered == 1
    hole.abort_all()  # let the hanging attempts end before stop()
    await until(lambda: r.ended == 5, "the black-hole attempts to end")


def _gone(r: Relay, queue_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(m.queue_id != queue_id for m in await r.store.list_messages())

    return check


# -- shutdown and leases ------------------------------------------------------------------------


async def test_stop_returns_with_jobs_queued_and_releases_their_leases(
    relay: MakeRelay, peer: MakePeer
) -> None:
    gate = asyncio.Event()
    p, port = await peer(gate=gate)
    r = await relay({"a.test": route_to("a.test", port)}, start=False, destination_concurrency=1)
    await r.enqueue(*(smtp_message(f"Q{i}", f"u{i}@a.test") for i in range(5)))
    r.start()
    await until(lambda: p.connections == 1, "the first connection")  # its greeting is held back
    stopping = asyncio.ensure_future(r.scheduler.stop())
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(stopping, 10)
    assert r.task is not None
    await asyncio.wait_for(r.task, 10)
    # The connection finished the message it had, and no other.
    assert [t.recipients for t in p.transactions] == [["u0@a.test"]]
    left = [v for _, v in await rows(r.store)]
    assert len(left) == 4
    assert all(v.state is RecipientState.QUEUED and v.attempts == 0 for v in left)
    claims = await r.store.claim_due(T0, limit=100, lease_seconds=60, owner="successor")
    assert sorted(c.queue_id for c in claims) == ["Q1", "Q2", "Q3", "Q4"]


async def test_a_job_whose_lease_nearly_ran_out_is_handed_back_due_now(
    relay: MakeRelay, peer: MakePeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gannet.mail")
    gate = asyncio.Event()
    p, port = await peer(gate=gate)
    # lease 100 s, renewed every 33 s of real time (not within this test); margin a third: 33 s.
    r = await relay({"a.test": route_to("a.test", port)}, start=False, lease_seconds=100.0)
    await r.enqueue(smtp_message("Q1", "u@a.test"))
    r.start()
    await until(lambda: p.connections == 1, "the connection")
    r.clock.t = T0 + 90  # the job waited in memory until 10 s before its lease ends
    gate.set()
    await until(r.empty, "the message to be delivered after all")
    stats = r.scheduler.stats
    assert stats.deferred == 1 and stats.delivered == 1
    assert len(p.transactions) == 1  # the first time nothing was sent
    deferred = [m for m in caplog.messages if "status=deferred" in m]
    assert len(deferred) == 1 and "not tried in time" in deferred[0]
    # "Due again now": retried at T0 + 90 without the clock moving on to a retry time.


async def test_a_renewed_job_waits_past_its_first_lease_and_is_delivered(
    relay: MakeRelay, peer: MakePeer
) -> None:
    gate = asyncio.Event()
    p, port = await peer(gate=gate)
    # A 3 s lease is renewed every second (real time); `now` stays pinned by the test.
    r = await relay({"a.test": route_to("a.test", port)}, start=False, lease_seconds=3.0)
    await r.enqueue(smtp_message("Q1", "u@a.test"))
    r.start()
    await until(lambda: p.connections == 1, "the connection")  # its greeting is held back
    r.clock.t = T0 + 2.5  # without a renewal: within a third of the lease's end, handed back
    renewed = r.scheduler.leases.renewals
    await until(lambda: r.scheduler.leases.renewals > renewed, "a renewal at the new time")
    assert await r.store.claim_due(T0 + 4, limit=10, lease_seconds=60, owner="other") == []
    gate.set()
    await until(r.empty, "the message to be delivered")
    assert r.scheduler.stats.deferred == 0 and r.scheduler.stats.delivered == 1
    assert len(p.transactions) == 1
    assert r.scheduler.leases.held == 0  # let go once recorded: nothing left to renew


async def test_a_job_whose_lease_was_taken_over_is_dropped_unsent_and_unrecorded(
    relay: MakeRelay, peer: MakePeer, caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()
    p, port = await peer(gate=gate)
    r = await relay({"a.test": route_to("a.test", port)}, start=False, lease_seconds=3.0)
    await r.enqueue(smtp_message("Q1", "u@a.test"))
    r.start()
    await until(lambda: p.connections == 1, "the connection")
    # Another node takes the recipient as if this worker had missed its renewals
    # (`now` stays at T0 here, so our renewals cannot push the lease past T0 + 3).
    (theirs,) = await r.store.claim_due(T0 + 100, limit=10, lease_seconds=60, owner="other")
    await until(lambda: r.scheduler.leases.lost == 1, "the renewal to find the lease gone")
    gate.set()
    await until(lambda: r.scheduler.stats.lost == 1, "the job to be dropped")
    assert p.transactions == []
    assert r.store.records == []  # nothing recorded: the lease is the other worker's
    view = await recipient(r.store, "u@a.test")
    assert view.state is RecipientState.DELIVERING and view.attempts == 0
    assert "taken over elsewhere" in caplog.text
    tok = theirs.recipients[0]
    deferred = Deferred("4.0.0 x", T0 + 60)
    await r.store.record([RecipientOutcome(tok.recipient_id, tok.lease_token, deferred, T0)])
    assert (await recipient(r.store, "u@a.test")).state is RecipientState.DEFERRED


async def test_a_cached_connection_the_peer_closed_is_not_used(relay: MakeRelay, peer: MakePeer) -> None:
    p, port = await peer(close_after_data=True)
    r = await relay({"a.test": route_to("a.test", port)})
    await r.enqueue(smtp_message("Q1", "u1@a.test"))
    await until(r.empty, "the first message to be delivered")
    await until(lambda: p.open == 0, "the peer to hang up")
    await r.enqueue(smtp_message("Q2", "u2@a.test"))
    r.scheduler.wake()
    await until(lambda: r.ended == 2, "the second attempt to end")
    assert r.scheduler.stats.deferred == 0
    await until(r.empty, "the second message to be delivered")
    assert p.connections == 2 and len(p.transactions) == 2
