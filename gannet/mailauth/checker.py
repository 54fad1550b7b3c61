"""The end-of-data checks (DKIM, ARC, DMARC) in a child process, so they run on another core.

Why: on a small machine the server's one event loop is the limit when many
sessions are busy, and the checks are the largest piece of its work per
message that is not I/O (~0.25 ms of loop time under load, of ~0.6 ms in
all). Issue 4 asks that they cut the accept rate by at most a third; with 50
sessions sending over reused connections they cut it by 38 % in the server's
loop. In a child they overlap the loop's other work (measured with
`bench/accept.py --mailauth`; figures in the README). A thread would not do:
the checks are Python, and the GIL would serialize them with the loop.

How: `ProcessChecks` is an `InboundChecks` whose `finish` sends the SPF
outcome (SPF stays in the server: it starts at MAIL FROM), the message and
the DMARC mode to the child over a socketpair and awaits its `Verdict`. The
child (`python -m gannet.mailauth.checker`) is an `InboundChecks` of its own,
built from the same settings, with its own resolver and DNS cache. It is
started at the first message, and exits when the socket closes: when the
server closes it, exits, or is killed.

Both ends are `asyncio.Protocol`s, not streams. The requests sessions make
in one turn of the server's loop go out in one write; the child checks a
request whose records are cached with no task (`verdict_now`) and answers
each as soon as it is checked. Against streams, one write per request and a
task per message, this took ~0.06 ms of CPU a message off the checks' cost,
split between the server and the child. Answering a read's requests in one
write too would save the child ~0.02 ms more, but it was 5 to 8 % slower: the
group commit releases sessions in waves, a wave's messages reach the child
together, and the first checked waited for the last (`bench/accept.py
--mailauth`, 10 and 50 sessions, reused connections; bench/README.md,
"Session 17").

Never loses or delays mail for its own sake. The checks run in the server,
as without a child, while the child starts, after it died (until it is
restarted, at most once per RESTART_SECONDS), for a request the child was
working on when it died or left unanswered for ANSWER_TIMEOUT (it is then
killed as wedged), and for a body that is not in memory (spooled to a
file: over the spool's inline limit).

Frames (gannet/util/frames.py): a pickle of the request id and a tuple of
plain values (`_request`, `_reply`): a slots dataclass pickles through Python
functions, five times slower. Pickle is safe here because both ends are Gannet
processes on a private socketpair; the network's bytes travel inside it as
one `bytes` object, never unpickled.

Never writes to the queue or answers a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import socket
import sys
import time
from typing import Any, NamedTuple, cast

from gannet.clock import Clock
from gannet.config import Config, DmarcMode
from gannet.delivery.dns import Resolver
from gannet.mailauth import checks as checks_mod
from gannet.mailauth import spf as spf_mod
from gannet.mailauth.checks import InboundChecks, SpfSource, Verdict
from gannet.queue.model import Body, InlineBody
from gannet.smtp.replies import Reply
from gannet.util import frames

log = logging.getLogger("gannet.mailauth")

READY_ID = 0  # the child's first frame: its checks are built (the Public Suffix List is loaded)
START_TIMEOUT = 30.0
RESTART_SECONDS = 10.0
# A child that has not answered in this long is wedged (the checks' own DNS waits are far
# shorter): it is killed, and the message is checked in the server.
ANSWER_TIMEOUT = 60.0


class CheckerLost(Exception):
    """The child went away before it answered."""


def _frame(rid: int, fields: tuple[Any, ...]) -> bytes:
    return frames.frame(pickle.dumps((rid, fields), protocol=pickle.HIGHEST_PROTOCOL))


def _frame_buffer() -> frames.FrameBuffer[tuple[int, Any]]:
    """(request id, fields) of each whole frame."""
    return frames.FrameBuffer(pickle.loads)


class _Channel(asyncio.Protocol):
    """The server's end of one child: requests out, verdicts back by id.

    The requests that sessions make in one turn of the event loop go out in one write
    (at 50 sessions several end their DATA in the same turn): one system call and one
    wake-up of the child, instead of one per message."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        self.proc = proc
        self.ready: asyncio.Future[None] = loop.create_future()  # the child's READY_ID frame came
        self.lost: asyncio.Future[None] = loop.create_future()  # the socket closed
        # Insertion-ordered, so the first entry is the oldest request still unanswered.
        self.pending: dict[int, tuple[asyncio.Future[Verdict], float]] = {}
        self.alive = True
        self._transport: asyncio.Transport | None = None
        self._frames = _frame_buffer()
        self._outgoing: list[bytes] = []
        self._next_id = READY_ID

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a uvloop transport is one, not a subclass

    async def ask(self, request: tuple[Any, ...]) -> Verdict:
        if not self.alive:
            raise CheckerLost("the checker process has exited")
        self._next_id = self._next_id % 0xFFFFFFFF + 1  # never READY_ID
        rid = self._next_id
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Verdict] = loop.create_future()
        self.pending[rid] = (future, time.monotonic())
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(_frame(rid, request))
        try:
            return await future
        finally:
            self.pending.pop(rid, None)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(outgoing)

    def data_received(self, data: bytes) -> None:
        """Each verdict to the request that asked for it."""
        try:
            for rid, fields in self._frames.feed(data):
                if rid == READY_ID:
                    self.ready.set_result(None)
                    continue
                verdict = _verdict(fields)
                entry = self.pending.get(rid)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(verdict)
        except Exception:  # a frame that does not decode: this child cannot be trusted further
            log.exception(
                "mailauth: unreadable answer from the checker process %d; killing it", self.proc.pid
            )
            self.proc.kill()
            self.fail_pending()
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail_pending()
        if not self.ready.done():
            self.ready.set_exception(CheckerLost("the checker process exited before it was ready"))
            self.ready.exception()  # retrieved: whoever waited for it has seen the loss
        self.lost.set_result(None)

    def fail_pending(self) -> None:
        self.alive = False
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(CheckerLost("the checker process exited"))

    async def watch_answers(self, timeout: float) -> None:
        """Kill the child when its oldest unanswered request is `timeout` seconds old: it is
        wedged. One timer per child, instead of one per request on the hot path."""
        while self.alive:
            oldest = next(iter(self.pending.values()), None)
            now = time.monotonic()
            if oldest is not None and now - oldest[1] >= timeout:
                log.warning(
                    "mailauth: the checker process %d did not answer in %.0fs; killing it",
                    self.proc.pid,
                    timeout,
                )
                self.proc.kill()
                self.fail_pending()  # its requests are checked in the server now, not at EOF
                return
            await asyncio.sleep(timeout - (now - oldest[1]) if oldest is not None else timeout / 4)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the socket (the child exits at EOF) and wait for the child; kill it if it lingers."""
        self.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class ProcessChecks(InboundChecks):
    """`InboundChecks` with the end-of-data checks in a child process (see the module docstring)."""

    def __init__(
        self,
        resolver: Resolver,
        hostname: str,
        *,
        nameservers: tuple[str, ...] = (),
        max_verify_size: int = 10 * 1024 * 1024,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(resolver, hostname, max_verify_size=max_verify_size, clock=clock)
        self._settings = {
            "hostname": hostname,
            "nameservers": list(nameservers),
            "max_verify_size": max_verify_size,
        }
        self._channel: _Channel | None = None
        self._starting: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._next_start = 0.0
        self._closed = False
        self.in_child = 0  # messages the child checked
        self.in_server = 0  # messages checked here (no child yet, a dead one, a spooled body)

    @property
    def child_pid(self) -> int | None:
        """The running child's process ID, None while there is none."""
        channel = self._channel
        return channel.proc.pid if channel is not None and channel.alive else None

    async def finish(
        self,
        spf: SpfSource,
        body: Body,
        mode: DmarcMode,
        *,
        sender: str = "",
        helo: str = "",
    ) -> Verdict:
        channel = self._ready_channel()
        if channel is None or not isinstance(body, InlineBody):
            self.in_server += 1
            return await super().finish(spf, body, mode, sender=sender, helo=helo)
        outcome = await self._spf_result(spf, sender, helo)
        try:
            verdict = await channel.ask(_request(outcome, body.data, mode, sender, helo))
        except CheckerLost:
            self.in_server += 1
            return await super().finish(outcome, body, mode, sender=sender, helo=helo)
        self.in_child += 1
        return verdict

    def _ready_channel(self) -> _Channel | None:
        """The child when it is up; else start one (in the background) if it is time to."""
        channel = self._channel
        if channel is not None and channel.alive:
            return channel
        if self._closed or self._starting is not None or self.clock.monotonic() < self._next_start:
            return None
        self._next_start = self.clock.monotonic() + RESTART_SECONDS
        self._starting = asyncio.get_running_loop().create_task(self._start())
        return None

    async def _start(self) -> None:
        try:
            await self._spawn()
        finally:
            self._starting = None

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            argv = ["-m", "gannet.mailauth.checker", str(theirs.fileno()), json.dumps(self._settings)]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *argv, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL
            )
        except OSError as exc:
            log.warning("mailauth: cannot start the checker process (%s); checking in the server", exc)
            ours.close()
            return
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(lambda: _Channel(proc), sock=ours)
        try:
            await asyncio.wait_for(asyncio.shield(channel.ready), START_TIMEOUT)
        except (TimeoutError, CheckerLost):
            log.warning("mailauth: the checker process did not start; checking in the server")
            await channel.stop(timeout=1.0)
            return
        if self._closed:
            await channel.stop()
            return
        self._channel = channel
        self._reading = loop.create_task(self._watch(channel))
        log.info("mailauth: checker process %d started", proc.pid)

    async def _watch(self, channel: _Channel) -> None:
        watchdog = asyncio.get_running_loop().create_task(channel.watch_answers(ANSWER_TIMEOUT))
        try:
            await channel.lost
        finally:
            watchdog.cancel()
        if not self._closed:
            status = await channel.proc.wait()
            log.warning(
                "mailauth: the checker process exited (status %s); checking in the server"
                " until it is restarted",
                status,
            )

    async def close(self) -> None:
        """Stop the child (it exits at EOF). Checks asked for after this run in the server."""
        self._closed = True
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._channel is not None:
            await self._channel.stop()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)


