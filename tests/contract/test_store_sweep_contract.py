"""The QueueStore contract, part 2: what relaying needs from a store — the
per-destination backoff, the delay-warning flag, and the sweeps that find
recipients past their deadline or stuck in a claim. Same rules as
test_store_contract.py: written against the interface only, run per backend.
"""

from __future__ import annotations

from contract.test_store_contract import LEASE, T0, all_outcomes, claim, message, outcome, states
from gannet.queue.model import Deferred, Delivered, RecipientState, Transport
from gannet.queue.store import QueueStore


async def test_defer_destination_moves_only_that_domains_waiting_recipients(store: QueueStore) -> None:
    dead = message("a@dead.test", "b@dead.test")
    live = message("c@live.test")
    local = message("d@dead.test", transport=Transport.LOCAL)
    for m in (dead, live, local):
        await store.enqueue(m)
    moved = await store.defer_destination(Transport.SMTP, "dead.test", until=T0 + 600, reason="4.4.1 dead")
    assert moved == 2
    claims = await claim(store, transport=Transport.SMTP)
    assert [c.queue_id for c in claims] == [live.queue_id]
    await store.record(all_outcomes(claims[0], Delivered("ok")))
    view = await store.get_message(dead.queue_id)
    assert {(r.state, r.next_attempt, r.last_error, r.attempts) for r in view.recipients} == {
        (RecipientState.DEFERRED, T0 + 600, "4.4.1 dead", 0)
    }
    assert [c.queue_id for c in await claim(store, now=T0 + 600, transport=Transport.SMTP)] == [dead.queue_id]


async def test_defer_destination_never_moves_a_recipient_sooner_nor_a_leased_one(store: QueueStore) -> None:
    later = message("a@dead.test")
    leased = message("b@dead.test")
    await store.enqueue(leased)
    (c,) = await claim(store)
    await store.enqueue(later)
    await store.record([outcome((await claim(store))[0], Deferred("4.0.0 x", T0 + 5000))])
    assert await store.defer_destination(Transport.SMTP, "dead.test", until=T0 + 600, reason="r") == 0
    view = await store.get_message(later.queue_id)
    assert view.recipients[0].next_attempt == T0 + 5000
    assert await states(store, c.queue_id) == [RecipientState.DELIVERING]


async def test_defer_destination_without_a_domain_takes_the_whole_transport(store: QueueStore) -> None:
    for addr in ("a@x.test", "b@y.test"):
        await store.enqueue(message(addr))
    await store.enqueue(message("c@z.test", transport=Transport.LOCAL))
    assert await store.defer_destination(Transport.SMTP, None, until=T0 + 60, reason="smarthost down") == 2
    assert [c.recipients[0].address for c in await claim(store)] == ["c@z.test"]


async def test_the_warned_flag_is_kept_across_attempts(store: QueueStore) -> None:
    m = message("a@b.test")
    await store.enqueue(m)
    (c,) = await claim(store)
    assert c.recipients[0].warned is False
    await store.record([outcome(c, Deferred("4.0.0 later", T0 + 10, warned=True))])
    (c,) = await claim(store, now=T0 + 10)
    assert c.recipients[0].warned is True
    await store.record([outcome(c, Deferred("4.0.0 again", T0 + 20))], [])
    (c,) = await claim(store, now=T0 + 20)
    assert c.recipients[0].warned is True  # a later Deferred without the flag does not clear it


async def test_claim_expired_takes_old_messages_whatever_their_next_attempt(store: QueueStore) -> None:
    old = message("a@b.test", received_at=T0 - 1000)
    young = message("c@d.test", received_at=T0)
    held = message("e@f.test", received_at=T0 - 1000)
    for m in (old, young, held):
        await store.enqueue(m)
    await store.hold(held.queue_id, T0)
    (c,) = await claim(store, now=T0, limit=1)  # old first (oldest due first)
    await store.record([outcome(c, Deferred("4.0.0 x", T0 + 10**6))])
    got = await store.claim_expired(
        T0, received_before=T0 - 500, limit=10, lease_seconds=LEASE, owner="sweep"
    )
    assert [g.queue_id for g in got] == [old.queue_id]
    assert got[0].recipients[0].attempts == 1
    # Now leased to the sweep: not claimed twice while the lease lives.
    assert (
        await store.claim_expired(T0, received_before=T0 - 500, limit=10, lease_seconds=LEASE, owner="s2")
        == []
    )
    await store.record(all_outcomes(got[0], Delivered("ok")))
    assert len(await store.list_messages()) == 2


async def test_release_expired_leases_returns_stuck_claims(store: QueueStore) -> None:
    m = message("a@b.test", "c@d.test")
    await store.enqueue(m)
    (c,) = await claim(store, now=T0, owner="stuck-worker")
    assert await store.release_expired_leases(T0 + 10, expired_before=T0 + 10) == []
    released = await store.release_expired_leases(T0 + LEASE + 1, expired_before=T0 + LEASE + 1)
    assert sorted(released) == [
        (m.queue_id, "a@b.test", "stuck-worker"),
        (m.queue_id, "c@d.test", "stuck-worker"),
    ]
    assert await states(store, m.queue_id) == [RecipientState.QUEUED] * 2
    # The old worker's late outcome is fenced off.
    await store.record(all_outcomes(c, Delivered("late")))
    assert await states(store, m.queue_id) == [RecipientState.QUEUED] * 2
    assert len(await claim(store, now=T0 + LEASE + 1)) == 1
