"""/metrics: the Prometheus text exposition (format 0.0.4).

Two parts, concatenated: the counters and histograms of gannet.metrics (in
`gannet serve`, the sum of the server's and the delivery worker's files,
prometheus_client's MultiProcessCollector), and the queue's gauges from the
store's statistics (QueueStatsCache; computed at scrape time at most as often
as the cache allows, never on the queue's writer thread).

Queue gauges, one series per shown state (queued, delivering, deferred, held,
quarantined), present even when zero so that graphs do not break:
  gannet_queue_recipients{state}          unfinished recipients
  gannet_queue_oldest_age_seconds{state}  age of the oldest message with one (0 when none)
  gannet_queue_messages                   messages in the queue
  gannet_queue_stats_age_seconds          how old these figures are (the cache)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gannet import metrics
from gannet.admin.sampler import CachedStats
from gannet.queue.sqlite_stats import STATE_ORDER

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _QueueCollector(Collector):
    def __init__(self, cached: CachedStats, now: float) -> None:
        self.cached = cached
        self.now = now

    def collect(self) -> list[GaugeMetricFamily]:  # type: ignore[override]
        stats = self.cached.stats
        by_state = {s.state: s for s in stats.states}
        recipients = GaugeMetricFamily(
            "gannet_queue_recipients", "Unfinished recipients in the queue, by state", labels=["state"]
        )
        oldest = GaugeMetricFamily(
            "gannet_queue_oldest_age_seconds",
            "Age of the oldest message with a recipient in this state",
            labels=["state"],
        )
        for state in STATE_ORDER:
            count = by_state.get(state)
            recipients.add_metric([state], count.recipients if count else 0)
            oldest.add_metric([state], max(0.0, self.now - count.oldest) if count else 0.0)
        return [
            recipients,
            oldest,
            GaugeMetricFamily("gannet_queue_messages", "Messages in the queue", value=stats.messages),
            GaugeMetricFamily(
                "gannet_queue_stats_age_seconds",
                "Seconds since the queue figures were counted",
                value=max(0.0, self.now - self.cached.at),
            ),
        ]


def render(cached: CachedStats | None, now: float) -> bytes:
    """The whole /metrics body. `cached` None: the store could not be asked; the
    queue gauges are left out (Prometheus marks them stale) rather than faked."""
    text = generate_latest(metrics.registry())
    if cached is not None:
        queue = CollectorRegistry(auto_describe=False)
        queue.register(_QueueCollector(cached, now))
        text += generate_latest(queue)
    return text
