"""Listeners: one asyncio server per [[listen]] entry, one Session task per connection.

Modes (CONTRACT.md): mx (port 25 semantics), submission (STARTTLS then AUTH
required), submissions (implicit TLS, RFC 8314), lmtp (RFC 2033). Sessions are
tracked so that a graceful stop can ask each to finish and wait for them.

A reload (`apply`) binds the addresses new to the config before it closes
any: one that cannot be bound refuses the change as a whole. Sessions keep
the settings of the listener they came in on; new ones get the new.

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
from collections.abc import Sequence

from gannet.config import Listener, ListenMode
from gannet.server.services import Services
from gannet.server.session import Session
from gannet.server.wire import Wire

log = logging.getLogger("gannet.listener")


class Listeners:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.bound: dict[str, tuple[Listener, asyncio.Server]] = {}  # by address
        self._closed: list[asyncio.Server] = []  # by a reload; awaited at stop
        self.sessions: set[Session] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for listener in self.services.config.listen:
            self.bound[listener.address] = (listener, await self._bind(listener))
            log.info("listening on %s (%s)", listener.address, listener.mode.value)

    async def apply(self, listen: Sequence[Listener]) -> None:
        """Listen as `listen` says (a reload). Raises OSError, having changed
        nothing, when a new address cannot be bound."""
        wanted = {listener.address: listener for listener in listen}
        fresh: dict[str, tuple[Listener, asyncio.Server]] = {}
        try:
            for address, listener in wanted.items():
                if address not in self.bound:
                    fresh[address] = (listener, await self._bind(listener))
        except OSError:
            for _listener, server in fresh.values():
                server.close()
            raise
        for address in [a for a in self.bound if a not in wanted]:
            self._close(self.bound.pop(address)[1])
            log.info("no longer listening on %s; its sessions finish", address)
        for address, listener in wanted.items():
            if address in fresh or self.bound[address][0] == listener:
                continue
            old, server = self.bound[address]
            if _implicit(old) != _implicit(listener):  # TLS comes with the socket: bind it again
                self._close(server)
                server = await self._bind(listener)  # the address was ours a moment ago
            self.bound[address] = (listener, server)
            log.info("listening on %s (%s): new settings for new sessions", address, listener.mode.value)
        for address, (listener, server) in fresh.items():
            self.bound[address] = (listener, server)
            log.info("listening on %s (%s)", address, listener.mode.value)

    async def _bind(self, listener: Listener) -> asyncio.Server:
        ctx = self.services.tls_context if _implicit(listener) else None
        if ctx is not None:
            ctx.sni_callback = self._in_force
        return await asyncio.get_running_loop().create_server(
            lambda: self._wire(listener),
            host=listener.host,
            port=listener.port,
            ssl=ctx,
            reuse_address=True,
            backlog=4096,
            family=socket.AF_INET6 if ":" in listener.host else socket.AF_INET,
            ssl_handshake_timeout=30.0 if ctx else None,
        )

    def _wire(self, bound_as: Listener) -> _SessionWire:
        # The listener's settings in force now (a reload may have changed them).
        listener = self.bound.get(bound_as.address, (bound_as, None))[0]
        if _implicit(listener) != _implicit(bound_as):  # being bound again: this socket's TLS rules
            listener = bound_as
        return _SessionWire(self, listener, _implicit(listener))

    def _close(self, server: asyncio.Server) -> None:
        server.close()
        self._closed.append(server)

    def _in_force(self, ssl_object: ssl.SSLObject, _server_name: str | None, bound: ssl.SSLContext) -> None:
        # OpenSSL calls this for every ClientHello, SNI or not (server_name None);
        # the rest of the handshake uses the context set here.
        current = self.services.tls_context
        if current is not None and current is not bound:
            ssl_object.context = current

    def bound_ports(self) -> list[tuple[str, int]]:
        out = []
        for _listener, server in self.bound.values():
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
        servers = [server for _listener, server in self.bound.values()] + self._closed
        for server in servers:
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
        for server in servers:
            await server.wait_closed()


def _implicit(listener: Listener) -> bool:
    return listener.mode is ListenMode.SUBMISSIONS


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
