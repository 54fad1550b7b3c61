"""Benchmark: SqliteStore group commit under concurrent enqueuers (not a test).

    PYTHONPATH=. .venv/bin/python tests/unit/queue/bench_group_commit.py \
        [--messages 20000] [--concurrency 50] [--size 4096] [--dir DIR] [--uvloop]
        [--deferred 1000000]

Prints messages/s, commits/s (fsync-bound), the mean batch, and the writer
thread's CPU time per message. `--deferred N` first fills the queue with N
recipients deferred into the future and then times claim_due among them.
`--dir` chooses the file system (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, Transport
from gannet.queue.sqlite import SqliteStore

T0 = 1_800_000_000.0


async def enqueue_load(store: SqliteStore, total: int, concurrency: int, size: int) -> None:
    body = InlineBody(b"x" * size)
    rcpt = (NewRecipient("bob@b.test", Transport.SMTP, "b.test"),)
    per_worker = total // concurrency

    async def session() -> None:
        for _ in range(per_worker):
            await store.enqueue(NewMessage(new_queue_id(), "alice@a.test", rcpt, body, T0))

    stats = store.stats
    commits, batches, jobs, cpu = stats.commits, stats.batches, stats.jobs, stats.cpu_seconds
    start = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    done = per_worker * concurrency
    n_commits = stats.commits - commits
    print(f"{concurrency} concurrent enqueuers, {done} messages of {size} bytes")
    print(f"  {done / elapsed:10.0f} messages/s")
    print(f"  {n_commits / elapsed:10.0f} commits/s ({n_commits} commits in {elapsed:.2f} s)")
    print(f"  {(stats.jobs - jobs) / max(1, stats.batches - batches):10.1f} messages per commit")
    print(f"  {(stats.cpu_seconds - cpu) / done * 1e6:10.1f} µs writer CPU per message")


async def claim_among_deferred(store: SqliteStore, deferred: int) -> None:
    await store.enqueue(
        NewMessage(
            new_queue_id(),
            "a@a.test",
            (NewRecipient("b@b.test", Transport.SMTP, "b.test"),),
            InlineBody(b"x"),
            T0,
        )
    )
    qid = (await store.list_messages())[0].queue_id

    def fill(conn: sqlite3.Connection) -> None:
        conn.execute(
            """
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO recipients (queue_id, address, transport, domain, mailbox, original,
                state, attempts, next_attempt)
            SELECT ?, 'r' || i || '@x.test', 'smtp', 'x.test', '', '', 'deferred', 1,
                ? + 86400 + i FROM n
            """,
            (deferred, qid, T0),
        )

    start = time.perf_counter()
    await store.testing_call(fill)
    print(f"filled {deferred} deferred recipients in {time.perf_counter() - start:.1f} s")
    for now in (T0, T0 + 86400 + 100):
        start = time.perf_counter()
        claims = await store.claim_due(now, limit=100, lease_seconds=60, owner="bench")
        took = (time.perf_counter() - start) * 1000
        got = sum(len(c.recipients) for c in claims)
        print(f"  claim_due(limit=100) among them: {got} claimed in {took:.2f} ms")
    start = time.perf_counter()
    await store.next_due()
    print(f"  next_due: {(time.perf_counter() - start) * 1000:.2f} ms")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = SqliteStore(Path(tmp, "queue.db"), spool_dir=Path(tmp, "spool"))
        await store.open()
        try:
            await enqueue_load(store, args.messages, args.concurrency, args.size)
            if args.deferred:
                await claim_among_deferred(store, args.deferred)
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--deferred", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true")
    arguments = parser.parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(arguments))
