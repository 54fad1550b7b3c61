"""The streamed relaxed body hash equals the hash of the whole body canonicalized at once
(`signing.relaxed_body`, itself checked against dkimpy in test_signing.py), however the body
is cut into chunks and however short the line limit."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.mailauth.bodyhash import RelaxedBodyHash
from gannet.mailauth.signing import _RELAXED, relaxed_body

PIECES = [b"\r\n", b"\r", b"\n", b" ", b"  ", b"\t", b"a", b"bc", b"x y", b" \r\n", b"\r\n\r\n", b"\t\r\n"]


def streamed(body: bytes, cuts: list[int], max_line: int) -> bytes:
    h = RelaxedBodyHash(max_line=max_line)
    start = 0
    for cut in [*sorted({c % (len(body) + 1) for c in cuts}), len(body)]:
        h.update(body[start:cut])
        start = cut
    return h.digest()


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    st.integers(min_value=1, max_value=12),
)
def test_any_chunking_gives_the_whole_body_hash(body: bytes, cuts: list[int], max_line: int) -> None:
    assert streamed(body, cuts, max_line) == hashlib.sha256(relaxed_body(body)).digest()


@pytest.mark.parametrize(
    "body",
    [b"", b"\r\n", b"\r\n\r\n", b"a", b"a \r\n\r\n \r\n", b"end without newline  ", b"x\r\r\n",
     b"line\r\n" * 1000 + b"\r\n" * 50, b" " * 300 + b"\r\n", b"a" * 500 + b" \t " + b"b" * 500 + b"\r\n"],
)  # fmt: skip
def test_examples_match_dkimpy(body: bytes) -> None:
    expected = hashlib.sha256(_RELAXED.canonicalize_body(body)).digest()
    for max_line in (1, 3, 64 * 1024):
        assert streamed(body, [1, 7, 100, 333], max_line) == expected


def test_one_huge_line_keeps_memory_bounded() -> None:
    h = RelaxedBodyHash(max_line=1024)
    for _ in range(200):
        h.update(b"word  " * 1000)
        assert len(h._tail) <= 1024 + 6000
    h.update(b"\r\n")
    whole = (b"word  " * 1000) * 200 + b"\r\n"
    assert h.digest() == hashlib.sha256(relaxed_body(whole)).digest()
