"""LeaseKeeper against a real SqliteStore (tmp_path) and a FakeClock: it renews
what its agent holds, in one store call per tick, stops renewing what was let
go, forgets leases taken over elsewhere (and only those), and survives a
failing store. The store's side of renewal is in tests/contract/.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from gannet.clock import FakeClock
from gannet.delivery.leases import LeaseKeeper
from gannet.queue.model import (
    Claim,
    Delivered,
    InlineBody,
    NewMessage,
    NewRecipient,
    RecipientOutcome,
    Transport,
)
from gannet.queue.sqlite import SqliteStore

T0 = 1_800_000_000.0
LEASE = 30.0


def message(queue_id: str, *addresses: str) -> NewMessage:
    rcpts = tuple(NewRecipient(a, Transport.SMTP, a.rpartition("@")[2]) for a in addresses)
    return NewMessage(queue_id, "s@x.test", rcpts, InlineBody(b"Subject: x\r\n\r\nx\r\n"), T0)


async def claimed(store: SqliteStore, clock: FakeClock, keeper: LeaseKeeper) -> list[Claim]:
    claims = await store.claim_due(clock.now(), limit=100, lease_seconds=LEASE, owner="w1")
    keeper.hold(claims)
    return claims


async def test_renewal_keeps_held_work_away_from_other_claimers_until_let_go(store: SqliteStore) -> None:
    clock = FakeClock(T0)
    keeper = LeaseKeeper(store, clock, owner="w1", lease_seconds=LEASE)
    await store.enqueue(message("Q1", "a@x.test", "b@x.test"))
    (c,) = await claimed(store, clock, keeper)
    assert keeper.held == 2
    clock.advance(LEASE * 0.9)
    assert await keeper.renew() == 0
    assert keeper.lease_end(c) == T0 + LEASE * 1.9
    clock.advance(LEASE * 0.5)  # past the first lease's end
    assert await store.claim_due(clock.now(), limit=10, lease_seconds=LEASE, owner="w2") == []
    keeper.let_go(c.recipients)
    assert keeper.held == 0
    assert await keeper.renew() == 0  # nothing held: no store call at all
    assert keeper.renewals == 1
    clock.advance(LEASE)
    (again,) = await store.claim_due(clock.now(), limit=10, lease_seconds=LEASE, owner="w2")
    assert again.queue_id == "Q1"


async def test_a_lease_taken_over_is_forgotten_and_a_reclaimed_one_is_not(store: SqliteStore) -> None:
    clock = FakeClock(T0)
    keeper = LeaseKeeper(store, clock, owner="w1", lease_seconds=LEASE)
    await store.enqueue(message("Q1", "a@x.test"))
    await store.enqueue(message("Q2", "b@x.test"))
    first = {c.queue_id: c for c in await claimed(store, clock, keeper)}
    clock.advance(LEASE)  # this worker stalled: no renewal came
    taken = await store.claim_due(clock.now(), limit=1, lease_seconds=LEASE, owner="w2")
    assert [c.queue_id for c in taken] == ["Q1"]
    (mine_again,) = await claimed(store, clock, keeper)  # Q2: this keeper's own, under a new token
    assert mine_again.queue_id == "Q2"
    assert await keeper.renew() == 1
    assert keeper.lost == 1
    assert not keeper.holds(first["Q1"].recipients)
    assert not keeper.holds(first["Q2"].recipients)  # the old token's work is not ours either
    assert keeper.holds(mine_again.recipients)
    # The takeover's outcome lands; ours would have been fenced (we record nothing).
    r = taken[0].recipients[0]
    outcome = RecipientOutcome(r.recipient_id, r.lease_token, Delivered("ok"), clock.now())
    assert await store.record([outcome]) == ["Q1"]


async def test_the_keeper_renews_every_third_of_a_lease_and_survives_store_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "spool").mkdir()
    store = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    await store.open()
    clock = FakeClock(T0)
    keeper = LeaseKeeper(store, clock, owner="w1", lease_seconds=LEASE)
    await store.enqueue(message("Q1", "a@x.test"))
    await claimed(store, clock, keeper)
    keeper.start()
    try:
        for tick in (1, 2):
            await asyncio.sleep(0.01)  # the task reaches its sleep
            clock.advance(LEASE / 3)
            await wait(lambda: keeper.renewals == tick)  # noqa: B023 (awaited within the iteration)
        assert await store.next_due() == clock.now() + LEASE
        await store.close()  # the database goes away: a renewal fails, is logged, and is retried
        caplog.set_level(logging.ERROR, logger="gannet.delivery")
        await asyncio.sleep(0.01)
        clock.advance(LEASE / 3)
        await wait(lambda: "renewing 1 lease(s) failed" in caplog.text)
        await store.open()
        await asyncio.sleep(0.01)
        clock.advance(LEASE / 3)
        await wait(lambda: keeper.renewals == 3)
    finally:
        keeper.stop()
        await store.close()


async def wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
