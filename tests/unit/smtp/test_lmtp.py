"""lmtp.py and LMTP mode: LHLO, and one reply per accepted recipient (RFC 2033)."""

from __future__ import annotations

import pytest

from gannet.smtp import (
    PAUSED,
    Bdat,
    Ehlo,
    EndOfData,
    Event,
    LocalProtocolError,
    MessageRefused,
    Noop,
    RcptTo,
    ServerConnection,
    ServerState,
)
from gannet.smtp import replies as R
from gannet.smtp.lmtp import RecipientReplies, parse_lhlo
from gannet.smtp.replies import Reply

from .helpers import assert_parses, greeted, server

TXN = (
    b"MAIL FROM:<a@example.org>\r\n"
    b"RCPT TO:<b@example.org>\r\nRCPT TO:<nobody@example.org>\r\nRCPT TO:<c@example.org>\r\n"
)


def lmtp_with_refused_middle() -> ServerConnection:
    """LHLO, MAIL, three RCPTs of which the middle one is refused by the session."""
    conn, session = greeted(b"LHLO client\r\n", lmtp=True)
    conn.receive_data(TXN)
    for _ in range(4):
        ev = conn.next_event()
        assert isinstance(ev, Event)
        nobody = isinstance(ev, RcptTo) and ev.address.startswith("nobody")
        reply = R.R550_NO_SUCH_USER if nobody else session.reply_to(ev)
        assert reply is not None
        conn.send(reply)
    assert len(conn.recipients) == 2
    return conn


def test_lhlo() -> None:
    assert parse_lhlo("client.example", None, False) == Ehlo("client.example", lmtp=True)  # type: ignore[arg-type]
    assert_parses(b"LHLO client.example\r\n", [Ehlo("client.example", lmtp=True)], prefix=b"", lmtp=True)


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_helo_and_ehlo_are_refused(verb: bytes) -> None:
    conn, session = server(lmtp=True)
    out = session.feed(verb + b" client\r\n")
    assert out == b"500 5.5.1 This is an LMTP server: use LHLO\r\n"
    assert conn.state is ServerState.READY


def test_one_reply_per_recipient_after_data() -> None:
    conn = lmtp_with_refused_middle()
    conn.receive_data(b"DATA\r\nhi\r\n.\r\nNOOP\r\n")
    conn.next_event()
    conn.send(R.R354_START_INPUT)
    conn.next_event()  # BodyChunk
    assert conn.next_event() == EndOfData(4)
    assert conn.send(R.queued("A")) == b"250 2.0.0 queued as A\r\n"
    assert conn.next_event() is PAUSED  # one more reply owed
    assert conn.state is ServerState.BODY
    assert conn.send(Reply(452, "4.2.2", "Mailbox full")) == b"452 4.2.2 Mailbox full\r\n"
    assert conn.state is ServerState.GREETED
    assert conn.next_event() == Noop()


def test_refused_message_is_answered_per_recipient_in_one_send() -> None:
    _conn, session = greeted(b"LHLO client\r\n", lmtp=True, max_message_size=3)
    out = session.feed(TXN + b"DATA\r\ntoo big\r\n.\r\n")
    assert out.count(b"552 5.3.4") == 3
    assert isinstance(session.events[-1], MessageRefused)


def test_bdat_last_gets_one_reply_per_recipient() -> None:
    _conn, session = greeted(b"LHLO client\r\n", lmtp=True)
    out = session.feed(TXN + b"BDAT 2\r\nabBDAT 1 LAST\r\nc")
    assert Bdat(1, True) in session.events
    assert out.endswith(b"250 2.0.0 OK\r\n" + b"250 2.0.0 queued as TEST\r\n" * 3)


def test_impossible_reply_still_raises_in_lmtp() -> None:
    conn = lmtp_with_refused_middle()
    conn.receive_data(b"DATA\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(R.R250_OK)


def test_recipient_replies_counter() -> None:
    owed = RecipientReplies(2)
    assert not owed.sent_one()
    assert owed.sent_one()
