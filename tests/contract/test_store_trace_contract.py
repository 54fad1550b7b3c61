"""The QueueStore contract, part 3: history and `trace` (store.py "History and
trace"), the filters `gannet queue list` uses, and keyset paging. Same rules as
test_store_contract.py: written against the interface only, run per backend.
"""

from __future__ import annotations

import pytest

from contract.test_store_contract import T0, all_outcomes, claim, message, outcome
from gannet.queue.model import (
    Deferred,
    Delivered,
    Failed,
    NoSuchMessage,
    QueueFilter,
    RecipientState,
    TraceEvent,
)
from gannet.queue.store import QueueStore


def events(trace: list[TraceEvent]) -> list[tuple[float, str, str]]:
    return [(e.at, e.recipient, e.event) for e in trace]


async def test_trace_of_a_queued_message_starts_with_received(store: QueueStore) -> None:
    m = message("bob@b.test", message_id="<abc@a.test>", client="mail.a.test [192.0.2.1]:4000")
    await store.enqueue(m)
    (received,) = await store.trace(m.queue_id)
    assert (received.at, received.queue_id, received.recipient, received.event) == (
        T0,
        m.queue_id,
        "",
        "received",
    )
    for part in (
        "from=<alice@a.test>",
        f"size={m.body.size}",
        "client=mail.a.test [192.0.2.1]:4000",
        "message-id=<abc@a.test>",
    ):
        assert part in received.detail


async def test_a_delivered_message_can_still_be_traced(store: QueueStore) -> None:
    m = message("bob@b.test", "carol@c.test", message_id="<done@a.test>")
    await store.enqueue(m)
    (c,) = await claim(store)
    await store.record(
        [
            outcome(c, Deferred("451 4.3.0 busy", T0 + 60), at=T0 + 1, index=0),
            outcome(c, Delivered("250 2.0.0 ok carol"), at=T0 + 1, index=1),
        ]
    )
    (c,) = await claim(store, now=T0 + 60)
    assert await store.record([outcome(c, Delivered("250 2.0.0 ok bob"), at=T0 + 61)]) == [m.queue_id]
    with pytest.raises(NoSuchMessage):
        await store.get_message(m.queue_id)  # gone from the queue …
    trace = await store.trace(m.queue_id)  # … but not from its history
    assert events(trace) == [
        (T0, "", "received"),
        (T0 + 1, "bob@b.test", "deferred"),
        (T0 + 1, "carol@c.test", "delivered"),
        (T0 + 61, "bob@b.test", "delivered"),
        (T0 + 61, "", "completed"),
    ]
    assert [e.detail for e in trace[1:4]] == ["451 4.3.0 busy", "250 2.0.0 ok carol", "250 2.0.0 ok bob"]
    assert "message-id=<done@a.test>" in trace[0].detail
    assert {e.queue_id for e in trace} == {m.queue_id}


@pytest.mark.parametrize("key", ["<mid-1@a.test>", "mid-1@a.test", " <mid-1@a.test> "])
async def test_trace_finds_a_message_by_message_id_with_or_without_brackets(
    store: QueueStore, key: str
) -> None:
    m = message(message_id="<mid-1@a.test>")
    other = message(message_id="<mid-2@a.test>")
    await store.enqueue(m)
    await store.enqueue(other)
    assert {e.queue_id for e in await store.trace(key)} == {m.queue_id}


async def test_trace_by_message_id_spans_the_queue_and_the_finished(store: QueueStore) -> None:
    """The same Message-ID sent twice: one copy delivered, one still queued."""
    first = message(message_id="<twice@a.test>")
    await store.enqueue(first)
    (c,) = await claim(store)
    await store.record(all_outcomes(c, Delivered("250 ok")))
    second = message(message_id="<twice@a.test>", received_at=T0 + 10)
    await store.enqueue(second)
    trace = await store.trace("twice@a.test")
    assert [(e.queue_id, e.event) for e in trace] == [
        (first.queue_id, "received"),
        (first.queue_id, "delivered"),
        (first.queue_id, "completed"),
        (second.queue_id, "received"),
    ]


async def test_trace_of_an_unknown_key_is_empty(store: QueueStore) -> None:
    await store.enqueue(message(message_id="<x@a.test>"))
    await store.enqueue(message())  # no Message-ID header
    assert await store.trace("NOSUCHMESSAGE0") == []
    assert await store.trace("<y@a.test>") == []
    assert await store.trace("") == []  # messages without a Message-ID are not all "found"
    assert await store.trace("<>") == []


async def test_admin_actions_appear_in_the_trace(store: QueueStore) -> None:
    m = message()
    await store.enqueue(m)
    await store.hold(m.queue_id, T0 + 1)
    await store.release(m.queue_id, T0 + 2)
    (c,) = await claim(store, now=T0 + 2)
    await store.record([outcome(c, Deferred("421 4.4.2 gone", T0 + 600), at=T0 + 3)])
    await store.retry(m.queue_id, T0 + 4)
    await store.delete(m.queue_id, T0 + 5)
    assert [e.event for e in await store.trace(m.queue_id)] == [
        "received",
        "held",
        "released",
        "deferred",
        "retry",
        "deleted",
    ]


