"""The body spool: one message's content, collected as it arrives.

Small messages stay in memory and go into the queue database with the
envelope (one fsync for a whole batch of messages: group commit). A message
that grows past `inline_limit` is moved to a file in the spool directory and
streamed there chunk by chunk, so memory per session stays bounded however
large the message; `finish()` fsyncs that file (off the event loop) before
the store references it. A discarded or unacknowledged spool file is removed
(or, after a crash, by the store's recovery on open).

The header section is prefixed with Gannet's own lines (Received, and on
submission Message-ID/Date when missing) by a `prefix(facts)` callback that
the session supplies: the spool decides *when* the prefix is known (headers
complete, or the content leaves memory), the session decides *what* it is.

Never answers the client and never touches the queue.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gannet.message.headers import HeaderFacts, scan_headers
from gannet.queue.model import Body, InlineBody, SpooledBody

# How much of the start of a message is scanned for header facts. Header
# sections longer than this are rare and only lose the Message-ID/Date check.
HEAD_SCAN_LIMIT = 64 * 1024


class BodySpool:
    __slots__ = (
        "_buf",
        "_facts",
        "_file",
        "_path",
        "_prefix",
        "_prefix_len",
        "_size",
        "inline_limit",
        "spool_dir",
    )

    def __init__(
        self, spool_dir: Path, name: str, inline_limit: int, prefix: Callable[[HeaderFacts], bytes]
    ) -> None:
        self.spool_dir = spool_dir
        self.inline_limit = inline_limit
        self._path = spool_dir / name
        self._prefix = prefix
        self._buf = bytearray()
        self._file: BinaryIO | None = None
        self._facts: HeaderFacts | None = None
        self._size = 0
        self._prefix_len = 0

    @property
    def size(self) -> int:
        """Octets of content received so far (without Gannet's prefix)."""
        return self._size

    @property
    def facts(self) -> HeaderFacts:
        if self._facts is None:
            self._facts = scan_headers(bytes(self._buf[:HEAD_SCAN_LIMIT]))
        return self._facts

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._buf += data
        if len(self._buf) > self.inline_limit:
            self._move_to_file()

    def _move_to_file(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=256 * 1024)
        prefix = self._prefix(self.facts)
        self._prefix_len = len(prefix)
        self._file.write(prefix)
        self._file.write(self._buf)
        self._buf = bytearray()

    async def finish(self) -> Body:
        """The complete content with its prefix, durable if it is a file."""
        if self._file is None:
            prefix = self._prefix(self.facts)
            return InlineBody(prefix + bytes(self._buf))
        file, self._file = self._file, None
        await asyncio.get_running_loop().run_in_executor(None, _flush_and_close, file)
        return SpooledBody(self._path, self._prefix_len + self._size)

    def discard(self) -> None:
        """Drop everything (refused message, or the session ended mid-DATA)."""
        self._buf = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._prefix_len:  # a file was created (even if finish() failed on it)
            try:
                os.unlink(self._path)
            except OSError:
                pass


def _flush_and_close(file: BinaryIO) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
    finally:
        file.close()
