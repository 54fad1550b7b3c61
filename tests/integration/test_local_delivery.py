"""Local delivery end to end over the real SqliteStore: messages enqueued in
the store end up exactly once in the right Maildir, retries go through the
store's fencing and attempt counting, and the queue empties.

The benchmark at the end is skipped unless GANNET_BENCH=1:

    GANNET_BENCH=1 .venv/bin/pytest -s tests/integration/test_local_delivery.py -k bench
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from gannet.clock import Clock, FakeClock, SystemClock
from gannet.config import DeliveryConfig
from gannet.delivery.local import LocalDelivery
from gannet.queue.ids import QueueIdGenerator
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, RecipientState, Transport
from gannet.queue.sqlite import SqliteStore

CONFIG = DeliveryConfig(retry=(60.0, 300.0), give_up_after=5 * 86400.0, local_concurrency=8)
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>$", re.MULTILINE)


def message(queue_id: str, rcpt: str, received_at: float, pad: int = 0) -> NewMessage:
    body = (
        f"Received: from client by test; id {queue_id}\r\n"
        f"Message-ID: <{queue_id}@test>\r\nSubject: n\r\n\r\nhello\r\n"
    ).encode() + b"x" * pad
    return NewMessage(
        queue_id=queue_id,
        sender="sender@remote.test",
        recipients=(NewRecipient(rcpt, Transport.LOCAL, rcpt.rpartition("@")[2], mailbox=rcpt),),
        body=InlineBody(body),
        received_at=received_at,
    )


def maildir_ids(root: Path, mailbox: str) -> list[str]:
    user, _, domain = mailbox.partition("@")
    new = root / domain / user / "new"
    ids = []
    for path in new.iterdir():
        m = MESSAGE_ID.search(path.read_bytes())
        assert m, path
        ids.append(m.group(1).decode().removesuffix("@test"))
    return ids


async def until(cond: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def make_loop(store: SqliteStore, root: Path, clock: Clock, **kw: object) -> LocalDelivery:
    return LocalDelivery(
        store, maildir_template=str(root / "{domain}" / "{user}"), delivery=CONFIG, clock=clock, **kw
    )  # type: ignore[arg-type]


async def test_thousand_messages_three_mailboxes_each_exactly_once(
    store: SqliteStore, tmp_path: Path
) -> None:
    root = tmp_path / "mail"
    boxes = ["alice@example.test", "bob@example.test", "carol@other.test"]
    ids = QueueIdGenerator()
    expected: dict[str, list[str]] = {b: [] for b in boxes}
    messages = []
    for i in range(1000):
        qid = ids()
        expected[boxes[i % 3]].append(qid)
        messages.append(message(qid, boxes[i % 3], time.time()))
    await asyncio.gather(*(store.enqueue(m) for m in messages))

    delivery = make_loop(store, root, SystemClock())
    task = asyncio.create_task(delivery.run())
    await until(lambda: delivery.stats.delivered >= 1000, timeout=60)
    await delivery.stop()
    await task

    for box in boxes:
        got = maildir_ids(root, box)
        assert Counter(got) == Counter(expected[box])  # every one, once, in its own box
    assert await store.list_messages() == []
    assert await store.next_due(Transport.LOCAL) is None
    assert delivery.stats.deferred == delivery.stats.failed == 0
    assert delivery.stats.records < 1000 / 8  # batched commits, not one per message


async def test_wake_delivers_a_message_enqueued_while_idle(store: SqliteStore, tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    delivery = make_loop(store, tmp_path / "mail", clock)
    task = asyncio.create_task(delivery.run())
    await asyncio.sleep(0.05)  # idle, asleep on a clock that never moves
    await store.enqueue(message("Q1", "bob@example.test", clock.now()))
    delivery.wake()
    await until(lambda: delivery.stats.records == 1, timeout=5)
    await delivery.stop()
    await task
    assert maildir_ids(tmp_path / "mail", "bob@example.test") == ["Q1"]
    assert await store.list_messages() == []


async def test_deferral_is_stored_and_retried_when_due(store: SqliteStore, tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    blocker = root / "example.test"
    blocker.write_text("a file where a directory should be")
    clock = FakeClock(time.time())
    t0 = clock.now()
    await store.enqueue(message("Q1", "bob@example.test", t0))
    delivery = make_loop(store, root, clock)
    task = asyncio.create_task(delivery.run())
    try:
        await until(lambda: delivery.stats.deferred == 1 and delivery.stats.records == 1, 5)
        (rcpt,) = (await store.get_message("Q1")).recipients
        assert rcpt.state is RecipientState.DEFERRED
        assert rcpt.attempts == 1
        assert rcpt.next_attempt == pytest.approx(t0 + 60)
        assert rcpt.last_error == "4.3.0 cannot write mailbox: Not a directory"

        blocker.unlink()
        clock.advance(60)
        await until(lambda: delivery.stats.delivered == 1 and delivery.stats.records == 2, 5)
    finally:
        await delivery.stop()
        await task
    assert maildir_ids(root, "bob@example.test") == ["Q1"]
    assert await store.list_messages() == []


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GANNET_BENCH") != "1", reason="set GANNET_BENCH=1")
@pytest.mark.parametrize("mailboxes", [1, 20])
async def test_bench_deliveries_per_second(tmp_path: Path, mailboxes: int) -> None:
    """5,000 messages of 4 KiB already queued; time until all are delivered
    and recorded. Knobs: GANNET_BENCH_N, _CONCURRENCY, _BATCH, _BATCHES."""
    n = int(os.environ.get("GANNET_BENCH_N", "5000"))
    concurrency = int(os.environ.get("GANNET_BENCH_CONCURRENCY", "8"))
    batch = int(os.environ.get("GANNET_BENCH_BATCH", "64"))
    batches = int(os.environ.get("GANNET_BENCH_BATCHES", "3"))
    (tmp_path / "spool").mkdir()
    store = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    await store.open()
    ids = QueueIdGenerator()
    boxes = [f"user{i}@example.test" for i in range(mailboxes)]
    now = time.time()
    msgs = [message(ids(), boxes[i % mailboxes], now, pad=4096 - 90) for i in range(n)]
    await asyncio.gather(*(store.enqueue(m) for m in msgs))
    cfg = DeliveryConfig(retry=CONFIG.retry, local_concurrency=concurrency)
    delivery = LocalDelivery(
        store,
        maildir_template=str(tmp_path / "mail/{domain}/{user}"),
        delivery=cfg,
        clock=SystemClock(),
        batch=batch,
        max_batches=batches,
    )
    start = time.perf_counter()
    cpu = time.process_time()
    task = asyncio.create_task(delivery.run())
    await until(lambda: delivery.stats.delivered >= n, timeout=600)
    await delivery.stop()
    await task
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    assert await store.list_messages() == []
    await store.close()
    print(
        f"\nBENCH mailboxes={mailboxes} n={n} concurrency={concurrency} batch={batch} "
        f"max_batches={batches}: {n / elapsed:,.0f} deliveries/s "
        f"({elapsed:.2f} s wall, {cpu:.2f} s CPU, {delivery.stats.records} record commits)"
    )
