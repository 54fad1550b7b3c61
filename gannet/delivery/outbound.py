"""Outbound SMTP and LMTP: one connection to a next hop, and the messages sent over it.

The module callers import. `OutboundConnection` is an `OutboundSession`
(outbound_session.py: connect, greeting, EHLO/HELO/LHLO, STARTTLS, AUTH,
QUIT, the reply loop, how failures become SessionFailure) over a `Wire`
(outbound_wire.py: the bytes, deadlines, the TLS handshake). This module
owns the transactions: MAIL, RCPT, DATA or BDAT, with one result per
recipient, and an RSET before the next message only when the last left a
transaction open. The scheduler (delivery/scheduler.py)
owns routing, retries, the queue and the connection cache; this only talks.

    conn = await OutboundConnection.open(hop_host, address, port, options)  # or open_unix(path, options)
    results = await conn.send_message(envelope, body)   # one RecipientResult per recipient, in order
    if await conn.reset(): ...                           # reuse for the next message
    await conn.close()                                   # QUIT; never raises

Decisions (RFC sections at the code):
- Per-recipient results: a MAIL refusal answers every recipient; a RCPT
  refusal its own; a refusal of DATA, of a BDAT chunk or of the content every
  accepted recipient; LMTP gives one reply per accepted recipient after the
  content (RFC 2033 §4.2). A 421 answers every recipient not yet answered and
  makes the connection unusable (RFC 5321 §3.8). A broken connection raises
  SessionFailure (try_next_hop unless the content went out whole); but in
  LMTP, replies already received stand and the rest get 451 4.4.2.
- Results decided here, not by the server, have stage LOCAL_STAGE (""): the
  size limit (552 5.3.4, RFC 1870 §6), SMTPUTF8 not offered (550 5.6.7,
  RFC 6531 §3.2), an unreadable body file (451 4.3.0). Nothing is sent then.
- Parameters only when advertised (the core checks): SIZE, BODY=8BITMIME,
  SMTPUTF8, RET/ENVID/NOTIFY/ORCPT (DSN).
- 8-bit content to a server without 8BITMIME is downgraded by
  gannet.message.eightbit (RFC 6152 §3); when that is impossible it is sent as
  it is, as Postfix does. A spooled body is read into memory for this only.
- PIPELINING (RFC 2920): RSET, MAIL, every RCPT and DATA in one write.
  BDAT (RFC 3030) for SMTP when CHUNKING is offered: with PIPELINING a body up
  to EARLY_BDAT_LIMIT goes in that same write as "BDAT n LAST" (one round trip
  per message); larger bodies go in 1 MiB chunks once a recipient was
  accepted, each chunk answered before the next. LMTP always uses DATA.
- Timeouts: command_timeout for each reply and for each 1 MiB piece of the
  body to drain; data_timeout for the reply to the end of the content
  (RFC 5321 §4.5.3.2.6).
- reset() checks that the idle connection is still quiet and open. After a
  transaction that ended (the reply to the end of data, or a refused MAIL)
  it sends nothing: RFC 5321 §4.1.1.4 says the end of data clears the
  server's state, and an RSET per message cost both ends a command and a
  reply to parse. After one left open (recipients all refused, DATA
  refused) it pipelines an RSET in front of the next MAIL FROM (RFC 2920
  §3.1) instead of spending a round trip; without PIPELINING it is a plain
  RSET.
- The body's last piece (an in-memory body is one) goes out with the end of
  data in one write.

Invariants: send_message() raises nothing but SessionFailure (and
CancelledError, after aborting the connection); a SessionFailure or a 421
leaves `usable` False and the socket closed; a spooled body is read in
PIECEs, never whole, except for the 8-bit downgrade.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gannet.delivery.outbound_session import (
    QUIT_TIMEOUT,
    BodyReadError,
    ConnectionLost,
    OutboundOptions,
    OutboundSession,
    SessionFailure,
    reply_text,
    strerror,
    temporary_status,
)
from gannet.delivery.outbound_wire import Wire
from gannet.message.eightbit import CannotDowngrade, downgrade
from gannet.smtp import (
    PAUSED,
    BodyType,
    Capabilities,
    ClientState,
    Data,
    MailFrom,
    Notify,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Ret,
    Rset,
)

__all__ = [
    "EARLY_BDAT_LIMIT",
    "LOCAL_STAGE",
    "PIECE",
    "QUIT_TIMEOUT",
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
LOCAL_STAGE = ""  # RecipientResult.stage of a result decided here, not replied by the server


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


@dataclass(slots=True)
class _Payload:
    data: bytes | None  # the whole body, or
    file: BinaryIO | None  # a spooled body, read in PIECEs
    size: int
    eight_bit: bool


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


class OutboundConnection(OutboundSession):
    """An open session that sends messages; see the module docstring and OutboundSession."""

    def __init__(
        self, wire: Wire, options: OutboundOptions, hop_host: str, label: str, loopback: bool
    ) -> None:
        super().__init__(wire, options, hop_host, label, loopback)
        self._rset_pending = False  # reset() deferred the RSET into the next write (PIPELINING)
        # A transaction was begun and not seen to end (a final reply to the end of
        # data, or a refused MAIL): reset() then sends an RSET whatever the core's state.
        self._unfinished = False

    # -- sending ---------------------------------------------------------------------------

    async def send_message(self, envelope: Envelope, body: bytes | Path) -> list[RecipientResult]:
        """One transaction; one RecipientResult per envelope recipient, in order."""
        if not envelope.recipients:
            return []
        if not self.usable or self._closed:
            raise SessionFailure(
                f"4.4.2 the connection with {self.label} is no longer usable", stage="MAIL FROM"
            )
        caps = self.capabilities
        utf8 = (
            envelope.smtputf8
            or not envelope.sender.isascii()
            or not all(r.address.isascii() for r in envelope.recipients)
        )
        if utf8 and not caps.smtputf8:
            return self._local(
                envelope,
                Reply(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.label}"),
            )
        try:
            payload = await self._payload(envelope, body, caps)
        except OSError as exc:
            log.error("%s: cannot read the message body %s: %s", self.label, body, exc)
            reply = Reply(451, "4.3.0", f"cannot read the message body: {strerror(exc)}")
            return self._local(envelope, reply)
        try:
            if caps.size and payload.size > caps.size:  # RFC 1870 §6: do not send what will be refused
                return self._local(
                    envelope,
                    Reply(
                        552,
                        "5.3.4",
                        f"message size {payload.size} exceeds size limit {caps.size} of server {self.label}",
                    ),
                )
            return await self._transaction(envelope, payload, utf8)
        except (SessionFailure, asyncio.CancelledError):
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
                log.info(
                    "%s does not offer 8BITMIME and the message cannot be converted to 7 bit (%s): "
                    "sending it as it is",
                    self.label,
                    exc.reason,
                )
            return _Payload(data, None, len(data), eight_bit)
        if isinstance(body, bytes):
            return _Payload(body, None, len(body), eight_bit)
        return _Payload(None, open(body, "rb"), envelope.size, eight_bit)

    async def _transaction(self, envelope: Envelope, payload: _Payload, utf8: bool) -> list[RecipientResult]:
        core, caps, timeout = self._core, self.capabilities, self.options.command_timeout
        pipelining, chunking = caps.pipelining, caps.chunking and not self.options.lmtp
        self._body_sent = False
        mail = MailFrom(
            envelope.sender,
            size=payload.size,
            smtputf8=utf8,
            ret=_ret(envelope.ret),
            envid=envelope.envid,
            body=BodyType.EIGHT_BIT_MIME if payload.eight_bit else None,
        )  # RFC 6152 §2
        rcpts = [RcptTo(r.address, notify=r.notify, orcpt=r.orcpt) for r in envelope.recipients]
        need_rset = self._rset_pending or core.state is not ClientState.GREETED
        self._rset_pending = False
        self._unfinished = True
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
            self._unfinished = False  # no transaction was begun
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
        self._unfinished = stage != "end of data"  # RFC 5321 §4.1.1.4: its reply ends the transaction
        return results

    async def _expect_rset(self) -> None:
        reply = await self._next("RSET", self.options.command_timeout)
        if not reply.is_positive and reply.code != 421:
            reason = f"{temporary_status(reply)} host {self.label} refused RSET: {reply_text(reply)}"
            raise self._failure("RSET", reason, reply=reply)

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
        last = b""  # held back, to go out with the end of data in one write
        async for piece in self._pieces(payload, crlf=False):
            if last:
                wire.write(core.send_body(last))
                await wire.drain(self._loop.time() + self.options.command_timeout)
            last = piece
        wire.write(core.send_body(last) + core.end_body())
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
        except (OSError, TimeoutError, ConnectionLost, RemoteProtocolError) as exc:
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
                raise BodyReadError(strerror(exc)) from exc
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

    # -- reuse -----------------------------------------------------------------------------

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
        if not self._unfinished and self._core.state is ClientState.GREETED:
            # RFC 5321 §4.1.1.4: the reply to the end of data ended the transaction
            # (a refused MAIL began none): the next MAIL needs no RSET in front.
            return True
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
