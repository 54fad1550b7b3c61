"""OutboundConnection against real receivers: Postfix's smtp-sink (with its refusal
switches), a private Postfix (plain, without CHUNKING/8BITMIME, with SASL AUTH
checked by Dovecot), Dovecot LMTP over TCP and its unix socket, Gannet itself
(STARTTLS verified against the test CA, BDAT, SMTPUTF8, DSN, AUTH on the
submission listener) and a black hole that never greets.

Each test drives the connection directly (no scheduler): what the receiver
logged, dumped or stored is compared with what was sent.
"""

from __future__ import annotations

import dataclasses
import email.utils
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peers
import pytest
from peers import USERS

from gannet.config import TlsPolicy
from gannet.delivery.outbound import (
    Envelope,
    OutboundConnection,
    OutboundOptions,
    OutboundRecipient,
    RecipientResult,
    SessionFailure,
)
from gannet.smtp import Notify

pytestmark = pytest.mark.interop

OPTIONS = OutboundOptions("client.test", tls=TlsPolicy.NONE, connect_timeout=10, command_timeout=30,
                          data_timeout=60)


def message(subject: str, body: str = "Hello.\r\n.A line that starts with a dot.\r\nBye.\r\n") -> bytes:
    """A complete message (Date and Message-ID too, so that no receiver adds any)."""
    return (f"From: sender@remote.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{time.monotonic_ns()}@remote.test>\r\n"
            f"\r\n{body}").encode()


def envelope(*rcpts: str, size: int = 0, **kw: Any) -> Envelope:
    return Envelope("sender@remote.test", tuple(OutboundRecipient(r) for r in rcpts), size=size, **kw)


def codes(results: list[RecipientResult]) -> list[tuple[int, str]]:
    return [(r.reply.code, r.stage) for r in results]


async def connect(host: str, port: int, hop: str = "mx.test", **kw: Any) -> OutboundConnection:
    return await OutboundConnection.open(hop, host, port, dataclasses.replace(OPTIONS, **kw))


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------- smtp-sink


