"""Delivery status notifications: the report's bytes (RFC 3464, RFC 6522, RFC 6533, RFC 3834).

`build_report(original, reports, ...)` returns a `Report`: the whole DSN as
bytes (CRLF line endings, header section included), ready to enqueue, plus
the two flags its envelope needs. The decisions (whether to report, to whom,
how much of the original to return) are in `gannet.delivery.dsn_policy`; its
names are re-exported here. Pure: no I/O, no clock (`now` is passed in).

The caller (a delivery agent or the scheduler) enqueues the report as a
`NewMessage` with the null sender "" (RFC 5321 §4.5.5; see the loop rule in
`dsn_policy`), one recipient `to` with no NOTIFY or ORCPT, no RET or ENVID,
`smtputf8=report.smtputf8` and `body_8bit=report.body_8bit`. It filters the
recipients with `should_notify` before calling: every `RecipientReport`
given here is reported.

Format
    multipart/report; report-type=delivery-status (RFC 6522), three parts:
    1. text/plain; charset=utf-8: what happened, for a person; 7bit, or
       quoted-printable when it holds non-ASCII text.
    2. message/delivery-status (RFC 3464 §2.2-2.3): the per-message fields
       (Reporting-MTA, X-Gannet-Queue-ID, Original-Envelope-Id, Arrival-Date),
       then one block per recipient (Original-Recipient, Final-Recipient,
       Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date,
       Will-Retry-Until). Diagnostic-Code is typed "smtp" when the text is an
       SMTP reply ("550 5.1.1 ...") and "X-Gannet" otherwise (a local error).
    3. The original, as `dsn_policy.returned_content` decides: message/rfc822
       (the stored content, byte for byte) or text/rfc822-headers (its header
       section); left out when even the headers exceed `max_returned`.
    Internationalized (RFC 6533), when the original used SMTPUTF8 or an
    address in a report is not ASCII: report-type=global-delivery-status
    (RFC 6522: the report-type is the second part's subtype), parts
    message/global-delivery-status, message/global and message/global-headers,
    and UTF-8 addresses typed "utf-8" (Final-Recipient: utf-8; jörg@x.test).

Invariants
    - No field value holds CR, LF or another control or format character:
      values from outside (remote replies, addresses, ENVID, host names) are
      flattened to one line of printable text, then folded at spaces, so a
      hostile reply cannot add a field, a block or a MIME part. Outside an
      internationalized report every non-ASCII character becomes "?".
    - The MIME boundary occurs in no part (checked, not assumed).
    - 8-bit octets of the original are returned as they are, never
      re-encoded (message/rfc822 allows no encoding but 7bit/8bit/binary):
      the report then says Content-Transfer-Encoding: 8bit and
      `Report.body_8bit` is set, and the caller must enqueue it with
      BODY=8BITMIME. `Report.smtputf8` is set only when the report's own
      header section (the To: address) is not ASCII: the UTF-8 inside the
      global parts is body content and needs 8BITMIME, not SMTPUTF8.
"""

from __future__ import annotations

import email.quoprimime
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from gannet.delivery.dsn_policy import (
    SUBJECTS,
    Action,
    Returned,
    is_double_bounce,
    report_recipient,
    returned_content,
    should_notify,
    worst_action,
)
from gannet.message.headers import rfc5322_date
from gannet.smtp.replies import ENHANCED_STATUS

__all__ = [
    "MAX_RETURNED",
    "Action",
    "OriginalMessage",
    "RecipientReport",
    "Report",
    "Returned",
    "build_report",
    "is_double_bounce",
    "report_recipient",
    "should_notify",
]

MAX_RETURNED = 10 * 1024 * 1024  # octets of the original a report may carry
MAX_TEXT = 2000  # characters of one outside value (a remote reply) kept in a report
FOLD_AT = 78  # fold fields before this column where there is a space
MAX_WORD = 900  # octets: a longer run without spaces is cut, to keep lines under 998 octets
TEXT_WIDTH = 76  # the plain-text part's line width

