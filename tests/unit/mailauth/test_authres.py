"""Authentication-Results (RFC 8601): our field's syntax, and recognising fields that claim our name."""

from __future__ import annotations

import email.parser
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.mailauth import authres
from gannet.mailauth.authres import ResInfo

RESULTS = [
    ResInfo("spf", "pass", "", (("smtp.mailfrom", "alice@sender.test"),)),
    ResInfo("dkim", "pass", "", (("header.d", "sender.test"), ("header.s", "s1"), ("header.b", "AbC/dE+f"))),
    ResInfo("dkim", "fail", "body hash mismatch", (("header.d", "other.test"),)),
    ResInfo("dmarc", "pass", "p=reject sp=none dis=none", (("header.from", "sender.test"),)),
    ResInfo("arc", "none"),
]


def test_render() -> None:
    assert authres.render("mx.example.test", RESULTS) == (
        b"Authentication-Results: mx.example.test;\r\n"
        b"\tspf=pass smtp.mailfrom=alice@sender.test;\r\n"
        b'\tdkim=pass header.d=sender.test header.s=s1 header.b="AbC/dE+f";\r\n'
        b"\tdkim=fail (body hash mismatch) header.d=other.test;\r\n"
        b"\tdmarc=pass (p=reject sp=none dis=none) header.from=sender.test;\r\n"
        b"\tarc=none\r\n"
    )


def test_value_is_one_line_for_arc() -> None:
    value = authres.value("mx.example.test", RESULTS[:1] + RESULTS[-1:])
    assert value == "mx.example.test; spf=pass smtp.mailfrom=alice@sender.test; arc=none"


def test_python_email_parses_it() -> None:
    raw = authres.render("mx.example.test", RESULTS) + b"Subject: x\r\n\r\nbody\r\n"
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
    unfolded = " ".join(str(msg["Authentication-Results"]).split())
    assert unfolded == authres.value("mx.example.test", RESULTS)


@pytest.mark.parametrize(
    ("value", "pv"),
    [
        ("alice@sender.test", "alice@sender.test"),
        ("sender.test", "sender.test"),
        ("s1", "s1"),
        ('"odd local"@sender.test', '"\\"odd local\\"@sender.test"'),
        ("a b", '"a b"'),
        ("AbC/dE+f", '"AbC/dE+f"'),
        ("x\r\ny", '"xy"'),
    ],
)
def test_pvalue(value: str, pv: str) -> None:
    assert authres.pvalue(value) == pv


def test_reason_cannot_break_out_of_its_comment() -> None:
    text = ResInfo("spf", "fail", "evil) dkim=pass (\\\r\nX-Injected: 1").text()
    assert text == "spf=fail (evil  dkim=pass X-Injected: 1)".replace("  ", " ")


@pytest.mark.parametrize(
    ("field", "ours"),
    [
        (b"Authentication-Results: mx.example.test; spf=pass\r\n", True),
        (b"Authentication-Results: MX.Example.TEST; dkim=pass\r\n", True),
        (b"authentication-results:mx.example.test;spf=pass\r\n", True),
        (b"Authentication-Results: (forged) mx.example.test 1; none\r\n", True),
        (b"Authentication-Results:\r\n\tmx.example.test;\r\n\tspf=pass\r\n", True),
        (b'Authentication-Results: "mx.example.test"; none\r\n', True),
        (b"Authentication-Results: mx.example.test.; none\r\n", True),
        (b"Authentication-Results: other.test; spf=pass smtp.mailfrom=mx.example.test\r\n", False),
        (b"Authentication-Results: mx.example.test.evil; none\r\n", False),
        (b"ARC-Authentication-Results: i=1; mx.example.test; none\r\n", False),
        (b"X-Authentication-Results: mx.example.test; none\r\n", False),
    ],
)
def test_is_ours(field: bytes, ours: bool) -> None:
    assert authres.is_ours(field, "mx.example.test") is ours


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=300), max_size=40))
def test_comment_text_is_printable_ascii_without_parentheses(text: str) -> None:
    slow = "".join(c if 32 <= ord(c) < 127 and c not in "()\\" else " " for c in text)
    assert authres.comment_text(text) == " ".join(slow.split())


def test_render_and_value_say_the_same() -> None:
    field, value = authres.render_both("mx.example.test", RESULTS)
    assert field == authres.render("mx.example.test", RESULTS)
    assert value == authres.value("mx.example.test", RESULTS)
    assert authres.render_both("mx.example.test", []) == (
        b"Authentication-Results: mx.example.test; none\r\n",
        "mx.example.test; none",
    )
