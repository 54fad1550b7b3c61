"""ClientConnection: replies, capabilities, pipelining, content framing, LMTP, and a
client ↔ server pair in memory (aioquic style)."""

from __future__ import annotations

import pytest

from gannet.smtp import (
    NEED_DATA,
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
    Noop,
    Notify,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Ret,
    Rset,
    ServerConnection,
    ServerOptions,
    StartTls,
    Vrfy,
)
from gannet.smtp.client import parse_reply_line, xtext_encode

from .transcript import GREETING, AcceptAll

EHLO_REPLY = (
    b"250-mx.example Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-DSN\r\n"
    b"250-SMTPUTF8\r\n250-CHUNKING\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n"
)


def replies(conn: ClientConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    out: list[object] = []
    while (ev := conn.next_event()) not in (NEED_DATA, PAUSED):
        out.append(ev)
    return out


def ready(ehlo: bytes = EHLO_REPLY, lmtp: bool = False) -> ClientConnection:
    conn = ClientConnection(ClientOptions("client.example", lmtp=lmtp))
    assert conn.next_event() is NEED_DATA  # waiting for the greeting
    assert replies(conn, b"220 mx.example ESMTP\r\n") == [Reply(220, "", "mx.example ESMTP")]
    assert conn.next_event() is PAUSED  # nothing outstanding
    assert conn.send(Ehlo("client.example")) == (b"LHLO" if lmtp else b"EHLO") + b" client.example\r\n"
    replies(conn, ehlo)
    assert conn.state is ClientState.GREETED
    return conn


def test_capabilities() -> None:
    conn = ready()
    assert conn.capabilities == Capabilities(
        size=1000,
        pipelining=True,
        eightbitmime=True,
        smtputf8=True,
        dsn=True,
        chunking=True,
        starttls=True,
        enhancedstatuscodes=True,
        auth=frozenset({"PLAIN", "LOGIN"}),
        keywords=conn.capabilities.keywords if conn.capabilities else {},
    )
    assert Capabilities.parse(Reply(250, "", "x", "SIZE")).size == 0
    assert Capabilities.parse(Reply(250, "", "x")).size is None


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"250 OK\r\n", Reply(250, "", "OK")),
        (b"250\r\n", Reply(250, "", "")),
        (b"250 2.1.0 Sender ok\r\n", Reply(250, "2.1.0", "Sender ok")),
        (
            b"550-5.1.1 No such\r\n550-5.1.1 user\r\n550 5.1.1 here\r\n",
            Reply(550, "5.1.1", "No such", "user", "here"),
        ),
        (b"250 5.1.0 odd class\r\n", Reply(250, "", "5.1.0 odd class")),
        (b"250 OK\n", Reply(250, "", "OK")),  # bare LF tolerated from servers
    ],
)
def test_reply_parsing(data: bytes, reply: Reply) -> None:
    for step in (len(data), 1):
        conn = ClientConnection(ClientOptions("c"))
        got: list[object] = []
        for i in range(0, len(data), step):
            got += replies(conn, data[i : i + step])
        assert got == [reply]


@pytest.mark.parametrize(
    "data",
    [
        b"25 OK\r\n",
        b"abc OK\r\n",
        b"250_OK\r\n",
        b"199 no\r\n",
        b"260 no\r\n",
        b"250-a\r\n251 b\r\n",
        b"250 " + b"x" * 5000 + b"\r\n",
        b"250-x\r\n" * 300,
        b"250 a\rb\r\n",
    ],
)
def test_malformed_replies(data: bytes) -> None:
    conn = ClientConnection(ClientOptions("c"))
    with pytest.raises(RemoteProtocolError):
        replies(conn, data)


def test_unsolicited_replies() -> None:
    conn = ready()
    with pytest.raises(RemoteProtocolError):
        replies(conn, b"250 surprise\r\n")
    conn = ready()
    assert replies(conn, b"421 4.3.2 shutting down\r\n") == [Reply(421, "4.3.2", "shutting down")]
    assert conn.closed


def test_eof() -> None:
    conn = ready()
    conn.send(Noop())
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.closed


