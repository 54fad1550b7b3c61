"""The server's side of the enqueue writer process (sqlite_enqueue_child): start
it, hand it each message, match its answers to the waiting sessions, and
restart it when it dies.

Owns: the child process, its socketpair and the requests in flight. Used only
by SqliteStore, which falls back to its writer thread whenever this is not
`ready` (not started yet, restarting, stopping) — both write under the same
cross-process lock, so either path is correct at any moment.

If the child dies with requests in flight, their transaction may or may not
have committed. Those requests fail with `WriterGone` only after the child has
exited (nothing of it can commit any more), and SqliteStore then looks for
each message and stores it if it is not there: a session never sees the
crash, and never gets 250 for a message that is not on disk.

Back-pressure: a session has at most one message in flight and waits for its
answer, so the bytes buffered toward the child are bounded by the sessions
times the inline body limit; a slow disk slows the answers, not the memory.

Never: answer a request before the child said its COMMIT returned, or fail
one while the child may still commit it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gannet import metrics
from gannet.queue import sqlite_enqueue_wire as wire
from gannet.queue.model import NewMessage, QueueError
from gannet.queue.sqlite_writer import WriterStats

log = logging.getLogger("gannet.queue")


class WriterGone(QueueError):
    """The writer process exited with this request unanswered (it has exited:
    whether the message was stored is now settled, and can be looked up)."""


class EnqueueProcess:
    """Start with `start()`, enqueue while `ready`, `stop()` once."""

    RESTART_DELAY = 1.0  # the first restart's wait; doubled while it keeps dying young
    RESTART_DELAY_MAX = 60.0
    HEALTHY_AFTER = 60.0  # a child that ran this long resets the delay
    READ_SIZE = 1 << 16

    def __init__(
        self,
        database: Path,
        spool_dir: Path,
        *,
        node: str,
        max_batch: int,
        stats: WriterStats,
        local_delivery: str = "",
    ) -> None:
        """`local_delivery`: the child delivers fresh local mail itself with these
        settings (delivery/local_at_enqueue.Settings as JSON); "" for not."""
        self._argv = [
            sys.executable, "-m", "gannet.queue.sqlite_enqueue_child", str(database), str(spool_dir),
            "--node", node, "--max-batch", str(max_batch), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        self.local_delivery = local_delivery  # read at each (re)start of the child
        # Called when the child gave local recipients back to the delivery loop.
        self.on_released: Callable[[], None] = lambda: None
        self._stats = stats
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._numbers = itertools.count()
        self._stream: asyncio.StreamWriter | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._first_life_over = asyncio.Event()  # ready, or failed: start() waits no longer
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.answered = 0  # requests the child answered, over all its lives

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, wait: float = 10.0) -> None:
        """Start the child; return once it is ready or has failed, or after
        `wait` seconds (the store uses its thread meanwhile)."""
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name="queue-enqueue-writer")
        try:
            await asyncio.wait_for(self._first_life_over.wait(), wait)
        except TimeoutError:
            log.warning("queue: the enqueue writer process is not ready after %.0fs; using the thread", wait)

    async def enqueue(self, message: NewMessage) -> bool:
        """Durable on return; True when the child delivers all its recipients
        itself (local delivery at enqueue). Raises QueueError (WriterGone if the
        child died holding it) or ValueError, like the thread writer's enqueue."""
        stream = self._stream
        if stream is None or not self.ready:
            raise WriterGone("the enqueue writer process is not running")
        number = next(self._numbers)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        stream.write(wire.request(number, message))
        return await future

    async def restart(self, grace: float = 30.0) -> None:
        """A new child, started with the current `local_delivery` (a reload changed
        it); the store uses its thread until the new one is ready."""
        await self.stop(grace)
        await self.start()

    async def stop(self, grace: float = 30.0) -> None:
        """Let the child answer what it was sent, then exit (killed after `grace`)."""
        self._stopping = True
        stream, proc, supervisor = self._stream, self._proc, self._supervisor
        if supervisor is None:
            return
        if stream is None:  # between two lives: nothing in flight
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            return
        stream.write_eof()  # the child finishes what it read, answers, sees EOF, exits
        try:
            await asyncio.wait_for(asyncio.shield(supervisor), grace)
        except TimeoutError:
            log.error("queue: the enqueue writer process did not stop within %.0fs; killing it", grace)
            if proc is not None and proc.returncode is None:
                proc.kill()
            await supervisor

    # --- the child's lives -----------------------------------------------------

    async def _supervise(self) -> None:
        delay = self.RESTART_DELAY
        while not self._stopping:
            started = time.monotonic()
            try:
                what = f"exited (status {await self._one_life()})"
            except OSError as exc:  # cannot even start it (no fds, no memory, no interpreter)
                what = f"cannot start ({exc})"
            self._first_life_over.set()
            if self._stopping:
                return
            if time.monotonic() - started >= self.HEALTHY_AFTER:
                delay = self.RESTART_DELAY
            # Like the delivery worker: a child that dies at once must not
            # become a restart loop; the thread carries the enqueues meanwhile.
            log.error(
                "queue: the enqueue writer process %s; the writer thread takes the enqueues; "
                "restarting it in %gs",
                what,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RESTART_DELAY_MAX)

    async def _one_life(self) -> int:
        """Run one child until it exits; returns its exit status."""
        ours, theirs = socket.socketpair()
        try:
            local = ("--local-delivery", self.local_delivery) if self.local_delivery else ()
            proc = await asyncio.create_subprocess_exec(
                *self._argv, *local, "--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._proc = proc
        reader, stream = await asyncio.open_connection(sock=ours)
        self._stream = stream
        frames = wire.FrameBuffer()
        try:
            while data := await reader.read(self.READ_SIZE):
                for value in frames.feed(data):
                    if value == wire.READY:
                        log.info("queue: enqueue writer process %d ready", proc.pid)
                        self._ready.set()
                        self._first_life_over.set()
                    else:
                        self._answer(wire.Reply.of(value))
        except OSError as exc:
            log.error("queue: reading from the enqueue writer process: %s", exc)
        except Exception:  # a frame that does not decode: a bug on one side; its answers are lost
            log.exception("queue: an answer from the enqueue writer process does not decode; killing it")
            proc.kill()
        finally:
            self._ready.clear()
            self._stream = None
            stream.close()
            # Only once the child has exited can nothing in flight still commit.
            code = await proc.wait()
            lost, self._pending = self._pending, {}
            gone = WriterGone(f"the enqueue writer process exited (status {code})")
            for future in lost.values():
                if not future.done():
                    future.set_exception(gone)
        return code

    def _answer(self, reply: wire.Reply) -> None:
        pending = self._pending
        taken = set(reply.taken)
        for number, error in reply.answers:
            self.answered += 1
            future = pending.pop(number, None)
            if future is None or future.done():  # the session went away; the work stands
                continue
            if error is None:
                future.set_result(number in taken)
            else:
                future.set_exception(wire.exception_of(error))
        if reply.released:
            self.on_released()
        for seconds, fsync in reply.commits:
            metrics.store_commit(seconds, fsync)
        stats = self._stats
        for name, value in zip(wire.STAT_FIELDS, reply.stats, strict=True):
            if name == "max_batch":
                stats.max_batch = max(stats.max_batch, int(value))
            elif name.endswith("_seconds"):
                setattr(stats, name, getattr(stats, name) + value)
            else:
                setattr(stats, name, getattr(stats, name) + int(value))