_SMTP_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|$)")
_REPLY_LINE = re.compile(r"([2-5]\d\d)[ -]((?:[245]\.\d{1,3}\.\d{1,3}(?: |$))?)(.*)")
_ENHANCED = re.compile(r"(?:[2-5]\d\d[ -])?([245]\.\d{1,3}\.\d{1,3})(?: |$)")
_CLASSES = {Action.FAILED: "54", Action.DELAYED: "4"}  # successes: "2"; failed 4.x.x = gave up (4.4.7)
_DEFAULT_STATUS = {Action.FAILED: "5.0.0", Action.DELAYED: "4.0.0"}  # successes: 2.0.0

_PHRASES = {
    Action.FAILED: "delivery failed",
    Action.DELAYED: "not delivered yet",
    Action.DELIVERED: "delivered",
    Action.RELAYED: "relayed to a system that sends no delivery reports",
    Action.EXPANDED: "delivered to an alias or list, which passed it on",
}


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient, as the report tells it."""

    final_recipient: str  # the address we tried
    action: Action
    status: str  # RFC 3463 "5.1.1"; "" or malformed: taken from `diagnostic`, else x.0.0
    original_recipient: str | None = None  # the stored ORCPT, "rfc822;a@b"
    diagnostic: str = ""  # the remote reply "550 5.1.1 <x@y>: user unknown", or a local reason
    remote_mta: str = ""  # the host that gave `diagnostic`, "mx.y.test"
    last_attempt: float | None = None  # POSIX time
    will_retry_until: float | None = None  # delay reports only


@dataclass(frozen=True, slots=True)
class OriginalMessage:
    """The queued message a report is about (the queue's fields of the same names)."""

    queue_id: str
    sender: str
    received_at: float
    envid: str | None
    ret: str | None  # "FULL" | "HDRS" | None
    smtputf8: bool
    content: bytes  # the whole stored message, CRLF line endings (or only its header section: see size)
    # The whole message's size when `content` is only its header section (a
    # large original whose body was not read back); None: len(content).
    size: int | None = None

    @property
    def full_size(self) -> int:
        return len(self.content) if self.size is None else self.size


@dataclass(frozen=True, slots=True)
class Report:
    """A built DSN and what its envelope needs (see the module docstring)."""

    content: bytes
    body_8bit: bool  # enqueue with BODY=8BITMIME
    smtputf8: bool  # enqueue with SMTPUTF8


def build_report(
    original: OriginalMessage,
    reports: Sequence[RecipientReport],
    *,
    reporting_mta: str,
    to: str,
    now: float,
    message_id: str,
    max_returned: int = MAX_RETURNED,
) -> Report:
    """The whole DSN for `reports` (one or more recipients of `original`), sent to `to`.

    `message_id` is the report's own Message-ID, with or without the angle
    brackets. Raises ValueError when `reports` or `to` is empty.
    """
    worst = worst_action(r.action for r in reports)
    utf8 = original.smtputf8 or any(
        not r.final_recipient.isascii() or not (r.original_recipient or "").isascii() for r in reports
    )
    headers = _header_section(original.content)
    returned = returned_content(
        original.ret,
        worst,
        size=original.full_size,
        header_size=len(headers),
        max_returned=max_returned,
    )
    mta = _clean(reporting_mta, utf8=False)
    text = _text_part(original, reports, mta=mta, worst=worst, returned=returned, max_returned=max_returned)
    parts = [text, _status_part(original, reports, mta=mta, utf8=utf8)]
    if returned is Returned.FULL:
        parts.append(_original_part(original.content, full=True, worst=worst, utf8=utf8))
    elif returned is not Returned.NOTHING_TOO_BIG:
        parts.append(_original_part(headers, full=False, worst=worst, utf8=utf8))
    body_8bit = not all(part.isascii() for part in parts)
    boundary = _boundary(original.queue_id, now, parts)
    head = _report_header(
        original,
        worst,
        mta=mta,
        to=to,
        now=now,
        message_id=message_id,
        boundary=boundary,
        report_type="global-delivery-status" if utf8 else "delivery-status",
        body_8bit=body_8bit,
    )
    delimiter = b"\r\n--" + boundary.encode("ascii")
    body = b"This is a MIME-encapsulated delivery status report.\r\n"
    body += b"".join(delimiter + b"\r\n" + part for part in parts) + delimiter + b"--\r\n"
    return Report(content=head + b"\r\n" + body, body_8bit=body_8bit, smtputf8=not head.isascii())


# -- the header section -----------------------------------------------------------


def _report_header(
    original: OriginalMessage,
    worst: Action,
    *,
    mta: str,
    to: str,
    now: float,
    message_id: str,
    boundary: str,
    report_type: str,
    body_8bit: bool,
) -> bytes:
    recipient = _clean(to, utf8=True).replace(" ", "").strip("<>")
    if not recipient:
        raise ValueError("a report needs a recipient")
    msgid = _clean(message_id, utf8=False).replace(" ", "").strip("<>")
    fields = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{recipient}>",
        f"Subject: {SUBJECTS[worst]}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{msgid}>",
    ]
    replied = _original_message_id(original.content)
    if replied:
        fields += [f"In-Reply-To: {replied}", f"References: {replied}"]
    fields += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report_type};\r\n\tboundary="{boundary}"',
    ]
    if body_8bit:
        fields.append("Content-Transfer-Encoding: 8bit")
    return "".join(f"{field}\r\n" for field in fields).encode("utf-8")