def test_pipelined_transaction() -> None:
    conn = ready()
    wire = conn.send(MailFrom("a@example.org", size=10, body=BodyType.EIGHT_BIT_MIME))
    wire += conn.send(RcptTo("b@example.net"))
    wire += conn.send(RcptTo("c@example.net"))
    wire += conn.send(Data())
    assert wire == (
        b"MAIL FROM:<a@example.org> SIZE=10 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())  # DATA ends the group (RFC 2920 §3.1)
    got = replies(conn, b"250 2.1.0 ok\r\n550 5.1.1 no\r\n250 2.1.5 ok\r\n354 go\r\n")
    assert [r.code for r in got] == [250, 550, 250, 354]  # type: ignore[attr-defined]
    assert conn.accepted == [RcptTo("c@example.net")]
    assert conn.state is ClientState.DATA
    body = conn.send_body(b".hidden\r\nline\r\n.") + conn.send_body(b"\r\n..x\nend")
    assert body == b"..hidden\r\nline\r\n..\r\n...x\r\nend"
    assert conn.end_body() == b"\r\n.\r\n"
    got = replies(conn, b"250 2.0.0 queued as X\r\n")
    assert got == [Reply(250, "2.0.0", "queued as X")]
    assert conn.state is ClientState.GREETED and conn.accepted == []


def test_no_pipelining_without_the_extension() -> None:
    conn = ready(b"250 mx.example\r\n")
    conn.send(MailFrom("a@b.c"))
    with pytest.raises(LocalProtocolError):
        conn.send(RcptTo("d@e.f"))


def test_refused_mail_cascades() -> None:
    conn = ready()
    conn.send(MailFrom("a@b.c"))
    conn.send(RcptTo("d@e.f"))
    conn.send(Data())
    got = replies(conn, b"550 5.7.1 no\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert len(got) == 3 and conn.state is ClientState.GREETED
    conn.send(MailFrom("a@b.c"))
    with pytest.raises(RemoteProtocolError):
        replies(conn, b"354 go ahead\r\n")  # 354 to MAIL


def test_out_of_sequence_sends() -> None:
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.send(RcptTo("a@b.c"))
    with pytest.raises(LocalProtocolError):
        conn.send(Data())
    with pytest.raises(LocalProtocolError):
        conn.send_body(b"x")
    with pytest.raises(LocalProtocolError):
        conn.end_body()
    with pytest.raises(LocalProtocolError):
        conn.send(Vrfy("x" * 600))
    with pytest.raises(LocalProtocolError):
        conn.send(Event())
    with pytest.raises(LocalProtocolError):
        conn.start_tls()


def test_parameters_follow_capabilities() -> None:
    conn = ready()
    mail = MailFrom("a@b.c", size=5, ret=Ret.HDRS, envid="id+1=2", auth="<>")
    assert conn.send(mail) == b"MAIL FROM:<a@b.c> SIZE=5 RET=HDRS ENVID=id+2B1+3D2 AUTH=<>\r\n"
    rcpt = RcptTo("d@e.f", Notify.SUCCESS | Notify.DELAY, "rfc822;d@e.f")
    assert conn.send(rcpt) == b"RCPT TO:<d@e.f> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;d@e.f\r\n"
    assert conn.send(RcptTo("g@h.i", Notify.NEVER)) == b"RCPT TO:<g@h.i> NOTIFY=NEVER\r\n"
    plain = ready(b"250 mx.example\r\n")
    assert plain.send(mail) == b"MAIL FROM:<a@b.c>\r\n"
    with pytest.raises(LocalProtocolError):
        ready(b"250 mx.example\r\n").send(MailFrom("jöran@bücher.example"))
    assert (
        ready().send(MailFrom("jöran@bücher.example"))
        == "MAIL FROM:<jöran@bücher.example> SMTPUTF8\r\n".encode()
    )


def test_xtext() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("é") == "+C3+A9"


def test_auth_plain() -> None:
    conn = ready()
    assert conn.send(Credentials("PLAIN", "", "alice", "secret")) == b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"
    assert replies(conn, b"235 2.7.0 ok\r\n")[0].code == 235  # type: ignore[attr-defined]
    with pytest.raises(LocalProtocolError):
        conn.send(Credentials("LOGIN", "", "alice", "secret"))


def test_starttls_drops_plaintext() -> None:
    conn = ready()
    conn.send(StartTls())
    conn.receive_data(b"220 2.0.0 go\r\n250 injected\r\n")
    assert conn.next_event() == Reply(220, "2.0.0", "go")
    assert conn.state is ClientState.TLS_PENDING
    assert conn.next_event() is PAUSED
    conn.start_tls()
    assert conn.tls and conn.capabilities is None and conn.state is ClientState.READY
    assert conn.next_event() is PAUSED  # the injected 250 is gone


def test_bdat() -> None:
    conn = ready()
    wire = conn.send(MailFrom("a@b.c")) + conn.send(RcptTo("d@e.f"))
    wire += conn.send_chunk(b"ab\r\n", last=False) + conn.send_chunk(b".\r\n", last=True)
    assert wire.endswith(b"BDAT 4\r\nab\r\nBDAT 3 LAST\r\n.\r\n")
    got = replies(conn, b"250 ok\r\n250 ok\r\n250 ok\r\n250 queued\r\n")
    assert len(got) == 4 and conn.state is ClientState.GREETED
    with pytest.raises(LocalProtocolError):
        ready(b"250 mx\r\n").send_chunk(b"x", last=True)


def test_lmtp_one_reply_per_accepted_recipient() -> None:
    conn = ready(lmtp=True)
    with pytest.raises(LocalProtocolError):
        conn.send(Helo("x"))
    for cmd in (MailFrom("a@b.c"), RcptTo("r1@x"), RcptTo("bad@x"), RcptTo("r2@x"), Data()):
        conn.send(cmd)
    replies(conn, b"250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n")
    conn.send_body(b"hi\r\n")
    conn.end_body()
    conn.receive_data(b"250 2.0.0 r1 ok\r\n452 4.2.2 r2 full\r\nFOO")
    assert conn.next_event() == Reply(250, "2.0.0", "r1 ok")
    assert conn.answered == RcptTo("r1@x")
    assert conn.state is ClientState.DATA
    assert conn.next_event() == Reply(452, "4.2.2", "r2 full")
    assert conn.answered == RcptTo("r2@x")
    assert conn.state is ClientState.GREETED


def test_quit_and_rset() -> None:
    conn = ready()
    conn.send(Rset())
    replies(conn, b"250 ok\r\n")
    conn.send(Quit())
    replies(conn, b"221 bye\r\n")
    assert conn.closed
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


def test_parse_reply_line() -> None:
    assert parse_reply_line(b"250-x") == (250, True, "x")
    assert parse_reply_line(b"354") == (354, False, "")


# -- client ↔ server in memory ---------------------------------------------------------


def pair(**server_options: object) -> tuple[ClientConnection, ServerConnection, AcceptAll]:
    server = ServerConnection(ServerOptions("mx.test", **server_options))  # type: ignore[arg-type]
    session = AcceptAll(server)
    client = ClientConnection(ClientOptions("client.test", lmtp=bool(server_options.get("lmtp"))))
    client.receive_data(server.send(GREETING))
    return client, server, session


def exchange(client: ClientConnection, session: AcceptAll, wire: bytes) -> list[object]:
    return replies(client, session.feed(wire))


@pytest.mark.parametrize("lmtp", [False, True])
def test_pair_delivers_the_exact_body(lmtp: bool) -> None:
    client, server, session = pair(lmtp=lmtp)
    client.next_event()
    exchange(client, session, client.send(Ehlo("client.test")))
    wire = client.send(MailFrom("a@b.c")) + client.send(RcptTo("d@e.f")) + client.send(RcptTo("g@h.i"))
    got = exchange(client, session, wire + client.send(Data()))
    assert [r.code for r in got] == [250, 250, 250, 354]  # type: ignore[attr-defined]
    body = b".leading dot\r\n.\r\nsmuggle\n.\nMAIL FROM:<x@y>\r\n"
    wire = client.send_body(body[:7]) + client.send_body(body[7:]) + client.end_body()
    got = exchange(client, session, wire)
    assert len(got) == (2 if lmtp else 1)
    assert session.messages == [b".leading dot\r\n.\r\nsmuggle\r\n.\r\nMAIL FROM:<x@y>\r\n"]
    assert client.state is ClientState.GREETED
    got = exchange(client, session, client.send(Quit()))
    assert client.closed and server.closed
