"""Listeners.apply (a reload's [[listen]]) in-process over real loopback
sockets: an address changing to implicit TLS and back is bound again with
the right TLS; a settings change reaches new sessions; an address that cannot
be bound changes nothing."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import peers
import pytest
import trustme
from in_process_services import services_for

from gannet import config as config_mod
from gannet.config import Listener, ListenMode
from gannet.server.listener import Listeners

CA = trustme.CA()
HOST = "127.0.0.1"


@pytest.fixture
async def listeners(tmp_path: Path) -> AsyncIterator[Listeners]:
    path = tmp_path / "gannet.toml"
    path.write_text(f'hostname = "mx.test"\n[[listen]]\naddress = "127.0.0.1:{peers.free_port(HOST)}"\n'
                    '[relay]\nlocal_domains = ["example.test"]\n')  # fmt: skip
    cfg = config_mod.load(path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    CA.issue_cert("127.0.0.1").configure_cert(tls)
    running = Listeners(services_for(cfg, tls_context=tls))
    await running.start()
    yield running
    await running.stop(5)


async def greeting(port: int, *, tls: bool, command: bytes = b"EHLO c.test\r\n") -> list[bytes]:
    context = None
    if tls:
        context = ssl.create_default_context()
        CA.configure_trust(context)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=None)
    lines = [await reader.readline()]
    writer.write(command)
    line = await reader.readline()
    lines.append(line)
    while line[3:4] == b"-":
        line = await reader.readline()
        lines.append(line)
    writer.close()
    return lines


async def test_an_address_switching_to_implicit_tls_and_back_is_bound_again(listeners: Listeners) -> None:
    (address,) = listeners.bound
    port = int(address.rpartition(":")[2])
    assert (await greeting(port, tls=False))[0].startswith(b"220 ")

    await listeners.apply([Listener("127.0.0.1", port, ListenMode.SUBMISSIONS)])
    lines = await greeting(port, tls=True)
    assert lines[0].startswith(b"220 ") and any(b"AUTH" in line for line in lines), lines

    await listeners.apply([Listener("127.0.0.1", port, ListenMode.LMTP)])  # plain again, and LMTP
    assert (await greeting(port, tls=False, command=b"LHLO c.test\r\n"))[-1].startswith(b"250 ")


async def test_an_address_that_cannot_be_bound_changes_nothing(listeners: Listeners) -> None:
    (address,) = listeners.bound
    port = int(address.rpartition(":")[2])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        fresh = peers.free_port(HOST)
        wanted = [Listener("127.0.0.1", fresh, ListenMode.MX), Listener("127.0.0.1", busy, ListenMode.MX)]
        with pytest.raises(OSError):
            await listeners.apply(wanted)  # the first was bound, then given back
    assert list(listeners.bound) == [address]
    assert (await greeting(port, tls=False))[0].startswith(b"220 ")
    with pytest.raises(OSError):
        await greeting(fresh, tls=False)
