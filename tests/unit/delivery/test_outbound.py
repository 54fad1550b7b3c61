"""OutboundConnection against scripted asyncio servers: the cases a real peer cannot produce.

Each test starts a ``FakeSmtp`` (below) on 127.0.0.1 port 0 — or a unix
socket — and drives one OutboundConnection against it: results per
recipient, pipelining, HELO fallback, TLS policies (a trustme certificate),
AUTH, 421s, resets, garbage, split replies, a silent server, BDAT, LMTP, the
8-bit downgrade, and a Hypothesis test that random reply bytes never raise
anything but SessionFailure. Real peers (smtp-sink, Postfix, Dovecot, Gannet)
are in tests/interop/test_outbound.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gannet.config import TlsPolicy
from gannet.delivery import outbound_session
from gannet.delivery.outbound import (
    LOCAL_STAGE,
    Envelope,
    OutboundConnection,
    OutboundOptions,
    OutboundRecipient,
    RecipientResult,
    SessionFailure,
)
from gannet.smtp import Notify, Reply

# --------------------------------------------------------------------------- the scripted server

CLOSE = b"<close>"
RESET = b"<reset>"
SILENT = b"<silent>"
BAD_TLS = b"<bad-tls>"


def ehlo_reply(keywords: list[str], name: str = "fake.test") -> bytes:
    lines = [name, *keywords]
    return b"".join(
        f"250{' ' if i == len(lines) - 1 else '-'}{line}\r\n".encode() for i, line in enumerate(lines))


@dataclass
class FakeSmtp:
    """A scripted SMTP/LMTP server on 127.0.0.1 (or a unix socket): the cases a real peer cannot produce.

    Defaults are sensible; ``replies`` overrides them per verb, in order
    (``{"RCPT": [b"550 5.1.1 no\\r\\n", None]}``, ``None`` = the default; key
    ``"."`` is the end of the content, ``"CONNECT"`` the greeting). Special
    replies: CLOSE, RESET (abort: RST), SILENT (never answer again), BAD_TLS
    (220 to STARTTLS, then garbage). It records every command line, every
    message (unstuffed, or the BDAT chunks joined) and the connections taken.
    """

    ehlo: tuple[str, ...] = ("PIPELINING", "SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES")
    greeting: bytes | None = b"220 fake.test ESMTP\r\n"  # None: a black hole (never says anything)
    replies: dict[str, list[bytes | None]] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this context
    tls_extra: bytes = b""  # sent right after "220" to STARTTLS, in the same write (injection test)
    lmtp: bool = False
    batch: bool = False  # withhold MAIL/RCPT/RSET replies until DATA or BDAT (proves pipelining)
    split: bool = False  # write replies one octet at a time
    users: dict[bytes, bytes] = field(default_factory=lambda: {b"alice": b"secret"})
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def start(self, unix_path: str | None = None) -> int:
        if unix_path:
            self.server = await asyncio.start_unix_server(self._session, unix_path)
            return 0
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.transport.abort()
        if self.tasks:
            _, hanging = await asyncio.wait(self.tasks, timeout=2)
            for task in hanging:
                task.cancel()

    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in self.commands]

    def _take(self, verb: str) -> bytes | None:
        queue = self.replies.get(verb)
        return queue.pop(0) if queue else None

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.split:
            writer.write(data)
            return
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.append(task)
        try:
            await self._dialog(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _dialog(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.greeting is None:
            await reader.read()
            return
        greeting = self._take("CONNECT") or self.greeting
        await self._write(writer, greeting)
        state: dict[str, int] = {"rcpts": 0, "tls": 0}
        pending: list[bytes] = []
        chunks: list[bytes] = []
        while line := await reader.readline():
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            self.commands.append(command)
            verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
            reply = self._take(verb)
            if reply in (CLOSE, RESET, SILENT):
                if reply == RESET:
                    writer.transport.abort()
                elif reply == SILENT:
                    await reader.read()
                return
            if verb == "STARTTLS":
                if not await self._starttls(reply, writer, state):
                    return
                continue
            if verb == "QUIT":
                await self._write(writer, reply or b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            if verb == "DATA":
                reply = await self._data(reply, reader, writer, state, pending)
            elif verb == "BDAT":
                reply = await self._bdat(command, reply, reader, state, chunks)
            elif verb == "AUTH":
                reply = reply or await self._auth(command, reader, writer)
            else:
                reply = self._simple(verb, reply, state)
            if self.batch and verb in ("MAIL", "RCPT", "RSET"):
                pending.append(reply)
                continue
            await self._write(writer, b"".join(pending) + reply)
            pending.clear()
            if state.get("end"):
                await writer.drain()
                if state["end"] == 2:
                    await reader.read()
                return

    def _simple(self, verb: str, reply: bytes | None, state: dict[str, int]) -> bytes:
        if verb in ("EHLO", "LHLO"):
            state["rcpts"] = state["mail"] = 0
            keywords = list(self.ehlo) + (["STARTTLS"] if self.tls and not state["tls"] else [])
            return reply or ehlo_reply(keywords)
        if verb == "HELO":
            return reply or b"250 fake.test\r\n"
        if verb in ("MAIL", "RSET"):
            state["rcpts"] = 0
            reply = reply or b"250 2.0.0 Ok\r\n"
            state["mail"] = verb == "MAIL" and reply.startswith(b"2")
            return reply
        if verb == "RCPT":
            reply = reply or (b"250 2.1.5 Ok\r\n" if state.get("mail") else b"503 5.5.1 need MAIL\r\n")
            state["rcpts"] += reply.startswith(b"2")
            return reply
        return reply or b"502 5.5.1 unknown command\r\n"

    async def _starttls(self, reply: bytes | None, writer: asyncio.StreamWriter,
                        state: dict[str, int]) -> bool:
        if reply == BAD_TLS:
            writer.write(b"220 2.0.0 go ahead\r\n")
            await writer.drain()
            writer.write(b"this is not a TLS server hello\r\n" * 4)
            await writer.drain()
            return False
        reply = reply or b"220 2.0.0 go ahead\r\n"
        ok = reply.startswith(b"220")
        await self._write(writer, reply + (self.tls_extra if ok else b""))
        await writer.drain()
        if ok:
            assert self.tls is not None
            plain = writer.transport
            try:
                await writer.start_tls(self.tls)
            except (AttributeError, ConnectionError, ssl.SSLError):
                pass  # the client gave the handshake up: asyncio 3.11 may leave the writer without transport
            if writer.transport is None:
                writer._transport = plain  # type: ignore[attr-defined]  # keeps StreamWriter.__del__ sane
                return False
            state["tls"] = 1
        return True

    def _final(self, state: dict[str, int]) -> bytes:
        """The reply to the end of the content (LMTP: one per accepted recipient); CLOSE or
        SILENT among them cut the list there and end (or mute) the session after it."""
        count = state["rcpts"] if self.lmtp else 1
        state["rcpts"] = state["mail"] = 0
        replies = [self._take(".") or b"250 2.0.0 queued as FAKE\r\n" for _ in range(count)]
        for marker in (CLOSE, SILENT):
            if marker in replies:
                replies = replies[: replies.index(marker)]
                state["end"] = 1 if marker == CLOSE else 2
        return b"".join(replies)

    async def _data(self, reply: bytes | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    state: dict[str, int], pending: list[bytes]) -> bytes:
        reply = reply or (b"354 go ahead\r\n" if state["rcpts"] else b"554 5.5.1 no valid recipients\r\n")
        if not reply.startswith(b"354"):
            return reply
        await self._write(writer, b"".join(pending) + reply)
        pending.clear()
        body = bytearray()
        while (line := await reader.readuntil(b"\r\n")) != b".\r\n":
            body += line[1:] if line.startswith(b".") else line
        self.messages.append(bytes(body))
        return self._final(state)

    async def _bdat(self, command: str, reply: bytes | None, reader: asyncio.StreamReader,
                    state: dict[str, int], chunks: list[bytes]) -> bytes:
        words = command.split()
        size, last = int(words[1]), len(words) > 2 and words[2].upper() == "LAST"
        chunks.append(await reader.readexactly(size))
        if reply is not None or not state["rcpts"]:
            chunks.clear()
            return reply or b"554 5.5.1 no valid recipients\r\n"
        if not last:
            return b"250 2.0.0 chunk ok\r\n"
        self.messages.append(b"".join(chunks))
        chunks.clear()
        return self._final(state)

    async def _auth(self, command: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        words = command.split()
        if words[1].upper() == "PLAIN" and len(words) > 2:
            _, user, password = base64.b64decode(words[2]).split(b"\0")
        elif words[1].upper() == "LOGIN":
            writer.write(b"334 VXNlcm5hbWU6\r\n")
            user = base64.b64decode(await reader.readline())
            writer.write(b"334 UGFzc3dvcmQ6\r\n")
            password = base64.b64decode(await reader.readline())
            self.commands += ["<username>", "<password>"]
        else:
            return b"504 5.5.4 unsupported\r\n"
        ok = self.users.get(user) == password
        return b"235 2.7.0 ok\r\n" if ok else b"535 5.7.8 authentication failed\r\n"

# --------------------------------------------------------------------------- helpers

OPTIONS = OutboundOptions("client.test", tls=TlsPolicy.NONE, connect_timeout=2, command_timeout=2,
                          data_timeout=2)
MESSAGE = b"From: a@remote.test\r\nSubject: test\r\n\r\nHello\r\n.a line with a dot\r\n..two\r\nend\r\n"
Fake = Callable[..., Awaitable[tuple[FakeSmtp, int]]]


def envelope(*rcpts: str, **kw: Any) -> Envelope:
    kw.setdefault("size", len(MESSAGE))
    return Envelope("sender@remote.test", tuple(OutboundRecipient(r) for r in rcpts or ("bob@y.test",)), **kw)


async def connect(port: int, hop: str = "fake.test", **kw: Any) -> OutboundConnection:
    return await OutboundConnection.open(hop, "127.0.0.1", port, dataclasses.replace(OPTIONS, **kw))


async def failure(port: int, **kw: Any) -> SessionFailure:
    with pytest.raises(SessionFailure) as info:
        conn = await connect(port, **kw)
        await conn.close()
    return info.value


def codes(results: list[RecipientResult]) -> list[tuple[int, str]]:
    return [(r.reply.code, r.stage) for r in results]


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    servers: list[FakeSmtp] = []

    async def make(**kw: Any) -> tuple[FakeSmtp, int]:
        server = FakeSmtp(**kw)
        servers.append(server)
        return server, await server.start()

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server context with a trustme certificate for mx.example.test (and the CA file)."""
    certs = peers.make_tls_certs(tmp_path_factory.mktemp("outbound-tls"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.cert_file, certs.key_file)
    return ctx, certs.ca_file


# --------------------------------------------------------------------------- delivery


async def test_pipelined_delivery_in_one_write_and_reuse(fake: Fake) -> None:
    server, port = await fake(batch=True)  # no reply before DATA: a client that waits would time out
    conn = await connect(port)
    assert conn.label == f"fake.test[127.0.0.1]:{port}" and conn.host == "fake.test"
    assert conn.tls == "" and conn.capabilities.pipelining and conn.usable
    for _n in range(3):
        results = await conn.send_message(envelope("a@y.test", "b@y.test"), MESSAGE)
        assert codes(results) == [(250, "end of data")] * 2
        assert all(r.delivered and not r.temporary and not r.permanent for r in results)
        assert await conn.reset()
    await conn.close()
    await conn.close()  # idempotent
    assert not conn.usable
    assert server.messages == [MESSAGE] * 3
    # RFC 5321 §4.1.1.4: each end of data ended its transaction, so no RSET in between.
    assert server.verbs() == ["EHLO", *["MAIL", "RCPT", "RCPT", "DATA"] * 3, "QUIT"]
    assert server.commands[1] == f"MAIL FROM:<sender@remote.test> SIZE={len(MESSAGE)}"


async def test_one_command_at_a_time_without_pipelining(fake: Fake) -> None:
    server, port = await fake(ehlo=("8BITMIME",))
    async with await connect(port) as conn:
        results = await conn.send_message(envelope("a@y.test", "b@y.test"), MESSAGE)
        assert codes(results) == [(250, "end of data")] * 2
        assert await conn.reset()
        assert server.verbs()[-1] == "DATA"  # the transaction ended: no RSET, not even a real one
        await conn.send_message(envelope("c@y.test"), b"Subject: no final newline")
    assert server.messages == [MESSAGE, b"Subject: no final newline\r\n"]
    assert server.commands[1] == "MAIL FROM:<sender@remote.test>"  # no SIZE: not advertised


@pytest.mark.parametrize("pipelining", [True, False])
async def test_recipients_each_get_their_own_reply(fake: Fake, pipelining: bool) -> None:
    ehlo = ("PIPELINING", "ENHANCEDSTATUSCODES") if pipelining else ("ENHANCEDSTATUSCODES",)
    server, port = await fake(ehlo=ehlo, replies={
        "RCPT": [b"550 5.1.1 no such user\r\n", b"452 4.2.2 mailbox full\r\n", None]})
    async with await connect(port) as conn:
        results = await conn.send_message(envelope("x@y.test", "full@y.test", "ok@y.test"), MESSAGE)
    assert codes(results) == [(550, "RCPT TO"), (452, "RCPT TO"), (250, "end of data")]
    assert results[0].permanent and results[1].temporary and results[2].delivered
    assert results[0].reply == Reply(550, "5.1.1", "no such user")
    assert server.messages == [MESSAGE]


@pytest.mark.parametrize("data_reply", [None, b"354 send anyway\r\n"])
async def test_no_recipient_accepted_then_reuse(fake: Fake, data_reply: bytes | None) -> None:
    """RFC 2920 §3.1: the pipelined DATA gets 554 — or 354, and then an empty message ends it."""
    server, port = await fake(replies={"RCPT": [b"550 5.1.1 no\r\n", b"550 5.1.1 no\r\n"],
                                       "DATA": [data_reply]})
    if data_reply:
        server.replies["."] = [b"554 5.5.1 nothing\r\n"]
    conn = await connect(port)
    results = await conn.send_message(envelope("a@y.test", "b@y.test"), MESSAGE)
    assert codes(results) == [(550, "RCPT TO")] * 2
    assert conn.usable and await conn.reset()
    assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    await conn.close()
    assert server.messages == ([b""] if data_reply else []) + [MESSAGE]
    # No transaction of ours ended with a reply to its content: an RSET before the next.
    assert server.verbs()[-5:] == ["RSET", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_no_recipient_accepted_without_pipelining_sends_no_data(fake: Fake) -> None:
    server, port = await fake(ehlo=(), replies={"RCPT": [b"450 4.1.1 later\r\n"]})
    async with await connect(port) as conn:
        results = await conn.send_message(envelope(), MESSAGE)
        assert codes(results) == [(450, "RCPT TO")]
        assert await conn.reset()
    assert "DATA" not in server.verbs() and server.verbs()[-2:] == ["RSET", "QUIT"]


@pytest.mark.parametrize(("verb", "reply", "expected"), [
    ("MAIL", b"553 5.1.8 bad sender\r\n", [(553, "MAIL FROM"), (553, "MAIL FROM")]),
    ("MAIL", b"451 4.3.0 try later\r\n", [(451, "MAIL FROM"), (451, "MAIL FROM")]),
    ("DATA", b"451 4.3.0 not now\r\n", [(550, "RCPT TO"), (451, "DATA")]),
    (".", b"554 5.7.1 spam\r\n", [(550, "RCPT TO"), (554, "end of data")]),
    (".", b"452 4.3.1 disk full\r\n", [(550, "RCPT TO"), (452, "end of data")]),
])
async def test_refusals_by_stage(fake: Fake, verb: str, reply: bytes,
                                 expected: list[tuple[int, str]]) -> None:
    replies: dict[str, list[bytes | None]] = {verb: [reply]}
    if verb != "MAIL":
        replies["RCPT"] = [b"550 5.1.1 no\r\n"]
    _server, port = await fake(replies=replies)
    async with await connect(port) as conn:
        results = await conn.send_message(envelope("a@y.test", "b@y.test"), MESSAGE)
        assert codes(results) == expected
        assert conn.usable and await conn.reset()


async def test_421_mid_transaction_answers_the_rest(fake: Fake) -> None:
    server, port = await fake(replies={"RCPT": [None, b"421 4.3.2 shutting down\r\n"]})
    conn = await connect(port)
    results = await conn.send_message(envelope("a@y.test", "b@y.test", "c@y.test"), MESSAGE)
    assert codes(results) == [(421, "DATA"), (421, "RCPT TO"), (421, "RCPT TO")]
    assert all(r.temporary for r in results)
    assert not conn.usable and not await conn.reset()
    with pytest.raises(SessionFailure):
        await conn.send_message(envelope(), MESSAGE)
    await conn.close()
    assert server.messages == []


async def test_421_to_the_last_rcpt_before_a_streamed_body(fake: Fake, tmp_path: Path) -> None:
    spooled = tmp_path / "body"
    spooled.write_bytes(big_body(1_500_000))
    server, port = await fake(ehlo=("PIPELINING", "CHUNKING"), replies={"RCPT": [None, b"421 4.3.2 bye\r\n"]})
    conn = await connect(port)
    results = await conn.send_message(envelope("a@y.test", "b@y.test"), spooled)
    assert codes(results) == [(421, "DATA"), (421, "RCPT TO")] and not conn.usable
    await conn.close()
    assert "BDAT" not in server.verbs()


async def test_an_unsolicited_reply_stops_reuse(fake: Fake) -> None:
    _server, port = await fake(replies={".": [b"250 2.0.0 ok\r\n250 2.0.0 and another\r\n"]})
    conn = await connect(port)
    assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    assert not await conn.reset() and not conn.usable
    await conn.close()


async def test_connection_reset_after_rcpt(fake: Fake) -> None:
    _server, port = await fake(ehlo=(), replies={"RCPT": [None, RESET]})
    conn = await connect(port)
    with pytest.raises(SessionFailure) as info:
        await conn.send_message(envelope("a@y.test", "b@y.test"), MESSAGE)
    exc = info.value
    assert exc.temporary and exc.stage == "RCPT TO" and exc.try_next_hop
    assert exc.reason.startswith(f"4.4.2 lost connection with {conn.label} after RCPT TO")
    assert not conn.usable
    await conn.close()


async def test_connection_closed_before_the_final_reply(fake: Fake) -> None:
    _server, port = await fake(replies={".": [CLOSE]})
    conn = await connect(port)
    with pytest.raises(SessionFailure) as info:
        await conn.send_message(envelope(), MESSAGE)
    assert info.value.stage == "end of data" and not info.value.try_next_hop  # the body went out
    await conn.close()


async def test_silent_server_after_data_times_out(fake: Fake) -> None:
    _server, port = await fake(replies={".": [SILENT]})
    conn = await connect(port, data_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(SessionFailure) as info:
        await conn.send_message(envelope(), MESSAGE)
    assert 0.25 < time.monotonic() - started < 2
    assert info.value.reason == f"4.4.2 conversation with {conn.label} timed out after end of data"
    await conn.close()


# --------------------------------------------------------------------------- connect, greeting, EHLO


async def test_connection_refused() -> None:
    port = peers.free_port("127.0.0.1")
    exc = await failure(port)
    assert exc.stage == "connect" and exc.temporary and exc.try_next_hop
    assert exc.reason == f"4.4.1 connect to fake.test[127.0.0.1]:{port}: Connection refused"


async def test_black_hole_banner_times_out(fake: Fake) -> None:
    _server, port = await fake(greeting=None)
    started = time.monotonic()
    exc = await failure(port, command_timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert exc.stage == "banner" and exc.temporary and exc.try_next_hop
    assert exc.reason == (f"4.4.2 conversation with fake.test[127.0.0.1]:{port} timed out "
                          "while receiving the initial server greeting")


@pytest.mark.parametrize("greeting", [b"554 5.7.1 go away\r\n", b"421 4.3.2 busy\r\n", b"450 later\r\n"])
async def test_refused_greeting_tries_the_next_hop(fake: Fake, greeting: bytes) -> None:
    server, port = await fake(greeting=greeting)
    exc = await failure(port)
    assert exc.stage == "banner" and exc.temporary and exc.try_next_hop
    assert exc.reply is not None and exc.reply.code == int(greeting[:3])
    assert exc.reason.startswith(f"4.{'7.1' if greeting[0:1] == b'5' else ''}")
    assert "refused to talk to me" in exc.reason
    assert server.verbs() == ([] if greeting.startswith(b"421") else ["QUIT"])


async def test_helo_when_ehlo_is_refused(fake: Fake) -> None:
    server, port = await fake(replies={"EHLO": [b"502 5.5.1 no ESMTP here\r\n"]})
    async with await connect(port) as conn:
        assert conn.capabilities.keywords == {} and not conn.capabilities.pipelining
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    assert server.verbs()[:3] == ["EHLO", "HELO", "MAIL"]
    assert server.commands[2] == "MAIL FROM:<sender@remote.test>"


@pytest.mark.parametrize(("replies", "stage"), [
    ({"EHLO": [b"502 no\r\n"], "HELO": [b"501 no\r\n"]}, "HELO"),
    ({"EHLO": [b"421 4.3.2 bye\r\n"]}, "EHLO"),
    ({"EHLO": [b"451 4.3.0 later\r\n"]}, "EHLO"),
])
async def test_hello_refused(fake: Fake, replies: dict[str, list[bytes | None]], stage: str) -> None:
    _server, port = await fake(replies=replies)
    exc = await failure(port)
    assert exc.stage == stage and exc.temporary and exc.try_next_hop and exc.reply is not None
    assert exc.reason.startswith("4.") and f"(in reply to {stage} command)" in exc.reason


async def test_garbage_reply(fake: Fake) -> None:
    _server, port = await fake(replies={"EHLO": [b"hello there\r\n"]})
    exc = await failure(port)
    assert exc.stage == "EHLO" and exc.reason.startswith("4.5.0 protocol error from")


async def test_replies_split_into_single_octets(fake: Fake) -> None:
    _server, port = await fake(split=True)
    async with await connect(port) as conn:
        assert conn.capabilities.size == 10000000
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]


async def test_idle_connection_closed_or_421_is_not_reused(fake: Fake) -> None:
    server, port = await fake()
    conn = await connect(port)
    server.writers[-1].write(b"421 4.4.2 idle timeout\r\n")
    server.writers[-1].close()
    await asyncio.sleep(0.05)
    assert not await conn.reset() and not conn.usable
    await conn.close()


async def test_close_never_raises(fake: Fake) -> None:
    _server, port = await fake(replies={"QUIT": [SILENT]})
    conn = await connect(port, command_timeout=0.2)
    await conn.close()  # a silent QUIT: bounded by the timeout
    server2, port2 = await fake()
    conn2 = await connect(port2)
    for w in server2.writers:
        w.transport.abort()
    await asyncio.sleep(0.05)
    await conn2.close()


# --------------------------------------------------------------------------- TLS


async def test_starttls_may_without_verification(fake: Fake, server_tls: tuple[ssl.SSLContext, Path]) -> None:
    server, port = await fake(tls=server_tls[0], ehlo=("PIPELINING", "CHUNKING"))
    async with await connect(port, hop="anything.test", tls=TlsPolicy.MAY) as conn:
        assert conn.tls.startswith("TLSv1.") and conn.capabilities.chunking
        assert not conn.capabilities.starttls  # the EHLO after TLS
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    assert server.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]


async def test_plaintext_after_220_is_dropped(fake: Fake, server_tls: tuple[ssl.SSLContext, Path]) -> None:
    """RFC 3207 §4.2: a reply injected after "220" in plaintext must not answer the EHLO after TLS."""
    _server, port = await fake(tls=server_tls[0], tls_extra=b"250-injected\r\n250 PIPELINING\r\n")
    async with await connect(port, tls=TlsPolicy.MAY) as conn:
        assert "INJECTED" not in conn.capabilities.keywords and conn.capabilities.size == 10000000
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]


async def test_may_falls_back_to_plaintext_once(fake: Fake, server_tls: tuple[ssl.SSLContext, Path]) -> None:
    server, port = await fake(tls=server_tls[0], replies={"STARTTLS": [BAD_TLS]})
    async with await connect(port, tls=TlsPolicy.MAY) as conn:
        assert conn.tls == "" and conn.usable
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    assert server.connections == 2 and server.verbs().count("STARTTLS") == 1


async def test_may_goes_on_when_starttls_is_refused(fake: Fake,
                                                    server_tls: tuple[ssl.SSLContext, Path]) -> None:
    server, port = await fake(tls=server_tls[0], replies={"STARTTLS": [b"454 4.7.0 TLS not available\r\n"]})
    async with await connect(port, tls=TlsPolicy.MAY) as conn:
        assert conn.tls == ""
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    assert server.connections == 1


async def test_require_without_starttls(fake: Fake) -> None:
    _server, port = await fake()
    exc = await failure(port, tls=TlsPolicy.REQUIRE)
    assert exc.stage == "STARTTLS" and exc.temporary and exc.try_next_hop
    assert exc.reason == f"4.7.4 TLS is required, but was not offered by host fake.test[127.0.0.1]:{port}"


@pytest.mark.parametrize(("reply", "words"), [
    (b"454 4.7.0 TLS not available\r\n", "refused to start TLS: 454 4.7.0 TLS not available"),
    (BAD_TLS, "Cannot start TLS: handshake failure"),
])
async def test_require_fails_when_tls_fails(fake: Fake, server_tls: tuple[ssl.SSLContext, Path],
                                            reply: bytes, words: str) -> None:
    server, port = await fake(tls=server_tls[0], replies={"STARTTLS": [reply]})
    exc = await failure(port, tls=TlsPolicy.REQUIRE)
    assert exc.stage == "STARTTLS" and exc.reason.startswith("4.7.5") and words in exc.reason
    assert server.connections == 1  # no plaintext retry under "require"


async def test_require_accepts_any_certificate(fake: Fake, server_tls: tuple[ssl.SSLContext, Path]) -> None:
    _server, port = await fake(tls=server_tls[0])
    async with await connect(port, hop="wrong.example.test", tls=TlsPolicy.REQUIRE) as conn:
        assert conn.tls.startswith("TLSv1.")


async def test_verify(fake: Fake, server_tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, ca_file = server_tls
    _server, port = await fake(tls=ctx)
    async with await connect(port, hop="mx.example.test", tls=TlsPolicy.VERIFY, tls_ca_file=ca_file) as conn:
        assert conn.tls.startswith("TLSv1.")
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    exc = await failure(port, hop="wrong.example.test", tls=TlsPolicy.VERIFY, tls_ca_file=ca_file)
    assert exc.stage == "STARTTLS" and exc.temporary and exc.try_next_hop
    assert exc.reason.startswith("4.7.5 Server certificate not verified for wrong.example.test")
    exc = await failure(port, hop="mx.example.test", tls=TlsPolicy.VERIFY)  # system CAs: not trusted
    assert exc.reason.startswith("4.7.5 Server certificate not verified")
    exc = await failure(port, hop="mx.example.test", tls=TlsPolicy.VERIFY, tls_ca_file=Path("/nonexistent"))
    assert exc.reason.startswith("4.7.5 cannot load the CA file")


# --------------------------------------------------------------------------- AUTH


@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
async def test_auth(fake: Fake, mechanisms: str) -> None:
    server, port = await fake(ehlo=("PIPELINING", f"AUTH {mechanisms}"))
    async with await connect(port, auth=("alice", "secret")) as conn:
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    expected = "AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode()
    assert server.commands[1] == (expected if "PLAIN" in mechanisms else "AUTH LOGIN")


@pytest.mark.parametrize("mechanisms", ["PLAIN", "LOGIN"])
async def test_auth_wrong_password(fake: Fake, mechanisms: str) -> None:
    _server, port = await fake(ehlo=(f"AUTH {mechanisms}",))
    exc = await failure(port, auth=("alice", "wrong"))
    assert exc.stage == "AUTH" and exc.temporary and exc.reply is not None and exc.reply.code == 535
    assert exc.reason.startswith("4.7.8 SASL authentication failed; server")


async def test_auth_without_a_usable_mechanism(fake: Fake) -> None:
    _server, port = await fake(ehlo=("AUTH CRAM-MD5",))
    exc = await failure(port, auth=("alice", "secret"))
    assert exc.stage == "AUTH" and "offered no compatible mechanism" in exc.reason
    assert exc.reason.endswith("it offered: CRAM-MD5")
    _server, port = await fake(ehlo=())
    exc = await failure(port, auth=("alice", "secret"))
    assert exc.reason.endswith("it offered: none")


async def test_auth_needs_tls_off_loopback(fake: Fake, monkeypatch: pytest.MonkeyPatch,
                                           server_tls: tuple[ssl.SSLContext, Path]) -> None:
    monkeypatch.setattr(outbound_session, "_is_loopback", lambda address: False)
    server, port = await fake(ehlo=("AUTH PLAIN",))
    exc = await failure(port, auth=("alice", "secret"))
    assert exc.stage == "AUTH" and "without TLS" in exc.reason
    assert "AUTH" not in server.verbs()
    server, port = await fake(ehlo=("AUTH PLAIN",), tls=server_tls[0])
    async with await connect(port, auth=("alice", "secret"), tls=TlsPolicy.MAY) as conn:
        assert conn.tls
    assert server.verbs()[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]


# --------------------------------------------------------------------------- parameters and content


async def test_size_limit_is_checked_before_mail(fake: Fake) -> None:
    server, port = await fake(ehlo=("SIZE 100",))
    async with await connect(port) as conn:
        results = await conn.send_message(envelope("a@y.test", "b@y.test", size=101), b"x" * 101)
        assert codes(results) == [(552, LOCAL_STAGE)] * 2 and results[0].permanent
        assert results[0].reply.enhanced == "5.3.4" and conn.usable
    assert "MAIL" not in server.verbs()


async def test_smtputf8(fake: Fake) -> None:
    server, port = await fake(ehlo=("PIPELINING",))
    async with await connect(port) as conn:
        results = await conn.send_message(envelope("jörg@y.test"), MESSAGE)
        assert codes(results) == [(550, LOCAL_STAGE)] and results[0].reply.enhanced == "5.6.7"
        results = await conn.send_message(envelope(smtputf8=True), MESSAGE)
        assert results[0].reply.enhanced == "5.6.7"
    server, port = await fake(ehlo=("PIPELINING", "SMTPUTF8"))
    async with await connect(port) as conn:
        assert codes(await conn.send_message(envelope("jörg@y.test"), MESSAGE)) == [(250, "end of data")]
    assert server.commands[1].endswith(" SMTPUTF8") and server.commands[2] == "RCPT TO:<jörg@y.test>"


async def test_dsn_parameters_only_when_offered(fake: Fake) -> None:
    env = Envelope("s@remote.test", (OutboundRecipient("b@y.test", Notify.FAILURE | Notify.DELAY,
                                                       "rfc822;B+x@y.test"),), size=10, ret="HDRS",
                   envid="id+1")
    server, port = await fake(ehlo=("DSN",))
    async with await connect(port) as conn:
        await conn.send_message(env, MESSAGE)
    assert server.commands[1:3] == ["MAIL FROM:<s@remote.test> RET=HDRS ENVID=id+2B1",
                                    "RCPT TO:<b@y.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;B+2Bx@y.test"]
    server, port = await fake(ehlo=())
    async with await connect(port) as conn:
        await conn.send_message(env, MESSAGE)
    assert server.commands[1:3] == ["MAIL FROM:<s@remote.test>", "RCPT TO:<b@y.test>"]


EIGHT_BIT = ("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\nSubject: x\r\n\r\nGrüße, déjà vu\r\n").encode()


async def test_8bitmime_offered(fake: Fake) -> None:
    server, port = await fake()
    async with await connect(port) as conn:
        await conn.send_message(envelope(body_8bit=True), EIGHT_BIT)
    assert server.commands[1].endswith(" BODY=8BITMIME") and server.messages == [EIGHT_BIT]


async def test_8bit_downgraded_when_not_offered(fake: Fake, tmp_path: Path) -> None:
    server, port = await fake(ehlo=("PIPELINING",))
    spooled = tmp_path / "body"
    spooled.write_bytes(EIGHT_BIT)
    async with await connect(port) as conn:
        await conn.send_message(envelope(body_8bit=True), EIGHT_BIT)
        await conn.reset()
        await conn.send_message(envelope(body_8bit=True), spooled)
        await conn.reset()
        headers_8bit = b"Subject: \xc3\xa9\r\nMIME-Version: 1.0\r\n\r\n\xc3\xa9\r\n"
        await conn.send_message(envelope(body_8bit=True), headers_8bit)  # cannot convert: as it is
    assert "BODY=8BITMIME" not in server.commands[1]
    first, second, third = server.messages
    assert first == second and first.isascii() and b"Content-Transfer-Encoding: quoted-printable" in first
    parsed = email.message_from_bytes(first, policy=email.policy.default)
    assert parsed.get_content() == "Grüße, déjà vu\r\n"
    assert third == headers_8bit


async def test_bdat_pipelined_with_the_envelope(fake: Fake) -> None:
    server, port = await fake(ehlo=("PIPELINING", "CHUNKING"), batch=True)
    async with await connect(port) as conn:
        for _ in range(2):
            assert codes(await conn.send_message(envelope("a@y.test", "b@y.test"), MESSAGE)) == [
                (250, "end of data")] * 2
            assert await conn.reset()
        bare = b"Subject: bare\nline\rend"
        await conn.send_message(envelope(), bare)
    assert server.messages == [MESSAGE, MESSAGE, b"Subject: bare\r\nline\r\nend\r\n"]
    assert server.verbs()[:5] == ["EHLO", "MAIL", "RCPT", "RCPT", "BDAT"]
    assert server.commands[4] == f"BDAT {len(MESSAGE)} LAST"


async def test_bdat_refused_recipients(fake: Fake) -> None:
    server, port = await fake(ehlo=("PIPELINING", "CHUNKING"), replies={"RCPT": [b"550 5.1.1 no\r\n"]})
    async with await connect(port) as conn:
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(550, "RCPT TO")]
        assert await conn.reset()
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    assert server.messages == [MESSAGE]


def big_body(size: int) -> bytes:
    line = b".a line that starts with a dot, then some text to fill it up to about eighty octets\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


@pytest.mark.parametrize("ehlo", [("PIPELINING", "CHUNKING"), ("CHUNKING",), ("PIPELINING",), ()])
async def test_large_spooled_body_streams(fake: Fake, tmp_path: Path, ehlo: tuple[str, ...]) -> None:
    body = big_body(2_600_000)  # three 1 MiB pieces
    spooled = tmp_path / "body"
    spooled.write_bytes(body)
    server, port = await fake(ehlo=ehlo)
    async with await connect(port) as conn:
        assert codes(await conn.send_message(envelope(size=len(body)), spooled)) == [(250, "end of data")]
    assert server.messages == [body]
    if "CHUNKING" in ehlo:
        assert [c for c in server.commands if c.startswith("BDAT")] == [
            "BDAT 1048576", "BDAT 1048576", f"BDAT {len(body) - 2 * 1048576} LAST"]


async def test_bdat_chunk_refused(fake: Fake, tmp_path: Path) -> None:
    spooled = tmp_path / "body"
    spooled.write_bytes(big_body(1_500_000))
    server, port = await fake(ehlo=("CHUNKING",), replies={"BDAT": [b"552 5.3.4 too big\r\n"]})
    async with await connect(port) as conn:
        assert codes(await conn.send_message(envelope(), spooled)) == [(552, "BDAT")]
        assert await conn.reset()
        # Whether a refused chunk ended the server's transaction is the server's to say: RSET.
        assert server.verbs()[-1] == "RSET"


async def test_no_rset_after_a_refused_end_of_data(fake: Fake) -> None:
    """RFC 5321 §4.1.1.4: the reply to the end of data, 5xx too, ends the transaction."""
    server, port = await fake(replies={".": [b"554 5.7.1 spam\r\n"]})
    async with await connect(port) as conn:
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(554, "end of data")]
        assert await conn.reset()
        assert codes(await conn.send_message(envelope(), MESSAGE)) == [(250, "end of data")]
    assert "RSET" not in server.verbs()


