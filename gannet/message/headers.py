"""Header edits Gannet makes: its Received line, and Message-ID/Date on submission.

Also a small scanner of the header section (`HeaderFacts`) that finds what the
session needs without parsing the whole message: whether Message-ID and Date
are present, the Message-ID value (for logs and tracing) and how many Received
headers there are (RFC 5321 §6.3 loop detection).

Pure functions over bytes and values: no I/O, no clock (time is passed in).
"""

from __future__ import annotations

import email.utils
import functools
from dataclasses import dataclass

# RFC 5321 §6.3 suggests a limit of at least 100 Received headers before
# declaring a loop; Postfix uses 50 (hopcount_limit). The issue asks for 100.
MAX_RECEIVED = 100


@dataclass(frozen=True, slots=True)
class ReceivedInfo:
    """The facts RFC 5321 §4.4 puts in a Received header."""

    helo: str
    client_host: str  # reverse DNS name, or "" when unknown
    client_ip: str
    by: str  # our hostname
    protocol: str  # with: ESMTP, ESMTPS, ESMTPSA, LMTP, UTF8SMTPS … (RFC 3848, RFC 6531 §4.3)
    queue_id: str
    recipient: str | None  # "for <addr>" only when there is exactly one
    tls: str = ""  # "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    auth_user: str = ""  # not shown in the header (privacy), only used for the protocol name


def with_protocol(*, esmtp: bool, tls: bool, auth: bool, smtputf8: bool, lmtp: bool) -> str:
    """RFC 3848 / RFC 6531 §4.3 transmission type for the "with" clause."""
    if lmtp:
        base = "LMTP"
    elif not esmtp:
        return "SMTP"
    else:
        base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


def received_header(info: ReceivedInfo, now: float) -> bytes:
    """RFC 5321 §4.4 Received: from HELO (rdns [ip]) by host with P id ID for <rcpt>; date."""
    ip = info.client_ip
    literal = f"IPv6:{ip}" if ":" in ip else ip
    remote = f"{info.client_host} [{literal}]" if info.client_host else f"[{literal}]"
    lines = [f"Received: from {_token(info.helo) or 'unknown'} ({remote})"]
    lines.append(f"\tby {info.by} (Gannet) with {info.protocol} id {info.queue_id}")
    if info.tls:
        lines[-1] += f"\r\n\t(using {info.tls})"
    if info.recipient:
        lines.append(f"\tfor <{info.recipient}>")
    text = "\r\n".join(lines) + f"; {rfc5322_date(now)}\r\n"
    return text.encode("utf-8")


def message_id(queue_id: str, hostname: str, now: float) -> str:
    stamp = int(now)
    return f"<{stamp}.{queue_id}@{hostname}>"


def rfc5322_date(now: float) -> str:
    return _date_of_second(int(now))


@functools.lru_cache(maxsize=4)  # one string per second: every message in it shares it
def _date_of_second(second: int) -> str:
    return email.utils.formatdate(second, localtime=False, usegmt=True)


@functools.lru_cache(maxsize=1024)  # a client's HELO name is the same in each of its sessions
def _token(value: str) -> str:
    """HELO names come from the peer: keep the header well-formed whatever they sent."""
    return "".join(c if 32 < ord(c) < 127 and c not in "()<>;" else "?" for c in value[:255])


@dataclass(slots=True)
class HeaderFacts:
    """What the session learns from the header section."""

    complete: bool = False  # the blank line ending the headers was seen
    has_message_id: bool = False
    has_date: bool = False
    message_id: str = ""
    received_count: int = 0


def scan_headers(head: bytes) -> HeaderFacts:
    """Scan the start of a message (CRLF line endings). `head` may be cut anywhere;
    facts are given for the complete header lines in it.

    Header names are matched at the start of a line only; folded continuation
    lines (starting with space/tab) belong to the header before them.
    """
    facts = HeaderFacts()
    end = head.find(b"\r\n\r\n")
    if head.startswith(b"\r\n"):
        facts.complete = True
        return facts
    if end >= 0:
        facts.complete = True
        section = head[: end + 2]
    else:
        section = head[: head.rfind(b"\r\n") + 2]
    lower = b"\r\n" + section.lower()
    facts.received_count = lower.count(b"\r\nreceived:")
    facts.has_date = b"\r\ndate:" in lower
    pos = lower.find(b"\r\nmessage-id:")
    if pos >= 0:
        facts.has_message_id = True
        start = pos + len(b"\r\nmessage-id:") - 2  # offset in `section`
        stop = section.find(b"\r\n", start)
        # Folded Message-ID (value on the next line) is legal; take what follows.
        while stop >= 0 and section[stop + 2 : stop + 3] in (b" ", b"\t"):
            stop = section.find(b"\r\n", stop + 2)
        raw = section[start : stop if stop >= 0 else len(section)]
        facts.message_id = raw.decode("utf-8", "replace").replace("\r\n", "").strip()[:250]
    return facts
