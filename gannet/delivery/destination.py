"""Destination: the scheduler's state for one next hop (a recipient domain, the
smarthost, or the LMTP server): the jobs waiting for it, how many connections
work on it, the idle connections kept for reuse, and its backoff.

A destination is *dead* after a connection attempt failed on every hop while
no other connection to it was open (Postfix's "dead destination"): its
waiting mail is deferred at once, new mail for it is deferred without an
attempt until `dead_until`, and then one connection probes it before the
full concurrency is used again. Mail to other destinations never waits
behind it: each destination has its own queue and its own connections.

No I/O here beyond closing connections handed back to it; the scheduler
drives it on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from gannet.delivery.outbound import OutboundConnection
from gannet.delivery.routing import Route
from gannet.queue.model import Claim, ClaimedRecipient


@dataclass(slots=True)
class SharedBody:
    """One claim's content, read once for all its jobs (bytes, or the spool file
    of a large body to stream)."""

    load: asyncio.Task[bytes | Path] | None = None
    users: int = 0


@dataclass(slots=True)
class Job:
    """One message's recipients for one destination: one transaction."""

    claim: Claim
    recipients: tuple[ClaimedRecipient, ...]
    body: SharedBody


@dataclass(slots=True)
class Destination:
    name: str
    route: Route
    jobs: deque[Job] = field(default_factory=deque)
    workers: int = 0  # tasks working on it (each with at most one connection)
    connected: int = 0  # of those, how many hold an open connection now
    idle: list[tuple[OutboundConnection, float]] = field(default_factory=list)  # (conn, idle since)
    failures: int = 0  # consecutive times it was found dead
    dead_until: float = 0.0
    probing: bool = False  # back from dead: one connection until one gets through
    last_error: str = ""

    def limit(self, concurrency: int) -> int:
        return 1 if self.probing else concurrency

    def is_dead(self, now: float) -> bool:
        return self.dead_until > now

    def mark_dead(self, now: float, backoff: float, reason: str) -> list[Job]:
        """Found dead: returns the waiting jobs, now the caller's to defer."""
        self.failures += 1
        self.dead_until = now + backoff
        self.probing = True
        self.last_error = reason
        waiting = list(self.jobs)
        self.jobs.clear()
        return waiting

    def mark_alive(self) -> None:
        self.failures = 0
        self.dead_until = 0.0
        self.probing = False

    def take_idle(self, now: float, max_idle: float) -> OutboundConnection | None:
        """A cached connection still fresh and usable; stale ones are closed."""
        while self.idle:
            conn, since = self.idle.pop()
            if conn.usable and now - since < max_idle:
                return conn
            _close_soon(conn)
        return None

    def expire_idle(self, now: float, max_idle: float) -> None:
        keep = []
        for conn, since in self.idle:
            if conn.usable and now - since < max_idle:
                keep.append((conn, since))
            else:
                _close_soon(conn)
        self.idle = keep

    def close_idle(self) -> list[OutboundConnection]:
        conns = [c for c, _ in self.idle]
        self.idle = []
        return conns

    @property
    def unused(self) -> bool:
        """Nothing waits, works or idles here: the scheduler may forget it
        (unless it is dead: the backoff must be remembered)."""
        return not self.jobs and self.workers == 0 and not self.idle and self.dead_until == 0.0


_closing: set[asyncio.Task[None]] = set()


def _close_soon(conn: OutboundConnection) -> None:
    with contextlib.suppress(RuntimeError):  # no running loop (interpreter shutdown)
        task = asyncio.get_running_loop().create_task(conn.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
