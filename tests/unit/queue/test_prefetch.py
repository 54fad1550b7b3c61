"""Prefetched: the bodies that come with a claim (both stores)."""

from __future__ import annotations

from gannet.queue.prefetch import Prefetched


def test_prefetched_bodies_stay_within_their_budget() -> None:
    held = Prefetched(budget=10)
    held.keep({"A": b"1234", "B": b"5678"})
    held.keep({"C": b"90ab"})  # 12 bytes: the oldest goes
    assert len(held) == 2 and held.take("A") is None
    assert held.take("B") == b"5678" and held.take("B") is None
    held.forget(["C"])
    assert len(held) == 0
