"""The enqueue writer process: the SQLite store's enqueue transactions, off the
server's interpreter.

Why a process: in the server, the writer thread and the session loop share one
GIL; every `execute` hands it over and must win it back from a busy loop, and
at 10 sessions the writer spent longer waiting for the GIL than working
(bench/README.md, session 9: 14 context switches per commit, 2.6 s of run-queue
wait per 10,000 messages). Here the inserts and the fsync'd COMMIT run on their
own interpreter; the loop only writes a frame and reads the answer.

Started by sqlite_enqueue_process with one end of a socketpair; it says READY
once the database and the write lock are open, then for each group of requests
that arrived together runs them as one transaction (the same Writer code as the
thread: savepoints, bulk insert, the cross-process flock, fsync) and answers
each request only after that COMMIT returned. It exits when the server closes
its end (after answering what it had read); the kernel kills it the moment
the server dies (gannet/util/parent_watch.py), so that nothing of it can commit once
a restarted server has begun its crash recovery.

Never: accept requests from anything but its parent's socket (marshal), touch a
message the server did not hand it, or answer before the COMMIT.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from gannet.queue import sqlite_enqueue_wire as wire
from gannet.queue import sqlite_ops as ops
from gannet.queue.sqlite_schema import connect
from gannet.queue.sqlite_writer import Job, Writer, WriterStats
from gannet.util.parent_watch import exit_with_parent

RECV_SIZE = 1 << 20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gannet-enqueue-writer")
    parser.add_argument("database", type=Path)
    parser.add_argument("spool_dir", type=Path)
    parser.add_argument("--node", default="local")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    if not exit_with_parent(args.parent_pid, sig=signal.SIGKILL, who="queue enqueue writer"):
        return 1
    sock = socket.socket(fileno=args.fd)
    commits: list[wire.Commit] = []
    db: Path = args.database
    writer = Writer(
        partial(connect, db),
        lock_path=db.with_name(db.name + "-writelock"),
        max_batch=args.max_batch,
        name="enqueue process",
        on_commit=lambda seconds, fsync: commits.append((seconds, fsync)),
    )
    try:
        writer.open_here()
    except Exception as exc:  # the server sees EOF, logs our stderr, keeps its thread writer
        print(f"gannet enqueue writer: cannot open {db}: {exc}", file=sys.stderr)
        return 1
    try:
        sock.sendall(wire.frame(wire.READY))
        _serve(sock, writer, ops.Ctx(args.spool_dir, args.node, time.time), commits, args.max_batch)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server is gone: nobody is waiting for an answer
    finally:
        writer.close_here()
    return 0


def _serve(
    sock: socket.socket, writer: Writer, ctx: ops.Ctx, commits: list[wire.Commit], max_batch: int
) -> None:
    one, bulk = partial(ops.enqueue_one, ctx), partial(ops.enqueue_many, ctx)
    frames = wire.FrameBuffer()
    while True:
        requests, open_ = _receive(sock, frames)
        for start in range(0, len(requests), max_batch):
            group = map(wire.message_of, requests[start : start + max_batch])
            jobs = [Job(one, message, number, bulk) for number, message in group]
            writer.stats = WriterStats()
            done = writer.run_here(jobs)
            reply = wire.Reply(
                answers=[(number, wire.error_of(exc)) for number, _, exc in done],
                commits=commits[:],
                stats=tuple(float(getattr(writer.stats, f)) for f in wire.STAT_FIELDS),
            )
            commits.clear()
            sock.sendall(reply.encode())
        if not open_:
            return


def _receive(sock: socket.socket, frames: wire.FrameBuffer) -> tuple[list[Any], bool]:
    """Wait for at least one request, then take everything else already sent
    (that is the group in group commit). Returns (requests, still open)."""
    requests: list[Any] = []
    flags = 0  # block for the first request only
    try:
        while True:
            data = sock.recv(RECV_SIZE, flags)
            if not data:
                return requests, False
            requests += frames.feed(data)
            if requests:
                flags = socket.MSG_DONTWAIT
    except BlockingIOError:
        return requests, True


if __name__ == "__main__":
    sys.exit(main())
