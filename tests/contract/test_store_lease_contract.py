"""The QueueStore contract, part 3: lease renewal (`renew_leases`).

A worker renews the leases it still holds, so that leases can be short and a
dead worker's claims come free within one lease length. Renewal is fenced
like `record`: only a recipient still delivering under the very token and
owner the worker holds is extended; every other one is reported gone, so the
worker drops that work. The sweeps and `claim_expired` keep working on what
is not renewed. Same rules as test_store_contract.py: the interface only, run
per backend, explicit times.
"""

from __future__ import annotations

from contract.test_store_contract import LEASE, T0, all_outcomes, claim, message, outcome, states
from gannet.queue.model import Claim, Deferred, Delivered, RecipientState
from gannet.queue.store import QueueStore


def held(*claims: Claim) -> list[tuple[int, str]]:
    """What a worker holds: (recipient_id, lease_token) of every claimed recipient."""
    return [(r.recipient_id, r.lease_token) for c in claims for r in c.recipients]


async def test_a_renewed_lease_is_not_claimable_when_the_first_would_have_ended(store: QueueStore) -> None:
    m = message("a@x.test", "b@x.test")
    await store.enqueue(m)
    (c,) = await claim(store, owner="w1")
    assert await store.renew_leases("w1", held(c), until=T0 + 2 * LEASE) == []
    assert await claim(store, now=T0 + LEASE, owner="w2") == []
    assert await store.next_due() == T0 + 2 * LEASE
    assert await store.release_expired_leases(T0 + LEASE + 1, expired_before=T0 + LEASE + 1) == []
    assert (
        await store.claim_expired(
            T0 + LEASE, received_before=T0 + 1, limit=10, lease_seconds=LEASE, owner="sweep"
        )
        == []
    )
    # The holder records under its original token, as always.
    assert await store.record(all_outcomes(c, Delivered("ok"), at=T0 + LEASE + 5)) == [m.queue_id]


async def test_renewal_never_shortens_a_lease(store: QueueStore) -> None:
    await store.enqueue(message())
    (c,) = await claim(store, owner="w1")
    assert await store.renew_leases("w1", held(c), until=T0 + 10) == []  # not lost: just not shorter
    assert await store.next_due() == T0 + LEASE


async def test_a_lease_taken_over_under_a_new_token_is_reported_lost_and_left_alone(
    store: QueueStore,
) -> None:
    m = message("a@x.test")
    await store.enqueue(m)
    (stale,) = await claim(store, owner="w1")
    (fresh,) = await claim(store, now=T0 + LEASE, owner="w2")  # w1 missed its renewals
    rid = stale.recipients[0].recipient_id
    assert await store.renew_leases("w1", held(stale), until=T0 + 5 * LEASE) == [rid]
    assert await store.next_due() == T0 + 2 * LEASE  # w2's lease, untouched
    # The same token under another owner name is not a match either.
    assert await store.renew_leases("w1", held(fresh), until=T0 + 5 * LEASE) == [rid]
    assert await store.renew_leases("w2", held(fresh), until=T0 + 3 * LEASE) == []
    assert await store.next_due() == T0 + 3 * LEASE
    assert await store.record(all_outcomes(fresh, Delivered("ok"), at=T0 + LEASE + 1)) == [m.queue_id]


async def test_recorded_and_released_leases_are_reported_lost(store: QueueStore) -> None:
    done, swept, kept = message("a@x.test"), message("b@x.test"), message("c@x.test")
    for m in (done, swept, kept):
        await store.enqueue(m)
    claims = {c.queue_id: c for c in await claim(store, owner="w1")}
    await store.record([outcome(claims[done.queue_id], Deferred("4.0.0 later", T0 + 9000))])
    # The sweep gives back a stuck claim it finds expired (here: of `swept` only).
    (c_kept,) = [claims[kept.queue_id]]
    await store.renew_leases("w1", held(c_kept), until=T0 + 3 * LEASE)
    released = await store.release_expired_leases(T0 + 2 * LEASE, expired_before=T0 + 2 * LEASE)
    assert released == [(swept.queue_id, "b@x.test", "w1")]
    lost = await store.renew_leases("w1", held(*claims.values()), until=T0 + 4 * LEASE)
    assert sorted(lost) == sorted(
        claims[q].recipients[0].recipient_id for q in (done.queue_id, swept.queue_id)
    )
    assert await states(store, done.queue_id) == [RecipientState.DEFERRED]
    assert await states(store, swept.queue_id) == [RecipientState.QUEUED]
    assert await states(store, kept.queue_id) == [RecipientState.DELIVERING]
    assert await store.next_due() == T0  # `swept`: due again (its next attempt had long passed)


async def test_one_call_renews_the_claims_of_several_batches(store: QueueStore) -> None:
    first, second = message("a@x.test", "b@x.test"), message("c@y.test")
    await store.enqueue(first)
    (c1,) = await claim(store, owner="w1")
    await store.enqueue(second)
    (c2,) = await claim(store, now=T0 + 10, owner="w1")
    assert c1.recipients[0].lease_token != c2.recipients[0].lease_token
    assert await store.renew_leases("w1", held(c1, c2), until=T0 + 4 * LEASE) == []
    assert await claim(store, now=T0 + 4 * LEASE - 1, owner="w2") == []
    got = await claim(store, now=T0 + 4 * LEASE, owner="w2")
    assert sorted(c.queue_id for c in got) == sorted([first.queue_id, second.queue_id])


async def test_renewing_nothing_is_a_no_op(store: QueueStore) -> None:
    assert await store.renew_leases("w1", [], until=T0 + LEASE) == []
    assert await store.renew_leases("w1", [(999_999, "nope")], until=T0 + LEASE) == [999_999]


async def test_release_leases_still_frees_a_renewed_lease(store: QueueStore) -> None:
    """A restarted worker of the same name releases what its predecessor renewed."""
    await store.enqueue(message())
    (c,) = await claim(store, owner="w1")
    await store.renew_leases("w1", held(c), until=T0 + 10 * LEASE)
    assert await store.release_leases("w1") == 1
    assert len(await claim(store, owner="w1")) == 1
    assert await store.renew_leases("w1", held(c), until=T0 + 11 * LEASE) == [c.recipients[0].recipient_id]
