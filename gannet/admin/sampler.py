"""What the dashboard plots, gathered in the server: per-minute throughput and
queue size, and a cache of the store's queue statistics.

Throughput comes from the same counters /metrics shows (gannet.metrics, summed
over the server and its delivery worker), sampled every `TICK` seconds; the
difference between two samples is added to the current minute. Counters start
at zero with the server (gannet/metrics.py wipes them), and so does the
series: it covers the time since `gannet serve` started, at most `KEEP_MINUTES`.

The queue statistics are a scan of the queue (store.queue_stats), so they are
cached and refreshed at most every `MIN_INTERVAL` seconds, or every
`COST_FACTOR` times as long as the last scan took, whichever is longer: a
million-message queue (a 1.3 s scan) is counted every 26 s, never often enough
to cost more than a twentieth of a core, however many dashboards are open.

Never touches the store except through `QueueStore.queue_stats`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gannet import metrics
from gannet.clock import Clock
from gannet.queue.model import QueueError, QueueStats
from gannet.queue.store import QueueStore

log = logging.getLogger("gannet.admin")

TICK = 5.0
KEEP_MINUTES = 24 * 60
MIN_INTERVAL = 2.0
COST_FACTOR = 20.0

# The counters behind the four throughput lines, by their sample names.
SERIES = {
    "received": "gannet_messages_received_total",
    "delivered": "gannet_messages_delivered_total",
    "deferred": "gannet_messages_deferred_total",
    "bounced": "gannet_messages_bounced_total",
}


@dataclass(slots=True)
class CachedStats:
    stats: QueueStats
    at: float  # clock.now() when it was computed
    seconds: float  # how long the scan took


class QueueStatsCache:
    """store.queue_stats(), at most every max(MIN_INTERVAL, COST_FACTOR * last scan)."""

    def __init__(self, store: QueueStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._cached: CachedStats | None = None
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> CachedStats:
        """Raises QueueError when the store cannot answer and nothing is cached."""
        if self._cached is not None and self._clock.monotonic() < self._next:
            return self._cached
        async with self._lock:  # one scan at a time, however many callers
            if self._cached is not None and self._clock.monotonic() < self._next:
                return self._cached
            start = self._clock.monotonic()
            try:
                stats = await self._store.queue_stats()
            except QueueError:
                if self._cached is None:
                    raise
                log.exception("queue statistics failed; showing the last ones")
                self._next = self._clock.monotonic() + MIN_INTERVAL
                return self._cached
            took = self._clock.monotonic() - start
            self._cached = CachedStats(stats, self._clock.now(), took)
            self._next = start + max(MIN_INTERVAL, COST_FACTOR * took)
            return self._cached


@dataclass(slots=True)
class Minute:
    start: float  # POSIX seconds, a multiple of 60
    received: float = 0.0
    delivered: float = 0.0
    deferred: float = 0.0
    bounced: float = 0.0
    queue: int | None = None  # recipients waiting, as last seen in this minute


class Throughput:
    """Per-minute counts from successive counter totals, since `started`."""

    def __init__(self, started: float) -> None:
        self._first = int(started // 60)
        self._last = dict.fromkeys(SERIES, 0.0)  # counters start at zero with the server
        self._minutes: dict[int, Minute] = {}

    def add(self, now: float, totals: dict[str, float], queue: int | None) -> None:
        key = int(now // 60)
        minute = self._minutes.get(key)
        if minute is None:
            minute = self._minutes[key] = Minute(key * 60.0)
            for old in [k for k in self._minutes if k <= key - KEEP_MINUTES]:
                del self._minutes[old]
        for field, sample in SERIES.items():
            value = totals.get(sample, 0.0)
            # max(): a counter never goes down; if it seems to, count nothing rather than negative
            setattr(minute, field, getattr(minute, field) + max(0.0, value - self._last[field]))
            self._last[field] = max(value, self._last[field])
        if queue is not None:
            minute.queue = queue

    def series(self, now: float, minutes: int) -> list[tuple[float, Minute | None]]:
        """The last `minutes` minutes up to now's, oldest first, as (start, counts):
        zeros for a quiet minute, None for one before the server started."""
        last = int(now // 60)
        return [
            (k * 60.0, self._minutes.get(k) or Minute(k * 60.0) if k >= self._first else None)
            for k in range(last - minutes + 1, last + 1)
        ]


def waiting(stats: QueueStats) -> int:
    """Recipients still to deliver (every unfinished state)."""
    return sum(s.recipients for s in stats.states)


class Sampler:
    """The loop that feeds Throughput; `run()` until cancelled."""

    def __init__(
        self,
        cache: QueueStatsCache,
        clock: Clock,
        totals: Callable[[], dict[str, float]] = metrics.totals,
    ) -> None:
        self.cache = cache
        self.clock = clock
        self.totals = totals
        self.throughput = Throughput(clock.now())

    def sample_counters(self, queue: int | None = None) -> None:
        self.throughput.add(self.clock.now(), self.totals(), queue)

    async def sample(self) -> None:
        queue: int | None = None
        try:
            queue = waiting((await self.cache.get()).stats)
        except QueueError as exc:
            log.warning("dashboard: queue statistics unavailable: %s", exc)
        self.sample_counters(queue)

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # the dashboard's graphs must never take the server down
                log.exception("dashboard sampler failed; trying again")
            await self.clock.sleep(TICK)
