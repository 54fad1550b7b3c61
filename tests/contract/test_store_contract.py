"""The QueueStore contract: what every store (SQLite now, PostgreSQL later) must do.

Written against gannet.queue.store.QueueStore and gannet.queue.model only —
never against one store's internals — and run once per backend through the
`store` / `store_env` fixtures (conftest.py). Times are explicit POSIX seconds
from T0; no test reads the clock or sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import pytest

from gannet.queue.ids import new_queue_id
from gannet.queue.model import (
    Claim,
    Deferred,
    Delivered,
    Failed,
    InlineBody,
    NewMessage,
    NewRecipient,
    NoSuchMessage,
    Outcome,
    QueuedMessageView,
    QueueError,
    QueueFilter,
    RecipientOutcome,
    RecipientState,
    SpooledBody,
    Transport,
)
from gannet.queue.store import QueueStore

T0 = 1_800_000_000.0
LEASE = 300.0


class StoreEnv(Protocol):
    """What conftest's `store_env` fixture offers (kept as a protocol so that
    this module imports nothing from conftest)."""

    @property
    def spool_dir(self) -> Path: ...

    def make(self, *, recover: bool = True) -> QueueStore: ...


def rcpt(address: str, transport: Transport = Transport.SMTP, **kw: object) -> NewRecipient:
    return NewRecipient(address, transport, address.rpartition("@")[2].lower(), **kw)  # type: ignore[arg-type]


def message(
    *addresses: str,
    sender: str = "alice@a.test",
    received_at: float = T0,
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    transport: Transport = Transport.SMTP,
    **kw: object,
) -> NewMessage:
    recipients = tuple(rcpt(a, transport) for a in (addresses or ("bob@b.test",)))
    return NewMessage(
        new_queue_id(), sender, recipients, InlineBody(body), received_at, **kw  # type: ignore[arg-type]
    )


async def claim(store: QueueStore, now: float = T0, **kw: object) -> list[Claim]:
    args: dict[str, object] = {"limit": 100, "lease_seconds": LEASE, "owner": "worker-1"}
    args.update(kw)
    return await store.claim_due(now, **args)  # type: ignore[arg-type]


def outcome(c: Claim, result: Outcome, at: float = T0 + 1, index: int = 0) -> RecipientOutcome:
    r = c.recipients[index]
    return RecipientOutcome(r.recipient_id, r.lease_token, result, at)


def all_outcomes(c: Claim, result: Outcome, at: float = T0 + 1) -> list[RecipientOutcome]:
    return [RecipientOutcome(r.recipient_id, r.lease_token, result, at) for r in c.recipients]


async def states(store: QueueStore, queue_id: str) -> list[RecipientState]:
    view = await store.get_message(queue_id)
    return [r.state for r in view.recipients]


# --- enqueue and claim ------------------------------------------------------------


async def test_enqueue_then_claim_returns_the_message(store: QueueStore) -> None:
    m = message(
        "bob@b.test",
        "carol@c.test",
        envid="env-1",
        ret="HDRS",
        smtputf8=True,
        body_8bit=True,
    )
    await store.enqueue(m)
    claims = await claim(store)
    assert len(claims) == 1
    c = claims[0]
    assert (c.queue_id, c.sender, c.received_at) == (m.queue_id, m.sender, m.received_at)
    assert (c.envid, c.ret, c.smtputf8, c.body_8bit) == ("env-1", "HDRS", True, True)
    assert c.size == m.body.size
    assert c.lease_until == T0 + LEASE
    assert [r.address for r in c.recipients] == ["bob@b.test", "carol@c.test"]
    assert all(r.attempts == 0 and r.transport is Transport.SMTP for r in c.recipients)
    assert len({r.recipient_id for r in c.recipients}) == 2
    assert await store.read_body(m.queue_id) == b"Subject: hi\r\n\r\nhello\r\n"
    assert await states(store, m.queue_id) == [RecipientState.DELIVERING] * 2


async def test_recipient_fields_round_trip(store: QueueStore) -> None:
    r = NewRecipient(
        "bob@b.test",
        Transport.LOCAL,
        "b.test",
        mailbox="bob@b.test",
        original="Bob@B.test",
        orcpt="rfc822;Bob@B.test",
        notify=6,
    )
    m = NewMessage(new_queue_id(), "", (r,), InlineBody(b"x\r\n"), T0)
    await store.enqueue(m)
    (c,) = await claim(store)
    got = c.recipients[0]
    assert (got.address, got.transport, got.domain, got.mailbox) == (
        "bob@b.test",
        Transport.LOCAL,
        "b.test",
        "bob@b.test",
    )
    assert (got.original, got.orcpt, got.notify) == ("Bob@B.test", "rfc822;Bob@B.test", 6)
    assert c.sender == ""


async def test_nothing_is_claimable_before_enqueue(store: QueueStore) -> None:
    assert await claim(store) == []
    m = message(received_at=T0)
    await store.enqueue(m)
    assert await claim(store, now=T0 - 1) == []  # a new recipient is due from received_at
    assert [c.queue_id for c in await claim(store, now=T0)] == [m.queue_id]


async def test_a_claim_sees_a_message_only_once_it_is_durable(
    store: QueueStore, store_env: StoreEnv
) -> None:
    """Claims race a stream of enqueues; whatever a claim returns must already
    be committed: a second store instance on the same storage sees it."""
    other = store_env.make(recover=False)
    await other.open()
    try:
        enqueues = [asyncio.create_task(store.enqueue(message())) for _ in range(20)]
        seen: list[str] = []
        while len(seen) < 20:
            for c in await claim(store):
                seen.append(c.queue_id)
                await other.get_message(c.queue_id)  # raises NoSuchMessage if not committed
        await asyncio.gather(*enqueues)
    finally:
        await other.close()


async def test_a_claim_leases_recipients_to_one_claimer(store: QueueStore) -> None:
    await store.enqueue(message("a@x.test", "b@x.test"))
    first = await claim(store, owner="w1")
    assert sum(len(c.recipients) for c in first) == 2
    assert await claim(store, owner="w2") == []
    assert await claim(store, now=T0 + LEASE - 1, owner="w2") == []


async def test_claim_respects_limit_and_takes_oldest_due_first(store: QueueStore) -> None:
    old = message("a@x.test", received_at=T0 - 30)
    new = message("b@x.test", "c@x.test", received_at=T0 - 10)
    middle = message("d@x.test", received_at=T0 - 20)
    for m in (new, old, middle):
        await store.enqueue(m)
    first = await claim(store, limit=2)
    assert [c.queue_id for c in first] == [old.queue_id, middle.queue_id]
    rest = await claim(store, limit=10)
    assert [c.queue_id for c in rest] == [new.queue_id]
    assert len(rest[0].recipients) == 2
    assert await claim(store, limit=0) == []


async def test_claim_filters_by_transport(store: QueueStore) -> None:
    local = message("bob@here.test", transport=Transport.LOCAL)
    remote = message("bob@there.test", transport=Transport.SMTP)
    await store.enqueue(local)
    await store.enqueue(remote)
    got = await claim(store, transport=Transport.LOCAL)
    assert [c.queue_id for c in got] == [local.queue_id]
    got = await claim(store, transport=Transport.SMTP)
    assert [c.queue_id for c in got] == [remote.queue_id]


async def test_an_expired_lease_can_be_claimed_again_with_a_new_token(store: QueueStore) -> None:
    await store.enqueue(message())
    (first,) = await claim(store, owner="dead-worker")
    assert await claim(store, now=T0 + LEASE - 0.001) == []
    (second,) = await claim(store, now=T0 + LEASE, owner="w2")
    assert second.recipients[0].recipient_id == first.recipients[0].recipient_id
    assert second.recipients[0].lease_token != first.recipients[0].lease_token
    assert second.lease_until == T0 + 2 * LEASE


async def test_release_leases_frees_only_that_owners_claims(store: QueueStore) -> None:
    await store.enqueue(message("a@x.test"))
    await store.enqueue(message("b@x.test"))
    (mine,) = await claim(store, owner="local", limit=1)
    (theirs,) = await claim(store, owner="other", limit=1)
    assert await store.release_leases("local") == 1
    (again,) = await claim(store, owner="local")  # due now, long before the lease would end
    assert again.queue_id == mine.queue_id
    assert again.recipients[0].lease_token != mine.recipients[0].lease_token
    # The dead holder's late outcome is fenced off.
    assert await store.record(all_outcomes(mine, Delivered("late"), at=T0 + 1)) == []
    assert await store.record(all_outcomes(theirs, Delivered("ok"), at=T0 + 1)) == [theirs.queue_id]


# --- record -----------------------------------------------------------------------


async def test_fencing_ignores_a_stale_lease_token(store: QueueStore) -> None:
    m = message("a@x.test", "b@x.test")
    await store.enqueue(m)
    (stale,) = await claim(store)
    (fresh,) = await claim(store, now=T0 + LEASE)
    # The first worker comes back late: its outcomes must not land.
    assert await store.record(all_outcomes(stale, Delivered("late"), at=T0 + LEASE + 1)) == []
    assert await states(store, m.queue_id) == [RecipientState.DELIVERING] * 2
    retry_at = T0 + 1000
    await store.record(all_outcomes(fresh, Deferred("451 later", retry_at), at=T0 + LEASE + 2))
    view = await store.get_message(m.queue_id)
    assert [r.state for r in view.recipients] == [RecipientState.DEFERRED] * 2
    assert [r.attempts for r in view.recipients] == [1, 1]
    # Once applied, the same token is spent: replaying it changes nothing.
    await store.record(all_outcomes(fresh, Failed("550 no"), at=T0 + LEASE + 3))
    assert await states(store, m.queue_id) == [RecipientState.DEFERRED] * 2
    assert [h.event for h in (await store.get_message(m.queue_id)).history].count("failed") == 0


async def test_an_outcome_for_an_unknown_recipient_is_ignored(store: QueueStore) -> None:
    assert await store.record([RecipientOutcome(999_999, "nope", Delivered(), T0)]) == []


async def test_deferred_sets_retry_at_attempts_and_last_error(store: QueueStore) -> None:
    m = message()
    await store.enqueue(m)
    (c,) = await claim(store)
    assert await store.record([outcome(c, Deferred("451 4.7.1 greylisted", T0 + 600))]) == []
    (r,) = (await store.get_message(m.queue_id)).recipients
    assert (r.state, r.attempts, r.next_attempt) == (RecipientState.DEFERRED, 1, T0 + 600)
    assert r.last_error == "451 4.7.1 greylisted"
    assert await claim(store, now=T0 + 599) == []
    (again,) = await claim(store, now=T0 + 600)
    assert again.recipients[0].attempts == 1
    await store.record([outcome(again, Deferred("451 again", T0 + 1800), at=T0 + 601)])
    (r,) = (await store.get_message(m.queue_id)).recipients
    assert (r.attempts, r.next_attempt, r.last_error) == (2, T0 + 1800, "451 again")


async def test_delivered_and_failed_are_final_and_complete_the_message(
    store: QueueStore,
) -> None:
    m = message("a@x.test", "b@x.test", "c@x.test")
    await store.enqueue(m)
    (c,) = await claim(store)
    done = await store.record(
        [outcome(c, Delivered("250 ok"), index=0), outcome(c, Failed("550 5.1.1 no"), index=1)]
    )
    assert done == []
    view = await store.get_message(m.queue_id)
    assert [(r.state, r.attempts) for r in view.recipients] == [
        (RecipientState.DELIVERED, 1),
        (RecipientState.FAILED, 1),
        (RecipientState.DELIVERING, 0),
    ]
    assert view.recipients[1].last_error == "550 5.1.1 no"
    # Final recipients are never claimed again, even after the lease time.
    (later,) = await claim(store, now=T0 + LEASE)
    assert [r.address for r in later.recipients] == ["c@x.test"]
    assert await store.record([outcome(later, Delivered(), at=T0 + LEASE + 1)]) == [m.queue_id]
    assert await store.list_messages() == []
    with pytest.raises(NoSuchMessage):
        await store.get_message(m.queue_id)
    with pytest.raises(NoSuchMessage):
        await store.read_body(m.queue_id)


async def test_record_returns_each_completed_message_once(store: QueueStore) -> None:
    a, b, c = message(), message(), message("x@x.test", "y@x.test")
    for m in (a, b, c):
        await store.enqueue(m)
    claims = {cl.queue_id: cl for cl in await claim(store)}
    outcomes = all_outcomes(claims[a.queue_id], Delivered())
    outcomes += all_outcomes(claims[b.queue_id], Failed("550"))
    outcomes += [outcome(claims[c.queue_id], Delivered())]
    assert sorted(await store.record(outcomes)) == sorted([a.queue_id, b.queue_id])
    assert [v.queue_id for v in await store.list_messages()] == [c.queue_id]


async def test_record_enqueues_follow_ups_in_the_same_transaction(store: QueueStore) -> None:
    m = message(sender="alice@a.test")
    await store.enqueue(m)
    (c,) = await claim(store)
    dsn = message("alice@a.test", sender="", received_at=T0 + 2, body=b"DSN\r\n")
    assert await store.record([outcome(c, Failed("550 no"))], enqueue=[dsn]) == [m.queue_id]
    (view,) = await store.list_messages()
    assert (view.queue_id, view.sender) == (dsn.queue_id, "")
    assert await store.read_body(dsn.queue_id) == b"DSN\r\n"


async def test_record_is_all_or_nothing(store: QueueStore) -> None:
    """If the follow-up cannot be stored, the outcomes are not applied either."""
    m = message()
    await store.enqueue(m)
    (c,) = await claim(store)
    clash = message("alice@a.test", sender="")
    clash = NewMessage(m.queue_id, clash.sender, clash.recipients, clash.body, T0 + 2)
    with pytest.raises(QueueError):
        await store.record([outcome(c, Failed("550 no"))], enqueue=[clash])
    assert await states(store, m.queue_id) == [RecipientState.DELIVERING]
    # The lease is still good: the worker can record again.
    assert await store.record([outcome(c, Delivered())]) == [m.queue_id]


# --- admin actions ----------------------------------------------------------------


async def test_held_messages_are_never_claimed_until_released(store: QueueStore) -> None:
    m = message()
    await store.enqueue(m)
    await store.hold(m.queue_id, T0 + 1)
    assert await claim(store, now=T0 + 10) == []
    assert await store.next_due() is None
    (view,) = await store.list_messages()
    assert view.held and view.recipients[0].state is RecipientState.QUEUED
    await store.release(m.queue_id, T0 + 2)
    assert not (await store.get_message(m.queue_id)).held
    assert [c.queue_id for c in await claim(store, now=T0 + 10)] == [m.queue_id]


async def test_a_message_can_be_enqueued_held(store: QueueStore) -> None:
    m = message(held=True)
    await store.enqueue(m)
    assert (await store.get_message(m.queue_id)).held
    assert await claim(store) == []


async def test_a_lease_that_expires_while_held_is_not_reclaimed(store: QueueStore) -> None:
    m = message()
    await store.enqueue(m)
    (c,) = await claim(store)
    await store.hold(m.queue_id, T0 + 1)
    assert await claim(store, now=T0 + 2 * LEASE) == []
    # The worker that holds the lease may still report.
    await store.record([outcome(c, Deferred("451", T0 + 50))])
    assert await states(store, m.queue_id) == [RecipientState.DEFERRED]


async def test_admin_actions_on_an_unknown_message_raise(store: QueueStore) -> None:
    for action in (store.hold, store.release, store.delete):
        with pytest.raises(NoSuchMessage):
            await action("NOSUCHMESSAGE0", T0)
    with pytest.raises(NoSuchMessage):
        await store.retry("NOSUCHMESSAGE0", T0)
    with pytest.raises(NoSuchMessage):
        await store.get_message("NOSUCHMESSAGE0")
    with pytest.raises(NoSuchMessage):
        await store.read_body("NOSUCHMESSAGE0")


async def test_retry_makes_deferred_recipients_due_now(store: QueueStore) -> None:
    a, b = message("x@x.test", "y@x.test"), message()
    await store.enqueue(a)
    await store.enqueue(b)
    claims = {c.queue_id: c for c in await claim(store)}
    await store.record(all_outcomes(claims[a.queue_id], Deferred("451", T0 + 3600)))
    await store.record(all_outcomes(claims[b.queue_id], Deferred("451", T0 + 3600)))
    assert await claim(store, now=T0 + 10) == []
    assert await store.retry(a.queue_id, T0 + 10) == 2
    got = await claim(store, now=T0 + 10)
    assert [c.queue_id for c in got] == [a.queue_id]
    assert await store.retry(None, T0 + 20) == 1  # only b is still deferred
    assert [c.queue_id for c in await claim(store, now=T0 + 20)] == [b.queue_id]
    assert await store.retry(None, T0 + 30) == 0


async def test_delete_removes_a_message_without_delivering(store: QueueStore) -> None:
    m, keep = message(), message()
    await store.enqueue(m)
    await store.enqueue(keep)
    await store.delete(m.queue_id, T0 + 1)
    assert [v.queue_id for v in await store.list_messages()] == [keep.queue_id]
    with pytest.raises(NoSuchMessage):
        await store.read_body(m.queue_id)
    with pytest.raises(NoSuchMessage):
        await store.delete(m.queue_id, T0 + 2)
    assert [c.queue_id for c in await claim(store)] == [keep.queue_id]


async def test_list_messages_filters_and_order(store: QueueStore) -> None:
    old = message("bob@b.test", sender="alice@a.test", received_at=T0 - 100)
    mid = message("carol@c.test", "dave@b.test", sender="eve@e.test", received_at=T0 - 50)
    new = message("frank@f.test", sender="alice@a.test", received_at=T0)
    for m in (new, old, mid):
        await store.enqueue(m)
    await store.hold(new.queue_id, T0)
    (c,) = await claim(store, limit=1)  # takes old's only recipient
    await store.record([outcome(c, Deferred("451", T0 + 900))])

    async def ids(f: QueueFilter | None = None) -> list[str]:
        return [v.queue_id for v in await store.list_messages(f)]

    assert await ids() == [old.queue_id, mid.queue_id, new.queue_id]
    assert await ids(QueueFilter(sender="Alice@A.test")) == [old.queue_id, new.queue_id]
    assert await ids(QueueFilter(recipient="dave@b.test")) == [mid.queue_id]
    assert await ids(QueueFilter(domain="B.TEST")) == [old.queue_id, mid.queue_id]
    assert await ids(QueueFilter(state=RecipientState.DEFERRED)) == [old.queue_id]
    assert await ids(QueueFilter(state=RecipientState.QUEUED)) == [mid.queue_id, new.queue_id]
    assert await ids(QueueFilter(held=True)) == [new.queue_id]
    assert await ids(QueueFilter(held=False)) == [old.queue_id, mid.queue_id]
    assert await ids(QueueFilter(older_than=T0 - 50)) == [old.queue_id]
    assert await ids(QueueFilter(sender="alice@a.test", held=False)) == [old.queue_id]
    assert await ids(QueueFilter(quarantined=True)) == []
    assert await ids(QueueFilter(limit=2)) == [old.queue_id, mid.queue_id]
    (view,) = await store.list_messages(QueueFilter(state=RecipientState.DEFERRED))
    assert view.history == ()  # lists carry no history
    (r,) = view.recipients
    assert (r.address, r.attempts, r.next_attempt, r.last_error) == (
        "bob@b.test",
        1,
        T0 + 900,
        "451",
    )


async def test_get_message_shows_the_envelope_and_history(store: QueueStore) -> None:
    m = message(
        "bob@b.test",
        "carol@c.test",
        client="mx.a.test [192.0.2.1]:4567",
        auth_user="alice",
        message_id="<1@a.test>",
        envid="E1",
        ret="FULL",
    )
    await store.enqueue(m)
    (c,) = await claim(store, now=T0 + 5)
    await store.record([outcome(c, Deferred("451 busy", T0 + 100), at=T0 + 6, index=0)])
    await store.record([outcome(c, Delivered("250 2.0.0 ok"), at=T0 + 7, index=1)])
    await store.hold(m.queue_id, T0 + 8)
    await store.release(m.queue_id, T0 + 9)
    await store.retry(m.queue_id, T0 + 10)
    view = await store.get_message(m.queue_id)
    assert (view.sender, view.size, view.received_at) == (m.sender, m.body.size, T0)
    assert (view.client, view.auth_user, view.message_id) == (
        "mx.a.test [192.0.2.1]:4567",
        "alice",
        "<1@a.test>",
    )
    assert (view.envid, view.ret, view.held, view.quarantined) == ("E1", "FULL", False, False)
    events = [(h.at, h.recipient, h.event) for h in view.history]
    assert events == [
        (T0, "", "queued"),
        (T0 + 6, "bob@b.test", "deferred"),
        (T0 + 7, "carol@c.test", "delivered"),
        (T0 + 8, "", "held"),
        (T0 + 9, "", "released"),
        (T0 + 10, "", "retry"),
    ]
    assert view.history[1].detail == "451 busy"
    assert view.history[2].detail == "250 2.0.0 ok"


async def test_next_due(store: QueueStore) -> None:
    assert await store.next_due() is None
    local = message("a@here.test", transport=Transport.LOCAL, received_at=T0 + 20)
    remote = message("b@there.test", transport=Transport.SMTP, received_at=T0 + 10)
    await store.enqueue(local)
    await store.enqueue(remote)
    assert await store.next_due() == T0 + 10
    assert await store.next_due(Transport.LOCAL) == T0 + 20
    assert await store.next_due(Transport.SMTP) == T0 + 10
    (c,) = await claim(store, now=T0 + 10, transport=Transport.SMTP)
    # A leased recipient is due again when its lease runs out.
    assert await store.next_due(Transport.SMTP) == T0 + 10 + LEASE
    await store.record([outcome(c, Deferred("451", T0 + 5000))])
    assert await store.next_due(Transport.SMTP) == T0 + 5000
    assert await store.next_due() == T0 + 20


# --- bodies -------------------------------------------------------------------------


def spool(env: StoreEnv, data: bytes) -> SpooledBody:
    """What the session does for a large body: write and fsync a file in the spool dir."""
    path = env.spool_dir / f"body-{new_queue_id()}"
    path.write_bytes(data)
    return SpooledBody(path, len(data))


async def test_a_spooled_body_is_kept_and_removed_with_the_message(
    store: QueueStore, store_env: StoreEnv
) -> None:
    data = b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    body = spool(store_env, data)
    m = NewMessage(new_queue_id(), "a@a.test", (rcpt("b@b.test"),), body, T0)
    await store.enqueue(m)
    assert await store.read_body(m.queue_id) == data
    # A store may hand out a file to stream from instead; if so it holds the content.
    source = await store.body_file(m.queue_id)
    assert source is None or source.read_bytes() == data
    with pytest.raises(NoSuchMessage):
        await store.body_file("NOSUCHMESSAGE0")
    (c,) = await claim(store)
    assert c.size == len(data)
    assert await store.record([outcome(c, Delivered())]) == [m.queue_id]
    assert not body.path.exists()
    assert source is None or not source.exists()  # nothing of a completed message stays on disk

    body2 = spool(store_env, data)
    m2 = NewMessage(new_queue_id(), "a@a.test", (rcpt("b@b.test"),), body2, T0)
    await store.enqueue(m2)
    await store.delete(m2.queue_id, T0)
    assert not body2.path.exists()


async def test_enqueue_refuses_a_duplicate_queue_id(store: QueueStore) -> None:
    m = message(body=b"first\r\n")
    await store.enqueue(m)
    twin = NewMessage(m.queue_id, "x@x.test", (rcpt("y@y.test"),), InlineBody(b"second\r\n"), T0)
    with pytest.raises(QueueError):
        await store.enqueue(twin)
    assert await store.read_body(m.queue_id) == b"first\r\n"
    assert len(await store.list_messages()) == 1


async def test_a_failing_enqueue_does_not_take_its_batch_down(store: QueueStore) -> None:
    m = message()
    await store.enqueue(m)
    twin = NewMessage(m.queue_id, "x@x.test", (rcpt("y@y.test"),), InlineBody(b"2\r\n"), T0)
    others = [message() for _ in range(30)]
    results = await asyncio.gather(
        *(store.enqueue(o) for o in others[:15]),
        store.enqueue(twin),
        *(store.enqueue(o) for o in others[15:]),
        return_exceptions=True,
    )
    assert [type(r) for r in results].count(QueueError) == 1
    assert isinstance(results[15], QueueError)
    assert len(await store.list_messages()) == 31


# --- concurrency and durability ------------------------------------------------------


async def test_many_concurrent_enqueues_are_all_claimed_exactly_once(store: QueueStore) -> None:
    messages = [message(f"r{i}@x.test", f"s{i}@y.test") for i in range(200)]
    await asyncio.gather(*(store.enqueue(m) for m in messages))
    assert len(await store.list_messages()) == 200

    async def worker(name: str) -> list[tuple[str, int]]:
        got = []
        while batch := await claim(store, limit=17, owner=name):
            got += [(c.queue_id, r.recipient_id) for c in batch for r in c.recipients]
        return got

    results = await asyncio.gather(*(worker(f"w{i}") for i in range(5)))
    claimed = list(itertools.chain.from_iterable(results))
    assert len(claimed) == 400
    assert len(set(claimed)) == 400
    assert {qid for qid, _ in claimed} == {m.queue_id for m in messages}


async def test_everything_survives_close_and_reopen(store_env: StoreEnv) -> None:
    first = store_env.make()
    await first.open()
    messages = [message(f"r{i}@x.test") for i in range(50)]
    await asyncio.gather(*(first.enqueue(m) for m in messages))
    held = messages[0]
    await first.hold(held.queue_id, T0 + 1)
    claims = await claim(first, limit=3)
    await first.record([outcome(claims[0], Deferred("451 later", T0 + 99))])
    spooled = spool(store_env, b"spooled body\r\n")
    big = NewMessage(new_queue_id(), "a@a.test", (rcpt("b@b.test"),), spooled, T0 + 2)
    await first.enqueue(big)
    before = await first.list_messages()
    history = (await first.get_message(claims[0].queue_id)).history
    await first.close()

    second = store_env.make()
    await second.open()
    try:
        # A store may release a dead process's leases at open (SQLite, the only
        # deliverer) or keep them until they expire (a shared store): for the
        # recipients that were leased, state and next_attempt may differ.
        leased = {r.recipient_id for c in claims[1:] for r in c.recipients}
        assert _durable_facts(await second.list_messages(), leased) == _durable_facts(
            before, leased
        )
        assert len(before) == 51
        assert (await second.get_message(held.queue_id)).held
        assert (await second.get_message(claims[0].queue_id)).history == history
        assert await second.read_body(messages[5].queue_id) == messages[5].body.data  # type: ignore[union-attr]
        assert await second.read_body(big.queue_id) == b"spooled body\r\n"
        # Leased recipients come back when their lease runs out; the held one does not.
        assert len(await claim(second, now=T0 + LEASE)) == 50
    finally:
        await second.close()


def _durable_facts(views: list[QueuedMessageView], leased: set[int]) -> list[object]:
    return [
        (
            replace(v, recipients=()),
            [
                replace(r, state=RecipientState.DELIVERING, next_attempt=None)
                if r.recipient_id in leased
                else r
                for r in v.recipients
            ],
        )
        for v in views
    ]


async def test_a_closed_store_refuses_work(store_env: StoreEnv) -> None:
    s = store_env.make()
    await s.open()
    await s.close()
    with pytest.raises(QueueError):
        await s.enqueue(message())


async def test_the_spool_directory_is_the_stores_own(store_env: StoreEnv, tmp_path: Path) -> None:
    """A body outside the spool directory is a caller bug, refused before anything is stored."""
    s = store_env.make()
    await s.open()
    try:
        outside = tmp_path / "elsewhere.eml"
        outside.write_bytes(b"x\r\n")
        m = NewMessage(new_queue_id(), "", (rcpt("b@b.test"),), SpooledBody(outside, 3), T0)
        with pytest.raises(ValueError):
            await s.enqueue(m)
        assert await s.list_messages() == []
    finally:
        await s.close()
