"""ClientConnection: the sans-IO SMTP/LMTP client (commands in, bytes out; bytes in, replies out).

Owns the outbound side of one connection: encoding commands (with only the
parameters the server advertised), pipelining groups (RFC 2920), EHLO
capability parsing, reply parsing incl. multi-line replies (RFC 5321 §4.2),
content framing (dot-stuffing and CRLF.CRLF, or BDAT, RFC 3030), and LMTP's
one reply per accepted recipient (RFC 2033 §4.2).

Loop (delivery/remote.py):

    conn.receive_data(data)            # b"" at EOF
    while (ev := conn.next_event()) not in (NEED_DATA, PAUSED):
        ...                            # a Reply (conn.answered says to what) or ConnectionClosed
    writer.write(conn.send(MailFrom(...)) + conn.send(RcptTo(...)) + conn.send(Data()))

A malformed reply raises RemoteProtocolError; sending out of sequence raises
LocalProtocolError. Must never: do I/O, read a clock, send a bare CR or LF in
content or let a content line start an end marker, or keep plaintext received
before STARTTLS completed (the client side of CVE-2011-0411).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from gannet.smtp.buffer import ReceiveBuffer
from gannet.smtp.errors import LocalProtocolError, RemoteProtocolError
from gannet.smtp.events import (
    NEED_DATA,
    PAUSED,
    BodyType,
    ConnectionClosed,
    Credentials,
    Data,
    Ehlo,
    Event,
    Helo,
    MailFrom,
    Noop,
    Notify,
    Quit,
    RcptTo,
    Rset,
    Sentinel,
    StartTls,
    Vrfy,
)
from gannet.smtp.replies import ENHANCED_STATUS, Reply
from gannet.smtp.state import (
    ClientState,
    ClientStep,
    ReplyKind,
    client_transition,
    reply_kind,
)

__all__ = ["Capabilities", "ClientConnection", "ClientOptions"]

C = ClientState
P = ClientStep
REPLY_LINE_LIMIT = 4096  # RFC 5321 §4.5.3.1.5 says 512; real servers send longer text
REPLY_MAX_LINES = 256
COMMAND_LINE_LIMIT = 512  # RFC 5321 §4.5.3.1.4
# RFC 2920 §3.1: these end a pipelined group; wait for every reply before sending more.
_LAST_IN_GROUP = frozenset({P.HELLO, P.DATA, P.QUIT, P.NOOP, P.VRFY, P.STARTTLS, P.AUTH})


@dataclass(frozen=True, slots=True)
class ClientOptions:
    hostname: str  # our EHLO/LHLO name
    lmtp: bool = False


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the server's EHLO/LHLO reply advertised (RFC 5321 §4.1.1.1)."""

    size: int | None = None  # RFC 1870: None = not advertised, 0 = no fixed limit
    pipelining: bool = False
    eightbitmime: bool = False
    smtputf8: bool = False
    dsn: bool = False
    chunking: bool = False
    starttls: bool = False
    enhancedstatuscodes: bool = False
    auth: frozenset[str] = frozenset()
    keywords: dict[str, str] = field(default_factory=dict)  # every keyword → its parameters

    @classmethod
    def parse(cls, reply: Reply) -> Capabilities:
        keywords: dict[str, str] = {}
        for line in reply.text[1:]:  # the first line is the server's name
            key, _, params = line.strip().partition(" ")
            if key:
                keywords[key.upper()] = params.strip()
        size: int | None = None
        if "SIZE" in keywords:
            raw = keywords["SIZE"]
            size = int(raw) if raw.isdigit() and len(raw) <= 20 else 0
        return cls(
            size=size,
            pipelining="PIPELINING" in keywords,
            eightbitmime="8BITMIME" in keywords,
            smtputf8="SMTPUTF8" in keywords,
            dsn="DSN" in keywords,
            chunking="CHUNKING" in keywords,
            starttls="STARTTLS" in keywords,
            enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
            auth=frozenset(keywords.get("AUTH", "").upper().split()),
            keywords=keywords,
        )


