"""The floor servers of bench/floor.py: three ever fuller SMTP servers that write nothing.

Each answers smtp-source's session (EHLO, MAIL, RCPT, DATA, the body, QUIT; or
several transactions on one connection) with fixed replies and keeps nothing:

- `canned`: one `asyncio.Protocol` that looks only at a command's first four
  bytes and scans for the end of the data. What the kernel (loopback TCP,
  accept, close, the wake-ups) and uvloop cost for smtp-source's round trips.
- `core`: Gannet's protocol core (`gannet.smtp.server.ServerConnection`: the
  command parser, the state machine, the DATA reader) driven from the
  Protocol's callbacks, as h11 can be: no task, no future.
- `task`: the same core driven as `gannet.server.session.Session` drives it
  (since session 24): a task per connection, parked in
  `gannet.server.wire.Wire.park` while the transport's callback answers the
  commands; each end of data wakes the task, which answers it (where Gannet
  awaits the store). Until session 24 the task awaited every read (a future
  and a timeout timer each), and so did this floor.

Run as `python bench/floor_servers.py LEVEL PORT`: prints "ready" once
listening, serves until killed. Never used by Gannet or its tests.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

from gannet.server.wire import Wire
from gannet.smtp import events as ev
from gannet.smtp import replies as R
from gannet.smtp.server import ServerConnection, ServerOptions

LEVELS = ("canned", "core", "task")
HOSTNAME = "floor.test"
CANNED_EHLO = b"250-floor.test\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
END_OF_DATA = b"\r\n.\r\n"
OPTIONS = ServerOptions(hostname=HOSTNAME)
BANNER = R.Reply(220, "", f"{HOSTNAME} ESMTP")
GO_AHEAD = R.Reply(354, "", "End data with <CR><LF>.<CR><LF>")
QUEUED = R.Reply(250, "2.0.0", "queued as FLOOR")


class CannedProtocol(asyncio.Protocol):
    """Replies chosen by the verb; the end of the data found across reads (4 bytes kept)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.in_data = False
        self.tail = b""
        self.partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass, the same methods
        self.transport.write(b"220 floor.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        while data:
            if self.in_data:
                seen = self.tail + data
                end = seen.find(END_OF_DATA)
                if end < 0:
                    self.tail = seen[-4:]
                    return
                self.in_data, self.tail = False, b""
                self.transport.write(b"250 2.0.0 queued as FLOOR\r\n")
                data = seen[end + len(END_OF_DATA) :]
                continue
            line, sep, data = (self.partial + data).partition(b"\r\n")
            if not sep:
                self.partial = line
                return
            self.partial = b""
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(CANNED_EHLO)
            elif verb == b"DATA":
                self.in_data, self.tail = True, b"\r\n"  # the DATA line's CRLF starts the body
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 2.0.0 OK\r\n")


def answer(conn: ServerConnection, event: ev.Event) -> R.Reply | None:
    """The fixed reply to an event of the core; None for those that take none."""
    kind = type(event)
    if kind is ev.Ehlo:
        return conn.ehlo_reply()
    if kind is ev.MailFrom:
        return R.R250_SENDER_OK
    if kind is ev.RcptTo:
        return R.R250_RCPT_OK
    if kind is ev.Data:
        return GO_AHEAD
    if kind is ev.EndOfData:
        return QUEUED
    if kind is ev.Quit:
        return R.R221_BYE
    if isinstance(event, ev.CommandError | ev.MessageRefused):
        return event.reply
    if kind is ev.BodyChunk or kind is ev.ConnectionClosed:
        return None
    return R.R250_OK


def answer_events(conn: ServerConnection, out: list[bytes]) -> ev.Sentinel:
    """Answer the core's events into `out` until it needs data (or pauses, or closes)."""
    while not conn.closed:
        event = conn.next_event()
        if isinstance(event, ev.Sentinel):
            return event
        reply = answer(conn, event)
        if reply is not None:
            out.append(conn.send(reply))
    return ev.Sentinel.PAUSED


class CoreProtocol(asyncio.Protocol):
    """The protocol core driven from the callbacks: each read's replies in one write."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn = ServerConnection(OPTIONS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.conn.send(BANNER))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.conn.receive_data(data)
        out: list[bytes] = []
        answer_events(self.conn, out)
        if out:
            self.transport.write(b"".join(out))
        if self.conn.closed:
            self.transport.close()


class TaskWire(Wire):
    """Wire whose connection starts a task, as the listener's does for a Session."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(_session(self))


async def _session(wire: Wire) -> None:
    """Session's shape: replies gathered until the core needs data, then one write;
    the task parked meanwhile, woken for each end of data."""
    conn = ServerConnection(OPTIONS)
    out = [conn.send(BANNER)]
    held: list[ev.Event | ev.Sentinel] = []

    def pump() -> ev.Event | ev.Sentinel:
        while not conn.closed:
            event = conn.next_event()
            if isinstance(event, ev.Sentinel) or type(event) is ev.EndOfData:
                return event
            reply = answer(conn, event)
            if reply is not None:
                out.append(conn.send(reply))
        return ev.Sentinel.PAUSED

    def on_input(data: bytes) -> bool:
        conn.receive_data(data)
        event = pump()
        if out:
            wire.write(b"".join(out))
            out.clear()
        if event is ev.NEED_DATA:
            return conn.closed
        held.append(event)
        return True

    while not conn.closed:
        event = held.pop() if held else pump()
        if event is ev.NEED_DATA:
            wire.write(b"".join(out))
            out.clear()
            await wire.drain()
            await wire.park(on_input, lambda: 300.0, 300.0)
            data = wire.take()
            if data is not None:
                conn.receive_data(data)
        elif type(event) is ev.EndOfData:
            out.append(conn.send(QUEUED))
        else:
            break
    if out:
        wire.write(b"".join(out))
    wire.close()


def serve(level: str, port: int) -> None:
    import uvloop

    factory = {"canned": CannedProtocol, "core": CoreProtocol, "task": TaskWire}[level]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(factory, "127.0.0.1", port, backlog=4096, reuse_address=True)
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
