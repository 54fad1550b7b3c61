"""Local delivery before the reply (delivery/local_direct.py, driven by
queue/sqlite_enqueue_child.py): the real writer process on a real SQLite queue
writes an all-local message into real Maildirs before it answers, so the file
is there when `enqueue` returns and the message is never queued; the queue
keeps its trace; whatever it does not take, or cannot write, is queued as
before. (A SIGKILL of the writer while it does this: test_local_at_enqueue.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import peers
import pytest

from gannet.delivery import local_direct, maildir_journal
from gannet.delivery.local import MaildirCopy
from gannet.delivery.maildir import SYNCFS_AVAILABLE, stage_checked
from gannet.delivery.maildir import syncfs as real_syncfs
from gannet.delivery.maildir_journal import RenameJournal
from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, RecipientState, SpooledBody, Transport
from gannet.queue.sqlite import SqliteStore
from gannet.smtp.events import Notify

from .relay_helpers import until
from .writer_queue import Queue, half_writable, local, message, running

pytestmark = pytest.mark.skipif(not SYNCFS_AVAILABLE, reason="local delivery at enqueue needs syncfs")


@pytest.fixture
async def q(tmp_path: Path) -> AsyncIterator[Queue]:
    async with running(tmp_path, direct=True) as queue:
        yield queue


async def test_the_files_are_durable_in_new_when_enqueue_returns(q: Queue) -> None:
    m = message(local("bob@example.test"), local("carol@example.test"))
    assert await q.store.enqueue(m) is True  # nobody need wake the delivery loop
    # No waiting: the answer came after the files.
    for rcpt in ("bob@example.test", "carol@example.test"):
        (path,) = q.files(rcpt)
        expected = f"Return-Path: <a@remote.test>\nDelivered-To: {rcpt}\n"
        expected += f"Message-ID: <{m.queue_id}@test>\n\nhello\n"
        assert path.read_bytes() == expected.encode()
        assert list((path.parent.parent / "tmp").iterdir()) == []
    assert await q.empty(), "the message was queued"


async def test_the_queue_keeps_its_trace(q: Queue) -> None:
    m = message(local("bob@example.test"), local("carol@example.test"))
    await q.store.enqueue(m)

    async def traced() -> bool:
        return any(e.event == "delivered" for e in await q.store.trace(m.queue_id))

    await until(traced, "the history, written after the answer")
    events = [(e.recipient, e.event, e.detail) for e in await q.store.trace(m.queue_id)]
    files = {rcpt: str(q.files(rcpt)[0]) for rcpt in ("bob@example.test", "carol@example.test")}
    for rcpt, path in files.items():
        assert (rcpt, "delivered", path) in events
    assert events[0][1] == "received", events  # from the summary a delivered message keeps


async def test_a_stream_of_messages_is_delivered_once_each(q: Queue) -> None:
    """Sent together, as busy sessions send them: written in batches."""
    sent = [message(local(f"u{i % 7}@example.test")) for i in range(300)]
    assert all(await asyncio.gather(*(q.store.enqueue(m) for m in sent)))
    found = [p.read_bytes() for i in range(7) for p in q.files(f"u{i}@example.test")]
    ids = sorted(b.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0].decode() for b in found)
    assert ids == sorted(m.queue_id for m in sent)
    assert await q.empty()
    stats = q.store.stats  # the counters the server logs at shutdown
    assert stats.direct_messages == 300 and 1 <= stats.direct_groups <= 300
    expected = f"300 messages into their Maildirs before the reply, in {stats.direct_groups} groups"
    assert expected in stats.summary()


async def test_a_recipient_it_cannot_write_is_queued_alone(q: Queue) -> None:
    """A file where one Maildir should be, and a mailbox name that is no path:
    the one it could write is delivered and traced; the message is queued with
    the other two only, due now, for the delivery loop."""
    m = half_writable(q.root)
    before = time.time()
    await q.store.enqueue(m)
    assert len(q.files("ok@example.test")) == 1
    await until(lambda: q.released, "the after-commit path to give the two back")
    views = {v.queue_id: v for v in await q.store.list_messages()}
    left = {r.address: r for r in views[m.queue_id].recipients}
    assert set(left) == {"blocked@example.test", "../evil@example.test"}
    assert q.store.stats.direct_messages == 0  # written in part only: not counted as never queued
    for r in left.values():
        assert r.state is RecipientState.QUEUED and r.attempts == 0
        assert r.next_attempt is not None and before - 1 <= r.next_attempt <= time.time()

    async def ok_traced() -> bool:
        return ("ok@example.test", "delivered") in [
            (e.recipient, e.event) for e in await q.store.trace(m.queue_id)
        ]

    await until(ok_traced, "ok's delivery in the history")


def test_it_takes_only_inline_unheld_all_local_mail_without_notify_success() -> None:
    remote = NewRecipient("x@remote.test", Transport.SMTP, "remote.test")
    assert local_direct.takes(message(local("a@example.test"), local("b@example.test")))
    assert local_direct.takes(message(local("a@example.test", notify=(Notify.FAILURE | Notify.DELAY).value)))
    assert not local_direct.takes(message(local("a@example.test"), remote))
    assert not local_direct.takes(message(local("a@example.test", notify=Notify.SUCCESS.value)))
    assert not local_direct.takes(message(local("a@example.test"), held=True))
    a = (local("a@example.test"),)
    assert local_direct.takes(NewMessage(new_queue_id(), "", a, InlineBody(b"x"), time.time()))
    spooled = SpooledBody(Path("/spool/big.eml"), 300_000)
    assert not local_direct.takes(NewMessage(new_queue_id(), "", a, spooled, time.time()))


def test_a_large_group_is_written_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, on real Maildirs: at most PIECE body bytes converted and
    written per batch; every message written once, in order; the rest untouched."""
    monkeypatch.setattr(local_direct, "PIECE", 1000)
    batches: list[int] = []
    real = local_direct.write_and_commit

    def counting(copies: list[MaildirCopy], journal: RenameJournal | None = None) -> list[Path | Exception]:
        batches.append(len(copies))
        return real(copies, journal)

    monkeypatch.setattr(local_direct, "write_and_commit", counting)
    body = b"Subject: x\r\n\r\n" + b"y" * 380 + b"\r\n"  # 3 bodies are over 1,000 bytes
    group = [(n, message(local(f"u{n}@example.test"), body=body)) for n in range(7)]
    remote = (7, message(NewRecipient("x@remote.test", Transport.SMTP, "remote.test")))
    taken, rest = local_direct.deliver(str(tmp_path / "{domain}" / "{user}"), [*group, remote])
    assert batches == [2, 2, 2, 1]
    assert rest == [remote]
    assert [w.number for w in taken] == list(range(7))
    for w in taken:
        ((_, path),) = w.delivered
        assert w.complete and path.parent == tmp_path / "example.test" / f"u{w.number}" / "new"
        assert path.read_bytes().endswith(b"y" * 380 + b"\n")


