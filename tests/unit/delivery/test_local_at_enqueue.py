"""Local delivery by the enqueue writer process (delivery/local_at_enqueue.py,
driven by queue/sqlite_enqueue_child.py): the real child on a real SQLite
queue writes fresh local mail into real Maildirs, leaves to the delivery loop
what is not its to deliver, hands back what it cannot write, and a SIGKILL at
any point loses nothing (the delivery loop delivers what it left)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gannet.config import Config, ConfigError
from gannet.config import load as load_config
from gannet.delivery import local_at_enqueue
from gannet.delivery.local import FileJob
from gannet.delivery.local_at_enqueue import OWNER, LocalAtEnqueue, Results, Settings, settings_for
from gannet.delivery.maildir import SYNCFS_AVAILABLE
from gannet.queue.ids import new_queue_id
from gannet.queue.model import (
    Claim,
    ClaimedRecipient,
    Delivered,
    NewMessage,
    NewRecipient,
    RecipientState,
    SpooledBody,
    Transport,
)
from gannet.queue.sqlite import SqliteStore
from gannet.queue.sqlite_enqueue_process import EnqueueProcess
from gannet.smtp.events import Notify

from .relay_helpers import until
from .writer_queue import LEASE, Queue, half_writable, local, message, running

pytestmark = pytest.mark.skipif(not SYNCFS_AVAILABLE, reason="local delivery at enqueue needs syncfs")


@pytest.fixture
async def q(tmp_path: Path) -> AsyncIterator[Queue]:
    async with running(tmp_path) as queue:
        yield queue


async def test_fresh_local_mail_is_delivered_by_the_writer_alone(q: Queue) -> None:
    """No delivery loop runs here: the child writes the file, records it, and
    the message leaves the queue with its history."""
    m = message(local("bob@example.test"), local("carol@example.test"))
    assert await q.store.enqueue(m) is True  # nobody need wake the delivery loop
    await until(q.empty, "the message to leave the queue")
    for rcpt in ("bob@example.test", "carol@example.test"):
        (path,) = q.files(rcpt)
        expected = f"Return-Path: <a@remote.test>\nDelivered-To: {rcpt}\n"
        expected += f"Message-ID: <{m.queue_id}@test>\n\nhello\n"
        assert path.read_bytes() == expected.encode()
    events = [(e.recipient, e.event) for e in await q.store.trace(m.queue_id)]
    assert ("bob@example.test", "delivered") in events and ("carol@example.test", "delivered") in events



async def test_a_stream_of_messages_is_delivered_once_each(q: Queue) -> None:
    sent = [message(local(f"u{i % 7}@example.test")) for i in range(300)]
    taken = await asyncio.gather(*(q.store.enqueue(m) for m in sent))
    assert all(taken)
    await until(q.empty, "the queue to empty")
    found = [p.read_bytes() for i in range(7) for p in q.files(f"u{i}@example.test")]
    ids = sorted(b.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0].decode() for b in found)
    assert ids == sorted(m.queue_id for m in sent)
    assert q.released == 0


@pytest.mark.parametrize("direct", [False, True], ids=["after-commit", "direct"])
async def test_what_is_not_the_writers_is_left_queued_for_the_delivery_loop(
    tmp_path: Path, direct: bool
) -> None:
    """Remote recipients, NOTIFY=SUCCESS (a DSN only the loop writes), held
    messages and spooled bodies: queued, not leased, and the server is told to
    wake the delivery loop (enqueue returns False). The same with `direct`
    (delivery/local_direct.py), which takes none of them."""
    async with running(tmp_path, direct=direct) as q:
        await _left_to_the_loop(q)


async def _left_to_the_loop(q: Queue) -> None:
    mixed = message(local("bob@example.test"), NewRecipient("x@remote.test", Transport.SMTP, "remote.test"))
    success = message(local("carol@example.test", notify=Notify.SUCCESS.value))
    held = message(local("dave@example.test"), held=True)
    path = q.spool / "big.eml"
    path.write_bytes(b"Subject: big\r\n\r\n" + b"x" * 20_000)
    body = SpooledBody(path, path.stat().st_size)
    spooled = NewMessage(new_queue_id(), "a@remote.test", (local("erin@example.test"),), body, time.time())
    for m in (mixed, success, held, spooled):
        assert await q.store.enqueue(m) is False, m
    await until(lambda: q.files("bob@example.test"), "the local half of the mixed message")
    await until(
        lambda: q.state_is(mixed.queue_id, "bob@example.test", RecipientState.DELIVERED), "bob's record"
    )
    assert (await q.states(mixed.queue_id))["x@remote.test"] is RecipientState.QUEUED
    assert await q.states(success.queue_id) == {"carol@example.test": RecipientState.QUEUED}
    assert await q.states(held.queue_id) == {"dave@example.test": RecipientState.QUEUED}
    assert await q.states(spooled.queue_id) == {"erin@example.test": RecipientState.QUEUED}
    for rcpt in ("carol@example.test", "dave@example.test", "erin@example.test"):
        assert q.files(rcpt) == []


async def test_what_cannot_be_written_is_given_back_due_now(q: Queue) -> None:
    """A file where the Maildir should be, and a mailbox name that is no path:
    the recipients are queued again at once (not leased), nothing recorded,
    and the server is told to wake the delivery loop."""
    m = half_writable(q.root)
    before = time.time()
    await q.store.enqueue(m)
    await until(lambda: q.released, "the server to hear of the given-back recipients")
    await until(
        lambda: q.state_is(m.queue_id, "ok@example.test", RecipientState.DELIVERED), "ok's record"
    )
    views = {v.queue_id: v for v in await q.store.list_messages()}
    back = {r.address: r for r in views[m.queue_id].recipients if r.address != "ok@example.test"}
    assert set(back) == {"blocked@example.test", "../evil@example.test"}
    for r in back.values():
        assert r.state is RecipientState.QUEUED and r.attempts == 0
        assert r.next_attempt is not None and r.next_attempt <= time.time() and r.next_attempt >= before - 1
    assert len(q.files("ok@example.test")) == 1


@pytest.mark.parametrize("direct", [False, True], ids=["after-commit", "direct"])
async def test_a_sigkilled_writer_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Kill -9 the writer at random points while it delivers: the next writer
    gives back what the dead one had claimed (not after the 600 s lease), and
    the delivery loop then delivers it; every message reaches its Maildir at
    least once (a duplicate is allowed, a loss is not), and the queue empties.
    `direct`: the same while it writes messages before answering for them
    (delivery/local_direct.py); what it had not answered the server stores
    again (WriterGone), and the delivery loop delivers it."""
    monkeypatch.setattr(EnqueueProcess, "RESTART_DELAY", 0.05)
    q = Queue(tmp_path, direct=direct)
    await q.open()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sent: list[NewMessage] = []
    try:
        for round_ in range(4):
            await until(lambda: q.enqueuer.ready, "the restarted writer")
            pid = q.enqueuer.pid
            assert pid is not None
            batch = [message(local(f"u{i % 5}@example.test")) for i in range(120)]
            sent += batch
            tasks = [asyncio.ensure_future(q.store.enqueue(m)) for m in batch]
            await asyncio.sleep(rng.uniform(0.0, 0.08))
            os.kill(pid, signal.SIGKILL)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, f"seed {seed}, round {round_}: {errors[:3]}"
            await until(lambda: q.enqueuer.pid != pid, f"writer {pid} to be replaced")  # noqa: B023
        await until(lambda: q.enqueuer.ready, "the last restarted writer")
        # The delivery loop (as the worker runs it) takes what the writers left.
        await q.drain(f"the queue to empty (seed {seed})", 60)
    finally:
        await q.store.close()
    found = [p.read_bytes() for i in range(5) for p in q.files(f"u{i}@example.test")]
    ids = {b.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0].decode() for b in found}
    assert ids == {m.queue_id for m in sent}, f"seed {seed}"


