"""Sessions in-process over real loopback sockets, with the queue store swapped:
what the client hears when the store fails, and that 250 waits for the commit."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from in_process_services import services_for

from gannet import config as config_mod
from gannet.queue.model import InlineBody, NewMessage, QueueError
from gannet.server.listener import Listeners


@dataclass
class ControlledStore:
    """Enough of QueueStore for a session: enqueue fails, or waits for `release`."""

    fail: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stored: list[NewMessage] = field(default_factory=list)
    in_hand: bool = False  # what enqueue says: the store's writer delivers it itself

    async def enqueue(self, message: NewMessage) -> bool:
        if self.fail:
            raise QueueError("disk full")
        await self.release.wait()
        self.stored.append(message)
        return self.in_hand


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Listeners, ControlledStore]]:
    path = tmp_path / "gannet.toml"
    path.write_text(
        'hostname = "mx.test"\n[[listen]]\naddress = "127.0.0.1:0"\n'
        '[relay]\nlocal_domains = ["example.test"]\n'
        '[mailboxes]\naliases = { "postmaster@example.test" = ["x@elsewhere.test"] }\n'
    )
    cfg = config_mod.load(path)
    store = ControlledStore()
    listeners = Listeners(services_for(cfg, store))
    await listeners.start()
    yield listeners, store
    await listeners.stop(5)


async def dialog(
    port: int, lines: list[bytes]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await reader.readline()]
    for line in lines:
        writer.write(line)
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        replies.append(reply)
    return reader, writer, replies


MESSAGE = [
    b"EHLO c.test\r\n",
    b"MAIL FROM:<a@elsewhere.test>\r\n",
    b"RCPT TO:<postmaster@example.test>\r\n",
    b"DATA\r\n",
]


async def test_a_store_failure_answers_451_and_the_session_goes_on(
    running: tuple[Listeners, ControlledStore],
) -> None:
    listeners, store = running
    store.fail = True
    ((_, port),) = listeners.bound_ports()
    reader, writer, replies = await dialog(port, [*MESSAGE, b"Subject: x\r\n\r\nbody\r\n.\r\n"])
    assert replies[-1].startswith(b"451 4.3.0")
    writer.write(b"NOOP\r\n")
    assert (await reader.readline()).startswith(b"250")
    writer.close()


async def test_250_is_sent_only_after_the_commit_returns(running: tuple[Listeners, ControlledStore]) -> None:
    listeners, store = running
    ((_, port),) = listeners.bound_ports()
    reader, writer, replies = await dialog(port, MESSAGE)
    assert replies[-1].startswith(b"354")
    writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), 0.3)  # the commit has not returned
    assert store.stored == []
    store.release.set()
    reply = await asyncio.wait_for(reader.readline(), 5)
    assert reply.startswith(b"250 2.0.0 queued as ")
    assert store.stored and reply.split()[-1].decode() == store.stored[0].queue_id
    writer.close()


@pytest.mark.parametrize("in_hand", [False, True])
async def test_the_delivery_loop_is_woken_unless_the_store_delivers_it(tmp_path: Path, in_hand: bool) -> None:
    """The SQLite writer that delivers local mail itself answers True: no wake-up
    (the delivery loop would claim nothing, and its claim would cost a commit)."""
    path = tmp_path / "gannet.toml"
    path.write_text('hostname = "mx.test"\n[[listen]]\naddress = "127.0.0.1:0"\n'
                    '[relay]\nlocal_domains = ["example.test"]\n'
                    '[mailboxes]\naliases = { "postmaster@example.test" = ["x@elsewhere.test"] }\n')
    store = ControlledStore(in_hand=in_hand)
    store.release.set()
    services = services_for(config_mod.load(path), store)
    wakes: list[None] = []
    services.on_enqueued = lambda: wakes.append(None)
    listeners = Listeners(services)
    await listeners.start()
    try:
        ((_, port),) = listeners.bound_ports()
        _, writer, replies = await dialog(port, [*MESSAGE, b"Subject: x\r\n\r\nbody\r\n.\r\n"])
        assert replies[-1].startswith(b"250 2.0.0 queued as ")
        assert wakes == ([] if in_hand else [None])
        writer.close()
    finally:
        await listeners.stop(5)


async def _start(tmp_path: Path, smtp: str) -> tuple[Listeners, ControlledStore, int]:
    path = tmp_path / "gannet.toml"
    path.write_text('hostname = "mx.test"\n[[listen]]\naddress = "127.0.0.1:0"\n'
                    '[relay]\nlocal_domains = ["example.test"]\n'
                    '[mailboxes]\naliases = { "postmaster@example.test" = ["x@elsewhere.test"] }\n'
                    f"[smtp]\n{smtp}\n")
    store = ControlledStore()
    store.release.set()
    listeners = Listeners(services_for(config_mod.load(path), store))
    await listeners.start()
    ((_, port),) = listeners.bound_ports()
    return listeners, store, port


async def _until_closed(reader: asyncio.StreamReader, within: float) -> list[bytes]:
    lines = []
    async with asyncio.timeout(within):
        while line := await reader.readline():
            lines.append(line)
    return lines


async def test_a_silent_client_hears_421_after_the_idle_timeout(tmp_path: Path) -> None:
    listeners, _, port = await _start(tmp_path, 'idle_timeout = "300ms"\ndata_timeout = "30s"')
    try:
        reader, writer, replies = await dialog(port, [b"EHLO c.test\r\n"])
        assert replies[-1].startswith(b"250 ")
        started = asyncio.get_running_loop().time()
        assert await _until_closed(reader, 5) == [b"421 4.4.2 Idle timeout, closing connection\r\n"]
        assert asyncio.get_running_loop().time() - started >= 0.25
        writer.close()
    finally:
        await listeners.stop(5)


async def test_commands_keep_a_session_alive_past_the_idle_timeout(tmp_path: Path) -> None:
    """The commands are answered while the session's task stays parked: each one
    must still count as activity for the timer armed when it parked."""
    listeners, _, port = await _start(tmp_path, 'idle_timeout = "1s"\ndata_timeout = "30s"')
    try:
        reader, writer, _ = await dialog(port, [])
        for _ in range(10):  # 2.5 s in all, two and a half idle timeouts
            await asyncio.sleep(0.25)
            writer.write(b"NOOP\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 ")
        assert (await _until_closed(reader, 5))[0].startswith(b"421 4.4.2")
        writer.close()
    finally:
        await listeners.stop(5)


async def test_a_body_that_stops_hears_421_after_the_data_timeout(tmp_path: Path) -> None:
    """DATA is answered while parked under the long idle timeout; the shorter data
    timeout must still apply to the body that follows, and nothing is queued."""
    listeners, store, port = await _start(tmp_path, 'idle_timeout = "30s"\ndata_timeout = "300ms"')
    try:
        reader, writer, replies = await dialog(port, MESSAGE)
        assert replies[-1].startswith(b"354")
        writer.write(b"Subject: half\r\n\r\nthe rest never comes")
        assert (await _until_closed(reader, 5)) == [b"421 4.4.2 Idle timeout, closing connection\r\n"]
        assert store.stored == []
        writer.close()
    finally:
        await listeners.stop(5)


async def test_pipelined_commands_split_anywhere_get_one_reply_each(tmp_path: Path) -> None:
    listeners, store, port = await _start(tmp_path, "")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        stream = (b"EHLO c.test\r\nMAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<postmaster@example.test>\r\n"
                  b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        for i in range(0, len(stream), 7):  # each piece arrives on its own
            writer.write(stream[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0.005)
        lines = await _until_closed(reader, 5)
        codes = [line[:4] for line in lines if line[3:4] == b" "]
        assert codes == [b"250 ", b"250 ", b"250 ", b"354 ", b"250 ", b"250 ", b"221 "]
        assert len(store.stored) == 1
        writer.close()
    finally:
        await listeners.stop(5)


async def test_a_quit_pipelined_behind_the_end_of_data_closes_the_connection(tmp_path: Path) -> None:
    """The end of data is answered by the task, which then finds QUIT already read:
    after 221 the server closes (RFC 5321 §4.1.1.10), it does not wait for more."""
    listeners, store, port = await _start(tmp_path, "")
    try:
        reader, writer, replies = await dialog(port, MESSAGE)
        assert replies[-1].startswith(b"354")
        writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        lines = await _until_closed(reader, 5)
        assert [line[:4] for line in lines] == [b"250 ", b"221 "]
        assert len(store.stored) == 1
        writer.close()
    finally:
        await listeners.stop(5)

# Two transactions, one with a dot-stuffed line, then RSET, NOOP, QUIT: what a
# pipelining client may send in one go (RFC 2920), and the reply codes it gets.
PIPELINED = (
    b"EHLO c.test\r\nMAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<postmaster@example.test>\r\nDATA\r\n"
    b"Subject: one\r\n\r\n..dot-stuffed\r\n.\r\n"
    b"MAIL FROM:<b@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<postmaster@example.test>\r\n"
    b"DATA\r\nSubject: two\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n"
)
PIPELINED_CODES = [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"550", b"250", b"354", b"250",
                   b"250", b"250", b"221"]


async def _replies_to_pieces(tmp_path: Path, cuts: list[int]) -> tuple[list[bytes], list[NewMessage]]:
    listeners, store, port = await _start(tmp_path, "")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        bounds = [0, *sorted(set(cuts)), len(PIPELINED)]
        for start, end in itertools.pairwise(bounds):
            writer.write(PIPELINED[start:end])
            await writer.drain()
            await asyncio.sleep(0.001)  # each piece its own read, most of the time
        lines = await _until_closed(reader, 10)
        writer.close()
        return [line[:3] for line in lines if line[3:4] == b" "], store.stored
    finally:
        await listeners.stop(5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, len(PIPELINED) - 1), max_size=12))
def test_pipelined_input_cut_anywhere_gets_the_same_replies(tmp_path: Path, cuts: list[int]) -> None:
    """The protocol core's property (tests/unit/smtp) through the session: commands are
    answered in the transport's callback and the end of data in the task, and where the
    bytes break must not change a reply or a stored message."""
    codes, stored = asyncio.run(asyncio.wait_for(_replies_to_pieces(tmp_path, cuts), 30))
    assert codes == PIPELINED_CODES
    assert [m.sender for m in stored] == ["a@elsewhere.test", "b@elsewhere.test"]
    first = stored[0].body
    assert isinstance(first, InlineBody) and first.data.endswith(b"Subject: one\r\n\r\n.dot-stuffed\r\n")
