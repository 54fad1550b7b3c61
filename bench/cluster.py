#!/usr/bin/env python3
"""Cluster rates: 1, 2 and 3 Gannet nodes on one PostgreSQL, beside the SQLite single node.

Every configuration gets the same load through the same front door: HAProxy
(127.0.0.8, send-proxy-v2, roundrobin) in front of the nodes (127.0.0.2, .3,
.4; each a ``gannet serve`` with its deliver-worker, a ``proxy_protocol``
listener, its own data_dir), Postfix's smtp-source sending MESSAGES messages
of 4 KiB to ``load@sink.test`` over SESSIONS sessions (one message per
connection), every node relaying to one smtp-sink (127.0.0.3) as its
smarthost. Configurations (``--configs``):

- ``sqlite-1``: one node on its embedded SQLite queue (the single-box setup);
- ``pg-1``, ``pg-2``, ``pg-3``: 1, 2, 3 nodes sharing one PostgreSQL 15
  (a private instance from the installed binaries, fsync and
  synchronous_commit on: 250 means the WAL is flushed), a fresh database each.

Reported per configuration:
- accept/s: MESSAGES / smtp-source's wall time (the rate clients see);
- relay/s: MESSAGES / the time from smtp-source's start until smtp-sink has
  counted every message (end to end); drain s: the part after smtp-source;
- CPU ms/msg, split: Gannet (all nodes, serve + worker), PostgreSQL (the
  postmaster and every backend), HAProxy; and the load tools (smtp-source,
  smtp-sink) are on the same 2 cores;
- busy: all that CPU / (wall time * cores), i.e. how saturated the machine was.

Where the database waits: during each PostgreSQL run, pg_stat_activity is
sampled every 50 ms and the wait events of Gannet's active connections are
counted, with "idle in transaction" (the database waiting for the node in the
middle of a transaction) as its own entry (``--no-waits`` turns it off); pg_stat_statements (preloaded) gives
the statements by total time at the end (``--statements N``).
``--profile DIR`` samples every Gannet process with py-spy (see accept.py).

Nothing is left running: every process is started inside try/finally (and
SIGTERM to the benchmark runs those), and each run's directory
``/tmp/gannet-bench-cluster-*`` is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import _common
import cluster_peers  # tests/cluster_peers.py, on the path through _common
from _common import peers

CONFIGS = ("sqlite-1", "pg-1", "pg-2", "pg-3")
PG_SETTINGS = {"shared_preload_libraries": "pg_stat_statements", "max_connections": "300",
               "track_io_timing": "on"}


@dataclass
class Run:
    config: str
    messages: int
    accept: float = 0.0
    total: float = 0.0
    cpu_gannet: float = 0.0
    cpu_postgres: float = 0.0
    cpu_haproxy: float = 0.0
    waits: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    statements: list[tuple[str, float, int]] = field(default_factory=list)
    writer_lines: list[str] = field(default_factory=list)  # each process's queue writer counters

    @property
    def accept_rate(self) -> float:
        return self.messages / self.accept

    @property
    def relay_rate(self) -> float:
        return self.messages / self.total

    def ms(self, cpu: float) -> float:
        return 1000 * cpu / self.messages


class WaitSampler:
    """pg_stat_activity every `interval` s: what Gannet's active connections are waiting on."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-waits", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # "idle in transaction": the backend waits for Gannet to send the next statement of an open
        # transaction (the node's event loop is busy elsewhere): latency the node adds, not the database.
        sql = ("SELECT CASE WHEN state = 'active' THEN coalesce(wait_event_type || ':' || wait_event, "
               "'CPU (running)') ELSE 'idle in transaction' END FROM pg_stat_activity "
               "WHERE application_name LIKE 'gannet%' AND state IN ('active', 'idle in transaction')")
        while not self._stop.wait(self.interval):
            rows = self.conn.execute(sql).fetchall()
            self.samples += 1
            self.counts.update(str(r[0]) for r in rows)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.close()


def top_statements(pg: peers.PostgresServer, database: str, n: int) -> list[tuple[str, float, int]]:
    rows = pg.sql("SELECT query, total_exec_time, calls FROM pg_stat_statements "
                  "WHERE query NOT LIKE '%pg_stat%' ORDER BY total_exec_time DESC LIMIT " + str(int(n)),
                  database)
    return [(" ".join(str(q).split())[:100], float(t), int(c)) for q, t, c in rows]


