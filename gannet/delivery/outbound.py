"""Outbound SMTP and LMTP: one connection to a next hop, and the messages sent over it.

Owns the client side of a session, driving the sans-IO `gannet.smtp.ClientConnection`
over a `Wire` (outbound_wire.py): connect, greeting, EHLO (HELO when EHLO is
refused with 5xx; LHLO for LMTP), STARTTLS by `TlsPolicy`, AUTH PLAIN/LOGIN,
then transactions with per-recipient results, RSET between messages, QUIT.
The scheduler (delivery/remote.py) owns routing, retries, the queue and the
connection cache; this module only talks.

    conn = await OutboundConnection.open(hop_host, address, port, options)  # or open_unix(path, options)
    results = await conn.send_message(envelope, body)   # one RecipientResult per recipient, in order
    if await conn.reset(): ...                           # reuse for the next message
    await conn.close()                                   # QUIT; never raises

Decisions (RFC sections at the code):
- Timeouts (RFC 5321 §4.5.3.2): connect_timeout for the TCP connect;
  command_timeout for the greeting (§4.5.3.2.1 gives it the same 5 minutes as
  a command), every command reply and each 1 MiB piece of the body to drain;
  data_timeout for the reply to the end of the content (§4.5.3.2.6). Each is a
  deadline for one whole reply, not an idle timer, so a server dribbling one
  octet a minute cannot hold a connection for ever.
- Failures before a transaction (connect, banner, EHLO/HELO, STARTTLS, AUTH)
  raise SessionFailure, always temporary and with try_next_hop: a 5xx greeting
  is treated as 4xx like Postfix's smtp_skip_5xx_greeting, AUTH failures soft
  bounce like smtp_sasl_auth_soft_bounce. A 421 anywhere makes the connection
  unusable; inside a transaction it answers every recipient not yet answered.
- TLS "may": STARTTLS when offered, certificate not checked; a refused
  STARTTLS goes on in plaintext, a failed handshake reconnects once in
  plaintext (logged). "require": not offered or failed → 4.7.4/4.7.5.
  "verify": chain and hop host name checked (system CAs or tls_ca_file).
- Results decided here, not by the server, have stage LOCAL_STAGE (""): the
  size limit (552 5.3.4, RFC 1870 §6), SMTPUTF8 not offered (550 5.6.7,
  RFC 6531 §3.2), an unreadable body file (451 4.3.0).
- 8-bit content to a server without 8BITMIME is downgraded by
  gannet.message.eightbit (RFC 6152 §3); when that is impossible it is sent as
  it is, as Postfix does. A spooled body is read into memory for this only.
- BDAT (RFC 3030) is used for SMTP when CHUNKING is offered: with PIPELINING a
  body up to EARLY_BDAT_LIMIT goes out in the same write as MAIL and RCPT, one
  round trip per message; larger bodies go in 1 MiB chunks once a recipient
  was accepted, each chunk answered before the next. LMTP always uses DATA.
- reset() with PIPELINING checks that the idle connection is still quiet and
  open, and pipelines the RSET in front of the next MAIL FROM (RFC 2920 §3.1)
  instead of spending a round trip; without PIPELINING it is a plain RSET.

Invariants: open() and send_message() raise nothing but SessionFailure (and
CancelledError, after aborting the connection); a SessionFailure or a 421
leaves `usable` False and the socket closed; close() never raises; the body
file is never read whole except for the 8-bit downgrade.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gannet.config import TlsPolicy
from gannet.delivery.outbound_wire import Wire, client_context
from gannet.message.eightbit import CannotDowngrade, downgrade
from gannet.smtp import (
    PAUSED,
    BodyType,
    Capabilities,
    ClientConnection,
    ClientOptions,
    ClientState,
    ConnectionClosed,
    Credentials,
    Data,
    Ehlo,
    Event,
    Helo,
    LocalProtocolError,
    MailFrom,
    Notify,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Ret,
    Rset,
    StartTls,
)
from gannet.smtp.client import parse_reply_line

__all__ = [
    "EARLY_BDAT_LIMIT",
    "LOCAL_STAGE",
    "PIECE",
    "Envelope",
    "OutboundConnection",
    "OutboundOptions",
    "OutboundRecipient",
    "RecipientResult",
    "SessionFailure",
]

log = logging.getLogger(__name__)

PIECE = 1024 * 1024  # a spooled body is read and sent in pieces of this size
EARLY_BDAT_LIMIT = 64 * 1024  # bodies up to this size are pipelined with the envelope (BDAT LAST)
QUIT_TIMEOUT = 5.0  # the wait for the reply to QUIT, at most
LOCAL_STAGE = ""  # RecipientResult.stage of a result decided here, not replied by the server
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


@dataclass(frozen=True, slots=True)
class OutboundRecipient:
    address: str
    notify: Notify | None = None
    orcpt: str | None = None  # as stored: "rfc822;addr"


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str
    recipients: tuple[OutboundRecipient, ...]
    size: int
    body_8bit: bool = False
    smtputf8: bool = False
    ret: str | None = None  # "FULL" / "HDRS"
    envid: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The reply that decided one recipient, and what it answered: "MAIL FROM", "RCPT TO",
    "DATA", "BDAT", "end of data" — or LOCAL_STAGE ("") when decided here."""

    reply: Reply
    stage: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.reply.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.reply.code < 500

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500


