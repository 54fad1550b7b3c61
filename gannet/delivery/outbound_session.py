"""The session half of an outbound SMTP/LMTP connection: everything but the transactions.

Owns `OutboundSession`, the base of `outbound.OutboundConnection`: connect
(TCP or unix socket), the greeting, EHLO (HELO when EHLO gets a 5xx; LHLO for
LMTP), STARTTLS by `TlsPolicy`, AUTH PLAIN/LOGIN, QUIT; the loop that reads
one reply at a time through the sans-IO `gannet.smtp.ClientConnection`; and
how every failure becomes a `SessionFailure` with an enhanced status code.
Also `OutboundOptions` and `SessionFailure`, re-exported by outbound.py (the
module callers import).

Decisions (RFC sections at the code):
- Timeouts (RFC 5321 §4.5.3.2): connect_timeout for the TCP connect;
  command_timeout for the greeting (§4.5.3.2.1 gives it the same 5 minutes as
  a command) and every command reply. Each is a deadline for one whole reply,
  not an idle timer: a server dribbling one octet a minute cannot hold on.
- Every failure here is temporary and says try_next_hop: a 5xx greeting or
  EHLO+HELO refusal is treated like Postfix's smtp_skip_5xx_greeting, an AUTH
  refusal like smtp_sasl_auth_soft_bounce. A refused greeting/EHLO gets a
  polite QUIT (bounded by QUIT_TIMEOUT) before the socket closes.
- TLS "may": STARTTLS when offered, certificate not checked; a refused
  STARTTLS goes on in plaintext, a failed handshake reconnects once in
  plaintext (logged). "require": not offered → 4.7.4, refused or failed →
  4.7.5. "verify": chain (system CAs or tls_ca_file) and hop host name
  checked → 4.7.5 when not. SNI is the hop host.
- AUTH only over TLS or to a loopback address / unix socket; PLAIN when
  offered (through the core), else LOGIN (three raw exchanges beside the core,
  which speaks PLAIN only); anything else → 4.7.0.

Invariants: nothing but SessionFailure (or CancelledError, after aborting the
socket) leaves `open`/`open_unix`; after a failure `usable` is False and the
socket is closed; close() never raises.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from gannet.config import TlsPolicy
from gannet.delivery.outbound_wire import Wire, client_context
from gannet.smtp import (
    PAUSED,
    Capabilities,
    ClientConnection,
    ClientOptions,
    ClientState,
    ConnectionClosed,
    Credentials,
    Ehlo,
    Event,
    Helo,
    LocalProtocolError,
    Quit,
    RemoteProtocolError,
    Reply,
    StartTls,
)
from gannet.smtp.client import parse_reply_line

__all__ = ["QUIT_TIMEOUT", "OutboundOptions", "OutboundSession", "SessionFailure"]

log = logging.getLogger("gannet.delivery.outbound")

QUIT_TIMEOUT = 5.0  # the wait for the reply to QUIT, at most
_NO_CAPABILITIES = Capabilities()
_QUIT_STATES = frozenset({ClientState.READY, ClientState.GREETED, ClientState.MAIL, ClientState.RCPT})
_DURING = {"banner": "while receiving the initial server greeting"}
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # RFC 3463 §2


@dataclass(frozen=True, slots=True)
class OutboundOptions:
    helo_name: str
    tls: TlsPolicy = TlsPolicy.MAY
    tls_ca_file: Path | None = None
    auth: tuple[str, str] | None = None  # (username, password) for AUTH PLAIN/LOGIN
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    lmtp: bool = False


class SessionFailure(Exception):
    """The session (not one recipient) failed; `reason` starts with an enhanced status code."""

    def __init__(
        self,
        reason: str,
        *,
        stage: str,
        temporary: bool = True,
        reply: Reply | None = None,
        try_next_hop: bool = True,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.temporary = temporary
        self.reply = reply
        self.try_next_hop = try_next_hop


class ConnectionLost(Exception):
    """The server closed the connection while a reply was awaited."""


class BodyReadError(Exception):
    """The spooled body could not be read."""


class _TlsFallback(Exception):
    """TLS "may": the handshake failed; reconnect once in plaintext."""


def temporary_status(reply: Reply, default: str = "4.0.0") -> str:
    """The reply's enhanced code as a temporary one (the session is retried, not bounced)."""
    return "4" + reply.enhanced[1:] if reply.enhanced else default


def reply_text(reply: Reply) -> str:
    return " ".join(filter(None, (str(reply.code), reply.enhanced, " ".join(reply.text))))


