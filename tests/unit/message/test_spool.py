"""The body spool: small bodies inline, large ones streamed to an fsync'd file."""

from __future__ import annotations

from pathlib import Path

from gannet.message.headers import HeaderFacts
from gannet.message.spool import BodySpool
from gannet.queue.model import InlineBody, SpooledBody


def prefix(facts: HeaderFacts) -> bytes:
    return b"Received: test\r\n" + (b"" if facts.has_message_id else b"Message-ID: <added@x>\r\n")


async def test_small_body_stays_inline_with_prefix(tmp_path: Path) -> None:
    spool = BodySpool(tmp_path, "Q1", 1024, prefix)
    spool.write(b"Subject: hi\r\n\r\n")
    spool.write(b"hello\r\n")
    body = await spool.finish()
    assert isinstance(body, InlineBody)
    assert body.data == b"Received: test\r\nMessage-ID: <added@x>\r\nSubject: hi\r\n\r\nhello\r\n"
    assert not list(tmp_path.iterdir())


async def test_large_body_goes_to_a_file_and_memory_stays_small(tmp_path: Path) -> None:
    spool = BodySpool(tmp_path, "Q2", 1024, prefix)
    spool.write(b"Message-ID: <m@x>\r\n\r\n")
    chunk = b"x" * 998 + b"\r\n"
    for _ in range(2000):
        spool.write(chunk)
        assert len(spool._buf) <= 1024 + len(chunk)
    body = await spool.finish()
    assert isinstance(body, SpooledBody)
    data = body.path.read_bytes()
    assert data.startswith(b"Received: test\r\nMessage-ID: <m@x>\r\n\r\n")
    assert len(data) == body.size == len(b"Received: test\r\n") + spool.size


async def test_discard_removes_the_file(tmp_path: Path) -> None:
    spool = BodySpool(tmp_path, "Q3", 10, prefix)
    spool.write(b"y" * 100)
    assert (tmp_path / "Q3").exists()
    spool.discard()
    assert not (tmp_path / "Q3").exists()