async def test_a_bounce_is_linked_from_the_message_it_reports_on(store: QueueStore) -> None:
    m = message("bob@b.test")
    await store.enqueue(m)
    (c,) = await claim(store)
    dsn = message("alice@a.test", sender="", received_at=T0 + 2, report_for=m.queue_id)
    assert await store.record([outcome(c, Failed("550 5.1.1 no such user"), at=T0 + 2)], enqueue=[dsn]) == [
        m.queue_id
    ]
    trace = await store.trace(m.queue_id)
    assert [(e.event, e.queue_id) for e in trace] == [
        ("received", m.queue_id),
        ("failed", m.queue_id),
        ("dsn", m.queue_id),
        ("completed", m.queue_id),
    ]
    assert trace[1].detail == "550 5.1.1 no such user"
    assert trace[2].detail == f"report queued as {dsn.queue_id} to <alice@a.test>"
    # The report itself is an ordinary message with a trace of its own.
    assert [e.event for e in await store.trace(dsn.queue_id)] == ["received"]


async def test_check_events_given_at_enqueue_are_in_the_trace(store: QueueStore) -> None:
    m = message(events=(("check", "spf=pass smtp.mailfrom=a.test"), ("check", "dkim=none")))
    await store.enqueue(m)
    assert [(e.event, e.detail) for e in (await store.trace(m.queue_id))[1:]] == [
        ("check", "spf=pass smtp.mailfrom=a.test"),
        ("check", "dkim=none"),
    ]
    assert [h.event for h in (await store.get_message(m.queue_id)).history] == ["queued", "check", "check"]


async def test_prune_history_forgets_only_what_finished_before_the_cutoff(store: QueueStore) -> None:
    old = [message(received_at=T0 + i) for i in range(5)]
    for m in old:
        await store.enqueue(m)
    claims = await claim(store, now=T0 + 10)
    for i, c in enumerate(claims):
        await store.record(all_outcomes(c, Delivered("ok"), at=T0 + 10 + i))
    recent = message(received_at=T0 + 100)
    await store.enqueue(recent)
    (c,) = await claim(store, now=T0 + 100)
    await store.record(all_outcomes(c, Delivered("ok"), at=T0 + 200))
    waiting = message(received_at=T0)
    await store.enqueue(waiting)
    # Finished at T0+10 … T0+14; the cutoff T0+13 takes three, two per call.
    assert await store.prune_history(T0 + 13, limit=2) == 2
    assert await store.prune_history(T0 + 13, limit=2) == 1
    assert await store.prune_history(T0 + 13, limit=2) == 0
    assert [bool(await store.trace(m.queue_id)) for m in old] == [False, False, False, True, True]
    assert await store.trace(recent.queue_id)  # finished at T0+200
    assert await store.prune_history(T0 + 10_000, limit=100) == 3
    assert await store.trace(recent.queue_id) == []
    # A message still in the queue is never pruned, however old.
    assert [e.event for e in await store.trace(waiting.queue_id)] == ["received"]


async def test_list_filters_by_age_state_and_pages_by_key(store: QueueStore) -> None:
    ms = [message(f"r{i}@d{i % 2}.test", sender=f"s{i}@x.test", received_at=T0 + i * 100) for i in range(6)]
    for m in ms:
        await store.enqueue(m)
    (c,) = await claim(store, now=T0, limit=1)
    await store.record([outcome(c, Deferred("451 later", T0 + 9000))])

    async def ids(**kw: object) -> list[str]:
        return [v.queue_id for v in await store.list_messages(QueueFilter(**kw))]  # type: ignore[arg-type]

    qids = [m.queue_id for m in ms]
    assert await ids(newer_than=T0 + 300) == qids[3:]
    assert await ids(older_than=T0 + 300, newer_than=T0 + 100) == qids[1:3]
    assert await ids(state=RecipientState.DEFERRED) == qids[:1]
    assert await ids(domain="D1.test") == qids[1::2]
    assert await ids(sender="S2@x.test") == qids[2:3]
    assert await ids(recipient="r4@d0.test") == qids[4:5]
    pages, after = [], None
    while page := await ids(limit=4, after=after):
        pages.append(page)
        last = (await store.get_message(page[-1])).received_at
        after = (last, page[-1])
    assert pages == [qids[:4], qids[4:]]


async def test_paging_is_exact_when_messages_share_a_time(store: QueueStore) -> None:
    ms = [message(received_at=T0) for _ in range(5)]
    for m in ms:
        await store.enqueue(m)
    first = [v.queue_id for v in await store.list_messages(QueueFilter(limit=2))]
    rest = [v.queue_id for v in await store.list_messages(QueueFilter(after=(T0, first[-1])))]
    assert sorted(first + rest) == sorted(m.queue_id for m in ms)
    assert len(first + rest) == 5
