#!/usr/bin/env python3
"""Accept rate and CPU per message: smtp-source against Gannet and against Postfix, same flags.

For each number of sessions (default 1, 10, 50) and each connection style
(``one``: a new connection per message, smtp-source's default; ``many``:
each session sends all its messages over one connection, ``-d``), a fresh
server gets ``smtp-source -s SESSIONS -m MESSAGES -l 4096 -t alice@example.test``
(4 KiB bodies, one recipient). Both servers do the same durable work:

- Gannet: 250 only after the queue commit is fsync'd, then delivery into a
  Maildir (tmp → fsync → new);
- Postfix 3.7 (a private instance, defaults otherwise): smtpd → cleanup
  fsyncs the queue file before 250, then virtual(8) writes the Maildir file
  with fsync.

Reported per run:
- msgs/s: MESSAGES / smtp-source's wall time (the accept rate a client sees);
- drain s: from smtp-source's end until the last message is in the Maildir;
- CPU ms/msg: the server's CPU time over the run divided by MESSAGES, both
  during smtp-source (accept) and until the Maildir is complete (total).
  Gannet: utime+stime of its process (all threads) plus any children, from
  /proc/PID/stat. Postfix: the whole instance, i.e. the master's own
  utime+stime, plus cutime+cstime of the daemons it has reaped (smtpd,
  cleanup, virtual … that exited), plus utime+stime of the daemons still
  alive (/proc scan for the master's descendants). Before/after differences.
- CPU by process, while smtp-source ran: Gannet's server, enqueue writer,
  delivery worker (and checks), each from its own /proc/PID/stat, and
  smtp-source's own (this process's reaped children); printed after the
  table for the median run of each configuration;
- ratio: Gannet / Postfix for msgs/s (higher is better for Gannet) and for
  CPU per message (lower is better for Gannet).
smtp-source runs on the same 2 cores and takes its share of them for both.

``--profile DIR`` also samples Gannet with py-spy during each of its runs
(100 Hz, ``--nonblocking``, idle threads excluded) and writes the collapsed
stacks to ``DIR/gannet-SESSIONS-STYLE.txt`` (feed them to flamegraph.pl or
speedscope), then prints where the samples fall: the functions on top of
the stack (self) and the Gannet functions anywhere on it (inclusive).
Profiling costs Gannet some speed; use it for the shape, not the figures.
With ``BENCH_PROFILER=perf`` in the environment it is Linux perf instead
(``DIR/gannet-SESSIONS-STYLE.perf``): the CPU below Python, by shared object
and symbol (libpython, the kernel, uvloop; `_common.Profiler`).
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


@dataclass
class Run:
    server: str
    sessions: int
    style: str
    messages: int
    wall: float = 0.0
    drain: float = 0.0
    cpu_accept: float = 0.0
    cpu_total: float = 0.0
    # CPU seconds while smtp-source ran: Gannet's by process, and smtp-source's own
    split: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.wall

    def ms_per_msg(self, cpu: float) -> float:
        return 1000 * cpu / self.messages


def count_new(maildir: os.PathLike[str]) -> int:
    try:
        return len(os.listdir(os.path.join(maildir, "new")))
    except FileNotFoundError:
        return 0


def run_once(server: str, sessions: int, style: str, messages: int, size: int, keep: bool,
             profile: Path | None = None, queue: _common.BenchQueue | None = None) -> Run:
    run = Run(server, sessions, style, messages)
    work = _common.workdir(f"accept-{server}-{sessions}-{style}")
    queue = queue or _common.BenchQueue(None)
    try:
        if server == "gannet":
            g = _common.start_gannet(work, queue_url=queue.url(f"accept_{sessions}_{style}"))
            target, maildir, stop = g.target(), g.maildir(_common.BENCH_USER), g.stop

            def cpu() -> float:  # with a private PostgreSQL, its CPU too
                return peers.process_tree_cpu_seconds(g.pid) + queue.cpu_seconds()
        else:
            pf = _common.start_postfix(work, process_limit=max(100, 2 * sessions + 20))
            target, maildir, cpu, stop = pf.target, pf.maildir(_common.BENCH_USER), pf.cpu_seconds, pf.close
        profiler = None
        try:
            if profile and server == "gannet":
                profile.mkdir(parents=True, exist_ok=True)
                profiler = _common.Profiler(g.pid, profile / f"gannet-{sessions}-{style}.txt")
            cpu0 = cpu()
            split0 = _common.cpu_by_process(g.pid) if server == "gannet" else None
            run.wall, source_cpu = _common.accept_load(target, sessions=sessions, style=style,
                                                       messages=messages, size=size)
            run.cpu_accept = cpu() - cpu0
            run.split = {"smtp-source": source_cpu}
            if split0 is not None:
                split = _common.cpu_by_process(g.pid)
                split.subtract(split0)
                run.split.update(split)
            end = time.monotonic()
            peers.wait_progress(lambda: count_new(maildir), messages, stall=120, what=f"{server} delivery")
            run.drain = time.monotonic() - end
            run.cpu_total = cpu() - cpu0
        finally:
            if profiler:
                profiler.stop()
                print(profiler.summary(), file=sys.stderr)
            stop()
    finally:
        _common.remove(work, keep)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (default 20000)")
    parser.add_argument("--quick", action="store_true", help="2000 messages per run: a smoke test")
    parser.add_argument("--sessions", default="1,10,50", help="session counts (default 1,10,50)")
    parser.add_argument("--styles", default="one,many",
                        help="one (a connection per message), many (smtp-source -d); default both")
    parser.add_argument("--servers", default=",".join(SERVERS), help="gannet,postfix (default both)")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (smtp-source -l, default 4096)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample Gannet with py-spy; collapsed stacks into DIR (see below)")
    parser.add_argument("--queue-url", metavar="URL",
                        help="Gannet's queue: postgres (a private PostgreSQL) or a postgresql:// URL; "
                             "default SQLite (see _common.BenchQueue)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="runs per configuration, the servers (or checks off/on) alternating; "
                             "the tables show medians and every pair's ratio (this host is shared "
                             "and noisy: one run can be off by a quarter)")
    parser.add_argument("--mailauth", action="store_true",
                        help="Gannet only: the accept rate with SPF/DKIM/DMARC checks off and on "
                             "(bench/accept_mailauth.py)")
    args = parser.parse_args(argv)
    messages = 2000 if args.quick else args.messages
    sessions = [int(s) for s in args.sessions.split(",")]
    styles = args.styles.split(",")
    if args.mailauth:
        import accept_mailauth

        return accept_mailauth.main(sessions, styles, messages, args.size, args.keep, args.profile,
                                    repeat=args.repeat)
    servers = args.servers.split(",")
    if not set(styles) <= {"one", "many"} or not set(servers) <= set(SERVERS):
        parser.error("--styles takes one,many and --servers gannet,postfix")
    _common.require("smtp-source", *(["postfix"] if "postfix" in servers else []))
    peers.raise_nofile(4096)
    queue = _common.BenchQueue(args.queue_url)

    runs: dict[tuple[str, int, str], list[Run]] = {}
    for n in sessions:
        for style in styles:
            for _ in range(max(1, args.repeat)):
                for server in servers:
                    print(f"… {server}: {messages} messages, {n} sessions, {style} per connection",
                          file=sys.stderr, flush=True)
                    r = run_once(server, n, style, messages, args.size, args.keep, args.profile, queue)
                    runs.setdefault((server, n, style), []).append(r)
                    print(f"  {r.rate:,.0f} msgs/s, {r.ms_per_msg(r.cpu_total):.2f} ms CPU/msg",
                          file=sys.stderr, flush=True)

    rows = []
    for (server, n, style), rs in runs.items():
        r = _common.median_by(rs, lambda run: run.rate)
        ratio_rate = ratio_cpu = ""
        others = runs.get(("postfix", n, style))
        if server == "gannet" and others:
            ratio_rate = _common.pair_ratios([g.rate for g in rs], [p.rate for p in others])
            ratio_cpu = _common.pair_ratios([g.cpu_total for g in rs], [p.cpu_total for p in others])
        name = server if server != "gannet" else f"gannet ({queue.label})"
        rows.append([name, n, "1 per conn" if style == "one" else "all on 1 conn", r.rate, r.wall, r.drain,
                     r.ms_per_msg(r.cpu_accept), r.ms_per_msg(r.cpu_total), ratio_rate, ratio_cpu])
    queue.close()
    repeats = f"; median of {args.repeat} runs each, ratios: median (every pair)" if args.repeat > 1 else ""
    print(f"\n{messages} messages of {args.size} bytes, 1 recipient each; "
          f"{os.cpu_count()} CPUs; CPU ms/msg = server CPU / messages{repeats}\n")
    print(_common.table(["server", "sessions", "connections", "msgs/s", "wall s", "drain s",
                         "CPU ms/msg accept", "CPU ms/msg total", "rate G/P", "CPU G/P"], rows))
    print("\nCPU ms/msg while smtp-source ran, by process (the median run):")
    for (server, n, style), rs in runs.items():
        r = _common.median_by(rs, lambda run: run.rate)
        print(f"  {server} {n} {style}: {_common.split_text(r.split, r.messages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