def xtext_encode(text: str) -> str:
    """RFC 3461 §4: "+XX" for "+", "=", and anything outside "!".."~"."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode("utf-8"))
        for ch in text
    )


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """RFC 5321 §4.2: Reply-code [ ("-" / SP) textstring ]; returns (code, more, text)."""
    code = line[:3]
    sep = line[3:4]
    if len(code) != 3 or not code.isdigit() or sep not in (b"", b" ", b"-"):
        raise RemoteProtocolError(f"malformed reply line {line[:40]!r}")
    if not (0x32 <= code[0] <= 0x35 and 0x30 <= code[1] <= 0x35):
        raise RemoteProtocolError(f"reply code {code.decode()} out of range")
    return int(code), sep == b"-", line[4:].decode("utf-8", "replace")


class _BodyEncoder:
    """RFC 5321 §4.5.2 dot-stuffing and CRLF line ends, across chunk boundaries."""

    __slots__ = ("_carry", "_line_start", "size")

    def __init__(self) -> None:
        self._carry = b""  # a trailing "\r" whose successor is not yet known
        self._line_start = True
        self.size = 0

    def encode(self, data: bytes, final: bool = False) -> bytes:
        data = self._carry + data
        self._carry = b""
        if data[-1:] == b"\r" and not final:
            self._carry, data = b"\r", data[:-1]
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:  # RFC 5321 §2.3.8
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if not data:
            return b""
        if self._line_start and data[0] == 0x2E:
            data = b"." + data
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n..")
        self._line_start = data.endswith(b"\r\n")
        self.size += len(data)
        return data

    def end(self) -> bytes:
        tail = self.encode(b"", final=True)
        if not self._line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


class ClientConnection:
    __slots__ = (
        "_body",
        "_eof",
        "_lines",
        "_outstanding",
        "_rb",
        "_state",
        "accepted",
        "answered",
        "capabilities",
        "options",
        "tls",
    )

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._rb = ReceiveBuffer()
        self._state = C.CONNECTING
        # Commands sent and not yet answered, oldest first: (step, the command).
        self._outstanding: list[tuple[ClientStep, Event | None]] = [(P.GREETING, None)]
        self._lines: list[tuple[int, str]] = []  # lines of a multi-line reply so far
        self._body: _BodyEncoder | None = None
        self._eof = False
        self.capabilities: Capabilities | None = None
        self.tls = False
        self.accepted: list[RcptTo] = []  # recipients accepted in this transaction
        self.answered: Event | None = None  # what the last reply answered (LMTP: the RcptTo)

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is C.CLOSED

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._state is C.CLOSED or self._state is C.TLS_PENDING:
            return  # after 220 to STARTTLS nothing in plaintext is read
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data() after EOF")
            self._rb.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Reply | ConnectionClosed | Sentinel:
        """The next complete reply, ConnectionClosed at EOF, NEED_DATA or PAUSED."""
        if self._state is C.CLOSED or self._state is C.TLS_PENDING:
            return PAUSED
        while True:
            line = self._rb.next_line(REPLY_LINE_LIMIT, True)  # bare LF tolerated from servers
            if line is None:
                if self._eof:
                    self._state = C.CLOSED
                    return ConnectionClosed()
                return NEED_DATA if self._outstanding else PAUSED
            if isinstance(line, Reply):
                raise RemoteProtocolError(f"bad reply line: {line.text[0]}")
            code, more, text = parse_reply_line(line)
            if self._lines and code != self._lines[0][0]:
                raise RemoteProtocolError("reply code changed inside a multi-line reply")
            self._lines.append((code, text))
            if len(self._lines) > REPLY_MAX_LINES:
                raise RemoteProtocolError("multi-line reply too long")
            if not more:
                return self._complete(self._reply())

    def _reply(self) -> Reply:
        code = self._lines[0][0]
        texts = [text for _, text in self._lines]
        self._lines = []
        enhanced = ""
        first = texts[0].split(" ", 1)[0]
        if ENHANCED_STATUS.fullmatch(first) and first[0] == str(code)[0]:
            enhanced = first
            cut = len(first) + 1
            texts = [t[cut:] if t.split(" ", 1)[0] == first else t for t in texts]
        return Reply(code, enhanced, *texts)

    def _complete(self, reply: Reply) -> Reply:
        kind = reply_kind(reply)
        if not self._outstanding:
            if reply.code == 421:  # RFC 5321 §3.8: the server may give up at any time
                self._state = C.CLOSED
                return reply
            raise RemoteProtocolError(f"unsolicited reply {reply}")
        step, command = self._outstanding[0]
        if reply.code == 421:
            self._state = C.CLOSED
            self._outstanding.clear()
            self.answered = command
            return reply
        new = client_transition(self._state, step, kind)
        if new is None:
            raise RemoteProtocolError(f"reply {reply.code} to {step.value} in state {self._state.name}")
        self.answered = command
        if step is P.END_OF_DATA and self.options.lmtp:
            return self._lmtp_reply(reply, new)
        self._outstanding.pop(0)
        self._apply(step, command, reply, new)
        return reply

    def _lmtp_reply(self, reply: Reply, new: ClientState) -> Reply:
        """RFC 2033 §4.2: one reply per accepted recipient, in RCPT order."""
        index = self._lmtp_index()
        if self.accepted:
            self.answered = self.accepted[index]
        if index + 1 >= len(self.accepted):
            self._outstanding.pop(0)
            self._apply(P.END_OF_DATA, None, reply, new)
        else:
            self._outstanding[0] = (P.END_OF_DATA, _LmtpCount(index + 1))
        return reply

    def _lmtp_index(self) -> int:
        command = self._outstanding[0][1]
        return command.index if isinstance(command, _LmtpCount) else 0

    def _apply(self, step: ClientStep, command: Event | None, reply: Reply, new: ClientState) -> None:
        kind = reply_kind(reply)
        if step is P.HELLO and kind is ReplyKind.POSITIVE:
            is_ehlo = isinstance(command, Ehlo)
            self.capabilities = Capabilities.parse(reply) if is_ehlo else Capabilities()
        elif step is P.RCPT and kind is ReplyKind.POSITIVE and isinstance(command, RcptTo):
            self.accepted.append(command)
        elif step is P.DATA and new is C.DATA:
            self._body = _BodyEncoder()
        if new is C.GREETED or new is C.READY:
            self.accepted = []
            self._body = None
        self._state = new

    # -- output --------------------------------------------------------------------------

    def send(self, command: Event) -> bytes:
        """Encode one command; with PIPELINING it may follow unanswered ones (RFC 2920)."""
        step, line = self._encode(command)
        self._check_can_send(step)
        self._outstanding.append((step, command))
        return line

    def send_body(self, data: bytes) -> bytes:
        """Content after 354: dot-stuffed, CRLF line ends (RFC 5321 §4.5.2, §2.3.8)."""
        if self._body is None or self._state is not C.DATA:
            raise LocalProtocolError("send_body() without a 354 reply to DATA")
        return self._body.encode(data) if data else b""

    def end_body(self) -> bytes:
        """The end of content: (CRLF if needed) "." CRLF; then one reply (LMTP: one per recipient)."""
        if self._body is None or self._state is not C.DATA or self._outstanding:
            raise LocalProtocolError("end_body() without a 354 reply to DATA")
        tail = self._body.end()
        self._outstanding.append((P.END_OF_DATA, None))
        return tail

    def send_chunk(self, data: bytes, last: bool) -> bytes:
        """RFC 3030 §2: "BDAT n [LAST]" CRLF then exactly n octets, sent raw."""
        caps = self.capabilities
        if caps is None or not caps.chunking:
            raise LocalProtocolError("BDAT without CHUNKING")
        step = P.BDAT_LAST if last else P.BDAT
        self._check_can_send(step)
        self._outstanding.append((step, None))
        return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data

    def start_tls(self) -> None:
        """After 220 to STARTTLS and the handshake: drop plaintext leftovers, EHLO again."""
        if self._state is not C.TLS_PENDING:
            raise LocalProtocolError(f"start_tls() in state {self._state.name}")
        self._rb.clear()
        self.tls = True
        self.capabilities = None
        self._state = C.READY

    # -- internals -----------------------------------------------------------------------

    def _projected(self) -> ClientState:
        """The state once every outstanding command succeeds (what the next command follows)."""
        state = self._state
        for step, _ in self._outstanding:
            kind = ReplyKind.INTERMEDIATE if step is P.DATA else ReplyKind.POSITIVE
            state = client_transition(state, step, kind) or state
        return state

    def _check_can_send(self, step: ClientStep) -> None:
        if self._state is C.CLOSED or self._state is C.TLS_PENDING or self._state is C.DATA:
            raise LocalProtocolError(f"cannot send {step.value} in state {self._state.name}")
        if self._outstanding:
            pipelining = self.capabilities is not None and self.capabilities.pipelining
            if not pipelining or self._outstanding[-1][0] in _LAST_IN_GROUP:
                raise LocalProtocolError(f"{step.value} must wait for the replies (RFC 2920)")
        state = self._projected()
        kind = ReplyKind.INTERMEDIATE if step is P.DATA else ReplyKind.POSITIVE
        if client_transition(state, step, kind) is None:
            raise LocalProtocolError(f"{step.value} out of sequence in state {state.name}")

    def _encode(self, command: Event) -> tuple[ClientStep, bytes]:
        step, text = self._command_text(command)
        line = text.encode("utf-8") + b"\r\n"
        if len(line) > COMMAND_LINE_LIMIT or "\r" in text or "\n" in text:
            raise LocalProtocolError(f"{step.value} command line too long or not one line")
        return step, line

    def _command_text(self, command: Event) -> tuple[ClientStep, str]:
        match command:
            case Ehlo(domain=domain):
                return P.HELLO, f"{'LHLO' if self.options.lmtp else 'EHLO'} {domain}"
            case Helo(domain=domain):
                if self.options.lmtp:
                    raise LocalProtocolError("LMTP has no HELO (RFC 2033 §4.1)")
                return P.HELLO, f"HELO {domain}"
            case MailFrom():
                return P.MAIL, self._mail_text(command)
            case RcptTo():
                return P.RCPT, self._rcpt_text(command)
            case Data():
                return P.DATA, "DATA"
            case Rset():
                return P.RSET, "RSET"
            case Noop():
                return P.NOOP, "NOOP"
            case Vrfy(argument=argument):
                return P.VRFY, f"VRFY {argument}"
            case Quit():
                return P.QUIT, "QUIT"
            case StartTls():
                return P.STARTTLS, "STARTTLS"
            case Credentials():
                return P.AUTH, self._auth_text(command)
        raise LocalProtocolError(f"{type(command).__name__} is not a client command")

    def _caps(self) -> Capabilities:
        return self.capabilities or Capabilities()

    def _mail_text(self, mail: MailFrom) -> str:
        """MAIL FROM with only the parameters the server advertised."""
        caps = self._caps()
        parts = [f"MAIL FROM:<{mail.address}>"]
        if mail.size is not None and caps.size is not None:
            parts.append(f"SIZE={mail.size}")  # RFC 1870
        if mail.body is BodyType.EIGHT_BIT_MIME and caps.eightbitmime:
            parts.append("BODY=8BITMIME")  # RFC 6152
        if mail.smtputf8 or not mail.address.isascii():
            if not caps.smtputf8:
                raise LocalProtocolError("the server does not offer SMTPUTF8 (RFC 6531 §3.2)")
            parts.append("SMTPUTF8")
        if caps.dsn:  # RFC 3461 §4.3, §4.4
            if mail.ret is not None:
                parts.append(f"RET={mail.ret.value}")
            if mail.envid is not None:
                parts.append(f"ENVID={xtext_encode(mail.envid)}")
        if mail.auth is not None and caps.auth:
            parts.append(f"AUTH={xtext_encode(mail.auth)}")  # RFC 4954 §5
        return " ".join(parts)

    def _rcpt_text(self, rcpt: RcptTo) -> str:
        caps = self._caps()
        parts = [f"RCPT TO:<{rcpt.address}>"]
        if caps.dsn:  # RFC 3461 §4.1, §4.2
            if rcpt.notify is not None:
                names = ["SUCCESS", "FAILURE", "DELAY"]
                flags = [n for n in names if Notify[n] in rcpt.notify]
                parts.append(f"NOTIFY={','.join(flags) if flags else 'NEVER'}")
            if rcpt.orcpt is not None:
                kind, _, addr = rcpt.orcpt.partition(";")
                parts.append(f"ORCPT={kind};{xtext_encode(addr)}")
        return " ".join(parts)

    def _auth_text(self, creds: Credentials) -> str:
        """AUTH PLAIN with an initial response (RFC 4954 §4, RFC 4616 §2)."""
        if creds.mechanism.upper() != "PLAIN":
            raise LocalProtocolError("the client speaks AUTH PLAIN only")
        if "PLAIN" not in self._caps().auth:
            raise LocalProtocolError("the server does not offer AUTH PLAIN")
        raw = f"{creds.authzid}\0{creds.username}\0{creds.password}".encode()
        return "AUTH PLAIN " + (base64.b64encode(raw).decode("ascii") or "=")


@dataclass(frozen=True, slots=True)
class _LmtpCount(Event):
    """Bookkeeping: how many LMTP per-recipient replies were already received."""

    index: int
