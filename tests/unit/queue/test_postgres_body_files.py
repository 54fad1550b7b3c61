"""postgres_body_files.BodyFiles without a database: rows in, a whole file out
or none; copies untouched for KEEP_SECONDS are removed, at most every
PRUNE_EVERY; a failed write leaves nothing behind."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from gannet.clock import FakeClock
from gannet.queue.postgres_body_files import KEEP_SECONDS, PRUNE_EVERY, BodyFiles


async def rows(*chunks: bytes) -> AsyncGenerator[bytes, None]:
    for chunk in chunks:
        yield chunk


async def test_rows_become_one_file_reused_until_forgotten(tmp_path: Path) -> None:
    files = BodyFiles(tmp_path / "delivery")
    path, size = await files.copy("Q1", 6, rows(b"abc", b"def"))
    assert path == tmp_path / "delivery" / "Q1" and size == 6 and path.read_bytes() == b"abcdef"
    assert await files.copy("Q1", 6, rows()) == (path, 6)  # the copy, not the rows again
    await files.forget(["Q1", "NOTHERE"])
    assert list((tmp_path / "delivery").iterdir()) == []


async def test_rows_that_do_not_add_up_give_no_file(tmp_path: Path) -> None:
    files = BodyFiles(tmp_path)
    assert await files.copy("Q1", 10, rows(b"abc")) == (None, 3)
    assert list(tmp_path.iterdir()) == []


async def test_a_failing_row_source_leaves_no_temporary_file(tmp_path: Path) -> None:
    async def broken() -> AsyncGenerator[bytes, None]:
        yield b"abc"
        raise RuntimeError("database went away")

    files = BodyFiles(tmp_path)
    with pytest.raises(RuntimeError):
        await files.copy("Q1", 6, broken())
    assert list(tmp_path.iterdir()) == []


async def test_the_rows_are_closed_when_writing_fails(tmp_path: Path) -> None:
    closed = []

    async def tracked() -> AsyncGenerator[bytes, None]:
        try:
            yield b"abc"
            yield "not bytes: the write fails"  # type: ignore[misc]
            yield b"ghi"
        finally:
            closed.append(True)  # (a query still streaming would end here)

    files = BodyFiles(tmp_path)
    with pytest.raises(TypeError):
        await files.copy("Q1", 9, tracked())
    assert closed == [True]
    assert list(tmp_path.iterdir()) == []


async def test_copies_untouched_for_keep_seconds_are_removed(tmp_path: Path) -> None:
    clock = FakeClock()
    files = BodyFiles(tmp_path, monotonic=clock.monotonic)
    old, _ = await files.copy("OLD", 1, rows(b"o"))
    recent, _ = await files.copy("RECENT", 1, rows(b"r"))  # (no scan: within PRUNE_EVERY)
    assert old is not None and recent is not None
    long_ago = old.stat().st_mtime - KEEP_SECONDS - 10
    os.utime(old, (long_ago, long_ago))
    os.utime(recent, (long_ago, long_ago))
    assert await files.copy("RECENT", 1, rows()) == (recent, 1)  # handed out again: touched
    clock.advance(PRUNE_EVERY + 1)
    await files.copy("NEW", 1, rows(b"n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NEW", "RECENT"]
