"""The queue sweep (gannet/delivery/sweep.py) over a real SqliteStore in tmp_path
with a FakeClock: expired mail fails with 4.4.7 and its sender gets the DSN,
whatever its next attempt says; held mail is left alone; claims stuck past
their lease (plus `grace`) are released and the delivery loops woken; a pass
with nothing to do does nothing; a failing pass never ends `run()`; finished
messages' history is forgotten after `keep_history`, never sooner than
HISTORY_FLOOR."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gannet.clock import FakeClock
from gannet.config import DeliveryConfig
from gannet.delivery.bounces import Bounces
from gannet.delivery.sweep import HISTORY_FLOOR, Sweep, SweepResult
from gannet.queue.model import Claim, Deferred, Delivered, QueueError, RecipientOutcome, RecipientState
from gannet.smtp.events import Notify

from .relay_helpers import (
    DAY,
    SENDER,
    T0,
    SpyStore,
    open_store,
    parse,
    recipient,
    reports,
    smtp_message,
    table,
    until,
)

CONFIG = DeliveryConfig(retry=(60.0, 600.0), give_up_after=5 * DAY)
GRACE = 60.0


@dataclass
class World:
    store: SpyStore
    clock: FakeClock
    sweep: Sweep
    woken: list[None] = field(default_factory=list)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await open_store(tmp_path)
    clock = FakeClock(T0)
    woken: list[None] = []
    sweep = Sweep(
        store,
        delivery=CONFIG,
        clock=clock,
        bounces=Bounces(store, hostname="relay.gannet.test", table=table),
        grace=GRACE,
        on_released=lambda: woken.append(None),
    )
    yield World(store, clock, sweep, woken)
    await store.close()


async def claim_one(store: SpyStore, now: float, *, lease_seconds: float = 300.0) -> Claim:
    (claim,) = await store.claim_due(now, limit=1, lease_seconds=lease_seconds, owner="smtp")
    return claim


async def defer(store: SpyStore, claim: Claim, retry_at: float, now: float) -> None:
    await store.record(
        [RecipientOutcome(r.recipient_id, r.lease_token, Deferred("451 4.3.0 busy", retry_at), now)
         for r in claim.recipients]
    )  # fmt: skip


async def test_nothing_to_do(world: World) -> None:
    assert await world.sweep.once() == SweepResult(released=0, expired=0)
    assert world.woken == []
    await world.store.enqueue(smtp_message("Q1", "bob@remote.test", received_at=T0 - DAY))
    assert await world.sweep.once() == SweepResult(released=0, expired=0)
    assert world.woken == []
    assert (await recipient(world.store, "bob@remote.test")).state is RecipientState.QUEUED


async def test_expired_mail_fails_with_a_report_whatever_its_next_attempt(world: World) -> None:
    store = world.store
    await store.enqueue(smtp_message("OLD", "bob@remote.test", received_at=T0 - CONFIG.give_up_after - 10))
    await defer(store, await claim_one(store, T0 - 100), T0 + 10 * DAY, T0 - 100)  # pushed far out
    await store.enqueue(smtp_message("NEW", "carol@remote.test", received_at=T0 - DAY))
    await defer(store, await claim_one(store, T0 - 100), T0 + 10 * DAY, T0 - 100)

    assert await world.sweep.once() == SweepResult(released=0, expired=1)
    assert world.sweep.total == SweepResult(released=0, expired=1)
    assert world.woken  # the DSN is new mail: the delivery loops are woken
    ids = [m.queue_id for m in await store.list_messages() if m.sender]
    assert ids == ["NEW"]  # OLD had one recipient, now final: gone
    assert (await recipient(store, "carol@remote.test")).next_attempt == T0 + 10 * DAY
    (dsn,) = await reports(store)
    assert [r.address for r in dsn.recipients] == [SENDER]
    report = parse(await store.read_body(dsn.queue_id))
    assert report.get_content_type() == "multipart/report"
    text = report.as_string()
    assert "Final-Recipient: rfc822; bob@remote.test" in text
    assert "Action: failed" in text and "Status: 4.4.7" in text
    assert "message expired after 5 days in the queue" in text

    assert await world.sweep.once() == SweepResult(released=0, expired=0)  # done once


async def test_expired_mail_without_a_failure_notify_fails_silently(world: World) -> None:
    store = world.store
    await store.enqueue(smtp_message("OLD", "bob@remote.test", received_at=T0 - 6 * DAY,
                                     notify=Notify.SUCCESS.value))
    assert await world.sweep.once() == SweepResult(released=0, expired=1)
    assert await store.list_messages() == []
    assert world.woken == []


async def test_held_mail_is_left_alone(world: World) -> None:
    store = world.store
    await store.enqueue(smtp_message("OLD", "bob@remote.test", received_at=T0 - 6 * DAY))
    await store.hold("OLD", T0 - 10)
    assert await world.sweep.once() == SweepResult(released=0, expired=0)
    (message,) = await store.list_messages()
    assert message.held
    assert message.recipients[0].state is RecipientState.QUEUED
    assert await reports(store) == []


async def test_expired_mail_under_a_live_lease_is_left_to_its_worker(world: World) -> None:
    store = world.store
    await store.enqueue(smtp_message("OLD", "bob@remote.test", received_at=T0 - 6 * DAY))
    await claim_one(store, T0 - 10, lease_seconds=300)
    assert await world.sweep.once() == SweepResult(released=0, expired=0)
    assert (await recipient(store, "bob@remote.test")).state is RecipientState.DELIVERING


async def test_a_claim_stuck_past_its_lease_and_grace_is_released(world: World) -> None:
    store = world.store
    await store.enqueue(smtp_message("STUCK", "bob@remote.test", received_at=T0 - 100))
    await claim_one(store, T0, lease_seconds=10)  # lease ends at T0 + 10
    await store.enqueue(smtp_message("LATE", "carol@remote.test", received_at=T0 - 100))
    await claim_one(store, T0 + 50, lease_seconds=10)  # lease ends at T0 + 60
    world.clock.advance(10 + GRACE + 1)  # T0 + 71: STUCK ended 61 s ago, LATE 11 s ago

    assert await world.sweep.once() == SweepResult(released=1, expired=0)
    assert world.woken == [None]
    stuck = await recipient(store, "bob@remote.test")
    assert stuck.state is RecipientState.QUEUED and stuck.attempts == 0  # released, not an attempt
    assert (await recipient(store, "carol@remote.test")).state is RecipientState.DELIVERING
    assert stuck.next_attempt is not None and stuck.next_attempt <= world.clock.now()  # due now


class FailingOnce(SpyStore):
    """Its first release_expired_leases fails."""

    calls = 0

    async def release_expired_leases(
        self, now: float, *, expired_before: float
    ) -> list[tuple[str, str, str]]:
        self.calls += 1
        if self.calls == 1:
            raise QueueError("injected: database is locked")
        return await super().release_expired_leases(now, expired_before=expired_before)


async def test_a_failed_pass_does_not_end_run(tmp_path: Path) -> None:
    store = FailingOnce(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    await store.open()
    try:
        sweep = Sweep(store, delivery=CONFIG, clock=FakeClock(T0), bounces=None, interval=0.01)
        task = asyncio.create_task(sweep.run())
        await until(lambda: store.calls >= 2, "a second pass")
        assert not task.done()
        sweep.stop()
        await asyncio.wait_for(task, 10)
    finally:
        await store.close()


@pytest.mark.parametrize("keep_history", [0.0, HISTORY_FLOOR / 2, 3 * HISTORY_FLOOR])
async def test_history_is_forgotten_after_keep_history_never_before_the_floor(
    tmp_path: Path, keep_history: float
) -> None:
    """The floor is what makes enqueue_unless_stored safe: a message delivered
    in the moment its enqueue writer died must still be found as completed."""
    store = await open_store(tmp_path)
    try:
        clock = FakeClock(T0)
        sweep = Sweep(store, delivery=CONFIG, clock=clock, bounces=None, keep_history=keep_history)
        await store.enqueue(smtp_message("GONE", "bob@remote.test", received_at=T0))
        claim = await claim_one(store, T0)
        await store.record([RecipientOutcome(r.recipient_id, r.lease_token, Delivered("250 ok"), T0)
                            for r in claim.recipients])  # fmt: skip
        assert await store.list_messages() == []

        kept_for = max(keep_history, HISTORY_FLOOR)
        clock.advance(kept_for - 1)
        assert (await sweep.once()).pruned == 0
        assert await store.trace("GONE")
        clock.advance(2)
        assert (await sweep.once()).pruned == 1
        assert await store.trace("GONE") == []
    finally:
        await store.close()
