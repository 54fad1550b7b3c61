"""Rewriting a finished message: header fields prepended and dropped, in memory and in a spool file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gannet.message.rewrite import FieldFilter, header_fields, rewrite, rewrite_bytes, split_head
from gannet.queue.model import InlineBody, SpooledBody

HEAD = (
    b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Authentication-Results: mx.example.test; spf=pass\r\n"
    b"Subject: hello\r\n  folded\r\n"
    b"X-Drop: yes\r\n"
)
MESSAGE = HEAD + b"\r\nbody line\r\nX-Drop: not a header, in the body\r\n"


drop_x = FieldFilter(frozenset({b"x-drop"}), lambda field: field.endswith(b"yes\r\n"))


def test_header_fields_keep_folding() -> None:
    head, rest = split_head(MESSAGE)
    assert head == HEAD and rest.startswith(b"\r\nbody line")
    assert header_fields(head) == [
        b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        b"Authentication-Results: mx.example.test; spf=pass\r\n",
        b"Subject: hello\r\n  folded\r\n",
        b"X-Drop: yes\r\n",
    ]


@pytest.mark.parametrize(
    ("message", "head"),
    [
        (b"\r\nonly a body\r\n", b""),
        (b"Subject: no body\r\n", b"Subject: no body\r\n"),  # no blank line: all header
        (b"Subject: x\r\n\r\n", b"Subject: x\r\n"),
    ],
)
def test_split_head_edges(message: bytes, head: bytes) -> None:
    got_head, rest = split_head(message)
    assert got_head == head and got_head + rest == message


def test_rewrite_bytes_prepends_and_drops_only_in_the_header() -> None:
    out, dropped = rewrite_bytes(MESSAGE, b"New: 1\r\n", drop_x)
    assert dropped == 1
    assert out == b"New: 1\r\n" + HEAD.replace(b"X-Drop: yes\r\n", b"") + MESSAGE[len(HEAD) :]


async def test_inline_body() -> None:
    body, dropped = await rewrite(InlineBody(MESSAGE), b"New: 1\r\n", drop_x)
    assert isinstance(body, InlineBody) and dropped == 1 and body.data.startswith(b"New: 1\r\nReceived:")


async def test_spooled_body_is_rewritten_through_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "Q1"
    tail = b"x" * 100 + b"\r\n"
    path.write_bytes(MESSAGE + tail * 30_000)  # 3 MB: copied in chunks
    before = path.stat().st_ino
    body, dropped = await rewrite(SpooledBody(path, path.stat().st_size), b"New: 1\r\n", drop_x)
    assert isinstance(body, SpooledBody) and body.path == path and dropped == 1
    data = path.read_bytes()
    assert (
        body.size
        == len(data)
        == len(MESSAGE) + len(tail) * 30_000 + len(b"New: 1\r\n") - len(b"X-Drop: yes\r\n")
    )
    assert data.startswith(b"New: 1\r\nReceived: from a") and data.endswith(tail)
    assert b"X-Drop: not a header" in data
    assert path.stat().st_ino != before and os.listdir(tmp_path) == ["Q1"]


async def test_spooled_body_left_alone_when_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "Q2"
    path.write_bytes(MESSAGE.replace(b"X-Drop: yes\r\n", b""))
    inode = path.stat().st_ino
    body, dropped = await rewrite(SpooledBody(path, path.stat().st_size), b"", drop_x)
    assert dropped == 0 and path.stat().st_ino == inode and body.size == path.stat().st_size


async def test_spooled_body_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "Q3"
    path.write_bytes(MESSAGE)

    def explode(field: bytes) -> bool:
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        await rewrite(
            SpooledBody(path, len(MESSAGE)), b"New: 1\r\n", FieldFilter(frozenset({b"x-drop"}), explode)
        )
    assert path.read_bytes() == MESSAGE and os.listdir(tmp_path) == ["Q3"]


def test_a_filter_looks_only_at_the_fields_it_names() -> None:
    """The predicate sees only fields with one of the filter's names; a header section that does
    not mention them is returned as it is, without being split (and the message not copied)."""
    seen: list[bytes] = []

    def record(field: bytes) -> bool:
        seen.append(field)
        return True

    out, dropped = rewrite_bytes(MESSAGE, b"", FieldFilter(frozenset({b"subject"}), record))
    assert (
        dropped == 1
        and seen == [b"Subject: hello\r\n  folded\r\n"]
        and b"Subject" not in out.split(b"\r\n\r\n")[0]
    )
    seen.clear()
    out, dropped = rewrite_bytes(MESSAGE, b"", FieldFilter(frozenset({b"x-missing"}), record))
    assert dropped == 0 and not seen and out is MESSAGE


def test_a_name_is_matched_whatever_its_case_and_spacing() -> None:
    message = b"AUTHENTICATION-RESULTS : x; none\r\nSubject: s\r\n\r\nbody\r\n"
    out, dropped = rewrite_bytes(
        message, b"", FieldFilter(frozenset({b"authentication-results"}), lambda f: True)
    )
    assert dropped == 1 and out == b"Subject: s\r\n\r\nbody\r\n"
