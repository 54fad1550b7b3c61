"""Transcript files: SMTP dialogues as text, run in memory against ServerConnection.

Format (one step per line; blank lines and lines starting with "#" are ignored):

    @ key = value        ServerOptions field for this transcript (value: a Python literal)
    C: text              the client sends text + CRLF ("C:" alone: an empty line)
    C! b'raw bytes'      the client sends raw bytes (ast.literal_eval; no CRLF added)
    S: text              the server's next reply line is exactly text (CRLF not shown)
    S~ regex             the server's next reply line matches regex (re.fullmatch)
    !starttls            the client does the TLS handshake (in memory: conn.start_tls())
    !eof                 the client closes its side
    !closed              the server has closed the connection (221/421)

`load_transcript(path) -> list[Step]` is the reusable part: the TCP runner
(tests/integration) plays the same steps over a socket. The in-memory runner
here plays an accept-everything session: 250 to MAIL and RCPT, 354 to DATA,
"250 2.0.0 queued as TEST" at the end of the content, 235 for alice/secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transcript_format import Step

from gannet.smtp import (
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
    Help,
    MailFrom,
    MessageRefused,
    Noop,
    Quit,
    RcptTo,
    Rset,
    ServerConnection,
    ServerOptions,
    StartTls,
    Vrfy,
    queued,
)
from gannet.smtp import replies as R
from gannet.smtp.replies import Reply

HOSTNAME = "mx.test"
GREETING = Reply(220, "", f"{HOSTNAME} ESMTP ready")
USERS = {"alice": "secret"}


@dataclass
class AcceptAll:
    """The simplest session: accepts every sender, recipient and message."""

    conn: ServerConnection
    body: bytearray = field(default_factory=bytearray)
    messages: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def reply_to(self, ev: Event) -> Reply | None:
        conn = self.conn
        match ev:
            case CommandError() | MessageRefused() | AuthChallenge():
                return ev.reply
            case Ehlo():
                return conn.ehlo_reply()
            case Helo():
                return Reply(250, "", HOSTNAME)
            case MailFrom():
                return R.R250_SENDER_OK
            case RcptTo():
                return R.R250_RCPT_OK
            case Data():
                return R.R354_START_INPUT
            case EndOfData():
                self.messages.append(bytes(self.body))
                return queued("TEST")
            case EndOfChunk():
                return R.R250_OK
            case Rset():
                return R.R250_RESET
            case Noop():
                return R.R250_OK
            case Vrfy():
                return R.R252_CANNOT_VRFY
            case Help():
                return R.R214_HELP
            case Quit():
                return R.R221_BYE
            case StartTls():
                return R.R220_GO_AHEAD_TLS
            case Credentials():
                ok = USERS.get(ev.username) == ev.password
                return R.R235_AUTH_OK if ok else R.R535_AUTH_FAILED
        return None

    def feed(self, data: bytes) -> bytes:
        """receive_data(data), then answer every event; returns what the server wrote."""
        self.conn.receive_data(data)
        return self.drive()

    def drive(self) -> bytes:
        out = bytearray()
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                return bytes(out)
            assert isinstance(ev, Event)
            self.events.append(ev)
            if isinstance(ev, BodyChunk):
                self.body += ev.data
                continue
            if isinstance(ev, Bdat | ConnectionClosed):
                continue
            reply = self.reply_to(ev)
            assert reply is not None, ev
            count = len(conn.recipients) if conn.options.lmtp and isinstance(ev, EndOfData) else 1
            for _ in range(count):
                out += conn.send(reply)
            if isinstance(ev, EndOfData | MessageRefused):
                self.body.clear()


def run_in_memory(steps: list[Step]) -> None:
    """Play `steps` against a fresh ServerConnection; AssertionError on a mismatch."""
    options: dict[str, Any] = {"hostname": HOSTNAME}
    for step in steps:
        if step.kind == "option":
            key, value = step.value
            options[key] = value
    conn = ServerConnection(ServerOptions(**options))
    session = AcceptAll(conn)
    pending = conn.send(GREETING).decode("utf-8").split("\r\n")[:-1]
    for step in steps:
        where = f"transcript line {step.line}"
        if step.kind == "send":
            pending += session.feed(step.value).decode("utf-8").split("\r\n")[:-1]
        elif step.kind in ("expect", "expect_re"):
            assert pending, f"{where}: expected a reply, the server sent nothing more"
            got = pending.pop(0)
            if step.kind == "expect":
                assert got == step.value, f"{where}: got {got!r}, expected {step.value!r}"
            else:
                assert step.value.fullmatch(got), f"{where}: {got!r} !~ {step.value.pattern!r}"
        elif step.kind == "starttls":
            conn.start_tls()
        elif step.kind == "eof":
            pending += session.feed(b"").decode("utf-8").split("\r\n")[:-1]
        elif step.kind == "closed":
            assert conn.closed, f"{where}: connection still open"
    assert not pending, f"unexpected replies at the end: {pending!r}"
