"""Head of line: 10,000 messages for a dead destination must not hold up a fresh
message for a live one.

The dead destination is a black hole: mx.dead.test's address has a listening
socket that never accepts, so the kernel completes every TCP handshake (SYN
accepted) and no banner ever comes — the worst case, as each connection
waits for its full timeout. The timeouts here are long (2 minutes), so that
during the whole test every connection to it is still hanging: the fresh
message must get through while they do, not after they give up.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator

import peers
import pytest

from interop.test_relay import Relay, common_port, records

pytestmark = pytest.mark.interop

DEAD_MESSAGES = 10_000
BLACK_HOLE = "127.0.0.5"  # mx.dead.test in test_relay.records()


@pytest.fixture
def black_hole() -> Iterator[Callable[[int], socket.socket]]:
    opened: list[socket.socket] = []

    def listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((BLACK_HOLE, port))
        sock.listen(4096)  # never accept(): handshakes complete, nothing is ever said
        opened.append(sock)
        return sock

    yield listen
    for sock in opened:
        sock.close()


def test_a_dead_destination_does_not_delay_mail_to_a_live_one(
        gannet: Callable[..., peers.GannetProcess], dns_server: Callable[..., peers.DnsServer],
        smtp_sink: Callable[..., peers.SmtpSink], black_hole: Callable[[int], socket.socket]) -> None:
    port = common_port()
    black_hole(port)
    sink = smtp_sink(listen=f"{peers.SINK_HOST}:{port}")
    dns = dns_server(records=records())
    relay = Relay(gannet, dns, port, retry=["10m"], connect_timeout="2m", command_timeout="2m")
    peers.smtp_source(relay.g.target(), messages=DEAD_MESSAGES, sessions=10, size=1024,
                      sender="alice@example.test", recipient="bob@dead.test", timeout=300)
    # Connections to the black hole are open and hanging by now.
    relay.send("carol@sink.test", subject="fresh")
    sink.wait_count(1, timeout=60)
    sent = [line for line in relay.log_lines("to=<carol@sink.test>") if "status=" in line]
    assert len(sent) == 1 and "status=sent" in sent[0], sent
    # No attempt on the dead destination has ended: the fresh message did not wait for one.
    ended = [line for line in relay.log_lines("to=<bob@dead.test>") if "status=" in line]
    assert not ended, f"a black-hole connection ended during the test: {ended[:1]}"
    delay = float(re.search(r"delay=([\d.]+)", sent[0]).group(1))  # type: ignore[union-attr]
    print(f"fresh message delivered {delay:.2f}s after it was queued, behind {DEAD_MESSAGES} dead ones")
    queued = relay.queue()
    assert len(queued) == DEAD_MESSAGES and all(m["recipients"][0]["address"] == "bob@dead.test"
                                                for m in queued)


def test_a_dead_destination_is_backed_off_as_a_whole(
        gannet: Callable[..., peers.GannetProcess], dns_server: Callable[..., peers.DnsServer],
        black_hole: Callable[[int], socket.socket]) -> None:
    messages = 2000
    port = common_port()
    black_hole(port)
    dns = dns_server(records=records())
    relay = Relay(gannet, dns, port, retry=["10m"], connect_timeout="3s", command_timeout="3s",
                  destination_concurrency=5)
    peers.smtp_source(relay.g.target(), messages=messages, sessions=10, size=1024,
                      sender="alice@example.test", recipient="bob@dead.test", timeout=300)
    peers.wait_for(lambda: relay.log_lines("is not responding"), 60, "the destination to be found dead")

    def all_deferred() -> bool:
        lines = relay.log_lines("to=<bob@dead.test>")
        return len([ln for ln in lines if "status=deferred" in ln]) >= messages
    peers.wait_for(all_deferred, 60, f"{messages} deferrals")
    # Only the first connections (5 per destination) were tried; the rest waited for the backoff.
    attempts = relay.log_lines("dead.test: 4.4.2")
    assert 1 <= len(attempts) <= 5, attempts[:6]
    queued = relay.queue()
    assert len(queued) == messages
    states = {r["state"] for m in queued for r in m["recipients"]}
    assert states == {"deferred"}, states
