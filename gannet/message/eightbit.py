"""8-bit → 7-bit MIME downgrade, for a server that does not offer 8BITMIME (RFC 6152 §3).

Owns one pure function, `downgrade(message) -> bytes`: the message (CRLF
content, as spooled) with every leaf part that holds 8-bit octets re-encoded
as quoted-printable (text/*, when its lines are clean CRLF) or base64
(everything else), and its Content-Transfer-Encoding header rewritten
(RFC 2045 §6). Composite entities (multipart/*, message/rfc822) are walked,
never re-encoded (RFC 2045 §6.4, RFC 2046 §5.2.1); their own CTE becomes
"7bit". Everything else — other headers, boundaries, preambles, 7-bit parts
— is kept byte for byte: headers are read with the `email` package but never
re-serialized.

It raises `CannotDowngrade` (with the reason) when no faithful 7-bit form
exists: 8-bit octets in a header (RFC 2047 re-encoding of headers is not
done), in a multipart preamble or epilogue, in a base64/quoted-printable part
(malformed), in message/* other than rfc822, a multipart without a boundary,
a top-level message without MIME-Version (a non-MIME 8-bit body cannot be
labelled without inventing a charset), or nesting deeper than `MAX_DEPTH`.
The caller (delivery/outbound.py) then sends the message as it is, as Postfix
does when it cannot convert.

No I/O; the input is bytes, the whole message (the caller reads a spooled
body into memory for this rare path).
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import re
from email.message import Message

__all__ = ["MAX_DEPTH", "CannotDowngrade", "downgrade"]

MAX_DEPTH = 30  # nested MIME entities walked at most
_IDENTITY = frozenset({"7bit", "8bit", "binary"})  # RFC 2045 §6.1: no encoding applied
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


class CannotDowngrade(Exception):
    """The message has no faithful 7-bit form; `reason` says why (for the log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def downgrade(message: bytes) -> bytes:
    """The 7-bit form of `message` (the same object when it is 7-bit already)."""
    if message.isascii():
        return message
    return _entity(message, top=True, default_type="text/plain", depth=0)


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header section incl. its last CRLF, the blank line, body) — RFC 5322 §2.1."""
    if data.startswith(b"\r\n"):
        return b"", b"\r\n", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b"", b""
    return data[: end + 2], b"\r\n", data[end + 4 :]


def _entity(data: bytes, *, top: bool, default_type: str, depth: int) -> bytes:
    head, blank, body = _split(data)
    if not head.isascii():
        raise CannotDowngrade("8-bit octets in a header (RFC 2047 encoding is not attempted)")
    if body.isascii():
        return data
    if depth >= MAX_DEPTH:
        raise CannotDowngrade(f"MIME nesting deeper than {MAX_DEPTH}")
    msg = _HEADER_PARSER.parsebytes(head + b"\r\n")
    msg.set_default_type(default_type)
    if top and "MIME-Version" not in msg:
        raise CannotDowngrade("8-bit body in a message without MIME-Version")
    ctype = msg.get_content_type()
    cte = str(msg.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    maintype = msg.get_content_maintype()
    if maintype == "multipart" or ctype == "message/rfc822":
        if cte not in _IDENTITY:  # RFC 2045 §6.4: composites are never encoded
            raise CannotDowngrade(f"{ctype} with Content-Transfer-Encoding {cte}")
        if maintype == "multipart":
            new_body = _multipart(msg, body, depth)
        else:  # RFC 2046 §5.2.1: the enclosed message is converted, not the envelope part
            new_body = _entity(body, top=False, default_type="text/plain", depth=depth + 1)
        return _set_cte(head, "7bit") + blank + new_body
    if maintype == "message":
        raise CannotDowngrade(f"8-bit octets in {ctype}")
    if cte not in _IDENTITY:
        raise CannotDowngrade(f"8-bit octets in a {cte} part")
    if maintype == "text" and _clean_crlf(body):
        return _set_cte(head, "quoted-printable") + blank + _quoted_printable(body)
    return _set_cte(head, "base64") + blank + _base64(body)


def _multipart(msg: Message, body: bytes, depth: int) -> bytes:
    """Each body part converted on its own; delimiters, preamble and epilogue untouched (RFC 2046 §5.1.1)."""
    boundary = msg.get_boundary()
    if not boundary or not boundary.isascii():
        raise CannotDowngrade("multipart without a usable boundary")
    # The CRLF before a delimiter line belongs to the delimiter (RFC 2046 §5.1.1).
    marker = re.escape(boundary.encode("ascii"))
    delimiter = re.compile(rb"(?:\A|\r\n)--" + marker + rb"(--)?[ \t]*(?=\r\n|\Z)")
    child_type = "message/rfc822" if msg.get_content_subtype() == "digest" else "text/plain"
    matches = list(delimiter.finditer(body))
    if not matches:
        raise CannotDowngrade("8-bit octets in a multipart without delimiter lines")
    out = [_ascii_or_fail(body[: matches[0].start()], "preamble")]
    for index, match in enumerate(matches):
        out.append(match.group(0))
        if match.group(1):  # the close delimiter: the rest is the epilogue
            out.append(_ascii_or_fail(body[match.end() :], "epilogue"))
            break
        end = matches[index + 1].start() if index + 1 < len(matches) else len(body)
        start = match.end() + 2  # past the CRLF that ends the delimiter line
        if start > end:  # the delimiter line is the last thing in the body
            out.append(body[match.end() : end])
            continue
        out.append(b"\r\n")
        out.append(_entity(body[start:end], top=False, default_type=child_type, depth=depth + 1))
    return b"".join(out)


def _ascii_or_fail(data: bytes, where: str) -> bytes:
    if not data.isascii():
        raise CannotDowngrade(f"8-bit octets in a multipart {where}")
    return data


def _clean_crlf(data: bytes) -> bool:
    """Every CR and LF is part of a CRLF pair (then QP keeps the line structure)."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") == pairs and data.count(b"\n") == pairs


def _quoted_printable(data: bytes) -> bytes:
    """RFC 2045 §6.7 with CRLF line breaks, soft breaks at 76 columns."""
    if data.endswith(b"\r\n"):
        return binascii.b2a_qp(data, quotetabs=False, istext=True)
    # b2a_qp picks its line end from the first LF it meets: give it a CRLF, then take it back.
    return binascii.b2a_qp(data + b"\r\n", quotetabs=False, istext=True)[:-2]


def _base64(data: bytes) -> bytes:
    """RFC 2045 §6.8: lines of at most 76 characters, CRLF after each."""
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


def _set_cte(head: bytes, value: str) -> bytes:
    """`head` with its (first) Content-Transfer-Encoding field replaced, others dropped, or one added."""
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)  # a folded continuation line (RFC 5322 §2.2.3)
        else:
            fields.append([line])
    new = b"Content-Transfer-Encoding: " + value.encode("ascii")
    out: list[bytes] = []
    for field in fields:
        if field[0].split(b":", 1)[0].strip().lower() == b"content-transfer-encoding":
            if new:
                out.append(new)
                new = b""
            continue
        out.extend(field)
    if new:
        out.append(new)
    return b"\r\n".join(out) + b"\r\n"
