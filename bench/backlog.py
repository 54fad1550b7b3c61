#!/usr/bin/env python3
"""A deep deferred queue must not slow fresh mail: Gannet with 1,000,000 deferred
messages (to a dead destination) beside Gannet with an empty queue.

Set-up per run: a dnsmasq on 127.0.0.53 serves sink.test (MX → smtp-sink on
127.0.0.3) and dead.test (MX → 127.0.0.5, where nothing listens). Before
Gannet starts, its queue is filled through the store itself with BACKLOG
messages of 1 KiB to bob@dead.test, each already tried once and deferred,
due again at a random time within the next 4 hours (as a retry schedule
spreads them); some come due during the run and are refused again.

Measured, with the backlog and without:
- fresh latency: one message at a time to carol@sink.test (smtplib), from
  the end of its SMTP transaction until smtp-sink has it; median and worst
  of `--fresh` messages;
- accept rate: smtp-source, `--messages` messages of 4 KiB to
  carol@sink.test over 10 sessions, one per connection (relayed on to
  smtp-sink as they come).
Targets (issue 3): fresh latency as with an empty queue; accept rate down
by under 20%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import smtplib
import statistics
import sys
import time
from pathlib import Path

import _common
from _common import peers

from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, Transport
from gannet.queue.sqlite import SqliteStore

RECORDS = {
    "sink.test": {"MX": [(10, "mx.sink.test")]},
    "mx.sink.test": {"A": [peers.SINK_HOST]},
    "dead.test": {"MX": [(10, "mx.dead.test")]},
    "mx.dead.test": {"A": ["127.0.0.5"]},
}


async def fill_queue(work: Path, count: int) -> float:
    """Enqueue `count` deferred messages to bob@dead.test; returns seconds taken."""
    started = time.monotonic()
    var = work / "gannet" / "var"
    store = SqliteStore(var / "queue.db", spool_dir=var / "spool")
    await store.open()
    body = InlineBody(b"From: a@client.test\r\nSubject: backlog\r\n\r\n" + b"x" * 960 + b"\r\n")
    now = time.time()
    try:
        done = 0
        while done < count:
            n = min(5000, count - done)
            batch = [
                NewMessage(new_queue_id(), "alice@example.test",
                           (NewRecipient("bob@dead.test", Transport.SMTP, "dead.test"),), body, now - 600)
                for _ in range(n)
            ]
            await asyncio.gather(*(store.enqueue(m) for m in batch))
            done += n
            print(f"\r  queue: {done:,}/{count:,}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

        def defer(conn: object) -> None:
            rng = random.Random(1)
            conn.create_function("spread", 0, lambda: now + 60 + rng.random() * 4 * 3600)  # type: ignore[attr-defined]
            conn.execute(  # type: ignore[attr-defined]
                "UPDATE recipients SET state = 'deferred', attempts = 1, next_attempt = spread(), "
                "last_error = '4.4.1 connect to mx.dead.test[127.0.0.5]:25: Connection refused'")
        await store.testing_call(defer)
    finally:
        await store.close()
    return time.monotonic() - started


def fresh_latency(g: peers.GannetProcess, sink: peers.SmtpSink, n: int) -> list[float]:
    delays = []
    for i in range(n):
        before = sink.count()
        with smtplib.SMTP(*g.address("mx"), timeout=60) as client:
            content = f"Subject: fresh {i}\r\n\r\nhi\r\n".encode()
            client.sendmail("alice@example.test", ["carol@sink.test"], content)
        sent = time.monotonic()
        peers.wait_for(lambda b=before: sink.count() > b, 60, "the fresh message", interval=0.002)
        delays.append(time.monotonic() - sent)
    return delays


def run_once(backlog: int, fresh: int, messages: int, keep: bool) -> dict[str, float]:
    work = _common.workdir(f"backlog-{backlog}")
    port = peers.free_port(peers.SINK_HOST)
    dns = peers.DnsServer(work / "dns", records=RECORDS)
    sink = peers.SmtpSink(work / "sink", listen=f"{peers.SINK_HOST}:{port}", max_sessions=1000)
    try:
        g = _common.start_gannet(work, delivery={"port": port, "retry": ["10m"]},
                                 sections={"dns": {"nameservers": [dns.nameserver]}}, start=False)
        fill = asyncio.run(fill_queue(work, backlog)) if backlog else 0.0
        g.start()
        try:
            delays = fresh_latency(g, sink, fresh)
            base = sink.count()
            result = peers.smtp_source(g.target(), messages=messages, sessions=10, size=4096,
                                       sender="alice@example.test", recipient="carol@sink.test", timeout=1800)
            peers.wait_progress(lambda: sink.count() - base, messages, stall=120, what="relay to smtp-sink")
        finally:
            g.stop()
        return {"fill": fill, "median": statistics.median(delays), "worst": max(delays),
                "accept": messages / result.elapsed}
    finally:
        sink.stop()
        dns.stop()
        _common.remove(work, keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--backlog", type=int, default=1_000_000, help="deferred messages (default 1000000)")
    parser.add_argument("--fresh", type=int, default=20, help="fresh messages timed one by one (default 20)")
    parser.add_argument("--messages", type=int, default=5000, help="smtp-source messages (default 5000)")
    parser.add_argument("--quick", action="store_true", help="a 50,000-message backlog, 2000 messages")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args(argv)
    backlog, messages = (50_000, 2000) if args.quick else (args.backlog, args.messages)
    _common.require("smtp-source", "smtp-sink", "dnsmasq")
    peers.raise_nofile(4096)
    results = {}
    for n in (0, backlog):
        print(f"… Gannet with {n:,} deferred messages", file=sys.stderr, flush=True)
        results[n] = run_once(n, args.fresh, messages, args.keep)
    empty, deep = results[0], results[backlog]
    rows = [[f"{n:,}", r["median"] * 1000, r["worst"] * 1000, r["accept"], r["fill"]]
            for n, r in results.items()]
    print(f"\nfresh: {args.fresh} messages one at a time; accept: {messages} messages of 4 KiB "
          f"over 10 sessions; {os.cpu_count()} CPUs\n")
    print(_common.table(["deferred in queue", "fresh median ms", "fresh worst ms", "accept msgs/s",
                         "fill s"], rows))
    print(f"\nwith the backlog: fresh median {deep['median'] / empty['median']:.2f}x, "
          f"accept rate {100 * (deep['accept'] / empty['accept'] - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