async def test_spooled_body_that_is_gone(fake: Fake, tmp_path: Path) -> None:
    server, port = await fake()
    async with await connect(port) as conn:
        results = await conn.send_message(envelope(), tmp_path / "missing")
        assert codes(results) == [(451, LOCAL_STAGE)] and conn.usable
    assert "MAIL" not in server.verbs()


# --------------------------------------------------------------------------- LMTP


async def test_lmtp_one_reply_per_recipient(fake: Fake) -> None:
    server, port = await fake(lmtp=True, ehlo=("PIPELINING", "CHUNKING", "ENHANCEDSTATUSCODES"), replies={
        "RCPT": [None, b"550 5.1.1 unknown\r\n", None, None],
        ".": [b"250 2.0.0 a ok\r\n", b"452 4.2.2 c over quota\r\n", b"552 5.2.2 d full\r\n"]})
    async with await connect(port, lmtp=True) as conn:
        results = await conn.send_message(envelope("a@y.test", "b@y.test", "c@y.test", "d@y.test"), MESSAGE)
    assert codes(results) == [(250, "end of data"), (550, "RCPT TO"), (452, "end of data"),
                              (552, "end of data")]
    assert results[2].reply.text == ("c over quota",)
    assert server.verbs()[:1] == ["LHLO"] and "BDAT" not in server.verbs()  # LMTP: always DATA


