#!/usr/bin/env python3
"""Memory per idle session: N connections open, each past EHLO, then nothing.

Opens N TCP sessions to Gannet (default 10,000), reads the banner, sends
``EHLO`` and reads the reply on each, and keeps them all open and idle. It
reports the server's memory before and after, and per session. Then the same
against a private Postfix with fewer sessions (default 1,000: Postfix runs one
smtpd process per session, so its process limit is raised to fit).

Memory:
- Gannet: the server process and its delivery worker, VmRSS from
  /proc/PID/status summed, and PSS (proportional set size, from
  /proc/PID/smaps_rollup, shared pages divided among the processes that map
  them) summed; the sessions live in the server process;
- Postfix is many processes: the sums of VmRSS and of PSS over the master and
  all its live descendants (the RSS sum counts shared library pages once per
  process, which is what "1,000 processes, 1.2 GB" in the issue counts; PSS is
  the fairer figure).
This script raises its own RLIMIT_NOFILE, and Gannet's in the child (root may
raise the hard limit). Connections come from several source addresses
(127.0.0.10, .11, … one per 20,000 sessions) so ephemeral ports never run short.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _common
from _common import peers

PER_SOURCE = 20_000


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pids: list[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of PSS) in KiB."""
    return sum(peers.rss_kib(p) for p in pids), sum(pss_kib(p) for p in pids)


async def open_sessions(host: str, port: int, n: int, concurrency: int = 200, timeout: float = 120,
                        ) -> list[asyncio.StreamWriter]:
    """n sessions, each past the banner and EHLO; all kept open (the writers are returned)."""
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        async with gate:
            source = f"127.0.0.{10 + i // PER_SOURCE}"
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
            writers.append(writer)
            await expect(reader, b"220")
            writer.write(b"EHLO idle.client.test\r\n")
            await expect(reader, b"250")

    async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
        while True:
            line = await reader.readline()
            if not line.startswith(code):
                raise RuntimeError(f"expected {code.decode()}, got {line!r}")
            if line[3:4] != b"-":
                return

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def settle(pids_fn: Callable[[], list[int]], seconds: float = 2.0) -> tuple[int, int]:
    """Memory once it has stopped moving (polled every 0.25 s, at most ``seconds`` after the last change)."""
    last = memory(pids_fn())
    stable_since = time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() - stable_since < seconds and time.monotonic() < deadline:
        time.sleep(0.25)
        now = memory(pids_fn())
        if abs(now[0] - last[0]) > 256:
            stable_since = time.monotonic()
        last = now
    return last


def measure(name: str, host: str, port: int, n: int, pids_fn: Callable[[], list[int]]) -> list[object]:
    before = settle(pids_fn, 1.0)
    procs_before = len(pids_fn())
    started = time.monotonic()
    loop = asyncio.new_event_loop()
    try:
        writers = loop.run_until_complete(open_sessions(host, port, n))
        opened = time.monotonic() - started
        after = settle(pids_fn)
        procs_after = len(pids_fn())
        loop.run_until_complete(close_all(writers))
    finally:
        loop.close()
    mib = 1024
    return [name, n, f"{procs_before}→{procs_after}", before[0] / mib, after[0] / mib,
            (after[0] - before[0]) / n, before[1] / mib, after[1] / mib, (after[1] - before[1]) / n, opened]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--sessions", type=int, default=10_000,
                        help="idle sessions to Gannet (default 10000)")
    parser.add_argument("--postfix-sessions", type=int, default=1000,
                        help="idle sessions to Postfix (default 1000; 0 skips Postfix)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args(argv)
    _common.require(*(["postfix"] if args.postfix_sessions else []))
    peers.raise_nofile(max(args.sessions, args.postfix_sessions) + 1000)

    rows = []
    work = _common.workdir("idle")
    try:
        g = _common.start_gannet(work, nofile=args.sessions + 1000,
                                 smtp={"max_sessions": args.sessions + 100, "idle_timeout": "10m"})
        try:
            host, port = g.address()
            rows.append(measure("gannet", host, port, args.sessions,
                                lambda: [g.pid, *peers.descendant_pids(g.pid)]))
        finally:
            g.stop()
        if args.postfix_sessions:
            pf = peers.PostfixInstance(work / "postfix", mode="discard",
                                       process_limit=args.postfix_sessions + 100)
            try:
                rows.append(measure("postfix", pf.host, pf.port, args.postfix_sessions, pf.pids))
            finally:
                pf.close()
    finally:
        _common.remove(work, args.keep)

    print("\nidle sessions after EHLO; memory in MiB, per session in KiB\n")
    print(_common.table(["server", "sessions", "processes", "RSS before", "RSS after", "RSS KiB/session",
                         "PSS before", "PSS after", "PSS KiB/session", "open s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
