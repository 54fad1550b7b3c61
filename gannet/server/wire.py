"""The byte pipe between an asyncio transport and a session task.

Why not asyncio streams: a StreamReader keeps its own buffer across
`start_tls()`, so plaintext pipelined after STARTTLS would be read as if it
had come inside TLS (CVE-2011-0411). Here the only buffer is ours, and
`start_tls()` drops it before the handshake. It is also lighter than streams
on the hot path (no extra buffer copies).

Flow control both ways: reading pauses when more than HIGH_WATER bytes wait
unread (memory per session stays bounded), and `drain()` waits while the
transport's write buffer is full.

While the task is parked in `park()`, bytes go straight to its receiver from
`data_received`, so commands that need no await are answered without waking
the task: a wake-up per command (a future, a timer, the task's step through
its coroutines) was a tenth of the server's CPU (bench/README.md, sessions
23 and 24).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

HIGH_WATER = 256 * 1024


class Wire(asyncio.Protocol):
    __slots__ = (
        "_can_write",
        "_chunks",
        "_eof",
        "_last_input",
        "_pending",
        "_reading_paused",
        "_receiver",
        "_timer",
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
        self._receiver: Callable[[bytes], bool] | None = None
        self._last_input = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol callbacks --------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        receiver = self._receiver
        if receiver is not None:  # the task is parked: its receiver handles the bytes now
            self._last_input = self.loop.time()
            if receiver(data):
                self._receiver = None
                self._wake()
            return
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
        none (TimeoutError then); b"" at EOF. For what comes before the session's
        loop (a PROXY header); the loop itself parks with a receiver."""
        await self.park(None, lambda: timeout, timeout)
        return self.take() or b""

    async def park(
        self, receiver: Callable[[bytes], bool] | None, timeout: Callable[[], float], check_every: float
    ) -> None:
        """Wait while `receiver` takes the bytes that arrive, until it returns True
        (it wants the task), EOF, or no bytes for `timeout()` seconds (TimeoutError).
        With no receiver, the first bytes end the wait (they are kept for `take()`).
        What the receiver does can change `timeout()` (a body waits longer than a
        command), so it is asked again at least every `check_every` seconds.
        Returns at once if bytes or EOF came while the task was busy: `take()` them."""
        if self._chunks or self._eof:
            return
        loop = self.loop
        waiter = self._waiter = loop.create_future()
        self._receiver = receiver
        self._last_input = loop.time()
        self._timer = loop.call_later(
            min(timeout(), check_every), self._check_idle, waiter, timeout, check_every
        )
        try:
            await waiter
        finally:
            self._receiver = None
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _check_idle(
        self, waiter: asyncio.Future[None], timeout: Callable[[], float], check_every: float
    ) -> None:
        left = self._last_input + timeout() - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(
                min(left, check_every), self._check_idle, waiter, timeout, check_every
            )
        else:  # nothing more goes to the receiver: bytes from now on wait for the task
            self._timer = None
            self._receiver = None
            _expire(waiter)

    def take(self) -> bytes | None:
        """The bytes received while the task was busy; b"" at EOF, None if neither."""
        if not self._chunks:
            return b"" if self._eof else None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._pending = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    @property
    def write_blocked(self) -> bool:
        """The transport's buffer is full: the task must `drain()` before writing more."""
        return self._can_write is not None and not self._can_write.done()

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
