"""Bounces (who gets a DSN, how it is routed, how much of the original is read)
and OutcomeRecorder (group commits, retries, giving up), over a real
SqliteStore in tmp_path. Store failures are injected with small wrapper
classes; the report's format itself is test_dsn.py's business."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from gannet.clock import FakeClock
from gannet.delivery.bounces import Bounces
from gannet.delivery.dsn import Action, RecipientReport
from gannet.delivery.recorder import BACKOFF, OutcomeRecorder
from gannet.policy.recipients import RecipientTable
from gannet.queue.model import (
    Claim,
    Delivered,
    InlineBody,
    NewMessage,
    NewRecipient,
    QueueError,
    RecipientOutcome,
    RecipientState,
    SpooledBody,
    Transport,
)

from .relay_helpers import (
    POSTMASTER,
    SENDER,
    T0,
    SpyStore,
    open_store,
    parse,
    recipient,
    smtp_message,
    table,
    until,
)

HOSTNAME = "relay.gannet.test"
FAILED = RecipientReport(
    "bob@remote.test",
    Action.FAILED,
    "5.1.1",
    diagnostic="550 5.1.1 <bob@remote.test>: no such user",
    remote_mta="mx.remote.test",
    last_attempt=T0,
)
EIGHT_BIT = "Subject: caf\u00e9\r\n\r\nCr\u00e8me br\u00fbl\u00e9e\r\n"
HEADERS = b"Message-ID: <big@x.test>\r\nSubject: a large one\r\n"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SpyStore]:
    s = await open_store(tmp_path)
    yield s
    await s.close()


async def claimed(store: SpyStore, message: NewMessage) -> Claim:
    await store.enqueue(message)
    claims = await store.claim_due(T0 + 1, limit=100, lease_seconds=300, owner="smtp")
    (claim,) = [c for c in claims if c.queue_id == message.queue_id]
    store.body_reads.clear()
    return claim


def bounces(store: SpyStore, *, max_returned: int = 10 * 1024 * 1024, recipients: RecipientTable | None = None
            ) -> Bounces:
    return Bounces(store, hostname=HOSTNAME, table=lambda: recipients or table(), max_returned=max_returned)


async def dsn_for(store: SpyStore, message: NewMessage, report: RecipientReport = FAILED, *,
                  max_returned: int = 10 * 1024 * 1024, recipients: RecipientTable | None = None
                  ) -> list[NewMessage]:
    claim = await claimed(store, message)
    b = bounces(store, max_returned=max_returned, recipients=recipients)
    return await b.reports(claim, [report], now=T0 + 5)


def content(m: NewMessage) -> bytes:
    assert isinstance(m.body, InlineBody)
    return m.body.data


# -- who gets the report ----------------------------------------------------------------------


async def test_a_local_sender_gets_the_report_in_its_mailbox(store: SpyStore) -> None:
    (dsn,) = await dsn_for(store, smtp_message("Q1", "bob@remote.test", sender=SENDER))
    assert dsn.sender == ""  # reports come from the null sender
    assert dsn.recipients == (
        NewRecipient(SENDER, Transport.LOCAL, "example.test", mailbox=SENDER, original=""),
    )
    assert dsn.received_at == T0 + 5
    assert dsn.message_id == f"<{dsn.queue_id}.dsn@{HOSTNAME}>"
    assert dsn.queue_id != "Q1"
    assert (dsn.body_8bit, dsn.smtputf8) == (False, False)
    report = parse(content(dsn))
    assert report["To"] == SENDER
    assert report.get_content_type() == "multipart/report"
    assert "Final-Recipient: rfc822; bob@remote.test" in report.as_string()


async def test_a_remote_sender_gets_the_report_over_smtp(store: SpyStore) -> None:
    (dsn,) = await dsn_for(store, smtp_message("Q1", "bob@remote.test", sender="carol@elsewhere.test"))
    assert dsn.recipients == (NewRecipient("carol@elsewhere.test", Transport.SMTP, "elsewhere.test"),)
    assert parse(content(dsn))["To"] == "carol@elsewhere.test"


async def test_a_bounce_that_fails_goes_to_postmaster(store: SpyStore) -> None:
    (dsn,) = await dsn_for(store, smtp_message("Q1", "bob@remote.test", sender=""))
    # postmaster is an alias of alice: her mailbox, with the address it was sent to.
    assert dsn.recipients == (
        NewRecipient(SENDER, Transport.LOCAL, "example.test", mailbox=SENDER, original=POSTMASTER),
    )
    assert parse(content(dsn))["To"] == POSTMASTER


async def test_no_report_about_a_double_bounce(store: SpyStore) -> None:
    about_postmaster = replace(FAILED, final_recipient=POSTMASTER)
    assert await dsn_for(store, smtp_message("Q1", POSTMASTER, sender=""), about_postmaster) == []
    assert store.body_reads == []


async def test_a_local_sender_that_does_not_exist_is_replaced_by_postmaster(store: SpyStore) -> None:
    (dsn,) = await dsn_for(store, smtp_message("Q1", "bob@remote.test", sender="nobody@example.test"))
    assert dsn.recipients == (
        NewRecipient(SENDER, Transport.LOCAL, "example.test", mailbox=SENDER, original=POSTMASTER),
    )
    assert parse(content(dsn))["To"] == POSTMASTER


async def test_no_report_when_neither_the_sender_nor_postmaster_exists(store: SpyStore) -> None:
    without_postmaster = replace(table(), aliases=MappingProxyType({}))
    sent = await dsn_for(store, smtp_message("Q1", "bob@remote.test", sender="nobody@example.test"),
                         recipients=without_postmaster)
    assert sent == []


async def test_no_reports_no_message(store: SpyStore) -> None:
    claim = await claimed(store, smtp_message("Q1", "bob@remote.test"))
    assert await bounces(store).reports(claim, [], now=T0) == []
    assert store.body_reads == []


async def test_a_report_that_cannot_be_built_is_skipped_not_raised(store: SpyStore) -> None:
    def broken() -> RecipientTable:
        raise RuntimeError("users file vanished")

    claim = await claimed(store, smtp_message("Q1", "bob@remote.test"))
    b = Bounces(store, hostname=HOSTNAME, table=broken)
    assert await b.reports(claim, [FAILED], now=T0) == []


# -- how much of the original is read ---------------------------------------------------------


async def test_content_given_by_the_caller_is_not_read_again(store: SpyStore) -> None:
    message = smtp_message("Q1", "bob@remote.test")
    claim = await claimed(store, message)
    (dsn,) = await bounces(store).reports(claim, [FAILED], now=T0, content=content(message))
    assert store.body_reads == []
    assert b"Subject: test Q1" in content(dsn)


async def test_a_small_original_is_returned_whole(store: SpyStore) -> None:
    (dsn,) = await dsn_for(store, smtp_message("Q1", "bob@remote.test"))
    assert store.body_reads == ["Q1"]
    parts = list(parse(content(dsn)).iter_parts())
    assert parts[2].get_content_type() == "message/rfc822"
    assert b"hello" in content(dsn)


def spooled(tmp_path: Path, queue_id: str, data: bytes) -> NewMessage:
    path = tmp_path / "spool" / queue_id
    path.write_bytes(data)
    return replace(smtp_message(queue_id, "bob@remote.test"), body=SpooledBody(path, len(data)))


async def test_a_large_spooled_original_has_only_its_headers_read(store: SpyStore, tmp_path: Path) -> None:
    data = HEADERS + b"\r\n" + b"the body line that must not come back\r\n" * 200
    (dsn,) = await dsn_for(store, spooled(tmp_path, "BIG", data), max_returned=1000)
    assert store.body_reads == []  # read_body would have read it all
    text = content(dsn)
    assert b"Subject: a large one" in text
    assert b"the body line" not in text


async def test_a_large_spooled_original_is_reported_as_headers_only(store: SpyStore, tmp_path: Path) -> None:
    data = HEADERS + b"\r\n" + b"the body line that must not come back\r\n" * 200
    (dsn,) = await dsn_for(store, spooled(tmp_path, "BIG", data), max_returned=1000)
    parts = list(parse(content(dsn)).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "only its headers are attached" in parts[0].get_content()


async def test_a_large_inline_original_is_read_from_the_store(store: SpyStore) -> None:
    message = smtp_message("BIG", "bob@remote.test", body=HEADERS + b"\r\n" + b"x" * 5000 + b"\r\n")
    (dsn,) = await dsn_for(store, message, max_returned=1000)
    assert store.body_reads == ["BIG"]  # no file to read the headers from
    assert b"Subject: a large one" in content(dsn) and b"x" * 100 not in content(dsn)


# -- the report's envelope flags --------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "failed", "body", "flags"),
    [
        (SENDER, "bob@remote.test", None, (False, False)),
        # 8-bit octets of the original come back as they are: BODY=8BITMIME.
        (SENDER, "bob@remote.test", EIGHT_BIT, (True, False)),
        # A UTF-8 address in the To: header: SMTPUTF8.
        ("j\u00f6rg@elsewhere.test", "bob@remote.test", None, (False, True)),
        # A UTF-8 address inside the report (message/global-delivery-status): 8BITMIME only.
        (SENDER, "j\u00f6rg@remote.test", None, (True, False)),
    ],
)
async def test_the_report_envelope_flags_come_from_the_report(
    store: SpyStore, sender: str, failed: str, body: str | None, flags: tuple[bool, bool]
) -> None:
    utf8 = not (sender.isascii() and failed.isascii())
    message = smtp_message("Q1", failed, sender=sender, body=body.encode() if body else None,
                           body_8bit=body is not None, smtputf8=utf8)
    (dsn,) = await dsn_for(store, message, replace(FAILED, final_recipient=failed))
    assert (dsn.body_8bit, dsn.smtputf8) == flags
    assert dsn.recipients[0].address == sender


# -- OutcomeRecorder --------------------------------------------------------------------------


class GatedStore(SpyStore):
    """record() waits for `gate` while it is closed; `waiting` says one is parked there."""

    gate: asyncio.Event
    waiting = False

    async def record(
        self, outcomes: Sequence[RecipientOutcome], enqueue: Sequence[NewMessage] = ()
    ) -> list[str]:
        self.waiting = True
        await self.gate.wait()
        self.waiting = False
        return await super().record(outcomes, enqueue)


class FailingStore(SpyStore):
    """record() raises for the first `failures` calls (all of them with -1)."""

    failures = 0
    calls = 0

    async def record(
        self, outcomes: Sequence[RecipientOutcome], enqueue: Sequence[NewMessage] = ()
    ) -> list[str]:
        self.calls += 1
        if self.failures < 0 or self.calls <= self.failures:
            raise QueueError("injected: disk I/O error")
        return await super().record(outcomes, enqueue)


async def make(cls: type[SpyStore], tmp_path: Path, messages: int) -> tuple[SpyStore, list[RecipientOutcome]]:
    s = cls(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    await s.open()
    for i in range(messages):
        await s.enqueue(smtp_message(f"Q{i:02}", f"u{i}@remote.test"))
    claims = await s.claim_due(T0, limit=1000, lease_seconds=300, owner="smtp")
    outcomes = [
        RecipientOutcome(r.recipient_id, r.lease_token, Delivered("250 2.0.0 ok"), T0)
        for c in claims for r in c.recipients
    ]  # fmt: skip
    return s, outcomes


async def test_concurrent_adds_share_few_commits(tmp_path: Path) -> None:
    store, outcomes = await make(GatedStore, tmp_path, 20)
    assert isinstance(store, GatedStore)
    store.gate = asyncio.Event()
    committed: list[tuple[int, int]] = []
    recorder = OutcomeRecorder(store, FakeClock(T0), lambda o, f: committed.append((len(o), len(f))))
    dsn = smtp_message("DSN", SENDER, sender="")
    try:
        first = recorder.add(outcomes[:1])
        await until(lambda: store.waiting, "the first commit to be in flight")
        # Nineteen deliveries end while it is: they wait and go together in the next one.
        rest = [recorder.add([o], [dsn] if i == 0 else []) for i, o in enumerate(outcomes[1:])]
        assert recorder.pending == 19
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        assert store.records == [1, 19]
        assert recorder.commits == 2 and recorder.errors == 0
        assert committed == [(1, 0), (19, 1)]
        messages = await store.list_messages()
        assert [m.queue_id for m in messages] == ["DSN"]  # every delivered message left the queue
    finally:
        await store.close()


async def test_a_failing_record_is_retried_with_backoff(tmp_path: Path) -> None:
    store, outcomes = await make(FailingStore, tmp_path, 1)
    assert isinstance(store, FailingStore)
    store.failures = 2
    clock = FakeClock(T0)
    recorder = OutcomeRecorder(store, clock)
    try:
        done = recorder.add(outcomes)
        await until(lambda: store.calls == 1, "the first try")
        clock.advance(BACKOFF[0])
        await until(lambda: store.calls == 2, "the second try")
        assert not done.done()
        clock.advance(BACKOFF[1])
        await asyncio.wait_for(done, 10)
        assert (recorder.commits, recorder.errors) == (1, 2)
        assert await store.list_messages() == []
    finally:
        await store.close()


async def test_a_record_that_keeps_failing_is_given_up_without_raising(tmp_path: Path) -> None:
    store, outcomes = await make(FailingStore, tmp_path, 1)
    assert isinstance(store, FailingStore)
    store.failures = -1
    clock = FakeClock(T0)
    recorder = OutcomeRecorder(store, clock)
    try:
        done = recorder.add(outcomes)
        for n, pause in enumerate(BACKOFF, start=1):
            await until(lambda n=n: store.calls == n, f"try {n}")  # type: ignore[misc]
            clock.advance(pause)
        await asyncio.wait_for(done, 10)
        assert done.result() is None  # resolved, not failed: the delivery path never sees the error
        assert store.calls == len(BACKOFF) + 1
        assert (recorder.commits, recorder.errors, recorder.pending) == (0, len(BACKOFF) + 1, 0)
        await recorder.drain()
        # Only memory forgot them: the lease still holds, and expires into a new attempt.
        assert (await recipient(store, "u0@remote.test")).state is RecipientState.DELIVERING
    finally:
        await store.close()