async def test_lmtp_connection_lost_between_replies(fake: Fake) -> None:
    _server, port = await fake(lmtp=True, replies={".": [b"250 2.0.0 a ok\r\n", CLOSE]})
    conn = await connect(port, lmtp=True)
    # the server's "." handling writes the first reply, then the CLOSE marker ends the session
    results = await conn.send_message(envelope("a@y.test", "b@y.test"), MESSAGE)
    assert codes(results)[0] == (250, "end of data")
    assert results[1].reply.code == 451 and results[1].reply.enhanced == "4.4.2" and not conn.usable
    await conn.close()


async def test_lmtp_over_a_unix_socket(tmp_path: Path) -> None:
    server = FakeSmtp(lmtp=True)
    path = str(tmp_path / "lmtp.sock")
    await server.start(unix_path=path)
    try:
        conn = await OutboundConnection.open_unix(path, dataclasses.replace(OPTIONS, lmtp=True))
        assert conn.label == f"unix:{path}"
        async with conn:
            assert codes(await conn.send_message(envelope("a@y.test"), MESSAGE)) == [(250, "end of data")]
        assert server.messages == [MESSAGE]
        with pytest.raises(SessionFailure) as info:
            await OutboundConnection.open_unix(tmp_path / "nothing", OPTIONS)
        assert info.value.stage == "connect" and "No such file or directory" in info.value.reason
    finally:
        await server.stop()


