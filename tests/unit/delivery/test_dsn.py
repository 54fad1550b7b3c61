"""Delivery status notifications: every report is parsed back with the stdlib `email`
package and checked field by field; the NOTIFY table and the loop rule are checked whole.

Fuzz invariant (hypothesis): for any addresses and any remote reply text, the
report parses, has one recipient block per recipient, each with exactly one
Final-Recipient, and no field the builder did not write.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import email.utils
from collections.abc import Sequence
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.delivery.dsn import (
    Action,
    OriginalMessage,
    RecipientReport,
    Report,
    build_report,
    is_double_bounce,
    report_recipient,
    should_notify,
)
from gannet.smtp.events import Notify

NOW = 1_700_000_000.0
RECEIVED = NOW - 3600.0
HEADER_SECTION = (
    b"Received: from client.x.test ([192.0.2.1])\r\n"
    b"\tby mx.example.test (Gannet) with ESMTP id QID1; Tue, 14 Nov 2023 21:13:20 GMT\r\n"
    b"From: Anna <anna@x.test>\r\n"
    b"To: <bob@y.test>\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <m1@x.test>\r\n"
)
BODY = b"Shall we meet at noon?\r\n"
CONTENT = HEADER_SECTION + b"\r\n" + BODY
FAILED = RecipientReport(
    "bob@y.test",
    Action.FAILED,
    "5.1.1",
    original_recipient="rfc822;Bob@y.test",
    diagnostic="550 5.1.1 <bob@y.test>: user unknown",
    remote_mta="mx.y.test",
    last_attempt=NOW - 60.0,
)
DELAYED = RecipientReport(
    "carol@z.test",
    Action.DELAYED,
    "4.4.1",
    diagnostic="connection timed out",
    will_retry_until=NOW + 4 * 86400.0,
)
DELIVERED = RecipientReport("dave@y.test", Action.DELIVERED, "2.0.0", remote_mta="mx.y.test")
PER_MESSAGE = {"reporting-mta", "x-gannet-queue-id", "original-envelope-id", "arrival-date"}
PER_RECIPIENT = {
    "original-recipient",
    "final-recipient",
    "action",
    "status",
    "remote-mta",
    "diagnostic-code",
    "last-attempt-date",
    "will-retry-until",
}


def original(
    *, content: bytes = CONTENT, ret: str | None = None, smtputf8: bool = False, envid: str | None = "E1"
) -> OriginalMessage:
    return OriginalMessage("QID1", "anna@x.test", RECEIVED, envid, ret, smtputf8, content)


def build(
    reports: Sequence[RecipientReport],
    orig: OriginalMessage | None = None,
    *,
    to: str = "anna@x.test",
    max_returned: int = 10 * 1024 * 1024,
    message_id: str = "<dsn1@mx.example.test>",
) -> Report:
    return build_report(
        orig or original(),
        reports,
        reporting_mta="mx.example.test",
        to=to,
        now=NOW,
        message_id=message_id,
        max_returned=max_returned,
    )


def parse(report: Report) -> EmailMessage:
    msg = email.message_from_bytes(report.content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert not msg.defects
    return msg


def parts(report: Report) -> list[EmailMessage]:
    found = list(parse(report).iter_parts())
    assert all(isinstance(part, EmailMessage) for part in found)
    return found  # type: ignore[return-value]


def blocks(status: Message) -> list[Message]:
    """The field blocks of a (global-)delivery-status part: per-message first."""
    payload = status.get_payload()
    assert isinstance(payload, list)
    found = [block for block in payload if isinstance(block, Message)]
    assert len(found) == len(payload)
    if status.get_content_type() == "message/delivery-status":
        return found  # the stdlib splits it into one Message per block
    # message/global-delivery-status is parsed as one message: its header is
    # the per-message block, its body the recipient blocks.
    (first,) = found
    rest = first.get_payload(decode=True)
    assert isinstance(rest, bytes)
    parser = email.parser.BytesParser(policy=email.policy.default)
    return [first] + [parser.parsebytes(b, headersonly=True) for b in rest.split(b"\r\n\r\n") if b.strip()]


def names(fields: Message) -> set[str]:
    return {name.lower() for name in fields}


def recipient_blocks(report: Report) -> list[Message]:
    return blocks(parts(report)[1])[1:]


def date_of(value: str | None) -> float:
    assert value is not None
    return email.utils.parsedate_to_datetime(value).timestamp()


def text_of(report: Report) -> str:
    content = parts(report)[0].get_content()
    assert isinstance(content, str)
    return content


# -- the report's shape -----------------------------------------------------------------


def test_a_failure_report_is_a_multipart_report_in_three_parts() -> None:
    report = build([FAILED])
    msg = parse(report)
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["To"] == "anna@x.test"
    assert b"\r\nTo: <anna@x.test>\r\n" in report.content
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert date_of(msg["Date"]) == NOW
    assert msg["Message-ID"] == "<dsn1@mx.example.test>"
    assert msg["In-Reply-To"] == msg["References"] == "<m1@x.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert [p.get_content_type() for p in parts(report)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert parts(report)[0].get_content_charset() == "utf-8"
    assert report.content.count(b"\n") == report.content.count(b"\r\n")
    assert report == Report(report.content, body_8bit=False, smtputf8=False)


def test_the_message_id_may_come_with_or_without_brackets() -> None:
    assert parse(build([FAILED], message_id="dsn2@mx.example.test"))["Message-ID"] == "<dsn2@mx.example.test>"


def test_no_in_reply_to_without_an_original_message_id() -> None:
    msg = parse(build([FAILED], original(content=b"Subject: x\r\n\r\nbody\r\n")))
    assert msg["In-Reply-To"] is None and msg["References"] is None


def test_per_message_fields() -> None:
    first = blocks(parts(build([FAILED]))[1])[0]
    assert first["Reporting-MTA"] == "dns; mx.example.test"
    assert first["X-Gannet-Queue-ID"] == "QID1"
    assert first["Original-Envelope-Id"] == "E1"
    assert date_of(first["Arrival-Date"]) == RECEIVED
    assert names(first) == PER_MESSAGE


def test_no_original_envelope_id_without_envid() -> None:
    first = blocks(parts(build([FAILED], original(envid=None)))[1])[0]
    assert first["Original-Envelope-Id"] is None


def test_failed_recipient_fields() -> None:
    (block,) = recipient_blocks(build([FAILED]))
    assert block["Original-Recipient"] == "rfc822;Bob@y.test"
    assert block["Final-Recipient"] == "rfc822; bob@y.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.y.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@y.test>: user unknown"
    assert date_of(block["Last-Attempt-Date"]) == NOW - 60.0
    assert block["Will-Retry-Until"] is None


def test_optional_recipient_fields_are_left_out_when_unknown() -> None:
    (block,) = recipient_blocks(build([RecipientReport("bob@y.test", Action.FAILED, "5.0.0")]))
    assert names(block) == {"final-recipient", "action", "status"}


def test_delayed_recipient_fields() -> None:
    report = build([DELAYED])
    (block,) = recipient_blocks(report)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Diagnostic-Code"] == "X-Gannet; connection timed out"
    assert date_of(block["Will-Retry-Until"]) == NOW + 4 * 86400.0
    assert parse(report)["Subject"] == "Delayed Mail (still being retried)"
    assert "will keep trying until" in text_of(report)


def test_will_retry_until_only_in_delay_reports() -> None:
    report = RecipientReport("bob@y.test", Action.FAILED, "5.0.0", will_retry_until=NOW)
    (block,) = recipient_blocks(build([report]))
    assert block["Will-Retry-Until"] is None


def test_one_block_per_recipient_in_order() -> None:
    found = recipient_blocks(build([FAILED, DELAYED, DELIVERED]))
    assert [b["Final-Recipient"] for b in found] == [
        "rfc822; bob@y.test",
        "rfc822; carol@z.test",
        "rfc822; dave@y.test",
    ]
    assert [b["Action"] for b in found] == ["failed", "delayed", "delivered"]


@pytest.mark.parametrize(
    ("reports", "subject"),
    [
        ([FAILED], "Undelivered Mail Returned to Sender"),
        ([DELAYED], "Delayed Mail (still being retried)"),
        ([DELIVERED], "Successful Mail Delivery Report"),
        ([RecipientReport("a@y.test", Action.RELAYED, "2.0.0")], "Successful Mail Delivery Report"),
        ([RecipientReport("a@y.test", Action.EXPANDED, "2.0.0")], "Successful Mail Delivery Report"),
        ([DELIVERED, DELAYED], "Delayed Mail (still being retried)"),
        ([DELIVERED, DELAYED, FAILED], "Undelivered Mail Returned to Sender"),
    ],
)
def test_the_subject_follows_the_most_severe_action(reports: list[RecipientReport], subject: str) -> None:
    assert parse(build(reports))["Subject"] == subject


def test_a_report_needs_recipients() -> None:
    with pytest.raises(ValueError):
        build([])
    with pytest.raises(ValueError):
        build([FAILED], to="")


# -- the status and diagnostic values -----------------------------------------------------


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [
        (Action.FAILED, "5.7.1", "5.7.1"),
        (Action.FAILED, "4.4.7", "4.4.7"),  # gave up after retrying (expired)
        (Action.FAILED, "550", "5.0.0"),
        (Action.FAILED, "", "5.0.0"),
        (Action.DELAYED, "x.y.z", "4.0.0"),
        (Action.DELIVERED, "2.0.0\r\nAction: failed", "2.0.0"),
        (Action.RELAYED, "9.9.9", "2.0.0"),
        (Action.FAILED, "2.0.0", "5.0.0"),  # the wrong class for the action
        (Action.DELAYED, "5.1.1", "4.0.0"),
    ],
)
def test_a_malformed_status_falls_back_to_the_action_class(
    action: Action, status: str, expected: str
) -> None:
    (block,) = recipient_blocks(build([RecipientReport("bob@y.test", action, status)]))
    assert block["Status"] == expected
    assert block["Action"] == action.value


@pytest.mark.parametrize(
    ("action", "diagnostic", "expected"),
    [
        (Action.FAILED, "550 5.1.1 <bob@y.test>: user unknown", "5.1.1"),
        (Action.FAILED, "550-5.7.1 first line\r\n550 5.7.1 second", "5.7.1"),
        (Action.FAILED, "4.4.7 gave up after 5 days", "4.4.7"),  # a local reason
        (Action.FAILED, "550 user unknown", "5.0.0"),
        (Action.FAILED, "250 2.0.0 ok", "5.0.0"),
        (Action.DELAYED, "451 4.3.0 try later", "4.3.0"),
        (Action.DELIVERED, "250 2.0.0 queued as X", "2.0.0"),
    ],
)
def test_without_a_status_the_diagnostic_gives_it(action: Action, diagnostic: str, expected: str) -> None:
    (block,) = recipient_blocks(build([RecipientReport("bob@y.test", action, "", diagnostic=diagnostic)]))
    assert block["Status"] == expected


def test_a_multi_line_smtp_reply_becomes_one_diagnostic() -> None:
    reply = "550-5.1.1 The account <bob@y.test> does not exist.\r\n550 5.1.1 Check the address."
    (block,) = recipient_blocks(
        build([RecipientReport("bob@y.test", Action.FAILED, "5.1.1", diagnostic=reply)])
    )
    assert block["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 The account <bob@y.test> does not exist. Check the address."
    )


def test_a_multi_line_reply_with_mixed_codes_is_kept_whole_on_one_line() -> None:
    reply = "550-5.1.1 first\r\n451 4.3.0 second"
    (block,) = recipient_blocks(
        build([RecipientReport("bob@y.test", Action.FAILED, "5.1.1", diagnostic=reply)])
    )
    assert block["Diagnostic-Code"] == "smtp; 550-5.1.1 first 451 4.3.0 second"


def test_a_long_diagnostic_is_folded_and_reads_back_whole() -> None:
    words = " ".join(f"word{i}" for i in range(150))
    long_word = "x" * 1500
    diag = f"550 5.7.1 {words} {long_word}"
    report = build([RecipientReport("bob@y.test", Action.FAILED, "5.7.1", diagnostic=diag)])
    assert max(len(line) for line in report.content.split(b"\r\n")) <= 998
    (block,) = recipient_blocks(report)
    value = block["Diagnostic-Code"]
    assert value.startswith(f"smtp; 550 5.7.1 {words} xxx")
    assert value.endswith("x...")  # cut at 2000 characters
    assert len(value) == len("smtp; ") + 2000


def test_a_long_utf8_word_is_cut_by_octets() -> None:
    bad = RecipientReport("jörg@y.test", Action.FAILED, "5.1.1", diagnostic="550 " + "ö" * 1500)
    report = build([bad])
    assert max(len(line) for line in report.content.split(b"\r\n")) <= 998
    (block,) = recipient_blocks(report)
    assert block["Diagnostic-Code"].replace(" ", "") == "smtp;550" + "ö" * 1500


# -- hostile values -------------------------------------------------------------------


INJECTION = "550 5.1.1 no\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; evil@x.test\r\nX-Evil: 1"


@pytest.mark.parametrize(
    "separator", ["\r\n", "\n", "\r", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\x1b[2J"]
)
def test_a_remote_reply_cannot_add_fields_or_blocks(separator: str) -> None:
    diag = INJECTION.replace("\r\n", separator)
    bad = RecipientReport(
        "bob@y.test", Action.FAILED, "5.1.1", diagnostic=diag, remote_mta=f"mx.y.test{separator}X-Evil: 2"
    )
    report = build([bad])
    (block,) = recipient_blocks(report)
    assert names(block) <= PER_RECIPIENT
    assert block["Action"] == "failed"
    assert block["Final-Recipient"] == "rfc822; bob@y.test"
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no")
    assert "\r" not in block["Diagnostic-Code"] and "\n" not in block["Diagnostic-Code"]
    assert all(0x20 <= b < 0x7F for b in block["Diagnostic-Code"].encode())  # "?" for the controls
    assert b"\r\nX-Evil" not in report.content and b"\nFinal-Recipient: rfc822; evil" not in report.content


def test_envelope_values_cannot_add_fields_or_headers() -> None:
    orig = original(envid="E1\r\nX-Evil: 1")
    bad = RecipientReport(
        "bob@y.test\r\nAction: delivered",
        Action.FAILED,
        "5.1.1",
        original_recipient="rfc822;bob@y.test\r\nX-Evil: 2",
    )
    report = build([bad], orig, to="anna@x.test\r\nBcc: victim@z.test", message_id="<a@b>\r\nX-Evil: 3")
    msg = parse(report)
    assert [k.lower() for k in msg] == [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "auto-submitted",
        "mime-version",
        "content-type",
    ]
    first, block = blocks(parts(report)[1])
    assert names(first) == PER_MESSAGE
    assert names(block) <= PER_RECIPIENT
    assert block["Action"] == "failed"
    assert first["Original-Envelope-Id"] == "E1 X-Evil: 1"


def test_non_ascii_text_in_an_ascii_report_becomes_question_marks() -> None:
    bad = RecipientReport("bob@y.test", Action.FAILED, "5.1.1", diagnostic="550 5.1.1 Grüße aus Köln")
    report = build([bad])
    (block,) = recipient_blocks(report)
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Gr??e aus K?ln"
    assert parts(report)[1].get_content_type() == "message/delivery-status"
    # The text part keeps it for the reader, quoted-printable so the report stays 7-bit.
    assert parts(report)[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Grüße aus Köln" in text_of(report)
    assert not report.body_8bit


# -- what comes back of the original ------------------------------------------------------


@pytest.mark.parametrize(
    ("ret", "reports", "full"),
    [
        (None, [FAILED], True),  # no RET: the whole message for a failure
        (None, [DELAYED], False),  # ... and the headers for a delay
        (None, [DELIVERED], False),  # ... or a success
        (None, [DELIVERED, DELAYED, FAILED], True),  # mixed: the most severe decides
        ("FULL", [FAILED], True),
        ("FULL", [DELAYED], False),  # RET=FULL is about failure reports (RFC 3461 §4.3)
        ("FULL", [DELIVERED], False),
        ("HDRS", [FAILED], False),
        ("HDRS", [DELAYED], False),
        ("hdrs", [FAILED], False),
    ],
)
def test_ret_and_the_report_kind_decide_what_is_returned(
    ret: str | None, reports: list[RecipientReport], full: bool
) -> None:
    report = build(reports, original(ret=ret))
    third = parts(report)[2]
    if full:
        assert third.get_content_type() == "message/rfc822"
        assert b"\r\n\r\n" + CONTENT + b"\r\n--" in report.content  # byte for byte
        inner = third.get_payload(0)
        assert isinstance(inner, EmailMessage)
        assert inner["Subject"] == "lunch"
        assert inner.get_content() == BODY.decode()
        assert "Your message is attached below." in text_of(report)
    else:
        assert third.get_content_type() == "text/rfc822-headers"
        assert b"\r\n\r\n" + HEADER_SECTION + b"\r\n--" in report.content
        assert BODY not in report.content
        assert "The headers of your message are attached below" in text_of(report)


def test_a_message_over_the_size_cap_comes_back_as_headers() -> None:
    big = HEADER_SECTION + b"\r\n" + b"x" * 5000 + b"\r\n"
    report = build([FAILED], original(content=big, ret="FULL"), max_returned=4000)
    third = parts(report)[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert b"x" * 100 not in report.content
    assert f"was {len(big)} bytes, more than the 4000 bytes a report may carry" in " ".join(
        text_of(report).split()
    )


def test_a_message_at_the_size_cap_comes_back_whole() -> None:
    report = build([FAILED], max_returned=len(CONTENT))
    assert parts(report)[2].get_content_type() == "message/rfc822"


def test_headers_over_the_size_cap_are_not_returned_either() -> None:
    report = build([FAILED], max_returned=50)
    assert len(parts(report)) == 2
    assert "even its headers exceed the 50 bytes" in " ".join(text_of(report).split())


def test_a_message_without_a_body_returns_its_header_section() -> None:
    report = build([DELAYED], original(content=HEADER_SECTION))
    assert b"\r\n\r\n" + HEADER_SECTION + b"\r\n--" in report.content


def test_eight_bit_content_is_returned_as_it_is() -> None:
    content = HEADER_SECTION + b"\r\n" + "Grüße\r\n".encode("latin-1")
    report = build([FAILED], original(content=content))
    third = parts(report)[2]
    assert third.get_content_type() == "message/rfc822"
    assert third["Content-Transfer-Encoding"] == "8bit"
    assert parse(report)["Content-Transfer-Encoding"] == "8bit"
    assert content in report.content
    assert report.body_8bit and not report.smtputf8


# -- internationalized reports (RFC 6533) --------------------------------------------------


UTF8_HEADERS = "From: Jürgen <jürgen@x.test>\r\nSubject: Grüße\r\nMessage-ID: <u1@x.test>\r\n".encode()
UTF8_CONTENT = UTF8_HEADERS + b"\r\n" + "Hallo Jörg\r\n".encode()
UTF8_FAILED = RecipientReport(
    "jörg@y.test",
    Action.FAILED,
    "5.1.1",
    original_recipient="rfc822;jörg@y.test",
    diagnostic="550 5.1.1 unbekannt: jörg",
)


def test_an_smtputf8_original_gets_a_global_report() -> None:
    report = build([UTF8_FAILED], original(content=UTF8_CONTENT, smtputf8=True))
    msg = parse(report)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert [p.get_content_type() for p in parts(report)] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global",
    ]
    (block,) = recipient_blocks(report)
    assert block["Final-Recipient"] == "utf-8; jörg@y.test"
    assert block["Original-Recipient"] == "utf-8;jörg@y.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannt: jörg"
    assert UTF8_CONTENT in report.content
    assert "jörg@y.test" in text_of(report)
    # UTF-8 only in the body: 8BITMIME, not SMTPUTF8 (the report's To: is ASCII).
    assert report.body_8bit and not report.smtputf8


def test_ascii_addresses_in_a_global_report_stay_rfc822() -> None:
    report = build([FAILED], original(content=UTF8_CONTENT, smtputf8=True))
    (block,) = recipient_blocks(report)
    assert block["Final-Recipient"] == "rfc822; bob@y.test"
    assert parse(report).get_param("report-type") == "global-delivery-status"


def test_a_global_report_returns_global_headers() -> None:
    report = build([DELAYED], original(content=UTF8_CONTENT, smtputf8=True))
    third = parts(report)[2]
    assert third.get_content_type() == "message/global-headers"
    assert b"\r\n\r\n" + UTF8_HEADERS + b"\r\n--" in report.content
    assert b"Hallo" not in report.content


def test_a_utf8_address_makes_the_report_global_even_without_smtputf8() -> None:
    report = build([UTF8_FAILED])
    assert parts(report)[1].get_content_type() == "message/global-delivery-status"
    assert parts(report)[2].get_content_type() == "message/global"
    (block,) = recipient_blocks(report)
    assert block["Final-Recipient"] == "utf-8; jörg@y.test"


def test_a_utf8_report_recipient_needs_smtputf8() -> None:
    report = build([UTF8_FAILED], original(content=UTF8_CONTENT, smtputf8=True), to="jürgen@x.test")
    assert report.smtputf8
    assert parse(report)["To"] == "jürgen@x.test"
    assert "\r\nTo: <jürgen@x.test>\r\n".encode() in report.content


# -- the boundary ---------------------------------------------------------------------


def boundary_of(report: Report) -> str:
    boundary = parse(report).get_boundary()
    assert boundary is not None
    return boundary


def test_the_boundary_is_made_of_the_queue_id() -> None:
    assert "QID1" in boundary_of(build([FAILED]))


def test_the_boundary_never_occurs_in_the_content() -> None:
    usual = boundary_of(build([FAILED]))
    hostile = CONTENT + f"--{usual}\r\nContent-Type: text/html\r\n\r\n<b>boo</b>\r\n--{usual}--\r\n".encode()
    report = build([FAILED], original(content=hostile))
    boundary = boundary_of(report)
    assert boundary != usual
    assert boundary.encode() not in hostile
    assert len(parts(report)) == 3
    assert b"\r\n\r\n" + hostile + b"\r\n--" + boundary.encode() + b"--\r\n" in report.content


def test_the_boundary_never_occurs_in_a_diagnostic() -> None:
    usual = boundary_of(build([FAILED]))
    bad = RecipientReport("bob@y.test", Action.FAILED, "5.1.1", diagnostic=f"550 --{usual}--")
    report = build([bad])
    assert boundary_of(report) != usual
    assert len(parts(report)) == 3


# -- the text for people -------------------------------------------------------------------


def test_the_text_says_what_failed_for_whom_and_why() -> None:
    text = " ".join(text_of(build([FAILED, DELAYED])).split())
    assert "This is the mail system at mx.example.test." in text
    assert "could not be delivered" in text
    assert "queue ID QID1" in text
    assert "envelope ID E1" in text
    assert "<bob@y.test>: delivery failed (status 5.1.1)." in text
    assert "The mail server mx.y.test said: 550 5.1.1 <bob@y.test>: user unknown" in text
    assert "<carol@z.test>: not delivered yet (status 4.4.1)." in text
    assert "Reason: connection timed out" in text


def test_the_text_names_the_original_recipient_when_an_alias_changed_it() -> None:
    alias = RecipientReport("alice@y.test", Action.FAILED, "5.2.2", original_recipient="rfc822;info@y.test")
    assert "<alice@y.test> (originally addressed to <info@y.test>)" in text_of(build([alias]))
    assert "originally" not in text_of(build([FAILED]))  # ORCPT differs only in case


def test_text_lines_are_short() -> None:
    text = text_of(build([FAILED, DELAYED, DELIVERED]))
    assert max(len(line) for line in text.splitlines()) <= 76


# -- should_notify: the whole table ----------------------------------------------------------

S, F, D = Notify.SUCCESS, Notify.FAILURE, Notify.DELAY
SUCCESSES = {Action.DELIVERED, Action.RELAYED, Action.EXPANDED}
NOTIFY_TABLE: list[tuple[Notify | None, set[Action]]] = [
    (None, {Action.FAILED, Action.DELAYED}),  # NOTIFY absent
    (Notify.NEVER, set()),
    (Notify.NONE, set()),  # an explicit empty set (never stored by the parser)
    (S, SUCCESSES),
    (F, {Action.FAILED}),
    (D, {Action.DELAYED}),
    (S | F, SUCCESSES | {Action.FAILED}),
    (S | D, SUCCESSES | {Action.DELAYED}),
    (F | D, {Action.FAILED, Action.DELAYED}),
    (S | F | D, set(Action)),
    (Notify.NEVER | F, set()),  # malformed: NEVER wins
]


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize(("notify", "wanted"), NOTIFY_TABLE)
def test_should_notify(notify: Notify | None, wanted: set[Action], action: Action) -> None:
    stored = None if notify is None else notify.value  # as the queue keeps it
    assert should_notify(stored, action) is (action in wanted)


# -- report_recipient and the loop rule ------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "postmaster", "double", "expected"),
    [
        ("anna@x.test", "postmaster@example.test", False, "anna@x.test"),
        ("anna@x.test", None, False, "anna@x.test"),
        ("", "postmaster@example.test", False, "postmaster@example.test"),  # a bounce failed
        ("", "postmaster@example.test", True, None),  # a double bounce failed: nobody
        ("", None, False, None),  # no postmaster configured
        ("", "", False, None),  # Config.postmaster is "" without local domains
        ("anna@x.test", "postmaster@example.test", True, None),
    ],
)
def test_report_recipient(sender: str, postmaster: str | None, double: bool, expected: str | None) -> None:
    assert report_recipient(sender, postmaster, is_bounce_to_postmaster=double) == expected


@pytest.mark.parametrize(
    ("sender", "recipients", "postmaster", "expected"),
    [
        ("", ["postmaster@example.test"], "postmaster@example.test", True),
        ("", ["Postmaster@Example.TEST"], "postmaster@example.test", True),
        ("", ["anna@x.test"], "postmaster@example.test", False),  # an ordinary bounce
        ("", ["postmaster@example.test", "anna@x.test"], "postmaster@example.test", False),
        ("", [], "postmaster@example.test", False),
        ("anna@x.test", ["postmaster@example.test"], "postmaster@example.test", False),
        ("", ["postmaster@example.test"], None, False),
    ],
)
def test_is_double_bounce(sender: str, recipients: list[str], postmaster: str | None, expected: bool) -> None:
    assert is_double_bounce(sender, recipients, postmaster) is expected


def test_a_failed_double_bounce_is_never_reported() -> None:
    """The loop, end to end: bounce → double bounce to postmaster → nothing."""
    postmaster = "postmaster@example.test"
    bounce_to = report_recipient("anna@x.test", postmaster, is_bounce_to_postmaster=False)
    assert bounce_to == "anna@x.test"
    # The bounce (sender "") to anna fails: the postmaster hears of it once.
    double = is_double_bounce("", [bounce_to], postmaster)
    assert report_recipient("", postmaster, is_bounce_to_postmaster=double) == postmaster
    # The double bounce (sender "") to the postmaster fails: nobody hears of it.
    double = is_double_bounce("", [postmaster], postmaster)
    assert report_recipient("", postmaster, is_bounce_to_postmaster=double) is None


# -- fuzz -------------------------------------------------------------------------------------

hostile_text = st.text(max_size=300)
printable_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
address = st.builds(
    lambda local, domain: f"{local}@{domain}", st.text(min_size=1, max_size=40), printable_text
)
recipient = st.builds(
    RecipientReport,
    final_recipient=address,
    action=st.sampled_from(list(Action)),
    status=st.text(max_size=12),
    original_recipient=st.none() | st.builds(lambda a: f"rfc822;{a}", address),
    diagnostic=st.one_of(printable_text, hostile_text),
    remote_mta=hostile_text,
    last_attempt=st.none() | st.floats(0, 4e9),
    will_retry_until=st.none() | st.floats(0, 4e9),
)


@settings(max_examples=200, deadline=None)
@given(reports=st.lists(recipient, min_size=1, max_size=4), smtputf8=st.booleans(), envid=hostile_text)
def test_any_report_parses_with_one_final_recipient_per_recipient(
    reports: list[RecipientReport], smtputf8: bool, envid: str
) -> None:
    report = build(reports, original(smtputf8=smtputf8, envid=envid or None))
    found = blocks(parts(report)[1])
    assert names(found[0]) <= PER_MESSAGE
    assert len(found) == 1 + len(reports)
    for block, sent in zip(found[1:], reports, strict=True):
        assert names(block) <= PER_RECIPIENT
        assert len(block.get_all("Final-Recipient") or []) == 1
        assert block["Action"] == sent.action.value
    assert max(len(line) for line in report.content.split(b"\r\n")) <= 998
