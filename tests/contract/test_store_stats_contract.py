"""QueueStore contract: `queue_stats` and `deferral_reasons`, the aggregate reads
behind /metrics and the dashboard. Run once per backend (conftest.py); times
are explicit; nothing reads the clock.
"""

from __future__ import annotations

from gannet.queue.model import DeferralReason, Deferred, Delivered, QueueStats, StateCount
from gannet.queue.store import QueueStore

from .test_store_contract import T0, claim, message, outcome


def by_state(stats: QueueStats) -> dict[str, StateCount]:
    return {s.state: s for s in stats.states}


async def test_empty_queue_has_no_states(store: QueueStore) -> None:
    assert await store.queue_stats() == QueueStats(0, ())
    assert await store.deferral_reasons(10) == []


async def test_counts_and_oldest_by_state(store: QueueStore) -> None:
    old = message("a@d.test", "b@d.test", received_at=T0 - 100)
    new = message("c@e.test", received_at=T0 - 10)
    held = message("h@d.test", received_at=T0 - 500)
    for m in (old, new, held):
        await store.enqueue(m)
    await store.hold(held.queue_id, T0)

    stats = await store.queue_stats()
    assert stats.messages == 3
    states = by_state(stats)
    assert set(states) == {"queued", "held"}
    assert states["queued"] == StateCount("queued", 3, 2, T0 - 100)
    assert states["held"] == StateCount("held", 1, 1, T0 - 500)
    assert [s.state for s in stats.states] == ["queued", "held"]  # a fixed order for displays


async def test_claimed_deferred_and_final_recipients(store: QueueStore) -> None:
    m = message("a@d.test", "b@d.test", "c@d.test", received_at=T0 - 60)
    await store.enqueue(m)
    (c,) = await claim(store, T0)
    await store.record(
        [outcome(c, Delivered("ok"), index=0), outcome(c, Deferred("451 4.3.0 later", T0 + 600), index=1)]
    )
    states = by_state(await store.queue_stats())
    # delivered recipients are no longer counted; the third is still under its lease
    assert set(states) == {"deferred", "delivering"}
    assert states["deferred"] == StateCount("deferred", 1, 1, T0 - 60)
    assert states["delivering"] == StateCount("delivering", 1, 1, T0 - 60)
    assert (await store.queue_stats()).messages == 1


async def test_deferral_reasons_grouped_by_domain_and_error(store: QueueStore) -> None:
    busy = "451 4.7.1 try again later"
    dead = "4.4.1 connection refused by mx.dead.test"
    plan = [("x@busy.test", busy)] * 3 + [("y@dead.test", dead)] * 2 + [("z@busy.test", dead)]
    for i, (address, _) in enumerate(plan):
        await store.enqueue(message(address, received_at=T0 - 1000 + i))
    claims = await claim(store, T0, limit=100)
    reasons = {c.recipients[0].address: r for (_, r), c in zip(plan, claims, strict=True)}
    await store.record([outcome(c, Deferred(reasons[c.recipients[0].address], T0 + 300)) for c in claims])
    held = message("h@busy.test", received_at=T0 - 5000)  # deferred but held: not a deferral reason
    await store.enqueue(held)
    (hc,) = await claim(store, T0 + 1)
    await store.record([outcome(hc, Deferred(busy, T0 + 300))])
    await store.hold(held.queue_id, T0 + 2)

    top = await store.deferral_reasons(10)
    assert top == [
        DeferralReason("busy.test", busy, 3, T0 - 1000),
        DeferralReason("dead.test", dead, 2, T0 - 997),
        DeferralReason("busy.test", dead, 1, T0 - 995),
    ]
    assert await store.deferral_reasons(1) == top[:1]