def test_with_the_journal_a_piece_costs_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's way (delivery/maildir_journal.py): each piece answered after
    one syncfs, the renames' own syncfs left to `settle`."""
    monkeypatch.setattr(local_direct, "PIECE", 1000)
    syncs: list[Path] = []

    def counted(path: Path) -> None:
        syncs.append(path)
        real_syncfs(path)

    monkeypatch.setattr(maildir_journal, "syncfs", counted)
    journal = RenameJournal(tmp_path / "queue.db-renames")
    body = b"Subject: x\r\n\r\n" + b"y" * 380 + b"\r\n"
    group = [(n, message(local(f"u{n}@example.test"), body=body)) for n in range(7)]
    taken, rest = local_direct.deliver(str(tmp_path / "{domain}" / "{user}"), group, journal)
    assert rest == [] and len(syncs) == 4 and journal.unsettled
    for w in taken:
        ((_, path),) = w.delivered
        assert w.complete and path.parent == tmp_path / "example.test" / f"u{w.number}" / "new"
    journal.close()
    assert len(syncs) == 5 and (tmp_path / "queue.db-renames").read_bytes() == b""


@pytest.mark.parametrize("direct", [True, False])
async def test_the_writer_finishes_renames_a_crash_lost(tmp_path: Path, direct: bool) -> None:
    """A file answered after its journal line and data were durable, whose
    rename the crash lost: the next writer moves it into new/ before it takes
    a request (also when local_direct was turned off in between)."""
    maildir = tmp_path / "mail" / "example.test" / "bob"
    tmp, size, crc = stage_checked(maildir, b"Subject: x\n\n", return_path="a@x", delivered_to="bob@x")
    (tmp_path / "queue.db-renames").write_text(json.dumps([str(tmp), size, crc]) + "\n")
    async with running(tmp_path, direct=direct) as q:
        (path,) = q.files("bob@example.test")
        assert path.name == tmp.name and not tmp.exists()
    assert (tmp_path / "queue.db-renames").read_bytes() == b""


