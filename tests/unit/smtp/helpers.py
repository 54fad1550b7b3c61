"""Test helpers for the protocol core: a greeted connection, event capture, assert_parses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gannet.smtp import BodyChunk, Event, ServerConnection, ServerOptions

from .transcript import GREETING, HOSTNAME, AcceptAll


def server(**options: Any) -> tuple[ServerConnection, AcceptAll]:
    """A connection that has been greeted (220), with an accept-everything session."""
    options.setdefault("hostname", HOSTNAME)
    conn = ServerConnection(ServerOptions(**options))
    conn.send(GREETING)
    return conn, AcceptAll(conn)


def greeted(prefix: bytes = b"EHLO client.example\r\n", **options: Any) -> tuple[ServerConnection, AcceptAll]:
    conn, session = server(**options)
    if prefix:
        session.feed(prefix)
    session.events.clear()
    return conn, session


def merge_chunks(events: Iterable[Event]) -> list[Event]:
    """Adjacent BodyChunks joined: how the content is cut depends on the reads."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, BodyChunk) and out and isinstance(out[-1], BodyChunk):
            out[-1] = BodyChunk(out[-1].data + ev.data)
        elif not (isinstance(ev, BodyChunk) and not ev.data):
            out.append(ev)
    return out


def run(
    data: bytes, *, prefix: bytes = b"EHLO client.example\r\n", split: int = 0, **options: Any
) -> tuple[list[Event], bytes]:
    """Feed `data` (whole, or `split` octets at a time) after `prefix`; events and replies."""
    _conn, session = greeted(prefix, **options)
    if split:
        out = b"".join(session.feed(data[i : i + split]) for i in range(0, len(data), split))
    else:
        out = session.feed(data)
    return merge_chunks(session.events), out


def assert_parses(data: bytes, expected: list[Event], *, trailing: bytes = b"NOOP\r\n", **kw: Any) -> bytes:
    """Habit 4: the same events whole, byte by byte, and with trailing data after it.

    `trailing` is a further command; its event must come after `expected`,
    proving `data` was consumed exactly. Returns the replies written.
    """
    whole, replies = run(data, **kw)
    assert whole == expected, f"whole: {whole!r}"
    bytewise, replies_b = run(data, split=1, **kw)
    assert bytewise == expected, f"byte by byte: {bytewise!r}"
    assert replies_b == replies
    more, _ = run(data + trailing, **kw)
    assert more[: len(expected)] == expected, f"with trailing data: {more!r}"
    assert len(more) == len(expected) + 1, f"trailing data not parsed alone: {more!r}"
    return replies