async def test_smtp_sink_takes_several_messages_over_one_connection(
        smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    sink = smtp_sink(dump=True)
    conn = await connect(sink.host, sink.port, hop="sink.test")
    assert conn.label == f"sink.test[{sink.host}]:{sink.port}" and conn.capabilities.pipelining
    for n in range(3):
        data = message(f"reuse {n}")
        results = await conn.send_message(envelope("a@sink.test", "b@sink.test", size=len(data)), data)
        assert codes(results) == [(250, "end of data")] * 2
        assert await conn.reset()
    await conn.close()
    sink.wait_count(3, timeout=20)
    dumps = [p.read_bytes() for p in sink.messages()]
    subjects = sorted(d.split(b"Subject: ")[1].split(b"\n")[0] for d in dumps)
    assert subjects == [b"reuse 0", b"reuse 1", b"reuse 2"]
    assert all(b"\n.A line that starts with a dot.\n" in d for d in dumps)  # dot-stuffing undone


@pytest.mark.parametrize(("switch", "command", "expected"), [
    ("-f", "MAIL", (500, "MAIL FROM")),
    ("-r", "MAIL", (450, "MAIL FROM")),
    ("-f", "RCPT", (500, "RCPT TO")),
    ("-r", "RCPT", (450, "RCPT TO")),
    ("-f", "DATA", (500, "DATA")),
    ("-r", "DATA", (450, "DATA")),
    ("-f", ".", (500, "end of data")),
    ("-r", ".", (450, "end of data")),
])
async def test_smtp_sink_refusals_per_recipient(smtp_sink: Callable[..., peers.SmtpSink], switch: str,
                                                command: str, expected: tuple[int, str]) -> None:
    sink = smtp_sink(extra_args=[switch, command])
    async with await connect(sink.host, sink.port) as conn:
        assert not conn.capabilities.pipelining  # -f/-r imply -p
        results = await conn.send_message(envelope("a@sink.test", "b@sink.test"), message("refused"))
        assert codes(results) == [expected] * 2
        assert all(r.permanent if switch == "-f" else r.temporary for r in results)
        assert conn.usable and await conn.reset()  # a refusal is not a broken session


@pytest.mark.parametrize(("switch", "stage", "code"), [
    ("-f", "banner", 500), ("-r", "banner", 450)])
async def test_smtp_sink_refused_greeting(smtp_sink: Callable[..., peers.SmtpSink], switch: str, stage: str,
                                          code: int) -> None:
    sink = smtp_sink(extra_args=[switch, "CONNECT"])
    with pytest.raises(SessionFailure) as info:
        await connect(sink.host, sink.port)
    exc = info.value
    assert exc.stage == stage and exc.temporary and exc.try_next_hop and exc.reply is not None
    assert exc.reply.code == code and exc.reason.startswith("4.3.0 host mx.test")
    assert "refused to talk to me" in exc.reason


async def test_smtp_sink_refusing_ehlo_and_helo(smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    sink = smtp_sink(extra_args=["-f", "EHLO,HELO"])
    with pytest.raises(SessionFailure) as info:
        await connect(sink.host, sink.port)
    assert info.value.stage == "HELO" and info.value.try_next_hop


async def test_smtp_sink_without_esmtp_gets_helo(smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    sink = smtp_sink(extra_args=["-e"], dump=True)
    async with await connect(sink.host, sink.port) as conn:
        assert conn.capabilities.keywords == {}
        data = message("helo")
        assert codes(await conn.send_message(envelope("a@sink.test", size=len(data)), data)) == [
            (250, "end of data")]
    sink.wait_count(1, timeout=20)
    dump = sink.messages()[0].read_bytes()
    assert b"X-Client-Proto: SMTP" in dump and b"X-Mail-Args: <sender@remote.test>\n" in dump


async def test_smtp_sink_421_mid_transaction(smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    sink = smtp_sink(extra_args=["-Q", "RCPT"])
    conn = await connect(sink.host, sink.port)
    results = await conn.send_message(envelope("a@sink.test", "b@sink.test"), message("421"))
    assert {r.reply.code for r in results} == {421} and all(r.temporary for r in results)
    assert not conn.usable and not await conn.reset()
    await conn.close()


async def test_smtp_sink_hanging_up_after_data(smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    sink = smtp_sink(extra_args=["-q", "DATA"])
    conn = await connect(sink.host, sink.port)
    with pytest.raises(SessionFailure) as info:
        await conn.send_message(envelope("a@sink.test"), message("hang up"))
    assert info.value.temporary and info.value.reason.startswith("4.4.2 lost connection with mx.test")
    assert not conn.usable
    await conn.close()


EIGHT_BIT = ("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
             "\r\nSubject: 8bit\r\n\r\nGrüße aus Köln.\r\n").encode()


@pytest.mark.parametrize("eightbitmime", [True, False])
async def test_smtp_sink_8bitmime_or_downgrade(smtp_sink: Callable[..., peers.SmtpSink],
                                               eightbitmime: bool) -> None:
    sink = smtp_sink(extra_args=[] if eightbitmime else ["-8"], dump=True)
    async with await connect(sink.host, sink.port) as conn:
        assert conn.capabilities.eightbitmime is eightbitmime
        results = await conn.send_message(envelope("a@sink.test", body_8bit=True), EIGHT_BIT)
        assert codes(results) == [(250, "end of data")]
    sink.wait_count(1, timeout=20)
    dump = sink.messages()[0].read_bytes()
    if eightbitmime:
        assert b"X-Mail-Args: <sender@remote.test> BODY=8BITMIME\n" in dump and lf(EIGHT_BIT) in dump
    else:
        assert b"X-Mail-Args: <sender@remote.test>\n" in dump
        converted = (b"\nContent-Transfer-Encoding: quoted-printable\nSubject: 8bit\n\n"
                     b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln.\n")
        assert converted in dump


async def test_smtp_sink_dsn_parameters(smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    sink = smtp_sink(dump=True)
    env = Envelope("sender@remote.test", (OutboundRecipient("a@sink.test", Notify.SUCCESS | Notify.FAILURE,
                                                            "rfc822;A@sink.test"),),
                   size=0, ret="HDRS", envid="queue+id")
    async with await connect(sink.host, sink.port) as conn:
        await conn.send_message(env, message("dsn"))
    sink.wait_count(1, timeout=20)
    dump = sink.messages()[0].read_bytes()
    assert b"X-Mail-Args: <sender@remote.test> RET=HDRS ENVID=queue+2Bid\n" in dump
    assert b"X-Rcpt-Args: <a@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A@sink.test\n" in dump


async def test_black_hole_greeting_times_out() -> None:
    with peers.BlackHole() as hole:
        started = time.monotonic()
        with pytest.raises(SessionFailure) as info:
            await connect(hole.host, hole.port, command_timeout=0.5)
        assert 0.4 < time.monotonic() - started < 5
        assert hole.accepted == 1
    exc = info.value
    assert exc.stage == "banner" and exc.temporary and exc.try_next_hop
    assert exc.reason == (f"4.4.2 conversation with mx.test[{hole.host}]:{hole.port} timed out while "
                          "receiving the initial server greeting")


# --------------------------------------------------------------------------- Postfix


def stored(path: Path) -> bytes:
    return path.read_bytes()


async def test_postfix_receives_intact(postfix: Callable[..., peers.PostfixInstance], tmp_path: Path) -> None:
    pf = postfix()
    small = message("to postfix")
    big = message("big", "".join(f"line {i:07d} .with text to make it longer than it needs to be\r\n"
                                 for i in range(50_000)))  # ~3.2 MB: three BDAT chunks
    spooled = tmp_path / "big"
    spooled.write_bytes(big)
    async with await connect(pf.host, pf.port, hop="postfix.test") as conn:
        caps = conn.capabilities
        assert caps.chunking and caps.pipelining and caps.dsn and caps.smtputf8
        results = await conn.send_message(envelope("alice@example.test", "nobody@example.test",
                                                   size=len(small)), small)
        assert codes(results) == [(250, "end of data"), (550, "RCPT TO")]
        assert results[1].reply.enhanced == "5.1.1"
        assert await conn.reset()
        results = await conn.send_message(envelope("bob@example.test", size=len(big)), spooled)
        assert codes(results) == [(250, "end of data")]
    alice = peers.wait_for(lambda: pf.delivered("alice@example.test"), 30, "delivery to alice")
    bob = peers.wait_for(lambda: pf.delivered("bob@example.test"), 30, "delivery to bob")
    assert stored(alice[0]).endswith(lf(small))
    assert stored(bob[0]).endswith(lf(big))


async def test_postfix_without_chunking_and_8bitmime(postfix: Callable[..., peers.PostfixInstance],
                                                     tmp_path: Path) -> None:
    pf = postfix(settings={"smtpd_discard_ehlo_keywords": "chunking, 8bitmime"})
    spooled = tmp_path / "body"
    spooled.write_bytes(EIGHT_BIT)
    async with await connect(pf.host, pf.port, hop="postfix.test") as conn:
        assert not conn.capabilities.chunking and not conn.capabilities.eightbitmime
        results = await conn.send_message(envelope("alice@example.test", body_8bit=True,
                                                   size=len(EIGHT_BIT)), spooled)
        assert codes(results) == [(250, "end of data")]
    files = peers.wait_for(lambda: pf.delivered("alice@example.test"), 30, "delivery to alice")
    content = stored(files[0])
    assert content.isascii() and b"Content-Transfer-Encoding: quoted-printable" in content
    assert content.endswith(b"\n\nGr=C3=BC=C3=9Fe aus K=C3=B6ln.\n")


async def test_postfix_sasl_auth(postfix: Callable[..., peers.PostfixInstance],
                                 dovecot: Callable[..., peers.DovecotImap]) -> None:
    auth = dovecot(auth_socket=True)
    assert auth.auth_socket is not None
    pf = postfix(settings=peers.postfix_sasl_settings(auth.auth_socket))
    good = ("alice@example.test", USERS["alice@example.test"])
    async with await connect(pf.host, pf.port, hop="postfix.test", auth=good) as conn:
        assert "PLAIN" in conn.capabilities.auth  # offered in plaintext; the client allows it on loopback
        assert codes(await conn.send_message(envelope("bob@example.test"), message("authenticated"))) == [
            (250, "end of data")]
    peers.wait_for(lambda: pf.delivered("bob@example.test"), 30, "delivery to bob")
    assert "sasl_method=PLAIN, sasl_username=alice@example.test" in pf.log_text()
    with pytest.raises(SessionFailure) as info:
        await connect(pf.host, pf.port, hop="postfix.test", auth=(good[0], "wrong"))
    exc = info.value
    assert exc.stage == "AUTH" and exc.temporary and exc.reply is not None and exc.reply.code == 535
    assert exc.reason.startswith("4.7.8 SASL authentication failed; server postfix.test")


# --------------------------------------------------------------------------- Dovecot LMTP


@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_dovecot_lmtp_replies_per_recipient(dovecot: Callable[..., peers.DovecotImap],
                                                  over: str) -> None:
    dc = dovecot(lmtp=True)
    options = dataclasses.replace(OPTIONS, lmtp=True)
    if over == "tcp":
        conn = await OutboundConnection.open("dovecot.test", *dc.lmtp_address, options)
    else:
        conn = await OutboundConnection.open_unix(dc.lmtp_socket, options)
        assert conn.label == f"unix:{dc.lmtp_socket}"
    data = message("lmtp")
    async with conn:
        results = await conn.send_message(
            envelope("alice@example.test", "nobody@example.test", "bob@example.test", size=len(data)), data)
    assert codes(results) == [(250, "end of data"), (550, "RCPT TO"), (250, "end of data")]
    assert results[1].permanent and results[1].reply.enhanced == "5.1.1"
    for user in ("alice", "bob"):
        files = peers.maildir_files(dc.maildir_root / "example.test" / user)
        assert len(files) == 1 and files[0].read_bytes().endswith(lf(data)), dc.log_text()[-2000:]


# --------------------------------------------------------------------------- Gannet


async def test_gannet_over_verified_tls_with_bdat_smtputf8_and_dsn(
        gannet: Callable[..., peers.GannetProcess], tls_certs: peers.TlsCerts) -> None:
    g = gannet()
    host, port = g.address("mx")
    data = ("From: jörg@remote.test\r\nTo: alice@example.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln.\r\n.dot\r\n").encode()
    env = Envelope("jörg@remote.test", (OutboundRecipient("alice@example.test", Notify.FAILURE,
                                                          "rfc822;alice@example.test"),),
                   size=len(data), body_8bit=True, smtputf8=True, ret="HDRS", envid="x1")
    async with await connect(host, port, hop="mx.example.test", tls=TlsPolicy.VERIFY,
                             tls_ca_file=tls_certs.ca_file) as conn:
        assert conn.tls.startswith("TLSv1.")
        caps = conn.capabilities
        assert caps.chunking and caps.eightbitmime and caps.smtputf8 and caps.dsn and not caps.starttls
        assert codes(await conn.send_message(env, data)) == [(250, "end of data")]
    files = peers.wait_for(lambda: g.delivered("alice@example.test"), 30, "delivery to alice")
    content = stored(files[0])
    assert content.endswith(lf(data))
    assert b"ESMTPS" in content.split(b"\n\n", 1)[0] or b"TLS" in content.split(b"\n\n", 1)[0]


async def test_gannet_submission_auth_over_tls(gannet: Callable[..., peers.GannetProcess],
                                               tls_certs: peers.TlsCerts) -> None:
    g = gannet()
    host, port = g.address("submission")
    good = ("alice@example.test", USERS["alice@example.test"])
    verify = {"hop": "mx.example.test", "tls": TlsPolicy.VERIFY, "tls_ca_file": tls_certs.ca_file}
    async with await connect(host, port, auth=good, **verify) as conn:
        assert conn.tls and {"PLAIN", "LOGIN"} <= conn.capabilities.auth
        data = message("submitted")
        env = Envelope("alice@example.test", (OutboundRecipient("bob@example.test"),), size=len(data))
        assert codes(await conn.send_message(env, data)) == [(250, "end of data")]
    peers.wait_for(lambda: g.delivered("bob@example.test"), 30, "delivery to bob")
    with pytest.raises(SessionFailure) as info:
        await connect(host, port, auth=(good[0], "wrong"), **verify)
    assert info.value.stage == "AUTH" and info.value.reply is not None and info.value.reply.code == 535
    with pytest.raises(SessionFailure) as info:  # the submission port says no AUTH before TLS
        await connect(host, port, auth=good, tls=TlsPolicy.NONE)
    assert info.value.stage == "AUTH" and "offered no compatible mechanism" in info.value.reason