async def test_the_writer_gives_back_its_predecessors_claims_at_start(q: Queue, tmp_path: Path) -> None:
    """Leases held by OWNER when a writer starts belong to a writer that has
    exited: they are due again at once, and the server hears of it (to wake the
    delivery loop). Here the lease is made by hand, then the writer restarted."""
    other = SqliteStore(tmp_path / "queue.db", spool_dir=q.spool, recover=False, release_leases_on_open=False)
    await other.open()
    try:
        m = message(NewRecipient("x@remote.test", Transport.SMTP, "remote.test"))
        await other.enqueue(m)
        (claim,) = await other.claim_due(time.time(), limit=10, lease_seconds=LEASE, owner=OWNER)
        assert claim.queue_id == m.queue_id
    finally:
        await other.close()
    assert await q.states(m.queue_id) == {"x@remote.test": RecipientState.DELIVERING}
    await q.enqueuer.restart()
    await until(lambda: q.released, "the new writer to report its release")
    assert await q.states(m.queue_id) == {"x@remote.test": RecipientState.QUEUED}


CONFIG = """
hostname = "mx.example.test"
data_dir = "{data}"
[[listen]]
address = "127.0.0.1:2525"
[relay]
local_domains = ["example.test"]
[mailboxes]
maildir = "{data}/mail/{{domain}}/{{user}}"
{extra}
"""


