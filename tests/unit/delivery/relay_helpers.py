"""Shared pieces of the relay tests (test_scheduler, test_sweep, test_bounces):
a scripted SMTP peer on 127.0.0.1 port 0, a routing stub, a clock whose `now`
the test sets, a spying SqliteStore, the recipient table and message builders.

`Peer` speaks just enough ESMTP for OutboundConnection (PIPELINING, 8BITMIME,
ENHANCEDSTATUSCODES; no CHUNKING, so content goes with DATA). It answers each
command line as it arrives, so pipelined groups work, and it records every
connection, every command line and every transaction. `greeting=None` makes
it a black hole (it accepts and never speaks); a non-2xx greeting makes it a
refusing host; `gate` holds the greeting back until the test sets it.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import inspect
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from gannet.delivery.routing import NextHop, Route
from gannet.policy.accounts import Accounts
from gannet.policy.recipients import RecipientTable
from gannet.queue.model import (
    InlineBody,
    NewMessage,
    NewRecipient,
    QueuedMessageView,
    RecipientOutcome,
    RecipientView,
    Transport,
)
from gannet.queue.sqlite import SqliteStore

T0 = 1_800_000_000.0
DAY = 86400.0
HOUR = 3600.0
LOCAL_DOMAIN = "example.test"
SENDER = "alice@example.test"  # an account here: reports to it stay in the queue (LOCAL)
POSTMASTER = "postmaster@example.test"  # an alias of alice
EHLO = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 10000000")
_ADDRESS = re.compile(r"<([^>]*)>")


# -- the world around the code under test -----------------------------------------------------


class PinnedClock:
    """`now()` stays where the test puts it (`t`); `monotonic()` and `sleep()` are the
    real loop's, as network timeouts run on the loop's clock anyway. Retry times
    come out exact, and nothing becomes due unless the test moves `t`."""

    def __init__(self, start: float = T0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Routes:
    """A RouteSource: a fixed Route per domain, or an exception to raise."""

    def __init__(self, table: Mapping[str, Route | Exception]) -> None:
        self.table = dict(table)
        self.asked: list[str] = []

    async def route(self, domain: str) -> Route:
        self.asked.append(domain)
        await asyncio.sleep(0)
        found = self.table[domain]
        if isinstance(found, Exception):
            raise found
        return found


def route_to(destination: str, *ports: int) -> Route:
    """A Route to 127.0.0.1 on each port in turn (mx0.<destination>, mx1.…)."""
    hops = tuple(NextHop(f"mx{i}.{destination}", "127.0.0.1", port, 10 * i) for i, port in enumerate(ports))
    return Route(destination, hops)


def closed_port() -> int:
    """A loopback port nobody listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SpyStore(SqliteStore):
    """The real SqliteStore, counting body reads and record calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_reads: list[str] = []
        self.records: list[int] = []  # outcomes per record() call

    async def read_body(self, queue_id: str) -> bytes:
        self.body_reads.append(queue_id)
        return await super().read_body(queue_id)

    async def record(
        self, outcomes: Sequence[RecipientOutcome], enqueue: Sequence[NewMessage] = ()
    ) -> list[str]:
        self.records.append(len(outcomes))
        return await super().record(outcomes, enqueue)


async def open_store(tmp_path: Path) -> SpyStore:
    store = SpyStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool")
    (tmp_path / "spool").mkdir(exist_ok=True)
    await store.open()
    return store


def table() -> RecipientTable:
    """Local domain example.test: the account alice, postmaster an alias of alice."""
    return RecipientTable(
        local_domains=frozenset({LOCAL_DOMAIN}),
        relay_domains=frozenset(),
        aliases={POSTMASTER: (SENDER,)},
        accounts=Accounts([(SENDER, "x")]),
    )


def body_of(queue_id: str) -> bytes:
    return f"Message-ID: <{queue_id}@x.test>\r\nSubject: test {queue_id}\r\n\r\nhello\r\n.a dot\r\n".encode()


def smtp_message(
    queue_id: str,
    *recipients: str,
    sender: str = SENDER,
    received_at: float = T0,
    body: bytes | None = None,
    notify: int | None = None,
    **kwargs: Any,
) -> NewMessage:
    rcpts = tuple(
        NewRecipient(a, Transport.SMTP, a.rpartition("@")[2].lower(), notify=notify) for a in recipients
    )
    content = body if body is not None else body_of(queue_id)
    return NewMessage(queue_id, sender, rcpts, InlineBody(content), received_at, **kwargs)


async def rows(store: SqliteStore) -> list[tuple[QueuedMessageView, RecipientView]]:
    """Every (message, recipient) still in the queue."""
    return [(m, r) for m in await store.list_messages() for r in m.recipients]


async def recipient(store: SqliteStore, address: str) -> RecipientView:
    (found,) = [r for _, r in await rows(store) if r.address == address]
    return found


async def reports(store: SqliteStore) -> list[QueuedMessageView]:
    """The delivery status notifications in the queue (null sender)."""
    return [m for m in await store.list_messages() if m.sender == ""]


def parse(content: bytes) -> EmailMessage:
    return email.message_from_bytes(content, policy=email.policy.default)


async def until(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` (a safety net, not a
    measurement: no test asserts how long anything took)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- the scripted peer --------------------------------------------------------------------------


@dataclass
class Transaction:
    sender: str
    recipients: list[str]  # every RCPT TO, in order
    accepted: list[str]
    body: bytes  # dot-unstuffed, CRLF line ends


@dataclass
class Peer:
    """A scripted SMTP server on 127.0.0.1 (see the module docstring).

    `rcpt` maps an address to its RCPT reply (default 250). `close_after_data`:
    hang up right after answering the end of the content (an idle connection
    the client keeps is then dead)."""

    greeting: bytes | None = b"220 peer.test ESMTP\r\n"
    rcpt: dict[str, bytes] = field(default_factory=dict)
    ehlo: tuple[str, ...] = EHLO
    gate: asyncio.Event | None = None
    close_after_data: bool = False
    connections: int = 0
    open: int = 0
    max_open: int = 0
    sessions: list[list[str]] = field(default_factory=list)  # the command lines of each connection
    transactions: list[Transaction] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def abort_all(self) -> None:
        """Reset every open connection (a black hole that finally goes away)."""
        for w in self._writers:
            w.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.abort_all()
        if self._tasks:
            _, hanging = await asyncio.wait(self._tasks, timeout=5)
            for task in hanging:
                task.cancel()

    def verbs(self, session: int = 0) -> list[str]:
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in self.sessions[session]]

    def count(self, verb: str) -> int:
        return sum(self.verbs(i).count(verb) for i in range(len(self.sessions)))

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self._writers.append(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.append(task)
        lines: list[str] = []
        self.sessions.append(lines)
        try:
            await self._dialog(reader, writer, lines)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _dialog(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      lines: list[str]) -> None:
        if self.greeting is None:  # a black hole: accept, never speak
            await reader.read()
            return
        if self.gate is not None:
            await self.gate.wait()
        writer.write(self.greeting)
        sender, rcpts, accepted = "", list[str](), list[str]()
        while line := await reader.readline():
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            lines.append(command)
            verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
            found = _ADDRESS.search(command)
            address = found.group(1) if found else ""
            if verb == "EHLO":
                names = ["peer.test", *self.ehlo]
                reply = b"".join(
                    f"250{' ' if i == len(names) - 1 else '-'}{n}\r\n".encode() for i, n in enumerate(names)
                )
            elif verb == "MAIL":
                sender, rcpts, accepted = address, [], []
                reply = b"250 2.1.0 ok\r\n"
            elif verb == "RCPT":
                rcpts.append(address)
                reply = self.rcpt.get(address, b"250 2.1.5 ok\r\n")
                if reply.startswith(b"2"):
                    accepted.append(address)
            elif verb == "RSET":
                sender, rcpts, accepted = "", [], []
                reply = b"250 2.0.0 ok\r\n"
            elif verb == "DATA":
                if not accepted:
                    reply = b"554 5.5.1 no valid recipients\r\n"
                else:
                    writer.write(b"354 go ahead\r\n")
                    body = bytearray()
                    while (chunk := await reader.readuntil(b"\r\n")) != b".\r\n":
                        body += chunk[1:] if chunk.startswith(b".") else chunk
                    self.transactions.append(Transaction(sender, rcpts, accepted, bytes(body)))
                    sender, rcpts, accepted = "", [], []
                    reply = b"250 2.0.0 queued\r\n"
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                reply = b"502 5.5.2 unknown command\r\n"
            writer.write(reply)
            await writer.drain()
            if verb == "DATA" and self.close_after_data:
                return