def _original_message_id(content: bytes) -> str:
    """The original's Message-ID, for In-Reply-To and References (RFC 3834 §3.1.5), or ""."""
    match = re.search(rb"(?im)^message-id:[ \t]*(?:\r\n[ \t]+)?(<[^<>\s]+>)", _header_section(content))
    if match is None:
        return ""
    value = match.group(1).decode("ascii", "replace")
    return value if value.isprintable() and value.isascii() and len(value) <= 250 else ""


def _boundary(queue_id: str, now: float, parts: Sequence[bytes]) -> str:
    """A boundary made of the queue ID and the time, bumped until no part contains it."""
    stem = "=_gannet-dsn." + (re.sub(r"[^A-Za-z0-9]", "", queue_id)[:32] or "x") + f".{int(now)}"
    candidate, n = stem, 0
    while any(candidate.encode("ascii") in part for part in parts):
        n += 1
        candidate = f"{stem}.{n}"
    return candidate


# -- part 1: for people ---------------------------------------------------------------


def _text_part(
    original: OriginalMessage,
    reports: Sequence[RecipientReport],
    *,
    mta: str,
    worst: Action,
    returned: Returned,
    max_returned: int,
) -> bytes:
    about = f"Your message received {rfc5322_date(original.received_at)} has queue ID"
    about += f" {_clean(original.queue_id, utf8=False)}"
    if original.envid:
        about += f" and envelope ID {_clean(original.envid, utf8=False)}"
    prose = [f"This is the mail system at {mta}.", *_intro(reports), about + "."]
    paragraphs = [_wrap(p) for p in prose] + [_recipient_text(r) for r in reports]
    paragraphs.append(_wrap(_returned_text(returned, worst, original.full_size, max_returned)))
    paragraphs.append(_wrap(f"If you need help, write to the postmaster of {mta} and quote the queue ID."))
    text = "\n\n".join(paragraphs) + "\n"
    data = text.encode("utf-8")
    if data.isascii():
        head = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n"
        encoded = data.replace(b"\n", b"\r\n")
    else:
        head = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        qp = email.quoprimime.body_encode(data.decode("latin-1"), maxlinelen=76, eol="\r\n")
        encoded = qp.encode("ascii")
    return f"Content-Description: Notification\r\n{head}\r\n".encode("ascii") + encoded


def _intro(reports: Sequence[RecipientReport]) -> list[str]:
    actions = {r.action for r in reports}
    out = []
    if Action.FAILED in actions:
        out.append(
            "I'm sorry to have to tell you that your message could not be delivered to one or"
            " more of its recipients. The mail system has given up on them; the reasons are below."
        )
    if Action.DELAYED in actions:
        until = [r.will_retry_until for r in reports if r.action is Action.DELAYED and r.will_retry_until]
        when = f" until {rfc5322_date(max(until))}" if until else ""
        out.append(
            "Your message has not been delivered yet to one or more of its recipients. The mail"
            f" system will keep trying{when}; you do not need to send it again. You will be told"
            " if it finally fails."
        )
    if any(action.is_success for action in actions):
        out.append("Your message was delivered or passed on as shown below; you asked to be told.")
    return out