def config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "gannet.toml"
    path.write_text(CONFIG.format(data=tmp_path, extra=extra))
    return load_config(path)


def test_settings_follow_the_config(tmp_path: Path) -> None:
    on = settings_for(config(tmp_path), "json")
    assert on is not None
    assert on.maildir_template == f"{tmp_path}/mail/{{domain}}/{{user}}"
    assert on.log_format == "json" and on.owner == OWNER and on.metric_domains == ("example.test",)
    assert on.direct is True
    assert Settings.from_json(on.to_json()) == on
    after_commit = settings_for(config(tmp_path, "[delivery]\nlocal_direct = false"), "text")
    assert after_commit is not None and after_commit.direct is False
    for extra in (
        "[delivery]\nlocal_at_enqueue = false",
        '[delivery]\nmaildir_sync = "file"',
        "[queue]\nwriter_process = false",
        'lmtp = "unix:/run/dovecot/lmtp"',
    ):
        assert settings_for(config(tmp_path, extra), "text") is None, extra


def test_a_bad_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"delivery\.local_at_enqueue"):
        config(tmp_path, '[delivery]\nlocal_at_enqueue = "yes"')
    with pytest.raises(ConfigError, match=r"delivery\.local_direct"):
        config(tmp_path, "[delivery]\nlocal_direct = 1")


def test_settings_survive_the_command_line() -> None:
    s = replace(Settings("/m/{domain}/{user}", 120.0), metric_domains=("a.test", "b.test"))
    assert Settings.from_json(s.to_json()) == s


# -- the thread alone (no writer process) ---------------------------------------


def claim(qid: str, *addresses: str, token: str = "t1") -> Claim:
    rcpts = tuple(
        ClaimedRecipient(i, a, Transport.LOCAL, "example.test", a, "", None, None, 0, token)
        for i, a in enumerate(addresses, 1)
    )
    return Claim(qid, "a@remote.test", time.time(), None, None, False, False, 10, rcpts, time.time() + LEASE)


class Thread:
    def __init__(self, tmp_path: Path) -> None:
        self.template = str(tmp_path / "mail" / "{domain}" / "{user}")
        self.ready = threading.Event()
        self.local = LocalAtEnqueue(Settings(self.template, LEASE), self.ready.set)
        self.local.start()

    def results(self) -> Results:
        assert self.ready.wait(10), "no results"
        self.ready.clear()
        return self.local.take_results()


def test_the_thread_writes_what_it_is_handed_and_hands_back_the_outcomes(tmp_path: Path) -> None:
    t = Thread(tmp_path)
    t.local.hand([(claim("Q1", "bob@example.test", "carol@example.test"), b"Subject: x\r\n\r\nhi\r\n")])
    results = t.results()
    assert [(o.recipient_id, o.lease_token) for o in results.delivered] == [(1, "t1"), (2, "t1")]
    assert results.given_back == []
    for o in results.delivered:
        assert isinstance(o.outcome, Delivered)
        assert Path(o.outcome.detail).read_bytes().endswith(b"Subject: x\n\nhi\n")
    t.local.stop()


def test_held_bodies_past_the_limit_leave_new_mail_to_the_delivery_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_at_enqueue, "MAX_HELD", 100)
    gate = threading.Event()
    real = local_at_enqueue.write_and_commit

    def slow_disk(jobs: list[FileJob]) -> list[Path | Exception]:
        gate.wait(10)
        return real(jobs)

    monkeypatch.setattr(local_at_enqueue, "write_and_commit", slow_disk)
    t = Thread(tmp_path)
    assert t.local.has_room()
    t.local.hand([(claim("Q1", "bob@example.test"), b"x" * 150)])
    assert not t.local.has_room()  # the writer claims nothing more until it is written
    gate.set()
    assert len(t.results().delivered) == 1
    assert t.local.has_room()
    t.local.stop()


def test_a_bug_in_the_thread_hands_everything_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(jobs: list[FileJob]) -> list[Path | Exception]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(local_at_enqueue, "write_and_commit", broken)
    t = Thread(tmp_path)
    t.local.hand([(claim("Q1", "bob@example.test", "carol@example.test", token="t9"), b"hi\r\n")])
    results = t.results()
    assert results.delivered == [] and results.given_back == [(1, "t9"), (2, "t9")]
    assert t.local.has_room()
    t.local.stop()
