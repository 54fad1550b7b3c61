"""The local delivery loop against the in-memory FakeStore and a FakeClock:
outcomes, retries, expiry, batching, wake-up and shutdown. The pure
decisions (decide_outcome, idle_delay) are tested first, without a loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gannet.clock import FakeClock
from gannet.config import DeliveryConfig
from gannet.delivery.dsn import RecipientReport
from gannet.delivery.local import LocalDelivery
from gannet.delivery.local_decisions import (
    BadMailbox,
    TempError,
    WriteResult,
    Written,
    apply_sync_errors,
    decide_outcome,
    dirs_to_sync,
    idle_delay,
)
from gannet.delivery.maildir import SYNCFS_AVAILABLE
from gannet.queue.model import (
    Claim,
    Deferred,
    Delivered,
    Failed,
    InlineBody,
    NewMessage,
    RecipientState,
)
from gannet.queue.store import QueueStore
from gannet.util import files

from .fakes import FakeStore, local_message

DAY = 86400.0
CONFIG = DeliveryConfig(retry=(60.0, 300.0, 900.0), give_up_after=5 * DAY, local_concurrency=4)
T0 = 1_800_000_000.0


# -- pure decisions -------------------------------------------------------------


def decide(result: Any, attempts: int = 0, received_at: float = T0, now: float = T0) -> Any:
    return decide_outcome(result, attempts=attempts, received_at=received_at, now=now,
                          delivery=CONFIG)


def test_decide_written_is_delivered_with_the_path() -> None:
    assert decide(Written(Path("/m/new/x"))) == Delivered(detail="/m/new/x")


def test_decide_bad_mailbox_fails_permanently() -> None:
    assert decide(BadMailbox("../x@y")) == Failed("5.1.3 bad mailbox name")


def test_decide_temp_error_defers_by_the_schedule() -> None:
    error = TempError("4.3.0 cannot write mailbox: Not a directory")
    assert decide(error, attempts=0) == Deferred(error.reason, T0 + 60)
    assert decide(error, attempts=1) == Deferred(error.reason, T0 + 300)
    assert decide(error, attempts=9) == Deferred(error.reason, T0 + 900)


def test_decide_temp_error_fails_once_the_message_expired() -> None:
    out = decide(TempError("4.3.0 cannot write mailbox: x"), attempts=30,
                 received_at=T0 - 5 * DAY)
    assert isinstance(out, Failed)
    assert out.reason.startswith("4.4.7 message expired after 5 days")
    assert out.reason.endswith("last error: 4.3.0 cannot write mailbox: x")


def test_dirs_to_sync_lists_each_new_dir_once_in_order() -> None:
    results: list[WriteResult] = [
        Written(Path("/m/b/new/1")), TempError("4.3.0 x"), Written(Path("/m/a/new/2")),
        Written(Path("/m/b/new/3")), BadMailbox("x"),
    ]
    assert dirs_to_sync(results) == [Path("/m/b/new"), Path("/m/a/new")]


def test_a_failed_dir_sync_turns_its_files_into_temp_errors() -> None:
    errors = {Path("/m/b/new"): "4.3.0 cannot write mailbox: Input/output error"}
    assert apply_sync_errors(Written(Path("/m/b/new/1")), errors) == TempError(
        "4.3.0 cannot write mailbox: Input/output error")
    assert apply_sync_errors(Written(Path("/m/a/new/2")), errors) == Written(Path("/m/a/new/2"))
    assert apply_sync_errors(BadMailbox("x"), errors) == BadMailbox("x")


@pytest.mark.parametrize(
    ("next_due", "delay"),
    [(None, 30.0), (T0 + 3600, 30.0), (T0 + 5, 5.0), (T0, 0.1), (T0 - 100, 0.1)],
)
def test_idle_delay(next_due: float | None, delay: float) -> None:
    assert idle_delay(T0, next_due) == pytest.approx(delay)


# -- the loop -------------------------------------------------------------------


class Harness:
    """A LocalDelivery over a FakeStore and FakeClock, running in a task."""

    def __init__(self, tmp_path: Path, **kwargs: Any) -> None:
        self.root = tmp_path / "mail"
        self.clock = FakeClock(T0)
        self.store = FakeStore()
        store: QueueStore = self.store  # the fake must satisfy the protocol
        kwargs.setdefault("delivery", CONFIG)
        self.loop = LocalDelivery(store, maildir_template=str(self.root / "{domain}" / "{user}"),
                                  clock=self.clock, **kwargs)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.loop.run())

    async def enqueue(self, *messages: NewMessage, wake: bool = True) -> None:
        for m in messages:
            await self.store.enqueue(m)
        if wake:
            self.loop.wake()

    def message(self, qid: str, *rcpts: str, **kwargs: Any) -> NewMessage:
        kwargs.setdefault("received_at", self.clock.now())
        return local_message(qid, *rcpts, **kwargs)

    def files(self, mailbox: str) -> list[Path]:
        user, _, domain = mailbox.partition("@")
        new = self.root / domain / user / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    async def stop(self) -> None:
        await asyncio.wait_for(self.loop.stop(), 5)
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    harness.start()
    yield harness
    await harness.stop()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (in real time: the writes run in threads) until `cond()` holds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


async def settle() -> None:
    """Let the loop reach its next await on the fake clock."""
    for _ in range(20):
        await asyncio.sleep(0.005)


async def test_delivers_into_the_mailbox_and_logs(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gannet.mail")
    await h.enqueue(h.message("Q1", "bob@example.test", sender="alice@remote.test"))
    await until(lambda: h.store.empty)
    (path,) = h.files("bob@example.test")
    assert path.read_bytes() == (
        b"Return-Path: <alice@remote.test>\nDelivered-To: bob@example.test\n"
        b"Message-ID: <Q1@test>\nSubject: test\n\nhello\n.. dots\n"
    )
    (call,) = h.store.record_calls
    assert call[0].outcome == Delivered(detail=str(path))
    assert call[0].at == T0
    assert f"Q1: to=<bob@example.test>, relay=maildir, delay=0.00, dsn=2.0.0, status=sent ({path})" \
        in caplog.text
    assert h.loop.stats.delivered == 1 and h.loop.stats.records == 1


async def test_delivered_to_is_the_address_and_the_mailbox_picks_the_maildir(h: Harness) -> None:
    await h.enqueue(h.message("Q1", "postmaster@example.test", mailboxes=["bob@example.test"]))
    await until(lambda: h.store.empty)
    (path,) = h.files("bob@example.test")
    assert b"Delivered-To: postmaster@example.test\n" in path.read_bytes()


async def test_body_is_read_once_and_shared_by_its_recipients(h: Harness) -> None:
    rcpts = ("a@example.test", "b@example.test", "c@other.test")
    await h.enqueue(h.message("Q1", *rcpts))
    await until(lambda: h.store.empty)
    assert h.store.body_reads == ["Q1"]
    for r in rcpts:
        (path,) = h.files(r)
        assert f"Delivered-To: {r}\n".encode() in path.read_bytes()


async def test_write_error_defers_counts_attempts_and_delivers_once_fixed(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gannet.mail")
    h.root.mkdir()
    blocker = h.root / "example.test"
    blocker.write_text("a file where the domain directory should be")
    await h.enqueue(h.message("Q1", "bob@example.test"))
    await until(lambda: h.store.recipient("bob@example.test").attempts == 1)
    r = h.store.recipient("bob@example.test")
    assert r.state is RecipientState.DEFERRED
    assert r.next_attempt == T0 + 60
    assert r.last_error == "4.3.0 cannot write mailbox: Not a directory"
    assert "status=deferred" in caplog.text and "retry_in=60s" in caplog.text

    h.clock.advance(60)  # second failure: the next interval of the schedule
    await until(lambda: h.store.recipient("bob@example.test").attempts == 2)
    assert h.store.recipient("bob@example.test").next_attempt == T0 + 60 + 300

    blocker.unlink()
    h.clock.advance(299)
    await settle()
    assert h.store.recipient("bob@example.test").attempts == 2  # not due yet
    h.clock.advance(1)
    await until(lambda: h.store.empty)
    assert len(h.files("bob@example.test")) == 1
    assert [len(c) for c in h.store.record_calls] == [1, 1, 1]


async def test_write_error_on_an_expired_message_fails_it(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gannet.mail")
    h.root.mkdir()
    (h.root / "example.test").write_text("blocker")
    await h.enqueue(h.message("Q1", "bob@example.test", received_at=T0 - 6 * DAY))
    await until(lambda: h.store.empty)
    (call,) = h.store.record_calls
    assert isinstance(call[0].outcome, Failed)
    assert call[0].outcome.reason.startswith("4.4.7 message expired")
    assert "status=bounced" in caplog.text and "dsn=4.4.7" in caplog.text


async def test_last_retry_lands_on_the_expiry_time(h: Harness) -> None:
    h.root.mkdir()
    (h.root / "example.test").write_text("blocker")
    received = T0 - 5 * DAY + 10  # expires in 10 s
    await h.enqueue(h.message("Q1", "bob@example.test", received_at=received))
    await until(lambda: h.store.recipient("bob@example.test").attempts == 1)
    assert h.store.recipient("bob@example.test").next_attempt == received + 5 * DAY
    h.clock.advance(10)
    await until(lambda: h.store.empty)
    assert isinstance(h.store.record_calls[-1][0].outcome, Failed)


async def test_unsafe_mailbox_name_fails_and_writes_nothing(h: Harness) -> None:
    await h.enqueue(h.message("Q1", "bob@example.test", mailboxes=["../../etc@example.test"]))
    await until(lambda: h.store.empty)
    (call,) = h.store.record_calls
    assert call[0].outcome == Failed("5.1.3 bad mailbox name")
    assert not h.root.exists()


async def test_one_bad_recipient_does_not_hold_up_the_others(h: Harness) -> None:
    h.root.mkdir()
    (h.root / "broken.test").write_text("blocker")
    await h.enqueue(h.message("Q1", "ok@example.test", "no@broken.test"))
    await until(lambda: h.store.recipient("no@broken.test").attempts == 1)
    assert len(h.files("ok@example.test")) == 1
    assert "Q1" in h.store.messages  # one recipient still deferred
    assert h.store.recipient("no@broken.test").state is RecipientState.DEFERRED


async def test_many_messages_many_mailboxes_each_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, batch=16)
    h.start()
    boxes = [f"user{i}@example.test" for i in range(5)]
    await h.enqueue(*(h.message(f"Q{i}", boxes[i % 5]) for i in range(300)))
    await until(lambda: h.store.empty, timeout=30)
    await h.stop()
    for box in boxes:
        ids = sorted(p.read_bytes().split(b"Message-ID: <")[1].split(b"@")[0]
                     for p in h.files(box))
        assert len(ids) == 60 and len(set(ids)) == 60
    assert sum(len(c) for c in h.store.record_calls) == 300
    assert all(len(c) <= 16 for c in h.store.record_calls)
    assert len(h.store.record_calls) == len([n for n in h.store.claim_calls if n])


async def test_outcomes_are_recorded_one_commit_per_batch(tmp_path: Path) -> None:
    h = Harness(tmp_path, batch=10)
    await h.enqueue(*(h.message(f"Q{i}", f"u{i % 3}@example.test") for i in range(30)))
    h.start()
    await until(lambda: h.store.empty)
    await h.stop()
    assert [len(c) for c in h.store.record_calls] == [10, 10, 10]
    assert h.loop.stats.records == 3


async def test_a_small_claim_lets_mail_gather_before_the_next(tmp_path: Path) -> None:
    """ClaimLoop._pace: after a claim of less than half a batch, enqueues (and their
    wakes) wait `pace` on the clock, then one claim takes them all."""
    h = Harness(tmp_path, batch=10, pace=0.05)
    await h.enqueue(h.message("Q1", "bob@example.test"), wake=False)
    h.start()
    await until(lambda: h.store.empty)  # claimed at once (no idle wait before the first claim)
    await h.enqueue(*(h.message(f"Q{i}", "bob@example.test") for i in (2, 3, 4)))
    await settle()
    assert h.store.claim_calls == [1]  # pacing: the wake did not cut the gathering short
    h.clock.advance(0.05)
    await until(lambda: h.store.empty)
    assert h.store.claim_calls == [1, 3]
    await asyncio.wait_for(h.stop(), 1.0)  # pacing again (3 < 5): stop() still returns at once
    assert len(h.files("bob@example.test")) == 4


async def test_a_claim_of_half_a_batch_or_more_is_not_paced(tmp_path: Path) -> None:
    h = Harness(tmp_path, batch=4, pace=0.05)
    await h.enqueue(*(h.message(f"Q{i}", "bob@example.test") for i in range(6)), wake=False)
    h.start()
    await until(lambda: h.store.empty)
    await settle()
    # The clock never moved: 4, then 2 (half a batch: no pause), then the claim that finds none.
    assert h.store.claim_calls == [4, 2, 0]
    await h.stop()


async def test_idles_on_the_clock_until_next_due_or_wake(h: Harness) -> None:
    await settle()  # idle: nothing queued, sleeping IDLE_CAP on the fake clock
    await h.enqueue(h.message("Q1", "bob@example.test"), wake=False)
    await settle()
    assert not h.store.empty  # no wake() and the clock has not moved
    h.clock.advance(30)
    await until(lambda: h.store.empty)


async def test_wake_starts_work_without_the_clock_moving(h: Harness) -> None:
    await settle()
    await h.enqueue(h.message("Q1", "bob@example.test"))  # calls wake()
    await until(lambda: h.store.empty, timeout=1.0)
    assert h.clock.now() == T0


async def test_stop_when_idle_returns_promptly(h: Harness) -> None:
    await settle()
    await asyncio.wait_for(h.loop.stop(), 1.0)
    assert h.task is not None
    await asyncio.wait_for(h.task, 1.0)


async def test_stop_before_run_makes_run_return(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.loop.stop()
    h.start()
    await h.stop()
    assert h.store.claim_calls == []


class GatedExecutor(ThreadPoolExecutor):
    """A thread pool whose jobs wait for `gate`; `entered` counts started jobs."""

    def __init__(self) -> None:
        super().__init__(4)
        self.gate = threading.Event()
        self.entered = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def gated() -> Any:
            self.entered += 1
            self.gate.wait(10)
            return fn(*args, **kwargs)

        return super().submit(gated)


async def test_stop_finishes_and_records_writes_in_flight(tmp_path: Path) -> None:
    executor = GatedExecutor()
    h = Harness(tmp_path, executor=executor)
    await h.enqueue(*(h.message(f"Q{i}", "bob@example.test") for i in range(3)))
    h.start()
    await until(lambda: executor.entered == 3)
    stopping = asyncio.create_task(h.loop.stop())
    await settle()
    assert not stopping.done()  # waits for the writes
    executor.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert h.task is not None
    await asyncio.wait_for(h.task, 5)
    assert h.store.empty and len(h.files("bob@example.test")) == 3
    executor.shutdown()


async def test_held_leases_are_renewed_and_one_taken_over_is_not_recorded(tmp_path: Path) -> None:
    executor = GatedExecutor()
    h = Harness(tmp_path, executor=executor, lease_seconds=30.0)
    await h.enqueue(h.message("Q1", "bob@example.test"), h.message("Q2", "carol@example.test"))
    h.start()
    await until(lambda: executor.entered == 2)  # both writes held back
    h.clock.advance(10)  # a third of the lease: the renewal
    await until(lambda: h.store.renew_calls == [2])
    bob = h.store.recipient("bob@example.test")
    assert bob.lease_until == T0 + 40
    # Another node takes Q2 (as if our renewals had come too late).
    theirs = h.store.recipient("carol@example.test")
    theirs.lease_owner, theirs.lease_token = "other", "their-token"
    h.clock.advance(10)
    await until(lambda: h.loop.leases.lost == 1)
    executor.gate.set()
    await until(lambda: h.store.messages.keys() == {"Q2"})
    assert [o.recipient_id for call in h.store.record_calls for o in call] == [bob.id]  # not carol's
    assert theirs.state is RecipientState.DELIVERING and theirs.lease_token == "their-token"
    assert h.loop.leases.held == 0
    await h.stop()
    executor.shutdown()


async def test_stop_waits_for_the_record_commit(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.store.record_gate = asyncio.Event()
    await h.enqueue(h.message("Q1", "bob@example.test"))
    h.start()
    await until(lambda: len(h.files("bob@example.test")) == 1)
    stopping = asyncio.create_task(h.loop.stop())
    await settle()
    assert not stopping.done()
    h.store.record_gate.set()
    await asyncio.wait_for(stopping, 5)
    assert h.store.empty


async def test_a_failed_claim_pauses_and_the_loop_goes_on(h: Harness) -> None:
    await settle()
    h.store.fail_claims = 1
    await h.enqueue(h.message("Q1", "bob@example.test"))
    await settle()
    assert not h.store.empty  # pausing after the error
    h.clock.advance(5)
    await until(lambda: h.store.empty)


async def test_a_failed_record_is_retried(h: Harness) -> None:
    h.store.fail_records = 1
    await h.enqueue(h.message("Q1", "bob@example.test"))
    await until(lambda: h.loop.stats.record_errors == 1)
    assert not h.store.empty
    h.clock.advance(0.5)
    await until(lambda: h.store.empty)
    assert len(h.files("bob@example.test")) == 1


async def test_an_unreadable_body_defers(h: Harness) -> None:
    async def broken(queue_id: str) -> bytes:
        raise OSError(5, "Input/output error")

    h.store.read_body = broken  # type: ignore[method-assign]
    await h.enqueue(h.message("Q1", "bob@example.test"))
    await until(lambda: h.store.recipient("bob@example.test").attempts == 1)
    r = h.store.recipient("bob@example.test")
    assert r.state is RecipientState.DEFERRED
    assert r.last_error.startswith("4.3.0 cannot read queued message")


async def test_failed_recipients_go_to_the_bounce_factory_in_the_same_record(
    tmp_path: Path,
) -> None:
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    class Reports:  # stands in for delivery.bounces.Bounces: records what it is asked
        async def reports(self, claim: Claim, reports: Sequence[RecipientReport], *, now: float,
                          content: bytes | None = None) -> list[NewMessage]:
            seen.append((claim.queue_id, [(r.final_recipient, r.action.value) for r in reports]))
            return [NewMessage(queue_id="DSN1", sender="", recipients=(), body=InlineBody(b"x"),
                               received_at=T0, held=True)]

    h = Harness(tmp_path, bounces=Reports())
    await h.enqueue(h.message("Q1", "ok@example.test", "bad@example.test",
                              mailboxes=["ok@example.test", ".bad@example.test"]))
    h.start()
    await until(lambda: "Q1" not in h.store.messages)
    await h.stop()
    assert seen == [("Q1", [("bad@example.test", "failed")])]
    assert [m.queue_id for m in h.store.record_enqueued] == ["DSN1"]
    assert len(h.store.record_calls) == 1


async def test_large_bodies_are_converted_and_delivered(h: Harness) -> None:
    body = b"Message-ID: <big@test>\r\n\r\n" + b"0123456789abcdef\r\n" * 100_000
    await h.enqueue(h.message("Q1", "bob@example.test", body=body))
    await until(lambda: h.store.empty)
    (path,) = h.files("bob@example.test")
    data = path.read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 100_000 + 4
    assert os.path.getsize(path) == int(path.name.rpartition("S=")[2])


async def test_a_batch_fsyncs_each_new_dir_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = files.fsync_dir

    def counting(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr("gannet.delivery.local.fsync_dir", counting)
    h = Harness(tmp_path, batch=64)
    await h.enqueue(*(h.message(f"Q{i}", f"u{i % 2}@example.test") for i in range(20)))
    h.start()
    await until(lambda: h.store.empty)
    await h.stop()
    assert sorted(synced) == [h.root / "example.test" / u / "new" for u in ("u0", "u1")]
    assert len(h.files("u0@example.test")) == len(h.files("u1@example.test")) == 10


async def test_a_failed_dir_fsync_defers_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("gannet.delivery.local.fsync_dir", broken)
    h = Harness(tmp_path)
    await h.enqueue(h.message("Q1", "bob@example.test"))
    h.start()
    await until(lambda: h.loop.stats.records == 1)
    await h.stop()
    r = h.store.recipient("bob@example.test")
    assert r.state is RecipientState.DEFERRED
    assert r.last_error == "4.3.0 cannot write mailbox: Input/output error"


async def test_run_is_called_once(h: Harness) -> None:
    with pytest.raises(RuntimeError):
        await h.loop.run()


# -- batch commits with syncfs -------------------------------------------------------
needs_syncfs = pytest.mark.skipif(not SYNCFS_AVAILABLE, reason="syncfs reports errors on Linux >= 5.8")


@needs_syncfs
async def test_batch_sync_delivers_every_file_into_new_and_leaves_tmp_empty(tmp_path: Path) -> None:
    harness = Harness(tmp_path, batch_sync=True)
    harness.start()
    try:
        rcpts = [f"u{i}@example.test" for i in range(5)]
        await harness.enqueue(*(harness.message(f"Q{i}", r) for i, r in enumerate(rcpts)))
        await until(lambda: harness.store.empty)
        for r in rcpts:
            (path,) = harness.files(r)
            assert path.parent.name == "new"
            assert f"Delivered-To: {r}\n".encode() in path.read_bytes()
            assert not list((path.parent.parent / "tmp").iterdir())
        assert harness.loop.stats.delivered == 5
    finally:
        await harness.stop()


@needs_syncfs
async def test_batch_sync_failure_defers_and_leaves_nothing_in_new(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gannet.delivery import maildir

    def failing_syncfs(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maildir, "syncfs", failing_syncfs)
    harness = Harness(tmp_path, batch_sync=True)
    harness.start()
    try:
        await harness.enqueue(harness.message("Q1", "bob@example.test"))
        await until(lambda: bool(harness.store.record_calls))
        (call,) = harness.store.record_calls
        assert isinstance(call[0].outcome, Deferred) and "Input/output error" in call[0].outcome.reason
        assert harness.files("bob@example.test") == []
        tmp = harness.root / "example.test" / "bob" / "tmp"
        assert not list(tmp.iterdir()), "an unsynced file must not be left behind"
    finally:
        await harness.stop()


@pytest.mark.parametrize("batch_sync", [False, pytest.param(True, marks=needs_syncfs)])
async def test_a_large_body_in_a_file_is_streamed_not_read(tmp_path: Path, batch_sync: bool) -> None:
    harness = Harness(tmp_path, batch_sync=batch_sync)
    harness.start()
    try:
        line = b"y" * 998 + b"\r\n"
        content = b"Subject: big\r\n\r\n" + line * 1500  # ~1.5 MB: above the streaming threshold
        spool = tmp_path / "spool-Q1"
        spool.write_bytes(content)
        harness.store.body_files["Q1"] = spool
        await harness.enqueue(harness.message("Q1", "bob@example.test", body=content))
        await until(lambda: harness.store.empty)
        assert harness.store.body_reads == [], "the body must not be loaded into memory"
        (path,) = harness.files("bob@example.test")
        assert path.read_bytes() == (b"Return-Path: <sender@remote.test>\nDelivered-To: bob@example.test\n"
                                     + content.replace(b"\r\n", b"\n"))
    finally:
        await harness.stop()


@needs_syncfs
async def test_batch_sync_fails_an_unsafe_mailbox_and_delivers_the_rest(tmp_path: Path) -> None:
    harness = Harness(tmp_path, batch_sync=True)
    harness.start()
    try:
        await harness.enqueue(harness.message("Q1", "bob@example.test", mailboxes=["../evil@example.test"]),
                              harness.message("Q2", "bob@example.test"))
        await until(lambda: harness.store.empty)
        outcomes = {c.recipient_id: c.outcome for call in harness.store.record_calls for c in call}
        assert sorted(type(o).__name__ for o in outcomes.values()) == ["Delivered", "Failed"]
        assert Failed("5.1.3 bad mailbox name") in outcomes.values()
        assert len(harness.files("bob@example.test")) == 1
    finally:
        await harness.stop()


def _claim_of(size: int, qid: str = "Q") -> Claim:
    return Claim(qid, "s@x.test", 0.0, None, None, False, False, size, (), 0.0)


def test_pieces_keep_in_memory_bodies_under_the_limit_and_streamed_ones_apart() -> None:
    from gannet.delivery.local import STREAM_ABOVE, _pieces

    sizes = [400, 400, 300, 900, STREAM_ABOVE + 1, 100, 2000, 1]
    pieces = _pieces([_claim_of(s, f"Q{i}") for i, s in enumerate(sizes)], 1000)
    # A streamed body counts for nothing (it is read a chunk at a time); one claim
    # over the limit still makes a piece of its own.
    assert [[c.size for c in p] for p in pieces] == [
        [400, 400], [300], [900, STREAM_ABOVE + 1, 100], [2000], [1]
    ]
    assert _pieces([], 1000) == []


@needs_syncfs
async def test_a_batch_of_bodies_over_the_budget_is_written_in_pieces_and_recorded_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gannet.delivery import local

    monkeypatch.setattr(local, "BODY_BUDGET", 3 * 5000)  # pieces of at most 5,000 bytes
    trips: list[int] = []
    real = local.write_and_commit

    def counting(jobs: Sequence[Any]) -> list[Path | Exception]:
        trips.append(len(jobs))
        return real(jobs)

    monkeypatch.setattr(local, "write_and_commit", counting)
    harness = Harness(tmp_path, batch=16, batch_sync=True)
    body = b"Subject: piece\r\n\r\n" + b"z" * 2400 + b"\r\n"
    await harness.enqueue(*(harness.message(f"Q{i}", f"u{i}@example.test", body=body) for i in range(5)),
                          wake=False)
    harness.start()
    try:
        await until(lambda: harness.store.empty)
        assert trips == [2, 2, 1]  # two ~2.4 KB bodies per 5,000-byte piece
        assert [len(call) for call in harness.store.record_calls] == [5]  # still one record
        for i in range(5):
            (path,) = harness.files(f"u{i}@example.test")
            assert path.read_bytes().endswith(b"z" * 2400 + b"\n")
    finally:
        await harness.stop()
