"""The 8-bit → 7-bit downgrade (RFC 6152 §3): what is re-encoded, what is kept byte for byte,
what cannot be converted, and a Hypothesis round trip through the `email` package."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.message.eightbit import MAX_DEPTH, CannotDowngrade, downgrade


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def decoded(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def assert_7bit_wire_form(data: bytes) -> None:
    """Pure ASCII, no bare CR or LF, no line over 998 octets (RFC 5322 §2.1.1)."""
    assert data.isascii()
    pairs = data.count(b"\r\n")
    assert data.count(b"\r") == pairs == data.count(b"\n")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


TEXT = (b"MIME-Version: 1.0\r\nSubject: plain\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n")


def test_7bit_message_is_returned_as_is() -> None:
    data = b"Subject: x\r\n\r\nhello\r\n"
    assert downgrade(data) is data
    headers_only = b"MIME-Version: 1.0\r\nSubject: no body"
    assert downgrade(headers_only) is headers_only


def test_text_part_becomes_quoted_printable() -> None:
    body = "Grüße aus Köln,\r\nline two with trailing space \r\n.dot\r\n".encode()
    out = downgrade(TEXT + body)
    assert_7bit_wire_form(out)
    head, _, encoded = out.partition(b"\r\n\r\n")
    assert head == (b"MIME-Version: 1.0\r\nSubject: plain\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Transfer-Encoding: quoted-printable")  # the other headers untouched
    assert encoded.startswith(b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln,\r\n")
    assert decoded(parse(out)) == body


def test_missing_cte_and_folded_duplicate_cte() -> None:
    no_cte = b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n\xe9t\xe9\r\n"
    out = downgrade(no_cte)
    assert out.endswith(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9t=E9\r\n")
    folded = (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding:\r\n 8bit\r\nX-A: 1\r\n"
              b"content-transfer-encoding: binary\r\n\r\n\xff\r\n")
    out = downgrade(folded)
    assert out.startswith(b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                          b"X-A: 1\r\n\r\n")


def test_long_line_without_final_newline_has_only_crlf_soft_breaks() -> None:
    body = "é".encode() * 300
    out = downgrade(TEXT + body)
    assert_7bit_wire_form(out)
    assert not out.endswith(b"\r\n")  # no line end invented
    assert decoded(parse(out)) == body


def test_text_with_bare_newlines_and_binary_parts_become_base64() -> None:
    cases = ((b"text/plain", b"bare\nLF \xe9\r\n"), (b"application/octet-stream", bytes(range(256))))
    for ctype, body in cases:
        data = (b"MIME-Version: 1.0\r\nContent-Type: " + ctype
                + b"\r\nContent-Transfer-Encoding: binary\r\n\r\n")
        out = downgrade(data + body)
        assert_7bit_wire_form(out)
        assert b"Content-Transfer-Encoding: base64\r\n\r\n" in out
        assert decoded(parse(out)) == body


MULTIPART = (
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"This is the preamble.\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    b"seven bit, kept  as it is   \r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"d\xc3\xa9j\xc3\xa0 vu\r\n"
    b"--b1 \r\n"
    b"Content-Type: application/octet-stream\r\n\r\n"
    b"\x00\x01\xfe\xff"
    b"\r\n--b1\r\n"
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Subject: inner\r\nContent-Type: text/plain\r\n\r\ninner \xe9\r\n"
    b"\r\n--b1--\r\n"
    b"epilogue\r\n"
)


def test_multipart_converts_each_8bit_leaf_and_keeps_the_rest() -> None:
    out = downgrade(MULTIPART)
    assert_7bit_wire_form(out)
    assert out.startswith(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n"
                          b"Content-Transfer-Encoding: 7bit\r\n\r\nThis is the preamble.\r\n--b1\r\n"
                          b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                          b"seven bit, kept  as it is   \r\n--b1\r\n")
    assert out.endswith(b"\r\n--b1--\r\nepilogue\r\n")
    assert b"\r\n--b1 \r\n" in out  # transport padding on a delimiter line kept
    parts = parse(out).get_payload()
    assert isinstance(parts, list) and len(parts) == 4
    assert decoded(parts[0]) == b"seven bit, kept  as it is   "
    assert parts[1]["Content-Transfer-Encoding"] == "quoted-printable"
    assert decoded(parts[1]) == "déjà vu".encode()  # the CRLF before "--b1" is the delimiter's
    assert parts[2]["Content-Transfer-Encoding"] == "base64" and decoded(parts[2]) == b"\x00\x01\xfe\xff"
    assert parts[3]["Content-Transfer-Encoding"] == "7bit"
    inner = parts[3].get_payload()[0]
    assert inner["Content-Transfer-Encoding"] == "quoted-printable" and decoded(inner) == b"inner \xe9\r\n"


def test_digest_parts_default_to_message_rfc822() -> None:
    data = (b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
            b"Subject: in a digest\r\n\r\n\xe9\r\n--d--\r\n")
    out = downgrade(data)
    assert_7bit_wire_form(out)
    assert b"--d\r\nContent-Transfer-Encoding: 7bit\r\n\r\nSubject: in a digest\r\n" in out


def test_multipart_without_close_delimiter() -> None:
    data = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\n\xe9"
    out = downgrade(data)
    assert out.endswith(b"--x\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9")


@pytest.mark.parametrize(("data", "reason"), [
    (b"Subject: caf\xc3\xa9\r\nMIME-Version: 1.0\r\n\r\nbody \xe9\r\n", "header"),
    (b"Subject: x\r\n\r\nbody \xe9\r\n", "MIME-Version"),
    (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\n\xe9\r\n", "base64"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n\xe9\r\n", "boundary"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\xe9\r\n", "delimiter"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\npre \xe9\r\n--b\r\n\r\n"
     b"x\r\n--b--\r\n", "preamble"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n\xe9",
     "epilogue"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\nContent-Transfer-Encoding: base64"
     b"\r\n\r\n--b\r\n\r\n\xe9\r\n--b--\r\n", "multipart/mixed with"),
    (b"MIME-Version: 1.0\r\nContent-Type: message/partial; id=1\r\n\r\n\xe9\r\n", "message/partial"),
])
def test_cannot_downgrade(data: bytes, reason: str) -> None:
    with pytest.raises(CannotDowngrade) as info:
        downgrade(data)
    assert reason in info.value.reason


def test_nesting_limit() -> None:
    data = b"\xe9\r\n"
    for _ in range(MAX_DEPTH + 1):
        data = b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n" + data
    with pytest.raises(CannotDowngrade, match="deeper"):
        downgrade(data)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=3000), text=st.booleans(), crlf_lines=st.booleans())
def test_round_trip(body: bytes, text: bool, crlf_lines: bool) -> None:
    """Any body: the result is 7-bit wire-safe and decodes to exactly the original octets."""
    if crlf_lines:
        body = body.replace(b"\r", b"").replace(b"\n", b"\r\n")
    ctype = b"text/plain; charset=utf-8" if text else b"application/octet-stream"
    data = b"MIME-Version: 1.0\r\nContent-Type: " + ctype + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    out = downgrade(data + body)
    if body.isascii():
        assert out == data + body  # 7-bit: untouched (line ends are the SMTP layer's business)
    else:
        assert_7bit_wire_form(out)
        assert decoded(parse(out)) == body