# What crosses the socket: tuples of plain values (see the module docstring).
_Request = tuple[str, str, str, str, bytes, str, str, str]


def _request(spf: spf_mod.SpfOutcome, data: bytes, mode: DmarcMode, sender: str, helo: str) -> _Request:
    return (spf.result.value, spf.identity, spf.domain, spf.explanation, data, mode.value, sender, helo)


class _Asked(NamedTuple):
    """A request, as the child reads it."""

    spf: spf_mod.SpfOutcome
    data: bytes
    mode: DmarcMode
    sender: str
    helo: str


def _asked(fields: tuple[Any, ...]) -> _Asked:
    result, identity, domain, explanation, data, mode, sender, helo = fields
    spf = spf_mod.SpfOutcome(spf_mod.SpfResult(result), identity, domain, explanation)
    return _Asked(spf, data, DmarcMode(mode), sender, helo)


def _reply(v: Verdict) -> tuple[Any, ...]:
    reject = (v.reject.code, v.reject.enhanced, v.reject.text) if v.reject is not None else None
    return (v.prepend, v.value, v.hostname, reject, v.quarantine, v.summary, v.reasons)


def _verdict(fields: tuple[Any, ...]) -> Verdict:
    prepend, value, hostname, reject, quarantine, summary, reasons = fields
    refusal = Reply(reject[0], reject[1], *reject[2]) if reject else None
    return Verdict(prepend, value, hostname, refusal, quarantine, summary, reasons)


