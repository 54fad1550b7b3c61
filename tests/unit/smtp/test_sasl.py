"""sasl.py: PLAIN (RFC 4616) and LOGIN sub-machines, and AUTH through the server."""

from __future__ import annotations

import base64

import pytest

from gannet.smtp import AuthChallenge, CommandError, Credentials, Noop
from gannet.smtp import replies as R
from gannet.smtp.sasl import Login, Plain, SaslError, decode_response, start

from .helpers import greeted


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def test_plain_initial_response() -> None:
    machine, result = start("PLAIN " + b64(b"\0alice\0secret").decode())
    assert isinstance(machine, Plain)
    assert result == Credentials("PLAIN", "", "alice", "secret")
    _, result = start("plain " + b64("admin\0alice\0pässword".encode()).decode())
    assert result == Credentials("PLAIN", "admin", "alice", "pässword")


def test_plain_challenge_then_response() -> None:
    machine, result = start("PLAIN")
    assert result == R.R334_CONTINUE
    assert machine.step(b64(b"\0bob\0pw")) == Credentials("PLAIN", "", "bob", "pw")


def test_login() -> None:
    machine, result = start("LOGIN")
    assert isinstance(machine, Login)
    assert result == R.R334_LOGIN_USERNAME
    assert machine.step(b64(b"alice")) == R.R334_LOGIN_PASSWORD
    assert machine.step(b64(b"secret")) == Credentials("LOGIN", "", "alice", "secret")
    machine, result = start("LOGIN " + b64(b"alice").decode())
    assert result == R.R334_LOGIN_PASSWORD
    assert machine.step(b"") == Credentials("LOGIN", "", "alice", "")


def test_password_not_in_repr() -> None:
    assert "secret" not in repr(Credentials("PLAIN", "", "alice", "secret"))


@pytest.mark.parametrize(
    ("argument", "reply"),
    [
        ("CRAM-MD5", R.R504_AUTH_MECH),
        ("PLAIN =", R.R501_AUTH_MALFORMED),  # "=": empty initial response
        ("PLAIN !!!", R.R501_AUTH_BAD_BASE64),
        ("PLAIN " + b64(b"alice\0secret").decode(), R.R501_AUTH_MALFORMED),
        ("PLAIN " + b64(b"\0\0secret").decode(), R.R501_AUTH_MALFORMED),
        ("PLAIN " + b64(b"\0al\xffice\0pw").decode(), R.R501_AUTH_MALFORMED),
        ("PLAIN *", R.R501_AUTH_CANCELLED),
        ("LOGIN =", R.R501_AUTH_MALFORMED),
    ],
)
def test_refusals(argument: str, reply: R.Reply) -> None:
    with pytest.raises(SaslError) as info:
        start(argument)
    assert info.value.reply == reply


def test_decode_response() -> None:
    assert decode_response(b"") == b""
    assert decode_response(b"YQ==") == b"a"
    for bad in (b"YQ", b"Y Q==", b"YQ==YQ=="):
        with pytest.raises(SaslError) as info:
            decode_response(bad)
        assert info.value.reply == R.R501_AUTH_BAD_BASE64
    with pytest.raises(SaslError) as info:
        decode_response(b"*")
    assert info.value.reply == R.R501_AUTH_CANCELLED


def test_auth_through_the_server() -> None:
    conn, session = greeted(auth=True)
    out = session.feed(b"AUTH LOGIN\r\n")
    assert out == b"334 VXNlcm5hbWU6\r\n"
    assert session.events == [AuthChallenge(R.R334_LOGIN_USERNAME)]
    out = session.feed(b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\n")
    assert out == b"334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n"
    assert conn.authenticated == "alice"


@pytest.mark.parametrize(
    ("line", "reply"),
    [(b"*", R.R501_AUTH_CANCELLED), (b"%%%", R.R501_AUTH_BAD_BASE64), (b"a\rb", R.R500_BARE_LF)],
)
def test_failed_exchange_returns_to_commands(line: bytes, reply: R.Reply) -> None:
    conn, session = greeted(auth=True)
    out = session.feed(b"AUTH PLAIN\r\n" + line + b"\r\nNOOP\r\n")
    assert out == b"334 \r\n" + reply.encode() + b"250 2.0.0 OK\r\n"
    assert isinstance(session.events[1], CommandError)
    assert conn.authenticated is None


def test_session_may_refuse_the_challenge() -> None:
    conn, _session = greeted(auth=True)
    conn.receive_data(b"AUTH PLAIN\r\nNOOP\r\n")
    ev = conn.next_event()
    assert isinstance(ev, AuthChallenge)
    conn.send(R.R454_AUTH_TEMP)  # e.g. the user database is down
    assert conn.next_event() == Noop()
