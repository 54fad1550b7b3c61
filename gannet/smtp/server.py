"""ServerConnection: the sans-IO SMTP/LMTP server (bytes in, events out, replies in, bytes out).

Owns one inbound connection's protocol state: which command is in sequence,
the current transaction (sender, accepted recipients), TLS/AUTH facts, and
the error/junk counters. It decides every *protocol* refusal itself
(CommandError / MessageRefused carry the reply); every *policy* decision
(accept this sender? this recipient? queue this message?) is the session's,
given back as the Reply to `send()`.

Loop (the session, server/session.py):

    conn.receive_data(data)                 # b"" at EOF
    while (ev := conn.next_event()) not in (NEED_DATA, PAUSED):
        ...decide...; writer.write(conn.send(reply))

Rules: the first send() is the greeting; every command event (and every event
carrying its own reply) gets exactly one send() before the next event (LMTP:
one per recipient after EndOfData); Bdat, BodyChunk and ConnectionClosed need
none. Nothing the peer sends makes receive_data()/next_event() raise; only
misuse by the session raises LocalProtocolError.

Must never: do I/O, read a clock, keep unbounded input, parse anything that
arrived after STARTTLS or QUIT (RFC 3207 §4.2, CVE-2011-0411).
"""

from __future__ import annotations

from dataclasses import dataclass

from gannet.smtp import sasl
from gannet.smtp.buffer import (
    AUTH_LINE_LIMIT,
    COMMAND_LINE_LIMIT,
    DONE,
    BareNewline,
    ChunkReader,
    DataReader,
    ReceiveBuffer,
)
from gannet.smtp.commands import COMMANDS, AuthRequest, parse_bdat
from gannet.smtp.errors import LocalProtocolError
from gannet.smtp.events import (
    NEED_DATA,
    PAUSED,
    AuthChallenge,
    Bdat,
    BodyChunk,
    CommandError,
    ConnectionClosed,
    Credentials,
    Data,
    Ehlo,
    EndOfChunk,
    EndOfData,
    Event,
    Helo,
    MailFrom,
    MessageRefused,
    RcptTo,
    Sentinel,
)
from gannet.smtp.lmtp import RecipientReplies
from gannet.smtp.replies import (
    R421_FORBIDDEN_COMMAND,
    R421_TOO_MANY_ERRORS,
    R452_TOO_MANY_RECIPIENTS,
    R454_TLS_UNAVAILABLE,
    R500_SYNTAX,
    R500_USE_LHLO,
    R501_BAD_ADDRESS,
    R501_SYNTAX_PARAMS,
    R502_NOT_IMPLEMENTED,
    R503_ALREADY_AUTH,
    R503_AUTH_NOT_OFFERED,
    R503_NEED_EHLO,
    R503_TLS_ACTIVE,
    R530_AUTH_REQUIRED,
    R530_STARTTLS_FIRST,
    Reply,
)
from gannet.smtp.state import (
    SERVER_TRANSITIONS,
    Cmd,
    ReplyKind,
    ServerState,
    reply_kind,
    server_refusal,
    server_transition,
)
from gannet.smtp.syntax import SyntaxProblem

__all__ = ["BareNewline", "ServerConnection", "ServerOptions", "ServerState"]

S = ServerState
_NO_REPLY = (Bdat, BodyChunk, ConnectionClosed)
_KINDS = {2: ReplyKind.POSITIVE, 3: ReplyKind.INTERMEDIATE, 4: ReplyKind.NEGATIVE, 5: ReplyKind.NEGATIVE}
_TRANSACTION_STATES = frozenset({S.MAIL, S.RCPT, S.BODY, S.BDAT, S.BDAT_NEXT})
# Printable ASCII and 8-bit octets; anything left after deleting them is a control character.
_PRINTABLE_OR_8BIT = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