def from_config(config: Config, clock: Clock | None = None) -> InboundChecks | None:
    """The server's checks: None when `[mailauth] checks = false`; in the server itself when
    `[mailauth] checker_process = false`; else with a child process for the end of data."""
    if not config.mailauth.checks or not config.mailauth.checker_process:
        return checks_mod.from_config(config, clock)
    return ProcessChecks(
        Resolver(config.dns.nameservers, clock=clock),
        config.hostname,
        nameservers=config.dns.nameservers,
        max_verify_size=config.mailauth.max_verify_size,
        clock=clock,
    )


# --- the child ------------------------------------------------------------------------


class _Answers(asyncio.Protocol):
    """The child's end: checks each request a read brings and answers it at once.
    A request whose checks must wait (a DNS lookup, a large message's verification in an
    executor) is answered by a task of its own when they are done."""

    def __init__(self, checks: InboundChecks) -> None:
        self.checks = checks
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._frames = _frame_buffer()
        self._waiting: set[asyncio.Task[None]] = set()  # a reference until done (the loop keeps weak ones)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(_frame(READY_ID, ()))

    def data_received(self, data: bytes) -> None:
        try:
            for rid, fields in self._frames.feed(data):
                a = _asked(fields)
                verdict = self.checks.verdict_now(a.spf, a.data, a.mode, sender=a.sender, helo=a.helo)
                if verdict is not None:
                    self._send(rid, verdict)  # now, not with the rest: its session waits for it
                    continue
                task = asyncio.get_running_loop().create_task(self._answer(rid, a))
                self._waiting.add(task)
                task.add_done_callback(self._waiting.discard)
        except Exception:  # a request that does not decode: end, and the server checks in itself
            log.exception("mailauth: unreadable request from the server; exiting")
            self.close()

    async def _answer(self, rid: int, a: _Asked) -> None:
        verdict = await self.checks.finish(a.spf, InlineBody(a.data), a.mode, sender=a.sender, helo=a.helo)
        self._send(rid, verdict)

    def _send(self, rid: int, verdict: Verdict) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_frame(rid, _reply(verdict)))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)  # the server closed its end, exited or died


async def _serve(sock: socket.socket, settings: dict[str, Any]) -> None:
    checks = InboundChecks(
        Resolver(tuple(settings["nameservers"])),
        settings["hostname"],
        max_verify_size=settings["max_verify_size"],
    )
    _, answers = await asyncio.get_running_loop().create_unix_connection(lambda: _Answers(checks), sock=sock)
    await answers.lost


def main(argv: list[str]) -> int:
    """`python -m gannet.mailauth.checker FD SETTINGS-JSON`, started by `ProcessChecks`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the server's to handle
    logging.basicConfig(level=logging.WARNING, format=f"gannet-checker[{os.getpid()}]: %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(sock, json.loads(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
