"""Fuzzing the client core (hypothesis).

Invariant: any reply stream either parses to Replies (or ConnectionClosed) or
raises RemoteProtocolError, never anything else; and any content the client
frames arrives at the server core as exactly one message, equal to the
content with its line ends made CRLF.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gannet.smtp import (
    NEED_DATA,
    PAUSED,
    ClientConnection,
    ClientOptions,
    ClientState,
    Data,
    Ehlo,
    MailFrom,
    Noop,
    RcptTo,
    RemoteProtocolError,
    Reply,
    ServerConnection,
    ServerOptions,
)
from gannet.smtp.client import REPLY_LINE_LIMIT

FUZZ = settings(max_examples=400, deadline=None)

LINES = [
    b"220 mx ESMTP",
    b"250-mx",
    b"250-PIPELINING",
    b"250 SIZE 10",
    b"250 2.1.0 ok",
    b"354 go",
    b"421 bye",
]
reply_stream = st.lists(
    st.one_of(
        st.builds(
            lambda line, end: line + end, st.sampled_from(LINES), st.sampled_from([b"\r\n", b"\n", b""])
        ),
        st.binary(max_size=30),
    ),
    max_size=20,
).map(b"".join)


@FUZZ
@given(data=reply_stream, cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=8))
def test_reply_streams(data: bytes, cuts: list[int]) -> None:
    conn = ClientConnection(ClientOptions("c"))
    pos = 0
    try:
        for size in [*cuts, len(data)]:
            conn.receive_data(data[pos : pos + size])
            pos += size
            while (ev := conn.next_event()) not in (NEED_DATA, PAUSED):
                if isinstance(ev, Reply):
                    assert 200 <= ev.code < 600
                    idle = conn.state in (ClientState.GREETED, ClientState.READY) and not conn._outstanding
                    if idle:
                        conn.send(Noop())  # keep something outstanding
            assert len(conn._rb) < REPLY_LINE_LIMIT  # at most one partial line is kept
        conn.receive_data(b"")
        conn.next_event()
    except RemoteProtocolError:
        pass


def normalized(body: bytes) -> bytes:
    out = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


@FUZZ
@given(
    pieces=st.lists(
        st.one_of(st.binary(max_size=40), st.sampled_from([b".", b"\r\n.", b"\r\n.\r\n", b"\n.\n", b"\r"])),
        max_size=25,
    )
)
def test_content_round_trip(pieces: list[bytes]) -> None:
    server = ServerConnection(ServerOptions("mx"))
    client = ClientConnection(ClientOptions("c"))
    client.receive_data(server.send(Reply(220, "", "mx")))
    assert client.next_event() == Reply(220, "", "mx")
    wire = client.send(Ehlo("c"))
    script = [
        (lambda ev: server.ehlo_reply()),
        (lambda ev: Reply(250, "", "ok")),
        (lambda ev: Reply(250, "", "ok")),
        (lambda ev: Reply(354, "", "go")),
    ]
    body = bytearray()
    ends = []

    def pump(data: bytes) -> None:
        server.receive_data(data)
        while (ev := server.next_event()) not in (NEED_DATA, PAUSED):
            name = type(ev).__name__
            if name == "BodyChunk":
                body.extend(ev.data)  # type: ignore[union-attr]
            elif name in ("EndOfData", "MessageRefused"):
                ends.append(ev)
                client.receive_data(server.send(Reply(250, "", "queued")))
            else:
                client.receive_data(server.send(script.pop(0)(ev)))
        while client.next_event() not in (NEED_DATA, PAUSED):
            pass

    pump(wire)
    pump(client.send(MailFrom("a@b.c")) + client.send(RcptTo("d@e.f")) + client.send(Data()))
    wire = b"".join(client.send_body(p) for p in pieces) + client.end_body()
    pump(wire)
    assert len(ends) == 1 and type(ends[0]).__name__ == "EndOfData"
    assert bytes(body) == normalized(b"".join(pieces))