def _recipient_text(r: RecipientReport) -> str:
    address = _clean(r.final_recipient, utf8=True)
    line = f"<{address}>"
    if r.original_recipient:
        first = _clean(r.original_recipient.partition(";")[2] or r.original_recipient, utf8=True)
        if first.lower() != address.lower():
            line += f" (originally addressed to <{first}>)"
    line += f": {_PHRASES[r.action]} (status {_status(r)})."
    lines = [_wrap(line, indent="    ")]
    diagnostic = _clean(_one_reply(r.diagnostic), utf8=True)
    if diagnostic:
        host = _clean(r.remote_mta, utf8=True)
        said = f"The mail server {host} said: " if host else "Reason: "
        lines.append(_wrap(said + diagnostic, indent="    ", first="    "))
    return "\n".join(lines)


def _returned_text(returned: Returned, worst: Action, size: int, max_returned: int) -> str:
    if returned is Returned.FULL:
        return "Your message is attached below."
    if returned is Returned.HEADERS:
        why = " (as you asked)" if worst is Action.FAILED else ""
        return f"The headers of your message are attached below{why}."
    if returned is Returned.HEADERS_TOO_BIG:
        return (
            f"Your message was {size} bytes, more than the {max_returned} bytes a report may carry,"
            " so only its headers are attached below."
        )
    return (
        f"Your message was {size} bytes and even its headers exceed the {max_returned} bytes"
        " a report may carry, so none of it is attached."
    )


def _wrap(text: str, *, indent: str = "", first: str = "") -> str:
    return textwrap.fill(
        text,
        width=TEXT_WIDTH,
        initial_indent=first,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    )


# -- part 2: for programs --------------------------------------------------------------


def _status_part(
    original: OriginalMessage, reports: Sequence[RecipientReport], *, mta: str, utf8: bool
) -> bytes:
    per_message = [_field("Reporting-MTA", f"dns; {mta}")]
    per_message.append(_field("X-Gannet-Queue-ID", _clean(original.queue_id, utf8=False)))
    if original.envid:
        per_message.append(_field("Original-Envelope-Id", _clean(original.envid, utf8=False)))
    per_message.append(_field("Arrival-Date", rfc5322_date(original.received_at)))
    blocks = ["".join(per_message)] + [_recipient_fields(r, utf8=utf8) for r in reports]
    body = "\r\n".join(blocks).encode("utf-8")
    kind = "message/global-delivery-status" if utf8 else "message/delivery-status"
    head = f"Content-Description: Delivery report\r\nContent-Type: {kind}\r\n"
    if not body.isascii():
        head += "Content-Transfer-Encoding: 8bit\r\n"
    return f"{head}\r\n".encode("ascii") + body


def _recipient_fields(r: RecipientReport, *, utf8: bool) -> str:
    fields = []
    if r.original_recipient:
        fields.append(_field("Original-Recipient", _orcpt(r.original_recipient, utf8=utf8)))
    fields.append(_field("Final-Recipient", _typed_address(r.final_recipient, utf8=utf8)))
    fields.append(_field("Action", r.action.value))
    fields.append(_field("Status", _status(r)))
    host = _clean(r.remote_mta, utf8=utf8).replace(" ", "")
    if host:
        fields.append(_field("Remote-MTA", f"dns; {host}"))
    diagnostic = _clean(_one_reply(r.diagnostic), utf8=utf8)
    if diagnostic:
        kind = "smtp" if _SMTP_REPLY.match(diagnostic) else "X-Gannet"
        fields.append(_field("Diagnostic-Code", f"{kind}; {diagnostic}"))
    if r.last_attempt is not None:
        fields.append(_field("Last-Attempt-Date", rfc5322_date(r.last_attempt)))
    if r.action is Action.DELAYED and r.will_retry_until is not None:
        fields.append(_field("Will-Retry-Until", rfc5322_date(r.will_retry_until)))
    return "".join(fields)