def run_once(config: str, messages: int, sessions: int, size: int, keep: bool, statements: int,
             waits: bool, profile: Path | None) -> Run:
    store, nodes = config.split("-")
    run = Run(config, messages)
    work = _common.workdir(f"cluster-{config}")
    pg: peers.PostgresServer | None = None
    sink: peers.SmtpSink | None = None
    cluster: cluster_peers.Cluster | None = None
    sampler: WaitSampler | None = None
    profilers: list[_common.Profiler] = []
    try:
        sink = peers.SmtpSink(work / "sink", max_sessions=2000, backlog=2000)
        url = "sqlite:"
        if store == "pg":
            pg = peers.PostgresServer(work / "pg", settings=PG_SETTINGS)
            url = pg.create_database("gannet")
            pg.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", "gannet")
        cluster = cluster_peers.Cluster(work, queue_url=url, smarthost=sink.target, nodes=int(nodes))
        assert cluster.haproxy is not None and cluster.haproxy.proc is not None
        haproxy_pid = cluster.haproxy.proc.pid
        node_pids = [n.pid for n in cluster.nodes]

        def cpu() -> tuple[float, float, float]:
            g = sum(peers.process_tree_cpu_seconds(p) for p in node_pids)
            pgc = peers.process_tree_cpu_seconds(pg.proc.pid) if pg and pg.proc else 0.0
            return g, pgc, peers.process_tree_cpu_seconds(haproxy_pid)

        if profile:
            profile.mkdir(parents=True, exist_ok=True)
            for pid in node_pids + [k for p in node_pids for k in peers.child_pids(p)]:
                profilers.append(_common.Profiler(pid, profile / f"cluster-{config}-{pid}.txt"))
        if pg is not None:
            pg.sql("SELECT pg_stat_statements_reset()", "gannet")
            if waits:
                sampler = WaitSampler(url)
        before = cpu()
        start = time.monotonic()
        result = peers.smtp_source(cluster.target, messages=messages, sessions=sessions, size=size,
                                   sender="bench@client.test", recipient="load@sink.test",
                                   helo="client.test", timeout=3600)
        run.accept = result.elapsed
        peers.wait_progress(sink.count, messages, stall=120, what=f"{config}: relaying to smtp-sink")
        run.total = time.monotonic() - start
        after = cpu()
        run.cpu_gannet, run.cpu_postgres, run.cpu_haproxy = (
            a - b for a, b in zip(after, before, strict=True))
        if sampler is not None:
            sampler.stop()
            run.waits, run.samples, sampler = sampler.counts, sampler.samples, None
        if pg is not None and statements:
            run.statements = top_statements(pg, "gannet", statements)
    finally:
        if sampler is not None:
            sampler.stop()
        for p in profilers:
            p.stop()
            print(f"--- py-spy, {config}, pid {p.output.stem}:\n{p.summary()}", file=sys.stderr)
        try:
            if cluster is not None:
                cluster.close()
                run.writer_lines = [line.split(": ", 1)[-1] for line in cluster.log_text().splitlines()
                                    if "queue writer:" in line]
        finally:
            try:
                if sink is not None:
                    sink.stop()
            finally:
                if pg is not None:
                    pg.close()
                _common.remove(work, keep)
    return run


def report(runs: list[Run], messages: int, sessions: int, size: int) -> str:
    cores = os.cpu_count() or 1
    base = runs[0]
    rows = []
    for r in runs:
        cpu = r.cpu_gannet + r.cpu_postgres + r.cpu_haproxy
        rows.append([r.config, r.accept_rate, r.relay_rate, r.total - r.accept, r.ms(r.cpu_gannet),
                     r.ms(r.cpu_postgres), r.ms(r.cpu_haproxy), f"{100 * cpu / (r.total * cores):.0f}%",
                     f"{r.relay_rate / base.relay_rate:.2f}x"])
    out = [f"{messages} messages of {size} bytes, {sessions} sessions through HAProxy, relayed to smtp-sink; "
           f"{cores} CPUs\n",
           _common.table(["config", "accept/s", "relay/s", "drain s", "CPU ms/msg gannet", "postgres",
                          "haproxy", "busy", f"relay vs {base.config}"], rows)]
    for r in runs:
        if r.samples:
            total = sum(r.waits.values())
            top = ", ".join(f"{k} {100 * n / total:.0f}%" for k, n in r.waits.most_common(6))
            out.append(f"\n{r.config}: Gannet backends in a transaction per sample {total / r.samples:.2f}; "
                       f"of those: {top}")
        for line in r.writer_lines:
            out.append(f"  {line}")
        for q, t, c in r.statements:
            out.append(f"  {t:9.0f} ms {c:8d} calls  {q}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (default 20000)")
    parser.add_argument("--quick", action="store_true", help="3000 messages per run: a smoke test")
    parser.add_argument("--sessions", type=int, default=30, help="smtp-source sessions (default 30)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"default {','.join(CONFIGS)}")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (smtp-source -l, default 4096)")
    parser.add_argument("--statements", type=int, default=6, help="top statements to show (default 6)")
    parser.add_argument("--no-waits", action="store_true", help="do not sample pg_stat_activity")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="sample Gannet with py-spy into DIR")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    if not set(configs) <= set(CONFIGS):
        parser.error(f"--configs takes {','.join(CONFIGS)}")
    messages = 3000 if args.quick else args.messages
    _common.require("smtp-source", "smtp-sink", "haproxy", *(["initdb"] if any("pg" in c for c in configs)
                                                            else []))
    # SIGTERM runs the finally blocks too (a plain kill of the benchmark orphans nothing).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    peers.raise_nofile(8192)
    runs = []
    for config in configs:
        print(f"… {config}: {messages} messages, {args.sessions} sessions", file=sys.stderr, flush=True)
        r = run_once(config, messages, args.sessions, args.size, args.keep, args.statements,
                     not args.no_waits, args.profile)
        runs.append(r)
        print(f"  accept {r.accept_rate:,.0f}/s, relay {r.relay_rate:,.0f}/s", file=sys.stderr, flush=True)
    print(report(runs, messages, args.sessions, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
