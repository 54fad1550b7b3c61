"""DKIM tag lists and signature tag checks (gannet/mailauth/dkim_tags.py) against dkimpy's own.

`parse_tags` and `check_signature` replace dkimpy's `parse_tag_value` and
`validate_signature_fields` for speed; these tests hold them to the same
answers on generated input, and list the few places where ours is stricter.
"""

from __future__ import annotations

import time

import dkim
import pytest
from dkim.util import InvalidTagValueList, parse_tag_value
from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.mailauth.dkim_tags import ValidationError, check_signature, parse_tags

NOW = time.time()

# Tag lists built from pieces that exercise every rule: separators, spaces, odd names, repeats.
_piece = st.sampled_from(
    [b"v", b"a", b"b", b"bh", b"d", b"x1", b"1x", b"_x", b"x-y", b"", b" ", b"\t", b"\r\n ", b"=", b";",
     b"==", b"rsa-sha256", b"a=b", b"AB+/", b"\xc3\xa9", b"k", b"=;", b";;"]
)  # fmt: skip
tag_lists = st.lists(_piece, max_size=12).map(b"".join)


@given(tag_lists)
@settings(max_examples=2000)
def test_parse_tags_reads_every_list_as_dkimpy_does(tag_list: bytes) -> None:
    try:
        expected: dict[bytes, bytes] | str = parse_tag_value(tag_list)
    except InvalidTagValueList as exc:
        expected = type(exc).__name__
    try:
        got: dict[bytes, bytes] | str = parse_tags(tag_list)
    except InvalidTagValueList as exc:
        got = type(exc).__name__
    assert got == expected


def test_parse_tags_on_a_real_signature() -> None:
    value = b" v=1; a=rsa-sha256; d=example.test;\r\n\ts=s1; h=from : to;\r\n\tbh=abc=; b=AB\r\n\t CD; "
    assert parse_tags(value) == {
        b"v": b"1", b"a": b"rsa-sha256", b"d": b"example.test", b"s": b"s1",
        b"h": b"from : to", b"bh": b"abc=", b"b": b"AB\r\n\t CD",
    }  # fmt: skip


GOOD = {
    b"v": b"1",
    b"a": b"rsa-sha256",
    b"b": b"dGVzdA==",
    b"bh": b"dGVzdHRlc3Q=",
    b"d": b"example.test",
    b"h": b"from:to",
    b"s": b"s1",
}

# Each tag with values both checkers accept and values both refuse (where ours is stricter, the
# cases are in test_check_signature_says_why).
_values = {
    b"v": [b"1", b"2", b""],
    b"a": [b"rsa-sha256", b"ed25519-sha256", b"rsa-sha1", b"RSA-SHA256", b"hmac"],
    b"b": [b"dGVzdA==", b"dG Vz\r\n dA==", b"dGVzdA=", b"dGVz!A==", b"=", b"", b"dGVzdA==x"],
    b"bh": [b"dGVzdHRlc3Q=", b"dGVzdHRlc3Q", b"dGVz dHRl c3Q="],
    b"d": [b"example.test", b"exa(mple.test", b"ex@mple.test", b"\xc3\xa9.test"],
    b"i": [b"@example.test", b"user@example.test", b"user@sub.example.test", b"user@other.test",
           b"user@EXAMPLE.test", b"user@badexample.test"],
    b"l": [b"0", b"123", b"12a", b"-1", b"1" * 77],
    b"q": [b"dns/txt", b"dns", b"DNS/TXT"],
    b"t": [b"1000", str(int(NOW) + 10).encode(), str(int(NOW) + 100_000).encode(), b"t1", b"+5"],
    b"x": [str(int(NOW) + 3600).encode(), str(int(NOW) - 100_000).encode(), b"999", b"x9"],
    b"cv": [b"pass", b"none", b"maybe"],
}  # fmt: skip


@st.composite
def signature_tags(draw: st.DrawFn) -> dict[bytes, bytes]:
    sig = dict(GOOD)
    for name in draw(st.sets(st.sampled_from(sorted(_values)), max_size=4)):
        sig[name] = draw(st.sampled_from(_values[name]))
    for name in draw(st.sets(st.sampled_from(sorted(GOOD)), max_size=2)):
        del sig[name]
    return sig


def _dkimpy_accepts(sig: dict[bytes, bytes]) -> bool:
    try:
        dkim.validate_signature_fields(sig)
    except dkim.ValidationError:
        return False
    except IndexError:  # an i= as long as d=: dkimpy indexes past its start
        return False
    return True


@given(signature_tags())
@settings(max_examples=1500)
def test_check_signature_accepts_what_dkimpy_accepts(sig: dict[bytes, bytes]) -> None:
    try:
        check_signature(sig, NOW)
        ours = True
    except ValidationError as exc:
        ours = False
        assert str(exc)  # every refusal says why
    assert ours == _dkimpy_accepts(sig)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({b"v": None}, "missing v="),
        ({b"a": b"rsa-md5"}, "unknown signature algorithm"),
        ({b"bh": b"!!!!"}, "bh= value is not valid base64"),  # dkimpy checks b= here instead
        ({b"l": b""}, "l= value is not a decimal integer"),  # dkimpy: int(b"") fails later
        ({b"i": b"example.test"}, "i= is not within d="),  # dkimpy: IndexError
        ({b"t": str(int(NOW) + 86_400).encode()}, "t= value is in the future"),
        ({b"x": b"1000", b"t": b"2000"}, "x= value is past"),
    ],
)
def test_check_signature_says_why(change: dict[bytes, bytes | None], reason: str) -> None:
    sig = dict(GOOD)
    for name, value in change.items():
        if value is None:
            del sig[name]
        else:
            sig[name] = value
    with pytest.raises(ValidationError, match=reason):
        check_signature(sig, NOW)


def test_x_before_t_is_refused() -> None:
    sig = dict(GOOD)
    sig[b"t"], sig[b"x"] = str(int(NOW)).encode(), str(int(NOW) - 10).encode()
    with pytest.raises(ValidationError, match="x= value is less than t="):
        check_signature(sig, NOW)
