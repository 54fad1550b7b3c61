"""The dashboard's sampling: per-minute throughput from counter totals, and the
queue statistics cache that keeps scans rare (FakeClock; no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from gannet.admin.sampler import COST_FACTOR, MIN_INTERVAL, QueueStatsCache, Sampler, Throughput
from gannet.clock import FakeClock
from gannet.queue.model import QueueError, QueueStats, StateCount

T0 = 1_800_000_000.0  # a multiple of 60


def totals(
    received: float = 0, delivered: float = 0, deferred: float = 0, bounced: float = 0
) -> dict[str, float]:
    return {
        "gannet_messages_received_total": received,
        "gannet_messages_delivered_total": delivered,
        "gannet_messages_deferred_total": deferred,
        "gannet_messages_bounced_total": bounced,
    }


def test_throughput_adds_differences_to_the_current_minute() -> None:
    t = Throughput(started=T0)
    t.add(T0 + 5, totals(received=2), queue=2)
    t.add(T0 + 30, totals(received=5, delivered=3), queue=2)
    t.add(T0 + 65, totals(received=6, delivered=6, deferred=1), queue=0)
    t.add(T0 + 185, totals(received=6, delivered=6, deferred=1, bounced=1), queue=None)
    points = t.series(T0 + 185, 5)
    assert [start for start, _ in points] == [T0 - 60, T0, T0 + 60, T0 + 120, T0 + 180]
    before, first, second, quiet, last = (m for _, m in points)
    assert before is None  # the server was not running yet
    assert first is not None and (first.received, first.delivered, first.queue) == (5, 3, 2)
    assert second is not None and (second.received, second.delivered, second.deferred) == (1, 3, 1)
    assert quiet is not None and (quiet.received, quiet.queue) == (0, None)
    assert last is not None and last.bounced == 1 and last.queue is None


def test_a_counter_that_seems_to_go_down_counts_nothing() -> None:
    t = Throughput(started=T0)
    t.add(T0 + 1, totals(received=10), None)
    t.add(T0 + 2, totals(received=4), None)  # e.g. a worker's file not yet read
    t.add(T0 + 3, totals(received=12), None)
    ((_, minute),) = t.series(T0 + 3, 1)
    assert minute is not None and minute.received == 12


class TimedStore:
    """queue_stats() that takes `scan` seconds of the fake clock; counts calls."""

    def __init__(self, clock: FakeClock, scan: float) -> None:
        self.clock = clock
        self.scan = scan
        self.calls = 0
        self.fail = False

    async def queue_stats(self) -> QueueStats:
        self.calls += 1
        if self.fail:
            raise QueueError("disk on fire")
        self.clock.advance(self.scan)
        return QueueStats(self.calls, (StateCount("queued", self.calls, self.calls, T0),))


async def test_the_cache_scans_at_most_every_min_interval() -> None:
    clock = FakeClock(T0)
    store = TimedStore(clock, scan=0.01)
    cache = QueueStatsCache(store, clock)  # type: ignore[arg-type]
    first = await cache.get()
    assert (await cache.get()) is first and store.calls == 1
    clock.advance(MIN_INTERVAL - 0.02)
    assert (await cache.get()) is first
    clock.advance(0.02)
    assert (await cache.get()).stats.messages == 2


async def test_a_slow_scan_is_repeated_less_often() -> None:
    clock = FakeClock(T0)
    store = TimedStore(clock, scan=1.5)  # a deep queue
    cache = QueueStatsCache(store, clock)  # type: ignore[arg-type]
    await cache.get()
    clock.advance(COST_FACTOR * 1.5 - 1.6)
    await cache.get()
    assert store.calls == 1
    clock.advance(0.2)
    await cache.get()
    assert store.calls == 2


async def test_concurrent_callers_share_one_scan() -> None:
    clock = FakeClock(T0)
    store = TimedStore(clock, scan=0.0)
    cache = QueueStatsCache(store, clock)  # type: ignore[arg-type]
    results = await asyncio.gather(*(cache.get() for _ in range(10)))
    assert store.calls == 1 and all(r is results[0] for r in results)


async def test_a_failing_store_keeps_the_last_figures_or_raises() -> None:
    clock = FakeClock(T0)
    store = TimedStore(clock, scan=0.0)
    cache = QueueStatsCache(store, clock)  # type: ignore[arg-type]
    store.fail = True
    with pytest.raises(QueueError):
        await cache.get()
    store.fail = False
    good = await cache.get()
    store.fail = True
    clock.advance(MIN_INTERVAL)
    assert (await cache.get()) is good


async def test_the_sampler_records_queue_size_and_counts() -> None:
    clock = FakeClock(T0)
    store = TimedStore(clock, scan=0.0)
    seen = totals(received=3, delivered=1)
    sampler = Sampler(QueueStatsCache(store, clock), clock, totals=lambda: seen)  # type: ignore[arg-type]
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(0)
    clock.advance(5.0)  # one tick
    await asyncio.sleep(0)
    task.cancel()
    ((_, minute),) = sampler.throughput.series(clock.now(), 1)
    # two samples (at start and after the tick, past MIN_INTERVAL: a fresh scan each time)
    assert store.calls == 2
    assert minute is not None and (minute.received, minute.delivered, minute.queue) == (3, 1, 2)
