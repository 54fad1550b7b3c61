"""Prefetched: small bodies that came with their claim, held until the delivery
that follows reads them (once each), so that it costs no round trip to the
database (PostgreSQL) or hop to a reader thread (SQLite) per message.

Bounded: never holds more than its budget. Never the only copy of anything:
a body that is dropped or never taken is simply read from the store again.
"""

from __future__ import annotations

from collections import OrderedDict

PREFETCH_BODY = 64 * 1024  # bodies up to this size come with their claim
PREFETCH_BUDGET = 16 * 1024 * 1024  # at most this much prefetched content held, the oldest dropped first
# SQLite reads them inside the claim's transaction, under the write lock the
# sessions' commits wait for: at most this much a claim (the rest is read later).
PREFETCH_PER_CLAIM = 1024 * 1024


class Prefetched:
    """Bodies that came with a claim, until read_body takes them (once each).

    Past `budget` bytes the oldest go (read_body then reads the store, as it
    would have anyway). A body never changes once stored, so an entry is never
    stale; one whose message was deleted meanwhile is only memory, and the
    delivery that reads it is fenced off at record."""

    def __init__(self, budget: int = PREFETCH_BUDGET) -> None:
        self._budget = budget
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._bodies)

    def keep(self, bodies: dict[str, bytes]) -> None:
        for queue_id, data in bodies.items():
            self.take(queue_id)
            self._bodies[queue_id] = data
            self._bytes += len(data)
        while self._bytes > self._budget:
            _qid, old = self._bodies.popitem(last=False)
            self._bytes -= len(old)

    def take(self, queue_id: str) -> bytes | None:
        data = self._bodies.pop(queue_id, None)
        if data is not None:
            self._bytes -= len(data)
        return data

    def forget(self, queue_ids: list[str]) -> None:
        """Drop what is held for messages that left the queue."""
        for queue_id in queue_ids:
            self.take(queue_id)
