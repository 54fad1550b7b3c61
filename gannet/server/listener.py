"""Listeners: one asyncio server per [[listen]] entry, one Session task per connection.

Modes (CONTRACT.md): mx (port 25 semantics), submission (STARTTLS then AUTH
required), submissions (implicit TLS, RFC 8314), lmtp (RFC 2033). Sessions are
tracked so that a graceful stop can ask each to finish and wait for them.

An implicit-TLS listener is bound with the TLS context of its start, but
every handshake on it switches to the context in force (`_in_force`), so a
certificate renewed and reloaded with SIGHUP reaches port 465 as it reaches
STARTTLS, without closing the socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from gannet.config import Listener, ListenMode
from gannet.server.services import Services
from gannet.server.session import Session
from gannet.server.wire import Wire

log = logging.getLogger("gannet.listener")


class Listeners:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.servers: list[asyncio.Server] = []
        self.sessions: set[Session] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.services.config.listen:
            implicit = listener.mode is ListenMode.SUBMISSIONS
            ctx = self.services.tls_context if implicit else None
            if ctx is not None:
                ctx.sni_callback = self._in_force
            server = await loop.create_server(
                lambda listener=listener, implicit=implicit: _SessionWire(self, listener, implicit),
                host=listener.host,
                port=listener.port,
                ssl=ctx,
                reuse_address=True,
                backlog=4096,
                family=socket.AF_INET6 if ":" in listener.host else socket.AF_INET,
                ssl_handshake_timeout=30.0 if ctx else None,
            )
            self.servers.append(server)
            log.info("listening on %s (%s)", listener.address, listener.mode.value)

    def _in_force(self, ssl_object: ssl.SSLObject, _server_name: str | None, bound: ssl.SSLContext) -> None:
        # OpenSSL calls this for every ClientHello, SNI or not (server_name None);
        # the rest of the handshake uses the context set here.
        current = self.services.tls_context
        if current is not None and current is not bound:
            ssl_object.context = current

    def bound_ports(self) -> list[tuple[str, int]]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((host, port))
        return out

    def _spawn(self, listener: Listener, wire: Wire, implicit: bool) -> None:
        session = Session(self.services, listener, wire, implicit_tls=implicit)
        self.sessions.add(session)
        task = asyncio.get_running_loop().create_task(session.run())
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self.sessions.discard(session)

        task.add_done_callback(done)

    async def stop(self, grace: float) -> None:
        """Stop accepting, ask sessions to finish, wait up to `grace` seconds, then cut."""
        for server in self.servers:
            server.close()
        for session in list(self.sessions):
            session.request_close()
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%d session(s) cut off after %.0fs; their messages were not acknowledged",
                    len(pending),
                    grace,
                )
                await asyncio.wait(pending, timeout=5)
        for server in self.servers:
            await server.wait_closed()


class _SessionWire(Wire):
    """A Wire that starts its Session as soon as the connection (and TLS) is up."""

    __slots__ = ("_implicit", "_listener", "_owner")

    def __init__(self, owner: Listeners, listener: Listener, implicit: bool) -> None:
        super().__init__()
        self._owner = owner
        self._listener = listener
        self._implicit = implicit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._owner._spawn(self._listener, self, self._implicit)
