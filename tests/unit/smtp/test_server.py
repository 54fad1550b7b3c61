"""ServerConnection: the event/reply contract, every command, every refusal."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import gannet.smtp
from gannet.smtp import (
    NEED_DATA,
    PAUSED,
    BareNewline,
    Bdat,
    BodyChunk,
    BodyType,
    CommandError,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfChunk,
    EndOfData,
    Helo,
    Help,
    LocalProtocolError,
    MailFrom,
    MessageRefused,
    Noop,
    Notify,
    Quit,
    RcptTo,
    Ret,
    Rset,
    ServerConnection,
    ServerOptions,
    ServerState,
    StartTls,
    Vrfy,
    queued,
)
from gannet.smtp import replies as R
from gannet.smtp.replies import Reply

from .helpers import assert_parses, greeted, run, server
from .transcript import GREETING, HOSTNAME, AcceptAll

TXN = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"


def errors(events: list[object]) -> list[Reply]:
    return [ev.reply for ev in events if isinstance(ev, CommandError | MessageRefused)]


# -- the contract: greeting, PAUSED, one send per event ---------------------------------


def test_greeting_comes_first() -> None:
    conn = ServerConnection(ServerOptions(HOSTNAME))
    assert conn.state is ServerState.GREETING
    conn.receive_data(b"EHLO x\r\n")
    assert conn.next_event() is PAUSED
    assert conn.send(GREETING) == b"220 mx.test ESMTP ready\r\n"
    assert conn.state is ServerState.READY
    assert conn.next_event() == Ehlo("x")
    assert conn.next_event() is PAUSED  # until the reply
    conn.send(conn.ehlo_reply())
    assert conn.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        conn.send(R.R250_OK)  # nothing pending


def test_refused_greeting_only_answers_quit() -> None:
    conn = ServerConnection(ServerOptions(HOSTNAME))
    conn.send(Reply(554, "5.3.2", "No service"))
    assert conn.state is ServerState.REFUSED
    session = AcceptAll(conn)
    out = session.feed(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nQUIT\r\n")
    assert out == b"503 5.5.1 Bad sequence of commands\r\n" * 2 + b"221 2.0.0 Bye\r\n"
    assert conn.closed


def test_421_greeting_closes() -> None:
    conn = ServerConnection(ServerOptions(HOSTNAME))
    conn.send(R.R421_TOO_BUSY)
    assert conn.closed
    conn.receive_data(b"EHLO x\r\n")
    assert conn.next_event() is PAUSED


def test_impossible_replies_raise() -> None:
    conn, session = greeted()
    session.feed(TXN)
    conn.receive_data(b"DATA\r\n")
    assert conn.next_event() == Data()
    with pytest.raises(LocalProtocolError):
        conn.send(R.R250_OK)  # 250 to DATA: Rule 2
    with pytest.raises(LocalProtocolError):
        conn.send(Reply(199, "", "what"))
    with pytest.raises(LocalProtocolError):
        conn.start_tls()  # not after a 220 to STARTTLS


def test_session_reply_drives_state() -> None:
    conn, _ = server()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<d@e.f>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n")
    assert conn.next_event() == Ehlo("c")
    conn.send(Reply(550, "5.7.1", "Go away"))
    assert (conn.state, conn.helo_name) == (ServerState.READY, None)
    assert conn.next_event() == CommandError(R.R503_NEED_HELO, "MAIL refused")
    conn.send(R.R503_NEED_HELO)
    assert conn.next_event() == CommandError(R.R503_NEED_HELO, "MAIL refused")
    conn.send(R.R503_NEED_HELO)
    assert conn.next_event() == CommandError(R.R503_NEED_HELO, "RCPT refused")
    conn.send(R.R503_NEED_HELO)
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<d@e.f>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n")
    assert isinstance(conn.next_event(), CommandError)  # the first DATA
    conn.send(R.R503_NEED_HELO)
    assert conn.next_event() == Ehlo("c")
    conn.send(conn.ehlo_reply())
    assert (conn.state, conn.helo_name, conn.esmtp) == (ServerState.GREETED, "c", True)
    assert conn.next_event() == MailFrom("a@b.c")
    conn.send(Reply(451, "4.3.0", "Try later"))
    assert (conn.state, conn.mail) == (ServerState.GREETED, None)
    assert conn.next_event() == MailFrom("d@e.f")
    conn.send(R.R250_SENDER_OK)
    assert conn.state is ServerState.MAIL and conn.mail == MailFrom("d@e.f")
    assert conn.next_event() == RcptTo("x@y.z")
    conn.send(R.R550_NO_SUCH_USER)
    assert conn.recipients == []
    assert conn.next_event() == CommandError(R.R503_NEED_RCPT, "DATA refused")


def test_negative_reply_to_data_means_no_body() -> None:
    conn, session = greeted()
    session.feed(TXN)
    conn.receive_data(b"DATA\r\nNOOP\r\n")
    assert conn.next_event() == Data()
    conn.send(R.R554_NO_VALID_RECIPIENTS)
    assert conn.state is ServerState.RCPT
    assert conn.next_event() == Noop()  # parsed as a command, not content


def test_421_to_any_event_closes() -> None:
    conn, _session = greeted()
    conn.receive_data(b"NOOP\r\nNOOP\r\n")
    assert conn.next_event() == Noop()
    assert conn.send(R.R421_SHUTTING_DOWN).startswith(b"421 4.3.2")
    assert conn.closed and conn.next_event() is PAUSED


def test_close_with_at_any_time() -> None:
    conn, session = greeted()
    session.feed(TXN + b"DATA\r\nhalf a body")
    assert conn.state is ServerState.BODY
    assert conn.close_with(R.R421_TIMEOUT) == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert conn.closed
    conn.receive_data(b"more\r\n.\r\n")
    assert conn.next_event() is PAUSED


def test_eof() -> None:
    conn, session = greeted()
    session.feed(TXN + b"DATA\r\npartial")
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.closed and conn.next_event() is PAUSED
    conn2, _ = greeted()
    conn2.receive_data(b"NOO")
    conn2.receive_data(b"")
    assert conn2.next_event() == ConnectionClosed()
    conn3, _ = greeted()
    conn3.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn3.receive_data(b"x")


def test_options_are_replaceable() -> None:
    conn, _session = greeted()
    assert b"AUTH" not in conn.ehlo_reply().encode()
    conn.options = dataclasses.replace(conn.options, auth=True)
    assert b"250-AUTH PLAIN LOGIN" in conn.ehlo_reply().encode()


# -- commands ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"HELO client.example", Helo("client.example")),
        (b"helo [192.0.2.1]", Helo("[192.0.2.1]")),
        (b"EHLO client.example", Ehlo("client.example")),
        (b"RSET", Rset()),
        (b"NOOP", Noop()),
        (b"NOOP anything at all", Noop()),
        (b"VRFY postmaster", Vrfy("postmaster")),
        (b"HELP", Help("")),
        (b"HELP MAIL", Help("MAIL")),
        (b"MAIL FROM:<a@example.org>", MailFrom("a@example.org")),
        (b"mail from: <a@example.org>", MailFrom("a@example.org")),
        (b"MAIL FROM:<>", MailFrom("")),
        (b"MAIL FROM:<@hop.example:a@example.org>", MailFrom("a@example.org")),
        (
            b"MAIL FROM:<a@example.org> SIZE=1000 BODY=8bitmime RET=HDRS ENVID=x+2By AUTH=<>",
            MailFrom("a@example.org", 1000, BodyType.EIGHT_BIT_MIME, False, Ret.HDRS, "x+y", "<>"),
        ),
        (b"MAIL FROM:<a@example.org> BODY=7BIT", MailFrom("a@example.org", body=BodyType.SEVEN_BIT)),
        (
            "MAIL FROM:<jöran@bücher.example> SMTPUTF8".encode(),
            MailFrom("jöran@bücher.example", smtputf8=True),
        ),
    ],
)
def test_commands(line: bytes, event: object) -> None:
    options = {"auth": True} if b"AUTH=" in line else {}
    assert_parses(line + b"\r\n", [event], **options)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"RCPT TO:<b@example.net>", RcptTo("b@example.net")),
        (b"rcpt to: <Postmaster>", RcptTo("Postmaster")),
        (
            b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE",
            RcptTo("b@example.net", Notify.SUCCESS | Notify.FAILURE),
        ),
        (b"RCPT TO:<b@example.net> NOTIFY=never", RcptTo("b@example.net", Notify.NEVER)),
        (
            b"RCPT TO:<b@example.net> ORCPT=rfc822;b+40example.net",
            RcptTo("b@example.net", None, "rfc822;b@example.net"),
        ),
    ],
)
def test_rcpt(line: bytes, event: object) -> None:
    assert_parses(line + b"\r\n", [event], prefix=b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")  # type: ignore[list-item]


def test_utf8_recipient_needs_smtputf8_on_mail() -> None:
    rcpt = "RCPT TO:<jöran@bücher.example>\r\n".encode()
    events, _ = run(b"MAIL FROM:<a@example.org> SMTPUTF8\r\n" + rcpt)
    assert events[1] == RcptTo("jöran@bücher.example")
    events, _ = run(b"MAIL FROM:<a@example.org>\r\n" + rcpt)
    assert errors(events) == [R.R553_NEED_SMTPUTF8]


# Each refusal: (options, prefix commands, the command, the reply).
REFUSALS = [
    ({}, b"", b"MAIL FROM:<a@b.c>", R.R503_NEED_HELO),
    ({}, b"", b"STARTTLS", R.R503_NEED_HELO),
    ({}, b"EHLO c", b"RCPT TO:<a@b.c>", R.R503_NEED_MAIL),
    ({}, b"EHLO c", b"DATA", R.R503_NEED_MAIL),
    ({}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"MAIL FROM:<a@b.c>", R.R503_NESTED_MAIL),
    ({}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"DATA", R.R503_NEED_RCPT),
    ({}, b"EHLO c", b"FROB", R.R500_SYNTAX),
    ({}, b"EHLO c", b"", R.R500_SYNTAX),
    ({}, b"EHLO c", b"EXPN list", R.R502_NOT_IMPLEMENTED),
    ({}, b"EHLO c", b"TURN", R.R502_NOT_IMPLEMENTED),
    ({}, b"EHLO c", b"ETRN example.org", R.R502_NOT_IMPLEMENTED),
    ({}, b"EHLO c", b"LHLO c", R.R500_SYNTAX),
    ({}, b"EHLO c", b"GET / HTTP/1.0", R.R421_FORBIDDEN_COMMAND),
    ({}, b"", b"EHLO", R.R501_SYNTAX_PARAMS),
    ({}, b"", b"HELO  ", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"RSET now", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"VRFY", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"NOOP \x00", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"NOOP caf\xc3\xa9", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"MAIL FROM:<a\xff@b.c>", R.R501_BAD_ADDRESS),
    ({}, b"EHLO c", b"MAIL FROM:<a@b.c> FOO=1", R.R555_PARAM_NOT_RECOGNIZED),
    ({}, b"EHLO c", b"MAIL FROM:<a@b.c> SIZE=x", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"MAIL FROM:<a@b.c> SIZE=52428801", R.R552_TOO_BIG),
    ({}, b"EHLO c", b"MAIL FROM:<a@b.c> BODY=BINARYMIME", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"MAIL FROM:<a@b.c> RET=ALL", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"MAIL FROM:<a@b.c> SMTPUTF8=yes", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"MAIL FROM:<a@b.c> AUTH=<>", R.R555_PARAM_NOT_RECOGNIZED),
    ({"eightbitmime": False}, b"EHLO c", b"MAIL FROM:<a@b.c> BODY=8BITMIME", R.R555_PARAM_NOT_RECOGNIZED),
    ({"smtputf8": False}, b"EHLO c", b"MAIL FROM:<a@b.c> SMTPUTF8", R.R555_PARAM_NOT_RECOGNIZED),
    ({"dsn": False}, b"EHLO c", b"MAIL FROM:<a@b.c> RET=FULL", R.R555_PARAM_NOT_RECOGNIZED),
    (
        {"dsn": False},
        b"EHLO c\r\nMAIL FROM:<a@b.c>",
        b"RCPT TO:<a@b.c> NOTIFY=NEVER",
        R.R555_PARAM_NOT_RECOGNIZED,
    ),
    ({}, b"EHLO c", "MAIL FROM:<jöran@bücher.example>".encode(), R.R553_NEED_SMTPUTF8),
    ({}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"RCPT TO:<>", R.R501_BAD_ADDRESS),
    ({}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"RCPT TO:<a@b.c> NOTIFY=NEVER,DELAY", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"RCPT TO:<a@b.c> NOTIFY=", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"RCPT TO:<a@b.c> ORCPT=bad", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"RCPT TO:<a@b.c> NOTIFY=SUCCESS,SUCCESS", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"STARTTLS", R.R454_TLS_UNAVAILABLE),
    ({"starttls": True}, b"EHLO c", b"STARTTLS now", R.R501_SYNTAX_PARAMS),
    ({"starttls": True}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"STARTTLS", R.R503_IN_TRANSACTION),
    ({}, b"EHLO c", b"AUTH PLAIN", R.R503_AUTH_NOT_OFFERED),
    ({"auth": True}, b"HELO c", b"AUTH PLAIN", R.R503_NEED_EHLO),
    ({"auth": True}, b"EHLO c", b"AUTH", R.R501_SYNTAX_PARAMS),
    ({"auth": True}, b"EHLO c", b"AUTH DIGEST-MD5", R.R504_AUTH_MECH),
    ({"auth": True}, b"EHLO c\r\nMAIL FROM:<a@b.c>", b"AUTH PLAIN", R.R503_IN_TRANSACTION),
    ({"auth": True, "tls_required": True}, b"EHLO c", b"AUTH PLAIN", R.R530_STARTTLS_FIRST),
    ({"tls_required": True}, b"EHLO c", b"MAIL FROM:<a@b.c>", R.R530_STARTTLS_FIRST),
    ({"tls_required": True}, b"EHLO c", b"VRFY a", R.R530_STARTTLS_FIRST),
    ({"auth_required": True}, b"EHLO c", b"MAIL FROM:<a@b.c>", R.R530_AUTH_REQUIRED),
    ({}, b"EHLO c", b"BDAT", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"BDAT 1 NOTLAST", R.R501_SYNTAX_PARAMS),
    ({}, b"EHLO c", b"NO\rOP", R.R500_BARE_LF),
    ({}, b"EHLO c", b"NOOP " + b"x" * 600, R.R500_LINE_TOO_LONG),
]


@pytest.mark.parametrize(
    ("options", "prefix", "line", "reply"), REFUSALS, ids=[repr(r[2])[:40] for r in REFUSALS]
)
def test_refusals(options: dict[str, object], prefix: bytes, line: bytes, reply: Reply) -> None:
    conn, session = server(**options)
    if prefix:
        session.feed(prefix + b"\r\n")
    assert not errors(session.events)
    session.events.clear()
    out = session.feed(line + b"\r\n")
    assert errors(session.events) == [reply]
    assert out == reply.encode()
    assert conn.state is not ServerState.BODY
    assert session.events and all(isinstance(e, CommandError) for e in session.events)


def test_vrfy_help_quit_and_junk() -> None:
    events, out = run(b"VRFY bob\r\nHELP\r\nQUIT\r\n")
    assert events == [Vrfy("bob"), Help(""), Quit()]
    assert out.endswith(b"221 2.0.0 Bye\r\n")


def test_data_after_quit_is_not_parsed() -> None:
    conn, session = greeted()
    session.feed(b"QUIT\r\nMAIL FROM:<a@b.c>\r\n")
    assert conn.closed
    assert session.events == [Quit()]


# -- transactions and content -----------------------------------------------------------


def test_message() -> None:
    events, out = run(TXN + b"DATA\r\nSubject: x\r\n\r\n..hi\r\n.\r\nQUIT\r\n")
    assert events[2:] == [Data(), BodyChunk(b"Subject: x\r\n\r\n.hi\r\n"), EndOfData(19), Quit()]
    assert b"250 2.0.0 queued as TEST\r\n" in out


def test_whole_pipeline_parses_the_same_bytewise() -> None:
    data = TXN + b"DATA\r\nline\r\n.\r\n" + TXN + b"BDAT 3 LAST\r\nabc"
    expected = [
        MailFrom("a@example.org"),
        RcptTo("b@example.net"),
        Data(),
        BodyChunk(b"line\r\n"),
        EndOfData(6),
        MailFrom("a@example.org"),
        RcptTo("b@example.net"),
        Bdat(3, True),
        BodyChunk(b"abc"),
        EndOfData(3),
    ]
    replies = assert_parses(data, expected, trailing=b"QUIT\r\n")
    assert replies.count(b"queued as TEST") == 2


def test_transaction_state_is_reset() -> None:
    conn, session = greeted()
    session.feed(TXN + b"DATA\r\nx\r\n.\r\n")
    assert (conn.state, conn.mail, conn.recipients) == (ServerState.GREETED, None, [])
    session.feed(TXN)
    assert conn.state is ServerState.RCPT and len(conn.recipients) == 1
    session.feed(b"RSET\r\n")
    assert (conn.state, conn.mail, conn.recipients) == (ServerState.GREETED, None, [])
    session.feed(TXN + b"EHLO again\r\n")
    assert (conn.state, conn.mail, conn.helo_name) == (ServerState.GREETED, None, "again")
    session.feed(b"HELO old\r\n")
    assert conn.esmtp is False


def test_too_many_recipients() -> None:
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(5))
    conn, session = greeted(max_recipients=3, max_errors=2)
    session.feed(b"MAIL FROM:<a@example.org>\r\n" + rcpts)
    assert len(conn.recipients) == 3
    assert errors(session.events) == [R.R452_TOO_MANY_RECIPIENTS] * 2
    assert sum(isinstance(e, RcptTo) for e in session.events) == 3
    assert conn.errors == 0  # within the overshoot limit: not counted (Postfix)
    session.feed(b"DATA\r\nx\r\n.\r\n")
    assert session.messages == [b"x\r\n"]


def test_error_limit() -> None:
    conn, session = greeted(max_errors=3)
    out = session.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert out.count(b"500 ") == 3
    assert conn.closed
    assert Noop() not in session.events
    # negative replies chosen by the session count too
    conn, session = greeted(max_errors=1)
    conn.receive_data(b"MAIL FROM:<a@b.c>\r\n")
    conn.next_event()
    conn.send(Reply(550, "5.7.1", "No"))
    assert conn.next_event() == CommandError(R.R421_TOO_MANY_ERRORS, "error limit reached")


def test_junk_commands_count_as_errors_past_the_limit() -> None:
    conn, session = greeted(max_junk_commands=2, max_errors=3)
    session.feed(b"NOOP\r\n" * 5)
    assert conn.closed
    assert session.events[-1] == CommandError(R.R421_TOO_MANY_ERRORS, "error limit reached")


def test_size_limit_on_content() -> None:
    conn, session = greeted(max_message_size=10)
    out = session.feed(TXN + b"DATA\r\n" + b"x" * 100 + b"\r\n.\r\nNOOP\r\n")
    assert errors(session.events) == [R.R552_TOO_BIG]
    assert out.endswith(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 OK\r\n")
    assert session.messages == []
    assert conn.state is ServerState.GREETED
    assert b"250-SIZE 10" in conn.ehlo_reply().encode()
    conn.options = dataclasses.replace(conn.options, max_message_size=0)
    assert b"250-SIZE\r\n" in conn.ehlo_reply().encode()


@pytest.mark.parametrize("mode", list(BareNewline))
def test_bare_lf_in_content(mode: BareNewline) -> None:
    _conn, session = greeted(bare_newline=mode)
    session.feed(TXN + b"DATA\r\nfoo\nbar\r\n.\r\n")
    if mode is BareNewline.REJECT:
        assert errors(session.events) == [R.R554_BARE_LF]
        assert session.messages == []
    else:
        assert session.messages == [b"foo\r\nbar\r\n"]


SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n"]
SMUGGLED = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n.\r\n"


@pytest.mark.parametrize("probe", SMUGGLING, ids=[repr(p) for p in SMUGGLING])
@pytest.mark.parametrize("mode", list(BareNewline))
@pytest.mark.parametrize("split", [0, 1])
def test_smuggling(probe: bytes, mode: BareNewline, split: int) -> None:
    """CVE-2023-51764/5/6: exactly one message ends, never two."""
    data = TXN + b"DATA\r\nlegit" + probe + SMUGGLED + b"QUIT\r\n"
    events, out = run(data, split=split, bare_newline=mode)
    ends = [e for e in events if isinstance(e, EndOfData | MessageRefused)]
    assert len(ends) == 1
    assert sum(isinstance(e, MailFrom) for e in events) == 1
    if mode is BareNewline.REJECT:
        assert ends == [MessageRefused(R.R554_BARE_LF)]
        assert out.count(b"554 5.5.2") == 1 and b"queued" not in out
    else:
        body = b"".join(e.data for e in events if isinstance(e, BodyChunk))
        assert b"MAIL FROM:<x@y>" in body and b"smuggled" in body
        assert out.count(b"queued as TEST") == 1
    assert out.endswith(b"221 2.0.0 Bye\r\n")


def test_starttls_injection() -> None:
    """CVE-2011-0411: commands pipelined after STARTTLS never run."""
    conn, session = greeted(starttls=True)
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert conn.next_event() == StartTls()
    assert conn.send(R.R220_GO_AHEAD_TLS) == b"220 2.0.0 Ready to start TLS\r\n"
    assert conn.state is ServerState.TLS_PENDING
    assert conn.next_event() is PAUSED
    conn.receive_data(b"RCPT TO:<also-evil@x>\r\n")  # plaintext before the handshake: dropped
    conn.start_tls()
    assert (conn.tls, conn.helo_name, conn.state) == (True, None, ServerState.READY)
    assert conn.next_event() is NEED_DATA
    session.feed(b"EHLO c\r\nMAIL FROM:<good@x>\r\n")
    assert not any(isinstance(e, MailFrom) and e.address.startswith("evil") for e in session.events)
    assert MailFrom("good@x") in session.events
    assert b"STARTTLS" not in conn.ehlo_reply().encode()


def test_starttls_refused_by_session_keeps_plaintext() -> None:
    conn, _session = greeted(starttls=True)
    conn.receive_data(b"STARTTLS\r\nNOOP\r\n")
    assert conn.next_event() == StartTls()
    conn.send(R.R454_TLS_UNAVAILABLE)
    assert conn.next_event() == Noop()


@pytest.mark.parametrize("mode", list(BareNewline))
def test_bare_lf_ends_a_command_only_when_normalizing(mode: BareNewline) -> None:
    events, out = run(b"NOOP\nNOOP\r\n", bare_newline=mode)
    if mode is BareNewline.REJECT:
        assert events == [CommandError(R.R500_BARE_LF, "refused line"), Noop()]
        assert out.startswith(b"500 5.5.2 Bare <LF>")
    else:
        assert events == [Noop(), Noop()]


def test_enhanced_status_codes_off() -> None:
    _, out = run(b"FOO\r\n", enhancedstatuscodes=False)
    assert out == b"500 Syntax error, command unrecognized\r\n"


def test_ehlo_reply() -> None:
    conn, _ = greeted(starttls=True, auth=True, tls_required=True)
    lines = conn.ehlo_reply("hello [192.0.2.1]").encode().split(b"\r\n")
    assert lines[0] == b"250-mx.test hello [192.0.2.1]"
    assert b"250-STARTTLS" in lines and b"250-AUTH PLAIN LOGIN" not in lines
    conn, _ = greeted(
        pipelining=False,
        eightbitmime=False,
        smtputf8=False,
        chunking=False,
        dsn=False,
        enhancedstatuscodes=False,
    )
    assert conn.ehlo_reply().encode() == b"250-mx.test\r\n250 SIZE 52428800\r\n"


def test_improper_pipelining_is_noted() -> None:
    conn, session = greeted()
    session.feed(b"NOOP\r\n")
    assert not conn.improper_pipelining
    session.feed(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n")
    assert conn.improper_pipelining


# -- BDAT -------------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    events, out = run(TXN + b"BDAT 3\r\nab\rBDAT 3 LAST\r\n\ncd")
    assert events[2:] == [
        Bdat(3, False),
        BodyChunk(b"ab"),
        EndOfChunk(3),
        Bdat(3, True),
        BodyChunk(b"\r\ncd"),
        EndOfData(6),
    ]
    assert out.endswith(b"250 2.0.0 OK\r\n250 2.0.0 queued as TEST\r\n")


def test_bdat_then_data_is_refused() -> None:
    events, _ = run(TXN + b"BDAT 1\r\nxDATA\r\nRCPT TO:<c@d.e>\r\nBDAT 1 LAST\r\ny")
    assert errors(events) == [R.R503_BAD_SEQUENCE, R.R503_BAD_SEQUENCE]
    assert isinstance(events[-1], EndOfData)


def test_refused_bdat_is_skipped_then_answered() -> None:
    events, _out = run(b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n", split=1)
    assert errors(events) == [R.R503_NEED_MAIL]
    assert events[-1] == Noop()
    events, _ = run(TXN + b"BDAT 4 LAST\r\nabcd", chunking=False)
    assert errors(events) == [R.R502_NOT_IMPLEMENTED]


def test_bdat_refused_chunk_ends_the_transaction() -> None:
    conn, session = greeted(max_message_size=5)
    session.feed(TXN + b"BDAT 10\r\n0123456789BDAT 1 LAST\r\nx")
    assert errors(session.events) == [R.R552_TOO_BIG, R.R503_NEED_MAIL]
    assert conn.state is ServerState.GREETED
    conn, session = greeted()
    conn.receive_data(TXN + b"BDAT 2\r\nabBDAT 1 LAST\r\nc")
    conn.send(R.R250_SENDER_OK if isinstance(conn.next_event(), MailFrom) else R.R500_SYNTAX)
    conn.send(R.R250_RCPT_OK if isinstance(conn.next_event(), RcptTo) else R.R500_SYNTAX)
    assert conn.next_event() == Bdat(2, False)
    assert conn.next_event() == BodyChunk(b"ab")
    assert conn.next_event() == EndOfChunk(2)
    conn.send(R.R452_NO_SPACE)
    assert conn.state is ServerState.GREETED
    assert conn.next_event() == CommandError(R.R503_NEED_MAIL, "BDAT refused")


# -- AUTH -------------------------------------------------------------------------------


def test_auth_state() -> None:
    conn, session = greeted(auth=True)
    session.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert conn.authenticated == "alice"
    conn, session = greeted(auth=True)
    session.feed(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n")
    assert conn.authenticated is None
    assert conn.state is ServerState.GREETED


def test_auth_long_line_ends_the_exchange() -> None:
    _conn, session = greeted(auth=True)
    session.feed(b"AUTH PLAIN\r\n" + b"A" * 13000 + b"\r\nNOOP\r\n")
    assert errors(session.events) == [R.R500_LINE_TOO_LONG]
    assert session.events[-1] == Noop()


# -- the package boundary ---------------------------------------------------------------


def test_smtp_imports_nothing_it_must_not() -> None:
    """STYLE.md: gannet.smtp imports only gannet.smtp.*, gannet.util and no I/O modules."""
    forbidden = {"asyncio", "socket", "ssl", "time", "selectors", "threading", "os"}
    for path in Path(gannet.smtp.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in forbidden, f"{path.name} imports {name}"
                if top == "gannet":
                    assert name.startswith(("gannet.smtp", "gannet.util")), f"{path.name} imports {name}"


def test_queued_reply() -> None:
    assert queued("ABC").encode() == b"250 2.0.0 queued as ABC\r\n"
