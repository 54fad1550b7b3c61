"""The byte pipe between an asyncio transport and a session task.

Why not asyncio streams: a StreamReader keeps its own buffer across
`start_tls()`, so plaintext pipelined after STARTTLS would be read as if it
had come inside TLS (CVE-2011-0411). Here the only buffer is ours, and
`start_tls()` drops it before the handshake. It is also lighter than streams
on the hot path (no extra buffer copies).

Flow control both ways: reading pauses when more than HIGH_WATER bytes wait
unread (memory per session stays bounded), and `drain()` waits while the
transport's write buffer is full.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import cast

HIGH_WATER = 256 * 1024


class Wire(asyncio.Protocol):
    __slots__ = (
        "_can_write",
        "_chunks",
        "_eof",
        "_pending",
        "_reading_paused",
        "_waiter",
        "loop",
        "transport",
    )

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._can_write: asyncio.Future[None] | None = None

    # -- asyncio.Protocol callbacks --------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._pending += len(data)
        if self._pending > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too: SMTP has no half-closed use

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- for the session -------------------------------------------------------
    async def read(self, timeout: float) -> bytes:
        """All bytes received so far, waiting up to `timeout` seconds if there are
        none (TimeoutError then); b"" at EOF. One timer handle per wait: cheaper
        than asyncio.timeout() on this path, which runs for every command."""
        while not self._chunks:
            if self._eof:
                return b""
            waiter = self._waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._pending = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            await self._can_write

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Upgrade in place. Everything received before the handshake is dropped."""
        assert self.transport is not None
        self._chunks.clear()
        self._pending = 0
        new = await self.loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if new is None:
            raise ConnectionError("TLS handshake did not complete")
        self.transport = new

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        if self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    def peername(self) -> tuple[str, int]:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(peer[0]), int(peer[1])
        return "", 0

    def sockname(self) -> tuple[str, int]:
        name = self.transport.get_extra_info("sockname") if self.transport else None
        if isinstance(name, tuple) and len(name) >= 2:
            return str(name[0]), int(name[1])
        return "", 0

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
