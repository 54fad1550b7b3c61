"""The byte stream under an outbound SMTP/LMTP connection: connect, read with deadlines, STARTTLS.

Owns the transport of `outbound.OutboundConnection`: a small asyncio
Protocol (`Wire`) instead of asyncio streams, for two reasons: a STARTTLS
upgrade must drop any plaintext received after the 220 and not yet parsed
(RFC 3207 §4.2, the client side of CVE-2011-0411), which StreamReader keeps
in a private buffer; and every read carries its own deadline as one timer
handle (no task per `wait_for`), which matters at a thousand messages a second.

Also owns the client SSLContexts, built once per (verify, CA file) and cached
for the life of the process: building one costs milliseconds (loading the
system CA store), reusing one costs nothing.

Invariants: at most `READ_HIGH_WATER` unread octets are buffered (beyond that
reading pauses until the owner reads); reads and drains never wait past their
deadline (they raise TimeoutError); nothing here raises anything but OSError
(incl. ssl.SSLError) and TimeoutError. Called only by outbound.py, on the
event loop's thread.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from pathlib import Path
from typing import cast

__all__ = ["READ_HIGH_WATER", "Wire", "client_context", "describe_tls"]

READ_HIGH_WATER = 1024 * 1024  # unread octets buffered before reading pauses


@functools.lru_cache(maxsize=16)
def client_context(verify: bool, ca_file: Path | None = None) -> ssl.SSLContext:
    """The SSLContext for STARTTLS; cached per (verify, ca_file), so built once per policy.

    Unverified (TLS policy "may"/"require", Postfix's smtp_tls_security_level=may/encrypt):
    opportunistic encryption against passive eavesdroppers; any certificate is accepted.
    Verified ("verify"): the chain must lead to the system CAs (or `ca_file`) and the
    certificate must name the next-hop host (RFC 6125 via ssl.match_hostname rules).
    """
    if verify:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def describe_tls(transport: asyncio.BaseTransport) -> str:
    """ "TLSv1.3 TLS_AES_256_GCM_SHA384", or "" for plaintext."""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return ""
    version = obj.version() or ""
    cipher = obj.cipher()
    return f"{version} {cipher[0]}" if cipher else version


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Wire(asyncio.Protocol):
    """One connection's bytes: `write`, `read(deadline)`, `drain(deadline)`, `start_tls`, `close`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._eof = False  # no more data will come (EOF or connection lost)
        self._lost = False  # the transport is gone
        self._error: BaseException | None = None
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None  # read() or drain() waiting
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._error = exc
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the owner's side ------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        return self._lost

    def has_input(self) -> bool:
        """Unread data, or the peer has closed: an idle connection that is no longer idle."""
        return bool(self._chunks) or self._eof

    def write(self, data: bytes) -> None:
        if self._lost or self.transport is None:
            raise ConnectionResetError("connection lost")
        self.transport.write(data)

    async def _wait(self, deadline: float) -> None:
        fut = self._loop.create_future()
        self._waiter = fut
        timer = self._loop.call_at(deadline, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    async def read(self, deadline: float) -> bytes:
        """What has arrived (at least one octet), or b"" at EOF; TimeoutError at `deadline`."""
        while not self._chunks:
            if self._eof:
                return b""
            await self._wait(deadline)
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def drain(self, deadline: float) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        while self._write_paused:
            if self._lost:
                break
            await self._wait(deadline)
        if self._lost:
            raise ConnectionResetError(str(self._error) if self._error else "connection lost")

    async def start_tls(self, ctx: ssl.SSLContext, server_hostname: str | None, timeout: float) -> str:
        """RFC 3207: the TLS handshake on this connection; returns `describe_tls` of the session.

        Whatever plaintext arrived after the 220 and was not yet read is dropped
        first (RFC 3207 §4.2): only bytes from inside TLS are read after this.
        """
        if self.transport is None or self._lost:
            raise ConnectionResetError("connection lost before the TLS handshake")
        self._chunks.clear()
        self._buffered = 0
        new = await self._loop.start_tls(
            self.transport, self, ctx, server_hostname=server_hostname, ssl_handshake_timeout=timeout
        )
        if new is None:  # pragma: no cover - only when the loop is closing
            raise ConnectionResetError("connection lost during the TLS handshake")
        self.transport = new
        return describe_tls(new)

    def close(self) -> None:
        """Flush what is buffered, then close; never raises."""
        if self.transport is not None and not self._lost:
            try:
                self.transport.close()
            except Exception:
                self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self._lost:
            try:
                self.transport.abort()
            except Exception:
                pass
