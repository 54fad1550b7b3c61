#!/usr/bin/env python3
"""Where the server's CPU a message goes: smtp-source against Gannet and three floor servers.

    .venv/bin/python bench/floor.py [--sessions 10] [--styles one,many] [--messages 10000] [--repeat 2]

The floors (bench/floor_servers.py) answer the same smtp-source load with fixed
replies and write nothing, each a layer fuller than the last: `canned` (the
kernel and uvloop: loopback TCP, accept, close, the wake-ups, and a verb
check), `core` (+ Gannet's protocol core, driven from the Protocol's
callbacks), `task` (+ a task per session over Gannet's Wire, as the server's
sessions run). Gannet's server process (its writer, delivery worker and
checks are left out: the floors do none of their work) minus `task` is the
rest of its session: policy, the spool and headers, the enqueue round trip,
logs and metrics.

Printed per run: msgs/s, the server's CPU a message (Gannet: its server process
alone, then its whole tree), smtp-source's; then, from the medians, the layers.
The servers' order alternates from one repetition to the next. A diagnostic,
like checks.py: it does not compare with Postfix (accept.py does), and the
floors' rates are no target: they write nothing to disk. A floor's run at
10,000 messages lasts a few seconds, so one run is a sample: with
`--repeat 1` or `--messages 2000` a layer can come out negative.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import _common
import floor_servers
from _common import peers

SERVERS = (*floor_servers.LEVELS, "gannet")
LAYERS = (
    ("canned", "", "the kernel and uvloop (canned replies)"),
    ("core", "canned", "+ the protocol core, from callbacks"),
    ("task", "core", "+ a task per session, woken per message"),
    ("gannet", "task", "+ the rest of Gannet's session"),
)


@dataclass(slots=True)
class Run:
    server: str
    sessions: int
    style: str
    messages: int
    wall: float
    server_cpu: float  # the server process (Gannet: without its children)
    tree_cpu: float  # Gannet: the server and its children; the floor: the same as server_cpu
    source_cpu: float

    def ms(self, seconds: float) -> float:
        return 1000 * seconds / self.messages


def run_floor(level: str, sessions: int, style: str, messages: int, size: int) -> Run:
    port = peers.free_port("127.0.0.1")
    script = Path(floor_servers.__file__)
    proc = subprocess.Popen(
        [sys.executable, str(script), level, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            sys.exit(f"bench: the {level} floor server did not start")
        cpu0 = peers.process_cpu_seconds(proc.pid)
        wall, source = _common.accept_load(
            f"127.0.0.1:{port}", sessions=sessions, style=style, messages=messages, size=size
        )
        cpu = peers.process_cpu_seconds(proc.pid) - cpu0
        return Run(level, sessions, style, messages, wall, cpu, cpu, source)
    finally:
        proc.kill()
        proc.wait()


def run_gannet(sessions: int, style: str, messages: int, size: int, keep: bool) -> Run:
    work = _common.workdir(f"floor-gannet-{sessions}-{style}")
    try:
        g = _common.start_gannet(work)
        try:
            split0 = _common.cpu_by_process(g.pid)
            tree0 = peers.process_tree_cpu_seconds(g.pid)
            wall, source = _common.accept_load(
                g.target(), sessions=sessions, style=style, messages=messages, size=size
            )
            split = _common.cpu_by_process(g.pid)
            tree = peers.process_tree_cpu_seconds(g.pid) - tree0
            return Run(
                "gannet", sessions, style, messages, wall, split["server"] - split0["server"], tree, source
            )
        finally:
            g.stop()
    finally:
        _common.remove(work, keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000, help="messages per run (default 10000)")
    parser.add_argument("--sessions", default="10", help="session counts (default 10)")
    parser.add_argument("--styles", default="one,many", help="one (a connection per message), many (-d)")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (default 4096)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each server per configuration")
    parser.add_argument("--keep", action="store_true", help="keep Gannet's work directories")
    args = parser.parse_args()
    _common.require("smtp-source")
    _common.settle()
    rows: list[list[object]] = []
    layers: list[str] = []
    for sessions in (int(s) for s in args.sessions.split(",")):
        for style in args.styles.split(","):
            runs: list[Run] = []
            for i in range(args.repeat):
                for server in SERVERS if i % 2 == 0 else reversed(SERVERS):
                    print(f"… {server}: {args.messages} messages, {sessions} sessions, {style}", flush=True)
                    if server == "gannet":
                        runs.append(run_gannet(sessions, style, args.messages, args.size, args.keep))
                    else:
                        runs.append(run_floor(server, sessions, style, args.messages, args.size))
            rows += [_row(r) for r in runs]
            layers += _layers(runs, f"{sessions} sessions, {_connections(style)}")
    print(f"\n{args.messages} messages of {args.size} bytes a run, 1 recipient; CPU in ms a message\n")
    headers = [
        "server",
        "sessions",
        "connections",
        "msgs/s",
        "server CPU",
        "with children",
        "smtp-source CPU",
    ]
    print(_common.table(headers, rows))
    print("\nThe server's CPU a message by layer (medians, ms):")
    print("\n".join(layers))


def _connections(style: str) -> str:
    return "1 per conn" if style == "one" else "all on 1 conn"


def _row(r: Run) -> list[object]:
    rate = f"{r.messages / r.wall:,.0f}"
    cpu = [f"{r.ms(c):.3f}" for c in (r.server_cpu, r.tree_cpu, r.source_cpu)]
    return [r.server, r.sessions, _connections(r.style), rate, *cpu]


def _layers(runs: list[Run], title: str) -> list[str]:
    median = {s: statistics.median(r.ms(r.server_cpu) for r in runs if r.server == s) for s in SERVERS}
    lines = [f"  {title}:"]
    for server, below, what in LAYERS:
        added = median[server] - (median[below] if below else 0.0)
        lines.append(f"    {what:<42} {added:6.3f}  ({added / median['gannet']:4.0%})")
    total = "= Gannet's server"
    lines.append(f"    {total:<42} {median['gannet']:6.3f}")
    return lines


if __name__ == "__main__":
    main()