class SessionFailure(Exception):
    """The session (not one recipient) failed; `reason` starts with an enhanced status code."""

    def __init__(self, reason: str, *, stage: str, temporary: bool = True, reply: Reply | None = None,
                 try_next_hop: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.temporary = temporary
        self.reply = reply
        self.try_next_hop = try_next_hop


class _Lost(Exception):
    """The server closed the connection while a reply was awaited."""


class _BodyReadError(Exception):
    """The spooled body could not be read."""


class _TlsFallback(Exception):
    """TLS "may": the handshake failed; reconnect once in plaintext."""


@dataclass(slots=True)
class _Payload:
    data: bytes | None  # the whole body, or
    file: BinaryIO | None  # a spooled body, read in PIECEs
    size: int
    eight_bit: bool


def _status(reply: Reply, default: str = "4.0.0") -> str:
    """The reply's enhanced code as a temporary one (the session is retried, not bounced)."""
    return "4" + reply.enhanced[1:] if reply.enhanced else default


def _text(reply: Reply) -> str:
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


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


def _to_crlf(data: bytes) -> bytes:
    """Bare CR or LF → CRLF (RFC 5321 §2.3.8); BDAT sends content octets as they are."""
    pairs = data.count(b"\r\n")
    if data.count(b"\r") == pairs and data.count(b"\n") == pairs:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _ret(value: str | None) -> Ret | None:
    try:
        return Ret(value.upper()) if value else None
    except ValueError:
        return None


class OutboundConnection:
    """One open SMTP/LMTP session to a next hop; see the module docstring."""

    def __init__(self, wire: Wire, options: OutboundOptions, hop_host: str, label: str,
                 loopback: bool) -> None:
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
        self._rset_pending = False
        self._body_sent = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<OutboundConnection {self.label} tls={self.tls!r} usable={self.usable}>"

    @property
    def host(self) -> str:
        """The next-hop host name (the DSN's Remote-MTA); "localhost" for a unix socket."""
        return self.hop_host

    @property
    def capabilities(self) -> Capabilities:
        return self._core.capabilities or _NO_CAPABILITIES

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def open(cls, hop_host: str, address: str, port: int, options: OutboundOptions,
                   ) -> OutboundConnection:
        """Connect to address:port (SNI and "verify" use hop_host) and get ready to send."""
        loop = asyncio.get_running_loop()

        async def connect() -> tuple[asyncio.BaseTransport, Wire]:
            return await loop.create_connection(lambda: Wire(loop), address, port)

        label = f"{hop_host}[{address}]:{port}"
        return await cls._open(connect, hop_host, label, _is_loopback(address), options)

    @classmethod
    async def open_unix(cls, path: str | Path, options: OutboundOptions) -> OutboundConnection:
        """Connect to a unix-domain socket ("unix:/path" LMTP destinations)."""
        loop = asyncio.get_running_loop()

        async def connect() -> tuple[asyncio.BaseTransport, Wire]:
            return await loop.create_unix_connection(lambda: Wire(loop), str(path))

        return await cls._open(connect, "localhost", f"unix:{path}", True, options)

    @classmethod
    async def _open(cls, connect: Callable[[], Awaitable[tuple[asyncio.BaseTransport, Wire]]],
                    hop_host: str, label: str, loopback: bool, options: OutboundOptions,
                    ) -> OutboundConnection:
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
    async def _connect(cls, connect: Callable[[], Awaitable[tuple[asyncio.BaseTransport, Wire]]],
                       hop_host: str, label: str, loopback: bool, options: OutboundOptions,
                       ) -> OutboundConnection:
        try:
            async with asyncio.timeout(options.connect_timeout):
                _, wire = await connect()
        except TimeoutError:
            raise SessionFailure(f"4.4.1 connect to {label}: Connection timed out", stage="connect") from None
        except OSError as exc:
            raise SessionFailure(f"4.4.1 connect to {label}: {_strerror(exc)}", stage="connect") from None
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
        except (SessionFailure, _TlsFallback):
            self._abort()
            raise
        except asyncio.CancelledError:
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
            raise self._failure("STARTTLS",
                                f"4.7.4 TLS is required, but was not offered by host {self.label}")
        try:
            ctx = client_context(policy is TlsPolicy.VERIFY, self.options.tls_ca_file)
        except (OSError, ValueError) as exc:
            raise self._failure("STARTTLS", f"4.7.5 cannot load the CA file {self.options.tls_ca_file}: "
                                f"{exc}") from None
        reply = await self._command(StartTls(), "STARTTLS")
        if reply.code == 421:
            raise await self._refusal(reply)
        if not reply.is_positive:
            if policy is TlsPolicy.MAY:
                log.info("%s refused STARTTLS (%s); going on without TLS", self.label, _text(reply))
                return
            raise self._failure("STARTTLS", f"4.7.5 TLS is required, but host {self.label} refused to "
                                f"start TLS: {_text(reply)}", reply=reply)
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
            raise self._failure("AUTH", f"4.7.0 SASL authentication failed: server {self.label} offered no "
                                f"compatible mechanism (PLAIN, LOGIN); it offered: {have}")
        if reply.code != 235:
            raise self._failure("AUTH", f"{_status(reply, '4.7.0')} SASL authentication failed; server "
                                f"{self.label} said: {_text(reply)}", reply=reply)

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
                    raise _Lost()
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

    # -- sending ---------------------------------------------------------------------------

    async def send_message(self, envelope: Envelope, body: bytes | Path) -> list[RecipientResult]:
        """One transaction; one RecipientResult per envelope recipient, in order."""
        if not envelope.recipients:
            return []
        if not self.usable or self._closed:
            raise SessionFailure(f"4.4.2 the connection with {self.label} is no longer usable",
                                 stage="MAIL FROM")
        caps = self.capabilities
        utf8 = envelope.smtputf8 or not envelope.sender.isascii() or not all(
            r.address.isascii() for r in envelope.recipients)
        if utf8 and not caps.smtputf8:
            return self._local(envelope, Reply(550, "5.6.7", "SMTPUTF8 is required, but was not offered "
                                               f"by host {self.label}"))
        try:
            payload = await self._payload(envelope, body, caps)
        except OSError as exc:
            log.error("%s: cannot read the message body %s: %s", self.label, body, exc)
            reply = Reply(451, "4.3.0", f"cannot read the message body: {_strerror(exc)}")
            return self._local(envelope, reply)
        try:
            if caps.size and payload.size > caps.size:  # RFC 1870 §6: do not send what will be refused
                return self._local(envelope, Reply(552, "5.3.4", f"message size {payload.size} exceeds size "
                                                   f"limit {caps.size} of server {self.label}"))
            return await self._transaction(envelope, payload, utf8)
        except SessionFailure:
            self._abort()
            raise
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception as exc:
            raise self._convert(exc) from None
        finally:
            if payload.file is not None:
                payload.file.close()
            if self._closing_reply is not None:
                self._abort()  # RFC 5321 §3.8: after 421 the server closes; so do we

    def _local(self, envelope: Envelope, reply: Reply) -> list[RecipientResult]:
        result = RecipientResult(reply, LOCAL_STAGE)
        return [result] * len(envelope.recipients)

    async def _payload(self, envelope: Envelope, body: bytes | Path, caps: Capabilities) -> _Payload:
        eight_bit = envelope.body_8bit
        if eight_bit and not caps.eightbitmime:  # RFC 6152 §3: downgrade, or send as it is
            if isinstance(body, bytes):
                data = body
            else:
                data = await self._loop.run_in_executor(None, body.read_bytes)
            try:
                data, eight_bit = downgrade(data), False
            except CannotDowngrade as exc:
                log.info("%s does not offer 8BITMIME and the message cannot be converted to 7 bit (%s): "
                         "sending it as it is", self.label, exc.reason)
            return _Payload(data, None, len(data), eight_bit)
        if isinstance(body, bytes):
            return _Payload(body, None, len(body), eight_bit)
        return _Payload(None, open(body, "rb"), envelope.size, eight_bit)

    async def _transaction(self, envelope: Envelope, payload: _Payload, utf8: bool) -> list[RecipientResult]:
        core, caps, timeout = self._core, self.capabilities, self.options.command_timeout
        pipelining, chunking = caps.pipelining, caps.chunking and not self.options.lmtp
        self._body_sent = False
        mail = MailFrom(envelope.sender, size=payload.size, smtputf8=utf8, ret=_ret(envelope.ret),
                        envid=envelope.envid,
                        body=BodyType.EIGHT_BIT_MIME if payload.eight_bit else None)  # RFC 6152 §2
        rcpts = [RcptTo(r.address, notify=r.notify, orcpt=r.orcpt) for r in envelope.recipients]
        need_rset = self._rset_pending or core.state is not ClientState.GREETED
        self._rset_pending = False
        early = pipelining and chunking and payload.data is not None and len(payload.data) <= EARLY_BDAT_LIMIT
        data_sent = pipelining and not chunking
        if pipelining:  # RFC 2920 §3.1: RSET, MAIL, every RCPT and DATA (or the BDAT LAST) in one write
            out = [core.send(Rset())] if need_rset else []
            out.append(core.send(mail))
            out += [core.send(rcpt) for rcpt in rcpts]
            if early:
                assert payload.data is not None
                out.append(core.send_chunk(self._bdat_body(payload.data), last=True))
            elif data_sent:
                out.append(core.send(Data()))
            self._wire.write(b"".join(out))
            if need_rset:
                await self._expect_rset()
            mail_reply = await self._next("MAIL FROM", timeout)
            rcpt_replies = [await self._next("RCPT TO", timeout) for _ in rcpts]
        else:
            if need_rset:
                self._send(Rset())
                await self._expect_rset()
            self._send(mail)
            mail_reply = await self._next("MAIL FROM", timeout)
            rcpt_replies = []
            for rcpt in rcpts if mail_reply.is_positive else ():
                self._send(rcpt)
                rcpt_replies.append(await self._next("RCPT TO", timeout))
        if not mail_reply.is_positive:
            results = [RecipientResult(mail_reply, "MAIL FROM")] * len(rcpts)
            await self._abandon(early, data_sent)
            return results
        results = [RecipientResult(reply, "RCPT TO") for reply in rcpt_replies]
        accepted = [i for i, reply in enumerate(rcpt_replies) if reply.is_positive]
        if not accepted:
            await self._abandon(early, data_sent)
            return results
        if self._closing_reply is not None:  # a 421 to a later RCPT: nothing more goes out
            replies, stage = [self._closing_reply], "DATA"
        elif early:
            self._body_sent = True
            replies = [await self._next("end of data", self.options.data_timeout)]
            stage = "end of data"
        elif chunking:
            replies, stage = await self._bdat(payload)
        else:
            replies, stage = await self._data(payload, data_sent, len(accepted))
        for n, i in enumerate(accepted):
            results[i] = RecipientResult(replies[min(n, len(replies) - 1)], stage)
        return results

    async def _expect_rset(self) -> None:
        reply = await self._next("RSET", self.options.command_timeout)
        if not reply.is_positive and reply.code != 421:
            raise self._failure("RSET", f"{_status(reply)} host {self.label} refused RSET: {_text(reply)}",
                                reply=reply)

    async def _abandon(self, early: bool, data_sent: bool) -> None:
        """No recipient: answer what was pipelined (RFC 2920 §3.1: after a 354, an empty message).

        The results are known by now, so a failure here only makes the connection unusable.
        """
        if not (early or data_sent) or self._closing_reply is not None:
            return
        try:
            reply = await self._next("DATA", self.options.command_timeout)
            if reply.code == 354:
                self._wire.write(self._core.end_body())
                await self._next("end of data", self.options.data_timeout)
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception as exc:
            log.info("%s: after a transaction without recipients: %s", self.label, exc)
            self._abort()

    async def _data(self, payload: _Payload, data_sent: bool, accepted: int) -> tuple[list[Reply], str]:
        """RFC 5321 §4.1.1.4: DATA, 354, the dot-stuffed content, "."; LMTP: one reply per recipient."""
        if not data_sent:
            self._send(Data())
        reply = await self._next("DATA", self.options.command_timeout)
        if reply.code != 354:
            return [reply], "DATA"
        self._during = "while sending the message body"
        core, wire = self._core, self._wire
        async for piece in self._pieces(payload, crlf=False):
            wire.write(core.send_body(piece))
            await wire.drain(self._loop.time() + self.options.command_timeout)
        wire.write(core.end_body())
        self._body_sent = True
        if not self.options.lmtp:
            return [await self._next("end of data", self.options.data_timeout)], "end of data"
        return await self._lmtp_replies(accepted), "end of data"

    async def _lmtp_replies(self, count: int) -> list[Reply]:
        """RFC 2033 §4.2: one reply per accepted recipient, in order. If the connection dies after
        some, those stand (delivered is delivered) and the rest get a synthesized 451 4.4.2."""
        replies: list[Reply] = []
        try:
            for _ in range(count):
                replies.append(await self._next("end of data", self.options.data_timeout))
        except (OSError, TimeoutError, _Lost, RemoteProtocolError) as exc:
            if not replies:
                raise
            log.warning("%s: lost after %d of %d LMTP replies: %s", self.label, len(replies), count, exc)
            self._abort()
            lost = Reply(451, "4.4.2", f"lost connection with {self.label} after end of data")
            replies += [lost] * (count - len(replies))
        return replies

    async def _bdat(self, payload: _Payload) -> tuple[list[Reply], str]:
        """RFC 3030 §2: "BDAT n" + n octets per piece, each answered before the next; the last is LAST."""
        core, wire = self._core, self._wire
        pieces = self._pieces(payload, crlf=True)
        try:
            current = await anext(pieces, b"")
            while True:
                following = await anext(pieces, None)
                last = following is None
                self._stage, self._during = "BDAT", "while sending the message body"
                wire.write(core.send_chunk(current, last))
                await wire.drain(self._loop.time() + self.options.command_timeout)
                if last:
                    self._body_sent = True
                    return [await self._next("end of data", self.options.data_timeout)], "end of data"
                reply = await self._next("BDAT", self.options.command_timeout)
                if not reply.is_positive or following is None:
                    return [reply], "BDAT"
                current = following
        finally:
            await pieces.aclose()

    @staticmethod
    def _bdat_body(data: bytes) -> bytes:
        data = _to_crlf(data)
        return data if not data or data.endswith(b"\r\n") else data + b"\r\n"

    async def _pieces(self, payload: _Payload, crlf: bool) -> AsyncGenerator[bytes, None]:
        """The body in pieces; with `crlf` (BDAT) with clean CRLF line ends and a final CRLF."""
        if payload.data is not None:
            yield self._bdat_body(payload.data) if crlf else payload.data
            return
        assert payload.file is not None
        carry, ends_crlf = b"", True
        while True:
            try:
                piece = await self._loop.run_in_executor(None, payload.file.read, PIECE)
            except OSError as exc:
                raise _BodyReadError(_strerror(exc)) from exc
            if not piece:
                break
            if crlf:  # a CR at the end of a piece may pair with an LF at the start of the next
                piece, carry = carry + piece, b""
                if piece.endswith(b"\r"):
                    piece, carry = piece[:-1], b"\r"
                piece = _to_crlf(piece)
            if piece:
                ends_crlf = piece.endswith(b"\r\n")
                yield piece
        if crlf and (carry or not ends_crlf):
            yield b"\r\n"  # a lone CR left over, or a last line without its CRLF

    # -- reuse and closing -----------------------------------------------------------------

    async def reset(self) -> bool:
        """Before reusing the connection: False when it must not be reused (then close() it)."""
        if not self.usable or self._closed:
            return False
        try:  # a reply nobody asked for, left in the core, would answer the next command
            leftover = self._core.next_event()
        except RemoteProtocolError:
            leftover = None
        if leftover is not PAUSED or self._wire.has_input():  # an idle server spoke (421?) or closed
            self._abort()
            return False
        if self.capabilities.pipelining:
            self._rset_pending = True  # sent in front of the next MAIL FROM (RFC 2920 §3.1)
            return True
        try:
            self._send(Rset())
            reply = await self._next("RSET", self.options.command_timeout)
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception as exc:
            log.info("%s: RSET failed: %s", self.label, exc)
            reply = None
        if reply is None or not reply.is_positive:
            self._abort()
            return False
        return True

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

    async def __aenter__(self) -> OutboundConnection:
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
                raise _Lost()
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
        return SessionFailure(f"{_status(reply)} host {self.label} {said}: {_text(reply)}{tail}",
                              stage=stage, reply=reply, try_next_hop=True)

    def _convert(self, exc: Exception) -> SessionFailure:
        """Any exception from the network, the peer or a bug → a temporary SessionFailure."""
        during = self._during or _DURING.get(self._stage, f"after {self._stage}")
        if isinstance(exc, TimeoutError):
            reason = f"4.4.2 conversation with {self.label} timed out {during}"
        elif isinstance(exc, RemoteProtocolError):
            reason = f"4.5.0 protocol error from {self.label} {during}: {exc.reason}"
        elif isinstance(exc, _BodyReadError):
            reason = f"4.3.0 cannot read the message body: {exc}"
        elif isinstance(exc, OSError | _Lost):
            reason = f"4.4.2 lost connection with {self.label} {during}"
        else:
            log.exception("%s: unexpected error %s", self.label, during)
            reason = f"4.3.0 local error talking to {self.label} {during}: {type(exc).__name__}"
        self._abort()
        return SessionFailure(reason, stage=self._stage, try_next_hop=not self._body_sent)