def _reply_with_enhanced(code: int, lines: list[str]) -> Reply:
    """A Reply from raw lines, the RFC 2034 enhanced code split off as the core does it."""
    first = lines[0].split(" ", 1)[0]
    if _ENHANCED.fullmatch(first) and first[0] == str(code)[0]:
        cut = len(first) + 1
        return Reply(code, first, *(t[cut:] if t.split(" ", 1)[0] == first else t for t in lines))
    return Reply(code, "", *lines)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


class OutboundSession:
    """One open SMTP/LMTP session to a next hop, before and between transactions."""

    def __init__(
        self, wire: Wire, options: OutboundOptions, hop_host: str, label: str, loopback: bool
    ) -> None:
        self._wire = wire
        self._core = ClientConnection(ClientOptions(options.helo_name, lmtp=options.lmtp))
        self._loop = asyncio.get_running_loop()
        self.options = options
        self.hop_host = hop_host
        self.label = label
        self.tls = ""  # "TLSv1.3 TLS_AES_256_GCM_SHA384" after STARTTLS
        self.usable = True
        self._loopback = loopback
        self._stage = "connect"
        self._during: str | None = None
        self._closing_reply: Reply | None = None  # a 421: the answer to everything after it
        self._body_sent = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} tls={self.tls!r} usable={self.usable}>"

    @property
    def host(self) -> str:
        """The next-hop host name (the DSN's Remote-MTA); "localhost" for a unix socket."""
        return self.hop_host

    @property
    def capabilities(self) -> Capabilities:
        return self._core.capabilities or _NO_CAPABILITIES

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        hop_host: str,
        address: str,
        port: int,
        options: OutboundOptions,
    ) -> Self:
        """Connect to address:port (SNI and "verify" use hop_host) and get ready to send."""
        loop = asyncio.get_running_loop()

        async def connect() -> tuple[asyncio.BaseTransport, Wire]:
            return await loop.create_connection(lambda: Wire(loop), address, port)

        label = f"{hop_host}[{address}]:{port}"
        return await cls._open(connect, hop_host, label, _is_loopback(address), options)

    @classmethod
    async def open_unix(cls, path: str | Path, options: OutboundOptions) -> Self:
        """Connect to a unix-domain socket ("unix:/path" LMTP destinations)."""
        loop = asyncio.get_running_loop()

        async def connect() -> tuple[asyncio.BaseTransport, Wire]:
            return await loop.create_unix_connection(lambda: Wire(loop), str(path))

        return await cls._open(connect, "localhost", f"unix:{path}", True, options)

    @classmethod
    async def _open(
        cls,
        connect: Callable[[], Awaitable[tuple[asyncio.BaseTransport, Wire]]],
        hop_host: str,
        label: str,
        loopback: bool,
        options: OutboundOptions,
    ) -> Self:
        conn = await cls._connect(connect, hop_host, label, loopback, options)
        try:
            await conn._setup(options.tls)
            return conn
        except _TlsFallback as exc:
            log.warning("%s: TLS handshake failed (%s); trying once more without TLS", label, exc)
        conn = await cls._connect(connect, hop_host, label, loopback, options)
        await conn._setup(TlsPolicy.NONE)
        return conn

    @classmethod
    async def _connect(
        cls,
        connect: Callable[[], Awaitable[tuple[asyncio.BaseTransport, Wire]]],
        hop_host: str,
        label: str,
        loopback: bool,
        options: OutboundOptions,
    ) -> Self:
        try:
            async with asyncio.timeout(options.connect_timeout):
                _, wire = await connect()
        except TimeoutError:
            raise SessionFailure(f"4.4.1 connect to {label}: Connection timed out", stage="connect") from None
        except OSError as exc:
            raise SessionFailure(f"4.4.1 connect to {label}: {strerror(exc)}", stage="connect") from None
        except Exception as exc:  # a malformed address or port: still the session's failure, not a crash
            log.exception("%s: cannot connect", label)
            raise SessionFailure(f"4.4.1 connect to {label}: {exc}", stage="connect") from None
        return cls(wire, options, hop_host.strip("[]"), label, loopback)

    async def _setup(self, policy: TlsPolicy) -> None:
        try:
            await self._greeting()
            await self._hello()
            if policy is not TlsPolicy.NONE:
                await self._starttls(policy)
            if self.options.auth is not None:
                await self._authenticate(*self.options.auth)
        except (SessionFailure, _TlsFallback, asyncio.CancelledError):
            self._abort()
            raise
        except Exception as exc:
            raise self._convert(exc) from None

    async def _greeting(self) -> None:
        self._stage = "banner"
        reply = await self._read_reply(self.options.command_timeout)  # RFC 5321 §4.5.3.2.1
        if not reply.is_positive:  # RFC 5321 §3.1 554; like Postfix's smtp_skip_5xx_greeting: next hop
            raise await self._refusal(reply, "refused to talk to me")

    async def _hello(self) -> None:
        """EHLO, or HELO when EHLO gets a 5xx (RFC 5321 §3.2); LHLO for LMTP (RFC 2033 §4.1)."""
        reply = await self._command(Ehlo(self.options.helo_name), "LHLO" if self.options.lmtp else "EHLO")
        if reply.is_positive:
            return
        if reply.code == 421 or self.options.lmtp or not reply.is_permanent:
            raise await self._refusal(reply)
        reply = await self._command(Helo(self.options.helo_name), "HELO")
        if not reply.is_positive:
            raise await self._refusal(reply)

    async def _starttls(self, policy: TlsPolicy) -> None:
        """RFC 3207: STARTTLS, the handshake (SNI = hop host), and EHLO again (§4.2)."""
        if not self.capabilities.starttls:
            if policy is TlsPolicy.MAY:
                return
            raise self._failure(
                "STARTTLS", f"4.7.4 TLS is required, but was not offered by host {self.label}"
            )
        try:
            ctx = client_context(policy is TlsPolicy.VERIFY, self.options.tls_ca_file)
        except (OSError, ValueError) as exc:
            raise self._failure(
                "STARTTLS", f"4.7.5 cannot load the CA file {self.options.tls_ca_file}: {exc}"
            ) from None
        reply = await self._command(StartTls(), "STARTTLS")
        if reply.code == 421:
            raise await self._refusal(reply)
        if not reply.is_positive:
            if policy is TlsPolicy.MAY:
                log.info("%s refused STARTTLS (%s); going on without TLS", self.label, reply_text(reply))
                return
            raise self._failure(
                "STARTTLS",
                f"4.7.5 TLS is required, but host {self.label} refused to start TLS: {reply_text(reply)}",
                reply=reply,
            )
        try:
            self.tls = await self._wire.start_tls(ctx, self.hop_host or None, self.options.command_timeout)
        except (OSError, TimeoutError, EOFError) as exc:
            detail = getattr(exc, "verify_message", "") or str(exc) or type(exc).__name__
            if policy is TlsPolicy.MAY:
                raise _TlsFallback(detail) from None
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"4.7.5 Server certificate not verified for {self.hop_host}: {detail}"
            else:
                reason = f"4.7.5 Cannot start TLS: handshake failure with {self.label}: {detail}"
            raise self._failure("STARTTLS", reason) from None
        self._core.start_tls()
        reply = await self._command(Ehlo(self.options.helo_name), "LHLO" if self.options.lmtp else "EHLO")
        if not reply.is_positive:
            raise await self._refusal(reply)

    async def _authenticate(self, username: str, password: str) -> None:
        """RFC 4954: AUTH PLAIN (RFC 4616) or LOGIN; credentials only over TLS or to loopback."""
        if not (self._core.tls or self._loopback):
            raise self._failure("AUTH", f"4.7.0 not sending credentials to {self.label} without TLS")
        offered = self.capabilities.auth
        if "PLAIN" in offered:
            reply = await self._command(Credentials("PLAIN", "", username, password), "AUTH")
        elif "LOGIN" in offered:
            reply = await self._auth_login(username, password)
        else:
            have = " ".join(sorted(offered)) or "none"
            raise self._failure(
                "AUTH",
                f"4.7.0 SASL authentication failed: server {self.label} offered no "
                f"compatible mechanism (PLAIN, LOGIN); it offered: {have}",
            )
        if reply.code != 235:
            status = temporary_status(reply, "4.7.0")
            raise self._failure(
                "AUTH",
                f"{status} SASL authentication failed; server {self.label} said: {reply_text(reply)}",
                reply=reply,
            )

    async def _auth_login(self, username: str, password: str) -> Reply:
        """AUTH LOGIN, beside the core (it speaks PLAIN only): three raw exchanges, 334 between."""
        self._stage = "AUTH"
        raw = bytearray()
        self._wire.write(b"AUTH LOGIN\r\n")
        reply = await self._raw_reply(raw)
        for secret in (username, password):
            if reply.code != 334:
                break
            self._wire.write(base64.b64encode(secret.encode()) + b"\r\n")
            reply = await self._raw_reply(raw)
        if raw:
            self._core.receive_data(bytes(raw))  # unsolicited: the core will object
        return reply

    async def _raw_reply(self, raw: bytearray) -> Reply:
        deadline = self._loop.time() + self.options.command_timeout
        lines: list[str] = []
        code = 0
        while True:
            end = raw.find(b"\n")
            if end < 0:
                if len(raw) > 4096:
                    raise RemoteProtocolError("reply line too long")
                data = await self._wire.read(deadline)
                if not data:
                    raise ConnectionLost()
                raw += data
                continue
            line = bytes(raw[:end]).removesuffix(b"\r")
            del raw[: end + 1]
            line_code, more, text = parse_reply_line(line)
            if lines and line_code != code:
                raise RemoteProtocolError("reply code changed inside a multi-line reply")
            code = line_code
            lines.append(text)
            if not more:
                return _reply_with_enhanced(code, lines)
            if len(lines) > 256:
                raise RemoteProtocolError("multi-line reply too long")

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """QUIT (waiting QUIT_TIMEOUT at most) and close; never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.usable and not self._wire.lost and self._core.state in _QUIT_STATES:
                self._wire.write(self._core.send(Quit()))
                await self._read_reply(min(QUIT_TIMEOUT, self.options.command_timeout))
        except asyncio.CancelledError:
            self._wire.abort()
            raise
        except Exception:
            pass
        finally:
            self.usable = False
            self._wire.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the loop ----------------------------------------------------------------------------

    def _send(self, command: Event) -> None:
        if self._closing_reply is None:  # after a 421 nothing more is sent
            self._wire.write(self._core.send(command))

    async def _command(self, command: Event, stage: str) -> Reply:
        self._stage, self._during = stage, None
        self._wire.write(self._core.send(command))
        return await self._read_reply(self.options.command_timeout)

    async def _next(self, stage: str, timeout: float) -> Reply:
        """The reply to the oldest outstanding command; after a 421, that 421 again."""
        if self._closing_reply is not None:
            return self._closing_reply
        self._stage, self._during = stage, None
        reply = await self._read_reply(timeout)
        if reply.code == 421:  # RFC 5321 §3.8: the server is closing the connection
            self._closing_reply = reply
            self.usable = False
        return reply

    async def _read_reply(self, timeout: float) -> Reply:
        core = self._core
        deadline = 0.0
        while True:
            ev = core.next_event()
            if isinstance(ev, Reply):
                return ev
            if isinstance(ev, ConnectionClosed):
                raise ConnectionLost()
            if ev is PAUSED:
                raise LocalProtocolError("waiting for a reply with no command outstanding")
            if not deadline:
                deadline = self._loop.time() + timeout
            core.receive_data(await self._wire.read(deadline))

    # -- failing -----------------------------------------------------------------------------

    def _abort(self) -> None:
        self.usable = False
        self._wire.abort()

    def _failure(self, stage: str, reason: str, reply: Reply | None = None) -> SessionFailure:
        self._abort()
        return SessionFailure(reason, stage=stage, reply=reply, try_next_hop=True)

    async def _refusal(self, reply: Reply, said: str = "said") -> SessionFailure:
        """A refused greeting/EHLO/STARTTLS: QUIT politely, fail over to the next hop."""
        stage = self._stage
        await self.close()
        self._abort()
        tail = "" if stage == "banner" else f" (in reply to {stage} command)"
        reason = f"{temporary_status(reply)} host {self.label} {said}: {reply_text(reply)}{tail}"
        return SessionFailure(reason, stage=stage, reply=reply, try_next_hop=True)

    def _convert(self, exc: Exception) -> SessionFailure:
        """Any exception from the network, the peer or a bug → a temporary SessionFailure."""
        during = self._during or _DURING.get(self._stage, f"after {self._stage}")
        if isinstance(exc, TimeoutError):
            reason = f"4.4.2 conversation with {self.label} timed out {during}"
        elif isinstance(exc, RemoteProtocolError):
            reason = f"4.5.0 protocol error from {self.label} {during}: {exc.reason}"
        elif isinstance(exc, BodyReadError):
            reason = f"4.3.0 cannot read the message body: {exc}"
        elif isinstance(exc, OSError | ConnectionLost):
            reason = f"4.4.2 lost connection with {self.label} {during}"
        else:
            log.exception("%s: unexpected error %s", self.label, during)
            reason = f"4.3.0 local error talking to {self.label} {during}: {type(exc).__name__}"
        self._abort()
        return SessionFailure(reason, stage=self._stage, try_next_hop=not self._body_sent)
