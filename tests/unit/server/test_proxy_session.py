"""A `proxy_protocol = true` listener in-process, over real loopback sockets.

The header comes before the greeting; the address it names is the client for
the Received header, the log and the relay rules; a connection without a
valid header, or from an address outside `proxy_from`, is closed without a
word (no SMTP reply) and logged with the peer and the reason. The header
format itself is tested in test_proxy_protocol.py; HAProxy in
tests/interop/test_haproxy.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from in_process_services import services_for

from gannet import config as config_mod
from gannet.queue.model import InlineBody, NewMessage
from gannet.server import proxy_intake
from gannet.server.listener import Listeners
from gannet.server.proxy_protocol import V2_SIGNATURE

CONFIG = """
hostname = "mx.test"
[[listen]]
address = "127.0.0.1:0"
proxy_protocol = true
{proxy_from}
[relay]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.1/32", "192.0.2.0/24"]
[mailboxes]
aliases = {{ "postmaster@example.test" = ["x@elsewhere.test"] }}
"""


@dataclass
class RecordingStore:
    stored: list[NewMessage] = field(default_factory=list)

    async def enqueue(self, message: NewMessage) -> None:
        self.stored.append(message)


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """start(proxy_from=None) → (port, store): a Listeners with one proxy_protocol mx listener."""
    started: list[Listeners] = []

    async def start(proxy_from: str | None = None) -> tuple[int, RecordingStore]:
        path = tmp_path / "gannet.toml"
        path.write_text(CONFIG.format(proxy_from=f"proxy_from = {proxy_from}" if proxy_from else ""))
        cfg = config_mod.load(path)
        store = RecordingStore()
        listeners = Listeners(services_for(cfg, store))
        await listeners.start()
        started.append(listeners)
        ((_, port),) = listeners.bound_ports()
        return port, store

    yield start
    for listeners in started:
        await listeners.stop(5)


def v2_inet4(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 25, command: int = 1) -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(block)) + block


async def said_before_closing(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed (a reset, when it left our bytes unread, counts
    as closed)."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(4096), 5):
            data += chunk
    except ConnectionResetError:
        pass
    return data


MESSAGE = [b"EHLO client.test\r\n", b"MAIL FROM:<a@elsewhere.test>\r\n", b"RCPT TO:<{rcpt}>\r\n", b"DATA\r\n",
           b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n"]


async def converse(port: int, header: bytes, rcpt: str = "postmaster@example.test",
                   bind: str = "127.0.0.1") -> list[bytes]:
    """Send the header and the first command in ONE write (early SMTP bytes must be kept),
    then one command at a time; return the replies (last line of each)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(bind, 0))
    lines = [line.replace(b"{rcpt}", rcpt.encode()) for line in MESSAGE]
    writer.write(header + lines[0])
    replies = [await reader.readline()]
    for line in [*lines[1:], b""]:
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        replies.append(reply)
        if reply[:3] in (b"221", b"") or reply[:1] in (b"4", b"5") or not line:
            break
        writer.write(line)
    writer.close()
    return replies


async def test_v1_header_names_the_client_for_received_and_the_log(
        proxied: Callable[..., object], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port, store = await proxied()  # type: ignore[misc]
    replies = await converse(port, b"PROXY TCP4 192.0.2.10 127.0.0.1 40001 25\r\n")
    assert replies[0].startswith(b"220 mx.test"), replies
    assert replies[-1].startswith(b"221"), replies
    (message,) = store.stored
    assert isinstance(message.body, InlineBody)
    assert message.body.data.startswith(b"Received: from client.test ([192.0.2.10])\r\n\tby mx.test")
    assert message.client == "client.test [192.0.2.10]:40001"
    log = caplog.text
    assert "connect from=[192.0.2.10]:40001" in log
    assert "client [192.0.2.10]:40001 via proxy [127.0.0.1]:" in log


async def test_relay_rules_apply_to_the_address_in_the_header(proxied: Callable[..., object]) -> None:
    port, store = await proxied()  # type: ignore[misc]
    # trusted (192.0.2.0/24): relaying allowed
    ok = await converse(port, v2_inet4("192.0.2.99", 1000), rcpt="someone@elsewhere.test")
    assert ok[3].startswith(b"250"), ok
    # 203.0.113.5 is not trusted, although the TCP peer (127.0.0.1) is
    refused = await converse(port, v2_inet4("203.0.113.5", 1001), rcpt="someone@elsewhere.test")
    assert refused[3].startswith(b"554 5.7.1"), refused
    assert len(store.stored) == 1 and store.stored[0].client.endswith("[192.0.2.99]:1000")


async def test_local_command_keeps_the_real_address(proxied: Callable[..., object]) -> None:
    port, store = await proxied()  # type: ignore[misc]
    replies = await converse(port, v2_inet4("203.0.113.5", 1, command=0))
    assert replies[-1].startswith(b"221"), replies
    assert store.stored[0].client.startswith("client.test [127.0.0.1]:")


@pytest.mark.parametrize(("first_bytes", "reason"), [
    (b"EHLO client.test\r\n", "invalid PROXY header: no PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "invalid PROXY header: v1: a bare LF"),
    (b"PROXY TCP4 1.2.3", "closed by the peer after an incomplete PROXY header"),
    (b"", "closed by the peer after no PROXY header"),
])
async def test_no_valid_header_no_greeting(proxied: Callable[..., object], caplog: pytest.LogCaptureFixture,
                                           first_bytes: bytes, reason: str) -> None:
    port, store = await proxied()  # type: ignore[misc]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first_bytes)
    writer.write_eof()
    assert await said_before_closing(reader) == b""
    writer.close()
    await asyncio.sleep(0.05)
    assert f"to 127.0.0.1:{port} dropped: {reason}" in caplog.text
    assert "connection from [127.0.0.1]:" in caplog.text
    assert "Traceback" not in caplog.text and not store.stored


async def test_a_silent_peer_is_dropped_after_the_header_timeout(
        proxied: Callable[..., object], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_intake, "HEADER_TIMEOUT", 0.3)
    port, _ = await proxied()  # type: ignore[misc]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY ")
    assert await said_before_closing(reader) == b""
    writer.close()
    assert "dropped: no complete PROXY header within 0.3s" in caplog.text


async def test_a_header_from_outside_proxy_from_is_refused(
        proxied: Callable[..., object], caplog: pytest.LogCaptureFixture) -> None:
    port, store = await proxied(proxy_from='["127.0.0.7/32"]')  # type: ignore[misc]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY TCP4 192.0.2.10 127.0.0.1 40001 25\r\nEHLO x\r\n")
    assert await said_before_closing(reader) == b""
    writer.close()
    assert "dropped: not in proxy_from" in caplog.text
    # from the listed address, the same header is accepted
    replies = await converse(port, b"PROXY TCP4 192.0.2.10 127.0.0.1 40001 25\r\n", bind="127.0.0.7")
    assert replies[-1].startswith(b"221") and store.stored
