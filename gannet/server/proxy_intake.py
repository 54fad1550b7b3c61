"""Reading the PROXY header off a new connection, before the SMTP greeting.

On a `[[listen]]` with `proxy_protocol = true`, the load balancer's header
comes first (proxy-protocol.txt §2: the receiver "MUST NOT start processing
the connection before it receives a complete and valid PROXY protocol
header", which matters for SMTP, where the server speaks first). This module
waits for it with a deadline (HEADER_TIMEOUT: above the 3 s of a TCP
retransmit the spec asks for), parses it with `proxy_protocol.parse`, and
says who the client really is; the session then greets.

A connection is dropped, with one log line naming the peer and the reason and
no SMTP reply (there is no client to answer: the peer is a proxy, or someone
who should not be talking to this port), when:
- the peer's own address is not in the listener's `proxy_from` (only the
  load balancers may vouch for client addresses; §2 "only trusted proxies");
- the header is invalid, incomplete at EOF, or not complete in time.
The header itself is never guessed to be absent (§2: no port sharing).
Never raises for anything the peer does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gannet.config import Listener
from gannet.policy.relay import is_trusted
from gannet.server import proxy_protocol as pp
from gannet.server.wire import Wire

log = logging.getLogger("gannet.proxy")

HEADER_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Arrival:
    """Who the client is, and the SMTP bytes that came with the header."""

    client_ip: str
    client_port: int
    early: bytes  # the client's first bytes, read together with the header
    header: pp.ProxyHeader


async def read_header(wire: Wire, listener: Listener, session_id: str) -> Arrival | None:
    """The client behind the proxy, or None when the connection must be dropped (logged here)."""
    peer_ip, peer_port = wire.peername()
    peer = f"[{peer_ip}]:{peer_port}"
    if not is_trusted(peer_ip, listener.proxy_from):
        _dropped(session_id, peer, wire, "not in proxy_from: only the load balancers may connect")
        return None
    deadline = time.monotonic() + HEADER_TIMEOUT
    data = b""
    while True:
        result = pp.parse(data)
        if isinstance(result, pp.Invalid):
            _dropped(session_id, peer, wire, f"invalid PROXY header: {result.reason}")
            return None
        if isinstance(result, pp.Parsed):
            break
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            chunk = await wire.read(remaining)
        except TimeoutError:
            _dropped(session_id, peer, wire, f"no complete PROXY header within {HEADER_TIMEOUT:g}s")
            return None
        except (ConnectionError, OSError) as exc:
            _dropped(session_id, peer, wire, f"connection error before the PROXY header: {exc}")
            return None
        if not chunk:
            what = "an incomplete PROXY header" if data else "no PROXY header"
            _dropped(session_id, peer, wire, f"closed by the peer after {what}")
            return None
        data += chunk
    header = result.header
    source = header.source
    if source is None:  # LOCAL (health check), UNKNOWN, UNSPEC, UNIX: the real endpoints stand
        ip, port = peer_ip, peer_port
    else:
        ip, port = source.ip, source.port
    log.info(
        "session %s: client [%s]:%d via proxy %s (PROXY v%d %s %s)",
        session_id, ip, port, peer, header.version.value, header.command.value, header.family.value,
    )
    return Arrival(ip, port, result.rest, header)


def _dropped(session_id: str, peer: str, wire: Wire, reason: str) -> None:
    host, port = wire.sockname()
    local = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.warning("session %s: connection from %s to %s dropped: %s", session_id, peer, local, reason)
