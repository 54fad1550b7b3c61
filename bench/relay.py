#!/usr/bin/env python3
"""Relay rate end to end: smtp-source → Gannet → smtp-sink, and the same through Postfix.

For each number of sessions (default 10 and 50), a fresh server relays
MESSAGES messages of 4 KiB with one recipient (``bench@sink.test``, a domain
that is not its own) to Postfix's smtp-sink on 127.0.0.3, its smarthost:

- Gannet: ``[relay] smarthost = "127.0.0.3:PORT"``; 250 only after the queue
  commit is fsync'd; outbound connections reused (an RSET only after a
  transaction left open), PIPELINING; its default limits (20 connections per destination);
- Postfix 3.7: ``relayhost = [127.0.0.3]:PORT``, defaults otherwise (cleanup
  fsyncs the queue file before 250; smtp(8) with its connection cache,
  20 connections per destination).

Reported per run:
- msgs/s: MESSAGES / the time from smtp-source's start until smtp-sink has
  counted them all (end to end);
- accept s: smtp-source's own wall time; drain s: from its end to the last;
- CPU ms/msg: the server's CPU over the whole run divided by MESSAGES (see
  bench/accept.py for how each server's CPU is summed);
- rate G/P and CPU G/P: Gannet ÷ Postfix;
- under the table, Gannet's CPU by process over the whole run (server,
  enqueue writer, delivery worker), per message, for the median run;
- with the SQLite queue, the share of the run its write lock was held, by
  the server's commits (its enqueue writer) and the delivery worker's, and
  how long each waited for it (from the writers' shutdown lines in
  gannet.log).
smtp-source and smtp-sink run on the same 2 cores and take their share.
``--profile DIR`` samples Gannet's processes with py-spy (see accept.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common
from _common import peers

SERVERS = ("gannet", "postfix")
RECIPIENT = "bench@sink.test"


@dataclass
class Run:
    server: str
    sessions: int
    messages: int
    total: float = 0.0
    accept: float = 0.0
    cpu: float = 0.0
    split: dict[str, float] = field(default_factory=dict)  # Gannet's CPU seconds by process
    lock: dict[str, tuple[float, float]] = field(default_factory=dict)  # _common.write_lock

    @property
    def rate(self) -> float:
        return self.messages / self.total


def run_once(server: str, sessions: int, messages: int, size: int, keep: bool, profile: Path | None,
             queue: _common.BenchQueue | None = None) -> Run:
    run = Run(server, sessions, messages)
    work = _common.workdir(f"relay-{server}-{sessions}")
    sink = peers.SmtpSink(work / "sink", max_sessions=1000, backlog=1000)
    queue = queue or _common.BenchQueue(None)
    try:
        if server == "gannet":
            g = _common.start_gannet(work, relay={"smarthost": sink.target},
                                     queue_url=queue.url(f"relay_{sessions}"))
            target, stop = g.target(), g.stop

            def cpu() -> float:  # with a private PostgreSQL, its CPU too
                return peers.process_tree_cpu_seconds(g.pid) + queue.cpu_seconds()
        else:
            pf = peers.PostfixInstance(work / "postfix", mode="relay", relayhost=sink.target,
                                       process_limit=max(100, 2 * sessions + 40))
            target, cpu, stop = pf.target, pf.cpu_seconds, pf.close
        profilers = []
        try:
            if profile and server == "gannet":
                profile.mkdir(parents=True, exist_ok=True)
                for pid in [g.pid, *peers.child_pids(g.pid)]:
                    profilers.append(_common.Profiler(pid, profile / f"relay-{sessions}-{pid}.txt"))
            cpu0 = cpu()
            split0 = _common.cpu_by_process(g.pid) if server == "gannet" else None
            start = time.monotonic()
            result = peers.smtp_source(target, messages=messages, sessions=sessions, size=size,
                                       sender="bench@client.test", recipient=RECIPIENT,
                                       helo="client.test", timeout=3600)
            run.accept = result.elapsed
            peers.wait_progress(sink.count, messages, stall=120, what=f"{server} relaying to smtp-sink")
            run.total = time.monotonic() - start
            run.cpu = cpu() - cpu0
            if split0 is not None:
                run.split = dict(_common.cpu_by_process(g.pid) - split0)
        finally:
            for p in profilers:
                p.stop()
                print(p.summary(), file=sys.stderr)
            stop()
        if server == "gannet":
            run.lock = _common.write_lock(g.log_text(since_start=True))
    finally:
        sink.stop()
        _common.remove(work, keep)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (default 20000)")
    parser.add_argument("--quick", action="store_true", help="2000 messages per run: a smoke test")
    parser.add_argument("--sessions", default="10,50", help="session counts (default 10,50)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="gannet,postfix (default both)")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (smtp-source -l, default 4096)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="sample Gannet with py-spy into DIR")
    parser.add_argument("--queue-url", metavar="URL",
                        help="Gannet's queue: postgres (a private PostgreSQL) or a postgresql:// URL; "
                             "default SQLite (see _common.BenchQueue)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="runs per session count, the servers alternating; medians and every "
                             "pair's ratio (as bench/accept.py --repeat)")
    args = parser.parse_args(argv)
    messages = 2000 if args.quick else args.messages
    servers = args.servers.split(",")
    if not set(servers) <= set(SERVERS):
        parser.error("--servers takes gannet,postfix")
    _common.require("smtp-source", "smtp-sink", *(["postfix"] if "postfix" in servers else []))
    peers.raise_nofile(4096)
    queue = _common.BenchQueue(args.queue_url)
    runs: dict[tuple[str, int], list[Run]] = {}
    for n in (int(s) for s in args.sessions.split(",")):
        for _ in range(max(1, args.repeat)):
            for server in servers:
                print(f"… {server}: {messages} messages, {n} sessions", file=sys.stderr, flush=True)
                r = run_once(server, n, messages, args.size, args.keep, args.profile, queue)
                runs.setdefault((server, n), []).append(r)
                print(f"  {r.rate:,.0f} msgs/s end to end, {1000 * r.cpu / messages:.2f} ms CPU/msg",
                      file=sys.stderr, flush=True)
    rows = []
    for (server, n), rs in runs.items():
        r = _common.median_by(rs, lambda run: run.rate)
        others = runs.get(("postfix", n)) if server == "gannet" else None
        ratio_rate = _common.pair_ratios([g.rate for g in rs], [p.rate for p in others]) if others else ""
        ratio_cpu = _common.pair_ratios([g.cpu for g in rs], [p.cpu for p in others]) if others else ""
        name = server if server != "gannet" else f"gannet ({queue.label})"
        rows.append([name, n, r.rate, r.total, r.accept, r.total - r.accept, 1000 * r.cpu / messages,
                     ratio_rate, ratio_cpu])
    queue.close()
    repeats = f"; median of {args.repeat} runs each, ratios: median (every pair)" if args.repeat > 1 else ""
    print(f"\n{messages} messages of {args.size} bytes, 1 recipient each, relayed to smtp-sink; "
          f"{os.cpu_count()} CPUs{repeats}\n")
    print(_common.table(["server", "sessions", "msgs/s", "total s", "accept s", "drain s", "CPU ms/msg",
                         "rate G/P", "CPU G/P"], rows))
    splits = [(n, _common.median_by(rs, lambda run: run.rate)) for (server, n), rs in runs.items()
              if server == "gannet"]
    if splits:
        print("\nGannet's CPU ms/msg over the whole run, by process (the median run):")
        for n, r in splits:
            print(f"  {n} sessions: {_common.split_text(r.split, r.messages)}")
        if any(r.lock for _, r in splits):  # SQLite: the one lock the server's and worker's commits share
            print("The queue's write lock in the median run (its seconds over Gannet's life,"
                  " as a share of the run's time):")
            for n, r in splits:
                print(f"  {n} sessions: {_common.write_lock_text(r.lock, r.total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