async def test_lhlo_refused_has_no_helo_fallback(fake: Fake) -> None:
    server, port = await fake(lmtp=True, replies={"LHLO": [b"500 5.5.1 what\r\n"]})
    exc = await failure(port, lmtp=True)
    assert exc.stage == "LHLO" and "HELO" not in server.verbs()


# --------------------------------------------------------------------------- fuzz

REPLY_PIECES = st.one_of(
    st.sampled_from([b"220 ok\r\n", b"250 ok\r\n", b"250-PIPELINING\r\n250-CHUNKING\r\n250 SIZE 10\r\n",
                     b"250-x\r\n250-STARTTLS\r\n250 AUTH LOGIN PLAIN\r\n", b"354 go\r\n", b"421 bye\r\n",
                     b"550 5.1.1 no\r\n", b"334 VXNlcm5hbWU6\r\n", b"235 ok\r\n", b"250-8BITMIME\r\n",
                     b"\r\n", b"250", b"\n", b"999 x\r\n"]),
    st.binary(max_size=40),
)


async def _fuzz_session(pieces: list[bytes], options: OutboundOptions, body: bytes) -> None:
    tasks: list[asyncio.Task[Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.append(task)
        try:
            while pieces:
                writer.write(pieces.pop(0))
                try:
                    await asyncio.wait_for(reader.readline(), 0.02)
                except TimeoutError:
                    pass
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await OutboundConnection.open("fuzz.test", "127.0.0.1", port, options)
        await conn.send_message(envelope("a@y.test", "b@y.test", body_8bit=True), body)
        await conn.reset()
        await conn.send_message(envelope(), body)
        await conn.close()
    except SessionFailure:
        pass
    finally:
        server.close()
        if tasks:
            await asyncio.wait(tasks, timeout=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(REPLY_PIECES, max_size=14), tls=st.sampled_from([TlsPolicy.NONE, TlsPolicy.MAY]),
       auth=st.booleans(), lmtp=st.booleans())
def test_random_replies_raise_only_session_failure(pieces: list[bytes], tls: TlsPolicy, auth: bool,
                                                   lmtp: bool) -> None:
    """Any bytes from the server: open/send_message/reset/close either work or raise SessionFailure."""
    options = dataclasses.replace(OPTIONS, tls=tls, auth=("u", "p") if auth else None, lmtp=lmtp,
                                  command_timeout=0.5, data_timeout=0.5)
    asyncio.run(asyncio.wait_for(_fuzz_session(list(pieces), options, EIGHT_BIT), 20))