def _status(r: RecipientReport) -> str:
    """`r.status`, else the enhanced code that starts the diagnostic ("550 5.1.1 ...",
    "4.3.0 ..."), else x.0.0; a code of the wrong class for the action is not used."""
    found = _ENHANCED.match(r.diagnostic.strip())
    for status in (r.status.strip(), found.group(1) if found else ""):
        if ENHANCED_STATUS.fullmatch(status) and status[0] in _CLASSES.get(r.action, "2"):
            return status
    return _DEFAULT_STATUS.get(r.action, "2.0.0")


def _one_reply(text: str) -> str:
    """A multi-line SMTP reply as one: "550-5.1.1 a" + "550 5.1.1 b" gives "550 5.1.1 a b".

    Anything else (one line, mixed codes, not a reply) is returned unchanged.
    """
    lines = [line for line in re.split(r"\r\n|\r|\n", text[: 4 * MAX_TEXT]) if line.strip()]
    matches = [_REPLY_LINE.fullmatch(line) for line in lines]
    if len(lines) < 2 or not all(matches):
        return text
    codes = {(m.group(1), m.group(2).strip()) for m in matches if m}
    if len(codes) != 1:
        return text
    code, enhanced = codes.pop()
    return " ".join([code, *([enhanced] if enhanced else []), *(m.group(3) for m in matches if m)])


def _typed_address(address: str, *, utf8: bool) -> str:
    """RFC 3464 §2.3.2 / RFC 6533 §3: "rfc822; a@b", or "utf-8; jörg@b" for a UTF-8 address."""
    clean = _clean(address, utf8=utf8).replace(" ", "")
    return f"{'rfc822' if clean.isascii() else 'utf-8'}; {clean}"


def _orcpt(orcpt: str, *, utf8: bool) -> str:
    """The stored ORCPT ("type;address", xtext already decoded) as RFC 3464 §2.3.1 wants it."""
    kind, semi, address = orcpt.partition(";")
    if not semi:
        kind, address = "rfc822", orcpt
    kind = re.sub(r"[^A-Za-z0-9-]", "", kind) or "rfc822"
    clean = _clean(address, utf8=utf8).replace(" ", "")
    if not clean.isascii() and kind.lower() == "rfc822":
        kind = "utf-8"
    return f"{kind};{clean}"


def _field(name: str, value: str) -> str:
    """`Name: value` CRLF, folded at spaces before FOLD_AT; `value` must be `_clean` already."""
    words = []
    for word in value.split(" "):
        step = MAX_WORD if word.isascii() else MAX_WORD // 4  # UTF-8: up to 4 octets a character
        words += [word[i : i + step] for i in range(0, len(word), step)]
    lines: list[str] = []
    line = f"{name}:"
    for n, word in enumerate(words):
        if n and len(line) + 1 + len(word) > FOLD_AT:
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _clean(text: str, *, utf8: bool, limit: int = MAX_TEXT) -> str:
    """`text` as one line of printable characters, at most `limit` of them.

    Every kind of line break and space becomes one space (runs collapse);
    other control, format, private-use, unassigned and surrogate characters
    become "?", and so does every non-ASCII character unless `utf8`.
    """
    chars = (
        " " if c.isspace() else c if c.isprintable() and (utf8 or c.isascii()) else "?"
        for c in text[: 4 * limit]
    )
    flat = " ".join("".join(chars).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- part 3: the original -------------------------------------------------------------


def _header_section(content: bytes) -> bytes:
    """The header section with its last CRLF, without the empty line that ends it."""
    if content.startswith(b"\r\n"):
        return b""
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 2]


def _original_part(data: bytes, *, full: bool, worst: Action, utf8: bool) -> bytes:
    undelivered = "Undelivered " if worst in (Action.FAILED, Action.DELAYED) else ""
    if full:
        kind = "message/global" if utf8 else "message/rfc822"
        head = f"Content-Description: {undelivered}Message\r\nContent-Type: {kind}\r\n"
    else:
        kind = "message/global-headers" if utf8 else "text/rfc822-headers"
        head = f"Content-Description: {undelivered}Message Headers\r\nContent-Type: {kind}\r\n"
    if not data.isascii():
        head += "Content-Transfer-Encoding: 8bit\r\n"
    return f"{head}\r\n".encode("ascii") + data
