"""Large bodies copied out of PostgreSQL into files, so that delivery streams them.

Why: the PostgreSQL store keeps every body in the database (`bodies` rows of
CHUNK bytes), while delivery streams a large body from a file
(`QueueStore.body_file`) and would otherwise get it whole in memory from
`read_body`: a 50 MiB message, 50 MiB (twice, while the rows are joined) in
the delivery worker. This copies the rows one at a time into a file under
the node's spool directory and hands out that file.

The files are a cache, not the queue: the database stays the truth, a file
is written under a temporary name and renamed into place only when whole
(so a reader never sees a partial one; two processes filling the same one
both end with the same content), and not fsync'd: the serving process's
crash recovery clears the spool directory at open. A file goes when its
message completes or is deleted on this node; one whose message finished on
another node is removed once untouched for KEEP_SECONDS (each hand-out
touches it).

Never: write to the database, or block the event loop on the disk (file
work runs in the default executor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import IO

from gannet.queue.model import QueueError

log = logging.getLogger("gannet.queue")

KEEP_SECONDS = 3600.0  # an untouched copy is removed after this (its message finished elsewhere)
PRUNE_EVERY = 60.0  # look for such copies at most this often


class BodyFiles:
    """Copies of large bodies in `directory` (created on first use)."""

    def __init__(self, directory: Path, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._monotonic = monotonic
        self._pruned_at: float | None = None

    async def copy(
        self, queue_id: str, size: int, rows: AsyncGenerator[bytes, None]
    ) -> tuple[Path | None, int]:
        """The file holding `queue_id`'s body of `size` bytes: the copy already
        made, or a new one written from `rows` (its bodies rows in order).
        Returns (the file, size) or, when the rows do not add up to `size`,
        (None, the bytes found): the caller decides what that means. `rows`
        is closed however this ends (its query must not outlive the call)."""
        async with contextlib.aclosing(rows):
            return await self._copy(queue_id, size, rows)

    async def _copy(
        self, queue_id: str, size: int, rows: AsyncGenerator[bytes, None]
    ) -> tuple[Path | None, int]:
        loop = asyncio.get_running_loop()
        path = self.directory / queue_id
        if await loop.run_in_executor(None, _reuse, path, size):
            return path, size
        await self._prune(loop)
        temporary = self.directory / f".{queue_id}.{secrets.token_hex(4)}"
        try:
            f = await loop.run_in_executor(None, _create, temporary)
            try:
                written = 0
                async for row in rows:
                    await loop.run_in_executor(None, f.write, row)
                    written += len(row)
            finally:
                await loop.run_in_executor(None, f.close)
            if written == size:
                await loop.run_in_executor(None, os.replace, temporary, path)
                return path, size
        except BaseException as exc:
            temporary.unlink(missing_ok=True)  # on the loop: one unlink, on a failure path only
            if isinstance(exc, OSError):
                raise QueueError(f"{queue_id}: cannot write a copy of the body for delivery: {exc}") from exc
            raise
        await loop.run_in_executor(None, partial(temporary.unlink, missing_ok=True))
        return None, written

    async def forget(self, queue_ids: Iterable[str]) -> None:
        """Remove the copies of these messages, if any (they completed or were deleted)."""
        paths = [self.directory / qid for qid in queue_ids]
        if paths:
            await asyncio.get_running_loop().run_in_executor(None, _unlink_all, paths)

    async def _prune(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        before = time.time() - KEEP_SECONDS
        removed = await loop.run_in_executor(None, _remove_untouched, self.directory, before)
        if removed:
            log.info("queue: removed %d delivery copies of bodies untouched for %.0fs", removed, KEEP_SECONDS)


def _reuse(path: Path, size: int) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        os.utime(path)  # in use: not for _remove_untouched
    except FileNotFoundError:
        return False
    return True


def _create(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "xb")


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _remove_untouched(directory: Path, before: float) -> int:
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file() and entry.stat().st_mtime < before:
                os.unlink(entry.path)
                removed += 1
    return removed