@dataclass(frozen=True, slots=True)
class ServerOptions:
    hostname: str
    lmtp: bool = False
    max_message_size: int = 50 * 1024 * 1024  # SIZE n (RFC 1870); <= 0: unlimited, "SIZE"
    max_recipients: int = 100
    max_errors: int = 20
    bare_newline: BareNewline = BareNewline.REJECT
    starttls: bool = False
    auth: bool = False
    auth_required: bool = False
    tls_required: bool = False
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    chunking: bool = True
    dsn: bool = True
    enhancedstatuscodes: bool = True
    # Beyond the contract, Postfix-style knobs (smtpd_junk_command_limit,
    # smtpd_recipient_overshoot_limit): junk commands past the first N count as
    # errors; 452-too-many-recipients replies count as errors only past N.
    max_junk_commands: int = 100
    max_recipient_overshoot: int = 1000


class ServerConnection:
    __slots__ = (
        "_auth_user",
        "_bdat_error",
        "_bdat_skip",
        "_chunk_size",
        "_eof",
        "_errors",
        "_esmtp",
        "_helo",
        "_junk",
        "_lmtp_owed",
        "_mail",
        "_overshoot",
        "_pending",
        "_rb",
        "_rcpts",
        "_reader",
        "_sasl",
        "_state",
        "_tls",
        "_uncounted",
        "improper_pipelining",
        "options",
    )

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self._rb = ReceiveBuffer()
        self._state = S.GREETING
        self._pending: Event | None = None
        self._helo: str | None = None
        self._esmtp = False
        self._tls = False
        self._auth_user: str | None = None
        self._mail: MailFrom | None = None
        self._rcpts: list[RcptTo] = []
        self._reader: DataReader | ChunkReader | None = None
        self._chunk_size = 0
        self._bdat_skip = 0  # octets of a refused BDAT chunk still to drop
        self._bdat_error: CommandError | None = None  # sent once they are dropped
        self._sasl: sasl.SaslMechanism | None = None
        self._lmtp_owed: RecipientReplies | None = None
        self._eof = False
        self._errors = 0
        self._junk = 0
        self._overshoot = 0
        self._uncounted = False
        # RFC 2920 §3.1: the client sent more after a LAST_IN_GROUP command
        # without waiting for its reply (a spam-bot signature; the session may log or refuse).
        self.improper_pipelining = False

    # -- read-only facts for the session -------------------------------------------------

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def helo_name(self) -> str | None:
        return self._helo

    @property
    def esmtp(self) -> bool:
        return self._esmtp

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def authenticated(self) -> str | None:
        return self._auth_user

    @property
    def mail(self) -> MailFrom | None:
        return self._mail

    @property
    def recipients(self) -> list[RcptTo]:
        """The accepted recipients of the current transaction (do not mutate)."""
        return self._rcpts

    @property
    def closed(self) -> bool:
        return self._state is S.CLOSED

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed (bounded; see buffer.py)."""
        return len(self._rb)

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side.

        Call it when next_event() says NEED_DATA: what is fed while an event
        awaits its reply is kept (pipelined commands must not be lost), so a
        session that reads ahead regardless makes `buffered` grow.
        """
        if self._state is S.CLOSED or self._state is S.TLS_PENDING:
            return  # RFC 3207 §4.2 / after QUIT: never parsed
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if data:
            self._rb.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | Sentinel:
        if self._pending is not None:
            return PAUSED
        state = self._state
        if state is S.BODY or state is S.BDAT:
            return self._content_event()
        if state is S.GREETING or state is S.TLS_PENDING or state is S.CLOSED:
            return PAUSED
        if self._bdat_skip or self._bdat_error is not None:
            return self._skip_event()
        if 0 < self.options.max_errors <= self._errors:
            return self._emit(CommandError(R421_TOO_MANY_ERRORS, "error limit reached"))
        normalize = self.options.bare_newline is BareNewline.NORMALIZE
        if state is S.AUTH:
            line = self._rb.next_line(AUTH_LINE_LIMIT, normalize)
        else:
            line = self._rb.next_line(COMMAND_LINE_LIMIT, normalize)
        if line is None:
            return self._starved()
        if isinstance(line, Reply):
            return self._emit(CommandError(line, "refused line"))
        if state is S.AUTH:
            return self._sasl_step(line)
        return self._command(line)

    # -- output --------------------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """Answer the pending event (or greet); returns the bytes to write."""
        event = self._pending
        state = self._state
        if event is None and state is not S.GREETING:
            raise LocalProtocolError(f"send({reply}) with no event awaiting a reply in {state.name}")
        kind = _KINDS.get(reply.code // 100) or reply_kind(reply)  # reply_kind raises on 1xx/6xx
        data = self._encode(reply)
        if kind is ReplyKind.NEGATIVE:
            if not self._uncounted:
                self._errors += 1
            self._uncounted = False
        if reply.code == 421:
            return self._close(data)
        etype = type(event) if event is not None else None
        new = SERVER_TRANSITIONS.get((state, etype, kind))
        if new is None:
            new = server_transition(state, etype, kind)  # Rule 2: raises on an impossible reply
        if self._lmtp_owed is not None:
            if etype is MessageRefused:
                data *= self._lmtp_owed.remaining  # the core's own reply, once per recipient
            elif not self._lmtp_owed.sent_one():
                return data  # RFC 2033 §4.2: more per-recipient replies owed
            self._lmtp_owed = None
        self._pending = None
        self._apply(event, kind, new)
        return data

    def ehlo_reply(self, greeting_text: str = "") -> Reply:
        """RFC 5321 §4.1.1.1: "250-hostname [text]" then one extension keyword per line."""
        o = self.options
        first = f"{o.hostname} {greeting_text}" if greeting_text else o.hostname
        lines = [first]
        if o.pipelining:
            lines.append("PIPELINING")  # RFC 2920
        lines.append(f"SIZE {o.max_message_size}" if o.max_message_size > 0 else "SIZE")
        if o.starttls and not self._tls:
            lines.append("STARTTLS")  # RFC 3207
        if o.auth and (self._tls or not o.tls_required):
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954
        if o.enhancedstatuscodes:
            lines.append("ENHANCEDSTATUSCODES")  # RFC 2034
        if o.eightbitmime:
            lines.append("8BITMIME")  # RFC 6152
        if o.dsn:
            lines.append("DSN")  # RFC 3461
        if o.smtputf8:
            lines.append("SMTPUTF8")  # RFC 6531
        if o.chunking:
            lines.append("CHUNKING")  # RFC 3030
        return Reply(250, "", *lines)

    def start_tls(self) -> None:
        """After 220 to StartTls: forget everything from before TLS (RFC 3207 §4.2)."""
        if self._state is not S.TLS_PENDING:
            raise LocalProtocolError(f"start_tls() in state {self._state.name}")
        self._rb.clear()  # CVE-2011-0411: no plaintext command survives the handshake
        self._tls = True
        self._helo = None
        self._esmtp = False
        self._auth_user = None
        self._reset_transaction()
        self._state = S.READY

    def close_with(self, reply: Reply) -> bytes:
        """An unsolicited last reply (421 timeout/shutdown); the connection is then closed."""
        return self._close(self._encode(reply))

    # -- internals -----------------------------------------------------------------------

    def _encode(self, reply: Reply) -> bytes:
        if not self.options.enhancedstatuscodes and reply.enhanced:
            reply = Reply(reply.code, "", *reply.text)  # RFC 2034: only when offered
        return reply.encode()

    def _close(self, data: bytes) -> bytes:
        self._state = S.CLOSED
        self._pending = None
        self._lmtp_owed = None
        self._rb.clear()
        return data

    def _emit(self, event: Event) -> Event:
        if type(event) in _NO_REPLY:
            self._state = server_transition(self._state, type(event), ReplyKind.NONE)
        else:
            self._pending = event
        return event

    def _starved(self) -> Event | Sentinel:
        if self._eof:
            self._rb.clear()
            return self._emit(ConnectionClosed())
        return NEED_DATA

    def _error(self, reply: Reply, reason: str) -> Event:
        return self._emit(CommandError(reply, reason))

    def _apply(self, event: Event | None, kind: ReplyKind, new: ServerState) -> None:
        """The session's reply takes effect (state.py decided `new`)."""
        old = self._state
        self._state = new
        if new is S.READY or new is S.GREETED:
            if old in _TRANSACTION_STATES:
                self._reset_transaction()
            self._sasl = None
        if kind is ReplyKind.POSITIVE:  # type() identity: cheaper than isinstance chains
            if type(event) is RcptTo:
                self._rcpts.append(event)
            elif type(event) is MailFrom:
                self._mail = event
            elif type(event) is Ehlo or type(event) is Helo:
                self._helo = event.domain
                self._esmtp = type(event) is Ehlo
                self._reset_transaction()
            elif type(event) is Credentials:
                self._auth_user = event.username
            elif type(event) is EndOfData:
                self._junk = 0
        elif kind is ReplyKind.INTERMEDIATE and type(event) is Data:
            o = self.options
            self._reader = DataReader(o.max_message_size, o.bare_newline is BareNewline.NORMALIZE)

    def _reset_transaction(self) -> None:
        self._mail = None
        self._rcpts = []
        self._reader = None

    def _command(self, line: bytes) -> Event | Sentinel:
        verb, _, argb = line.partition(b" ")
        spec = COMMANDS.get(verb.upper())
        if spec is None:
            return self._error(R500_SYNTAX, "unknown command")
        if spec.junk:
            self._junk += 1
            if self._junk > self.options.max_junk_commands:
                self._errors += 1
        if spec.last_in_group and len(self._rb):
            self.improper_pipelining = True
        if spec.cmd is None or spec.parser is None:
            if spec.forbidden:
                return self._error(R421_FORBIDDEN_COMMAND, "HTTP verb on SMTP port")
            return self._error(R502_NOT_IMPLEMENTED, "command not implemented")
        if spec.smtp_only or spec.lmtp_only:
            if self.options.lmtp and spec.smtp_only:
                return self._error(R500_USE_LHLO, "HELO/EHLO on LMTP")
            if not self.options.lmtp and spec.lmtp_only:
                return self._error(R500_SYNTAX, "LHLO on SMTP")
        arg = self._decode_arg(argb, spec.utf8_arg)
        if isinstance(arg, Reply):
            return self._error(arg, "bad octets in argument")
        if spec.cmd is Cmd.BDAT:
            return self._bdat_command(arg)
        refusal = self._refusal(spec.cmd, spec.pre_tls)
        if refusal is not None:
            return self._error(refusal, f"{spec.cmd.value} refused")
        utf8 = self._mail is not None and self._mail.smtputf8
        try:
            parsed = spec.parser(arg, self.options, utf8)
        except SyntaxProblem as problem:
            return self._error(problem.reply, problem.reason)
        if isinstance(parsed, AuthRequest):
            return self._auth_start(parsed.argument)
        return self._emit(parsed)

    def _decode_arg(self, argb: bytes, utf8: bool) -> str | Reply:
        if argb.translate(None, _PRINTABLE_OR_8BIT):
            return R501_SYNTAX_PARAMS  # control characters (NUL, TAB, ESC, …)
        if argb.isascii():
            return argb.decode("ascii")
        if not utf8:
            return R501_SYNTAX_PARAMS
        try:
            return argb.decode("utf-8")  # RFC 6531 §3.3; the parser checks SMTPUTF8
        except UnicodeDecodeError:
            return R501_BAD_ADDRESS

    def _refusal(self, cmd: Cmd, pre_tls: bool) -> Reply | None:
        """Protocol refusals after parsing, in Postfix's order: TLS, sequence, extension."""
        o = self.options
        if o.tls_required and not self._tls and not pre_tls:
            return R530_STARTTLS_FIRST
        refusal = server_refusal(self._state, cmd)
        if refusal is not None:
            return refusal
        if cmd is Cmd.MAIL:
            if o.auth_required and self._auth_user is None:
                return R530_AUTH_REQUIRED
        elif cmd is Cmd.RCPT:
            if len(self._rcpts) >= o.max_recipients:
                self._overshoot += 1  # RFC 5321 §4.5.3.1.10: 452, the client retries later
                self._uncounted = self._overshoot <= o.max_recipient_overshoot
                return R452_TOO_MANY_RECIPIENTS
        elif cmd is Cmd.BDAT:
            if not o.chunking:
                return R502_NOT_IMPLEMENTED
        elif cmd is Cmd.STARTTLS:
            # Documented choice: already in TLS → 503; not offered → 454 (RFC 3207 §4).
            if self._tls:
                return R503_TLS_ACTIVE
            if not o.starttls:
                return R454_TLS_UNAVAILABLE
        elif cmd is Cmd.AUTH:
            if not o.auth:
                return R503_AUTH_NOT_OFFERED
            if not self._esmtp:
                return R503_NEED_EHLO  # RFC 4954 §4: AUTH follows EHLO
            if self._auth_user is not None:
                return R503_ALREADY_AUTH  # RFC 4954 §4: at most once per session
        return None

    # -- AUTH ----------------------------------------------------------------------------

    def _auth_start(self, argument: str) -> Event:
        try:
            machine, result = sasl.start(argument)
        except sasl.SaslError as err:
            return self._error(err.reply, err.reason)
        self._sasl = machine
        if isinstance(result, Credentials):
            return self._emit(result)
        return self._emit(AuthChallenge(result))

    def _sasl_step(self, line: bytes) -> Event:
        machine = self._sasl
        if machine is None:  # pragma: no cover - AUTH state always has a machine
            return self._error(R503_AUTH_NOT_OFFERED, "no SASL exchange")
        try:
            result = machine.step(line)
        except sasl.SaslError as err:
            return self._error(err.reply, err.reason)
        if isinstance(result, Credentials):
            return self._emit(result)
        return self._emit(AuthChallenge(result))

    # -- content: DATA and BDAT ----------------------------------------------------------

    def _bdat_command(self, arg: str) -> Event | Sentinel:
        """RFC 3030: the chunk's octets follow the line whatever we answer, so a
        refused BDAT is skipped before its reply; a BDAT whose size cannot be
        parsed cannot be skipped (501, and the octets are read as commands)."""
        try:
            event = parse_bdat(arg)
        except SyntaxProblem as problem:
            return self._error(problem.reply, problem.reason)
        refusal = self._refusal(Cmd.BDAT, False)
        if refusal is not None:
            return self._skip(event.size, refusal)
        reader = self._reader
        if not isinstance(reader, ChunkReader):
            o = self.options
            reader = ChunkReader(o.max_message_size, o.bare_newline is BareNewline.NORMALIZE)
            self._reader = reader
        reader.start(event.size, event.last)
        self._chunk_size = event.size
        return self._emit(event)

    def _skip(self, size: int, reply: Reply) -> Event | Sentinel:
        """A refused BDAT: drop its octets first, then answer (RFC 3030 §3)."""
        self._bdat_skip = size
        self._bdat_error = CommandError(reply, "BDAT refused")
        return self._skip_event()

    def _skip_event(self) -> Event | Sentinel:
        if self._bdat_skip:
            self._bdat_skip -= self._rb.skip(self._bdat_skip)
            if self._bdat_skip:
                return self._starved()
        error, self._bdat_error = self._bdat_error, None
        if error is None:  # pragma: no cover - set together with _bdat_skip
            return NEED_DATA
        return self._emit(error)

    def _content_event(self) -> Event | Sentinel:
        reader = self._reader
        if reader is None:  # pragma: no cover - BODY/BDAT states always have a reader
            raise LocalProtocolError("content state without a reader")
        got = reader.read(self._rb)
        if got is None:
            return self._starved()
        if got is not DONE:
            return self._emit(BodyChunk(got))
        refusal = reader.refusal()
        last = not isinstance(reader, ChunkReader) or reader.last
        if refusal is not None:
            event: Event = MessageRefused(refusal)
        elif last:
            event = EndOfData(reader.size)
        else:
            return self._emit(EndOfChunk(self._chunk_size))
        if self.options.lmtp and last:
            self._lmtp_owed = RecipientReplies(len(self._rcpts))
        return self._emit(event)