async def test_a_writer_that_stops_records_the_traces_it_holds(tmp_path: Path) -> None:
    """Traces wait up to TRACE_EVERY to be recorded together; a writer told to
    stop (the server closing the store) records them before it exits."""
    async with running(tmp_path, direct=True) as q:
        m = message(local("bob@example.test"))
        assert await q.store.enqueue(m) is True
    store = SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool", release_leases_on_open=False)
    await store.open()
    try:
        events = [(e.recipient, e.event) for e in await store.trace(m.queue_id)]
    finally:
        await store.close()
    assert ("bob@example.test", "delivered") in events


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs of its own (root only; skipped elsewhere, a failure in CI)."""
    mountpoint = tmp_path / "mail"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        reason = f"needs root to mount a tmpfs ({mounted.stderr.strip()})"
        if peers.in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_maildirs_on_another_filesystem_take_two_syncfs(
    tmp_path: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal on the queue's filesystem, the Maildirs on a tmpfs: one
    syncfs could not cover both, so their files are committed the old way (a
    syncfs for the data, one for the renames), and the log says so once."""
    caplog.set_level(logging.INFO, "gannet.delivery.local")
    journal = RenameJournal(tmp_path / "queue.db-renames")
    group = [(n, message(local(f"u{n}@example.test"))) for n in range(3)]
    for one in group:
        (w,), _ = local_direct.deliver(str(small_disk / "{domain}" / "{user}"), [one], journal)
        ((_, path),) = w.delivered
        assert path.parent == small_disk / "example.test" / f"u{w.number}" / "new"
    assert not journal.unsettled and (tmp_path / "queue.db-renames").read_bytes() == b""
    assert caplog.text.count("Maildirs on another filesystem than") == 1
    journal.close()


async def test_a_full_disk_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    """The Maildirs' filesystem full: the message cannot be written before the
    reply, nor after the commit; it is queued, due now, and the enqueue
    succeeds (the queue is on another filesystem). Space freed, the delivery
    loop delivers it, once."""
    filler = small_disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"x" * 65536)
            f.flush()
    async with running(tmp_path, direct=True) as q:
        assert q.root == small_disk
        m = message(local("bob@example.test"))
        await q.store.enqueue(m)
        await until(lambda: q.released, "the after-commit path to give it back")
        assert await q.states(m.queue_id) == {"bob@example.test": RecipientState.QUEUED}
        assert q.files("bob@example.test") == []
        filler.unlink()
        await q.drain("the delivery loop to deliver it")
        (path,) = q.files("bob@example.test")
        assert f"<{m.queue_id}@test>".encode() in path.read_bytes()
