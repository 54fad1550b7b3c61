"""What only the SQLite store has: group commit, crash recovery, query plans,
failure handling and a real SIGKILL. The shared behaviour is in tests/contract/."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlite_writer_gate import occupy_writer

import gannet
from gannet.queue import sqlite_ops
from gannet.queue.ids import new_queue_id
from gannet.queue.model import (
    Deferred,
    Delivered,
    InlineBody,
    NewMessage,
    NewRecipient,
    QueueError,
    QueueFilter,
    RecipientOutcome,
    RecipientState,
    SpooledBody,
    Transport,
)
from gannet.queue.prefetch import PREFETCH_BODY, PREFETCH_PER_CLAIM
from gannet.queue.sqlite import SqliteStore
from gannet.queue.sqlite_schema import SCHEMA_VERSION

T0 = 1_800_000_000.0


def message(body: bytes = b"x" * 4096, **kw: object) -> NewMessage:
    recipients = (NewRecipient("bob@b.test", Transport.SMTP, "b.test"),)
    return NewMessage(new_queue_id(), "a@a.test", recipients, InlineBody(body), T0, **kw)  # type: ignore[arg-type]


def spooled(spool_dir: Path, data: bytes) -> NewMessage:
    path = spool_dir / f"{new_queue_id()}.eml"
    path.write_bytes(data)
    recipients = (NewRecipient("bob@b.test", Transport.SMTP, "b.test"),)
    return NewMessage(new_queue_id(), "a@a.test", recipients, SpooledBody(path, len(data)), T0)


def make(tmp_path: Path, **kw: object) -> SqliteStore:
    return SqliteStore(tmp_path / "queue.db", spool_dir=tmp_path / "spool", **kw)  # type: ignore[arg-type]


# --- threads and group commit ----------------------------------------------------------


async def test_sqlite_work_runs_on_the_writer_thread(store: SqliteStore) -> None:
    ident = await store.testing_call(lambda conn: threading.get_ident())
    assert ident != threading.get_ident()


async def test_the_database_is_wal_with_synchronous_full(store: SqliteStore) -> None:
    mode, sync, version = await store.testing_call(
        lambda c: (
            c.execute("PRAGMA journal_mode").fetchone()[0],
            c.execute("PRAGMA synchronous").fetchone()[0],
            c.execute("PRAGMA user_version").fetchone()[0],
        )
    )
    assert (mode, sync, version) == ("wal", 2, SCHEMA_VERSION)  # 2 = FULL


async def test_claims_commit_without_fsync_and_enqueues_with(store: SqliteStore) -> None:
    """A lease claim need not survive a power cut; an acknowledged message must."""
    stats = store.stats
    await store.enqueue(message())
    assert (stats.commits, stats.unsynced_commits) == (1, 0)
    assert len(await store.claim_due(T0, limit=10, lease_seconds=60, owner="w")) == 1
    assert (stats.commits, stats.unsynced_commits) == (2, 1)
    await store.enqueue(message())
    assert (stats.commits, stats.unsynced_commits) == (3, 1)


async def test_body_file_names_spooled_bodies_only(store: SqliteStore, tmp_path: Path) -> None:
    inline = message()
    big = spooled(store.spool_dir, b"Subject: s\r\n\r\n" + b"z" * 70_000 + b"\r\n")
    await store.enqueue(inline)
    await store.enqueue(big)
    assert await store.body_file(inline.queue_id) is None
    path = await store.body_file(big.queue_id)
    assert path is not None and path.read_bytes() == await store.read_body(big.queue_id)


async def test_a_small_body_comes_with_its_claim_and_is_handed_out_once(store: SqliteStore) -> None:
    """queue/prefetch.py: read in the claim's transaction, not by a reader thread per message."""
    small, large = message(b"small\r\n"), message(b"L" * (PREFETCH_BODY + 1))
    await store.enqueue(small)
    await store.enqueue(large)
    claims = await store.claim_due(T0, limit=10, lease_seconds=60, owner="w")
    assert {c.queue_id for c in claims} == {small.queue_id, large.queue_id}

    def rewrite(conn: sqlite3.Connection) -> None:  # a probe only: a stored body never changes
        conn.execute("UPDATE bodies SET data = ?", (b"changed\r\n",))

    await store.testing_call(rewrite)
    assert await store.read_body(small.queue_id) == b"small\r\n"  # from the claim
    assert await store.read_body(small.queue_id) == b"changed\r\n"  # taken once: then the database
    assert await store.read_body(large.queue_id) == b"changed\r\n"  # too large to come along


async def test_a_claim_brings_at_most_its_share_of_bodies(store: SqliteStore) -> None:
    """The bodies are read under the write lock: PREFETCH_PER_CLAIM bounds how much."""
    size = PREFETCH_BODY
    messages = [message(bytes([65 + i]) * size) for i in range(PREFETCH_PER_CLAIM // size + 3)]
    for m in messages:
        await store.enqueue(m)
    await store.claim_due(T0, limit=100, lease_seconds=60, owner="w")
    held = sum(1 for m in messages if store._prefetched.take(m.queue_id) is not None)
    assert held == PREFETCH_PER_CLAIM // size
    for m in messages:  # the rest from the database, as before
        assert await store.read_body(m.queue_id) == m.body.data  # type: ignore[union-attr]


async def test_two_stores_on_one_database_take_turns_without_busy_errors(tmp_path: Path) -> None:
    """The server and its delivery worker share the database: their writers
    serialize on a blocking lock, so neither sees SQLITE_BUSY or sleeps in
    SQLite's busy handler."""
    a, b = make(tmp_path), make(tmp_path, recover=False)
    await a.open()
    await b.open()
    try:
        # Count b's waits from here on: only the wait for the transaction held
        # below is this test's (b's own open() may meet a's last moments).
        waits_before, waited_before = b.stats.lock_waits, b.stats.lock_wait_seconds
        held_before = a.stats.lock_held_seconds
        gate, held = await occupy_writer(a)  # a's writer is inside a transaction
        waiting = asyncio.ensure_future(b.enqueue(message()))
        await asyncio.sleep(0.2)
        assert not waiting.done(), "b must wait for a's transaction, not interleave"
        gate.set()
        await held
        await asyncio.wait_for(waiting, 10)
        assert b.stats.lock_waits == waits_before + 1, "b waited on the process lock, not in SQLite's"
        # The lock's clocks (the shutdown summary's): a held it across the 0.2 s above,
        # and b's wait for it was counted.
        assert a.stats.lock_held_seconds - held_before >= 0.2
        assert b.stats.lock_wait_seconds > waited_before
        assert len(await a.list_messages()) == 1
    finally:
        await b.close()
        await a.close()


async def test_enqueues_that_pile_up_are_committed_together(store: SqliteStore) -> None:
    """While a transaction runs, 50 enqueues arrive: the next transaction takes
    them all, and none of them returns before that commit."""
    gate, blocker = await occupy_writer(store)
    commits, batches = store.stats.commits, store.stats.batches
    tasks = [asyncio.ensure_future(store.enqueue(message())) for _ in range(50)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in tasks)  # nothing acknowledged before its commit
    gate.set()
    await blocker
    await asyncio.gather(*tasks)
    assert store.stats.commits - commits == 1
    assert store.stats.batches - batches == 2  # the blocker's, then all fifty in one
    assert store.stats.max_batch >= 50
    assert len(await store.list_messages()) == 50


async def test_a_lone_enqueue_is_committed_at_once(store: SqliteStore) -> None:
    commits = store.stats.commits
    await store.enqueue(message())
    assert store.stats.commits == commits + 1


async def test_records_are_batched_too(store: SqliteStore) -> None:
    for _ in range(20):
        await store.enqueue(message())
    claims = await store.claim_due(T0, limit=100, lease_seconds=60, owner="w")
    gate, blocker = await occupy_writer(store)
    commits = store.stats.commits
    records = [
        asyncio.ensure_future(
            store.record([RecipientOutcome(r.recipient_id, r.lease_token, Deferred("451", T0 + 9), T0)])
        )
        for c in claims
        for r in c.recipients
    ]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(blocker, *records)
    assert store.stats.commits - commits == 1


async def test_a_cancelled_caller_does_not_disturb_the_writer(store: SqliteStore) -> None:
    task = asyncio.ensure_future(store.enqueue(message()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.enqueue(message())  # the writer still serves
    # The cancelled enqueue may or may not have committed; the client saw no 250 either way.
    assert len(await store.list_messages()) in (1, 2)


# --- query plans ------------------------------------------------------------------------


def plan(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> str:
    return "\n".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


async def test_claim_due_and_next_due_use_the_due_indexes(store: SqliteStore) -> None:
    plans = await store.testing_call(
        lambda c: [
            plan(c, sqlite_ops.CLAIM_SQL, (T0, 10)),
            plan(c, sqlite_ops.CLAIM_BY_TRANSPORT_SQL, ("smtp", T0, 10)),
            plan(c, sqlite_ops.NEXT_DUE_SQL, ()),
            plan(c, sqlite_ops.NEXT_DUE_BY_TRANSPORT_SQL, ("smtp",)),
        ]
    )
    claim, claim_transport, due, due_transport = plans
    assert "USING INDEX recipients_due (due_at<?)" in claim
    assert "USING INDEX recipients_due_by_transport (transport=? AND due_at<?)" in claim_transport
    assert "recipients_due" in due and "recipients_due_by_transport" in due_transport
    for p in plans:
        assert "TEMP B-TREE" not in p  # no sort: the index gives the order
        assert "SCAN recipients\n" not in p + "\n"  # never a full table scan


async def test_claiming_is_cheap_among_many_waiting_recipients(store: SqliteStore) -> None:
    """100,000 deferred recipients due next week and 5 due now: claiming the 5
    touches a handful of index entries (counted in SQLite VM steps), not 100,000 rows."""
    await store.enqueue(message())
    qid = (await store.list_messages())[0].queue_id

    def fill(conn: sqlite3.Connection) -> None:
        conn.execute(
            """
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
            INSERT INTO recipients (queue_id, address, transport, domain, mailbox, original,
                state, attempts, next_attempt)
            SELECT ?, 'r' || i || '@x.test', 'smtp', 'x.test', '', '', 'deferred', 1,
                ? + 604800 + i FROM n
            """,
            (qid, T0),
        )

    await store.testing_call(fill)
    for _ in range(4):
        await store.enqueue(message())

    def count_steps(conn: sqlite3.Connection) -> tuple[int, int]:
        steps = 0

        def tick() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn.set_progress_handler(tick, 100)  # called every 100 VM instructions
        try:
            rows = conn.execute(sqlite_ops.CLAIM_SQL, (T0, 100)).fetchall()
        finally:
            conn.set_progress_handler(None, 0)
        return len(rows), steps * 100

    found, instructions = await store.testing_call(count_steps)
    assert found == 5
    assert instructions < 5_000  # a scan of 100,000 rows would take millions
    claims = await store.claim_due(T0, limit=100, lease_seconds=60, owner="w")
    assert sum(len(c.recipients) for c in claims) == 5
    assert await store.next_due() == T0 + 60


# --- failures ------------------------------------------------------------------------------


async def test_enqueue_on_a_read_only_database_raises_queue_error(tmp_path: Path) -> None:
    s = make(tmp_path)
    await s.open()
    await s.enqueue(message())
    await s.testing_call(lambda c: c.execute("PRAGMA query_only=1"))
    with pytest.raises(QueueError, match="readonly"):
        await s.enqueue(message())
    await s.close()
    s = make(tmp_path)  # a fresh connection is writable again; nothing was damaged
    await s.open()
    await s.enqueue(message())
    assert len(await s.list_messages()) == 2
    await s.close()


async def test_a_full_disk_refuses_enqueues_and_corrupts_nothing(store: SqliteStore) -> None:
    """max_page_count makes SQLite report SQLITE_FULL exactly as a full disk does."""
    kept = [message() for _ in range(5)]
    for m in kept:
        await store.enqueue(m)

    def cap(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages + 30}")

    await store.testing_call(cap)
    results = await asyncio.gather(
        *(store.enqueue(message(b"y" * 20_000)) for _ in range(40)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors and all(isinstance(e, QueueError) for e in errors)
    assert "full" in str(errors[0]).lower()
    stored = len(await store.list_messages())
    assert stored == 5 + len(results) - len(errors)
    for m in kept:
        assert await store.read_body(m.queue_id) == m.body.data  # type: ignore[union-attr]
    await store.testing_call(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
    await store.enqueue(message())
    check = await store.testing_call(lambda c: c.execute("PRAGMA integrity_check").fetchall())
    assert check == [("ok",)]


async def test_a_lost_connection_turns_every_call_into_queue_error(tmp_path: Path) -> None:
    s = make(tmp_path)
    await s.open()
    with pytest.raises(QueueError):
        await s.testing_call(lambda c: c.close())
    with pytest.raises(QueueError):
        await s.enqueue(message())
    with pytest.raises(QueueError):
        await s.claim_due(T0, limit=1, lease_seconds=1, owner="w")
    await s.close()  # still closes cleanly


async def test_open_fails_with_queue_error_when_the_database_cannot_be_made(
    tmp_path: Path,
) -> None:
    (tmp_path / "queue.db").mkdir()  # a directory where the file should be
    s = make(tmp_path)
    with pytest.raises(QueueError):
        await s.open()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "queue.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(QueueError, match="newer"):
        await make(tmp_path).open()


def test_the_database_may_not_live_in_the_spool_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SqliteStore(tmp_path / "spool" / "q.db", spool_dir=tmp_path / "spool")


# --- crash recovery ---------------------------------------------------------------------------


async def test_open_removes_spool_files_no_message_names(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    s = make(tmp_path)
    await s.open()
    kept = spooled(spool, b"kept\r\n")
    await s.enqueue(kept)
    await s.close()
    (spool / "unacknowledged.eml").write_bytes(b"the crash came before COMMIT")
    (spool / "sub").mkdir()
    (spool / "sub" / "deeper.eml").write_bytes(b"also litter")

    s = make(tmp_path)
    await s.open()
    try:
        assert not (spool / "unacknowledged.eml").exists()
        assert not (spool / "sub" / "deeper.eml").exists()
        assert await s.read_body(kept.queue_id) == b"kept\r\n"
    finally:
        await s.close()


async def test_a_second_opener_without_recovery_leaves_files_alone(tmp_path: Path) -> None:
    s = make(tmp_path)
    await s.open()
    in_progress = tmp_path / "spool" / "being-written.eml"
    in_progress.write_bytes(b"a session is still receiving this")
    cli = make(tmp_path, recover=False)
    await cli.open()
    await cli.close()
    await s.close()
    assert in_progress.exists()


async def test_a_restart_releases_the_dead_processs_leases(tmp_path: Path) -> None:
    s = make(tmp_path)
    await s.open()
    fresh, retried = message(), message()
    await s.enqueue(fresh)
    await s.enqueue(retried)
    claims = {c.queue_id: c for c in await s.claim_due(T0, limit=9, lease_seconds=300, owner="a")}
    r = claims[retried.queue_id].recipients[0]
    await s.record([RecipientOutcome(r.recipient_id, r.lease_token, Deferred("451", T0 + 5), T0)])
    again = await s.claim_due(T0 + 5, limit=9, lease_seconds=300, owner="a")
    await s.close()  # as if killed: both recipients are leased for 300 s

    cli = make(tmp_path, recover=False)  # a second opener takes nothing away
    await cli.open()
    assert await cli.claim_due(T0 + 6, limit=9, lease_seconds=300, owner="cli") == []
    await cli.close()

    s = make(tmp_path)
    await s.open()
    try:
        views = {v.queue_id: v for v in await s.list_messages()}
        assert views[fresh.queue_id].recipients[0].state is RecipientState.QUEUED
        assert views[retried.queue_id].recipients[0].state is RecipientState.DEFERRED
        claimed = await s.claim_due(T0 + 6, limit=9, lease_seconds=300, owner="b")
        assert {c.queue_id for c in claimed} == {fresh.queue_id, retried.queue_id}
        # The dead holder's late report is fenced off.
        stale = again[0].recipients[0]
        late = RecipientOutcome(stale.recipient_id, stale.lease_token, Delivered(), T0 + 7)
        assert await s.record([late]) == []
        assert len(await s.list_messages()) == 2
    finally:
        await s.close()


async def test_a_missing_or_damaged_body_file_quarantines_the_message(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    s = make(tmp_path)
    await s.open()
    missing, short, fine = (spooled(spool, b"body %d\r\n" % i) for i in range(3))
    for m in (missing, short, fine):
        await s.enqueue(m)
    await s.close()
    assert isinstance(missing.body, SpooledBody) and isinstance(short.body, SpooledBody)
    missing.body.path.unlink()
    short.body.path.write_bytes(b"trunc")

    s = make(tmp_path, clock=lambda: T0 + 100)
    await s.open()  # never fails for a damaged message
    try:
        bad = {missing.queue_id, short.queue_id}
        views = {v.queue_id: v for v in await s.list_messages()}
        assert set(views) == bad | {fine.queue_id}  # kept, not deleted
        assert {q for q, v in views.items() if v.quarantined} == bad
        quarantined = await s.list_messages(QueueFilter(quarantined=True))
        assert {v.queue_id for v in quarantined} == bad
        history = (await s.get_message(missing.queue_id)).history
        assert (history[-1].at, history[-1].event) == (T0 + 100, "quarantined")
        assert "body file" in history[-1].detail
        claims = await s.claim_due(T0, limit=10, lease_seconds=60, owner="w")
        assert [c.queue_id for c in claims] == [fine.queue_id]
        await s.release(missing.queue_id, T0)  # release does not lift a quarantine
        assert await s.claim_due(T0, limit=10, lease_seconds=60, owner="w") == []
        await s.delete(missing.queue_id, T0)  # a postmaster may delete it
    finally:
        await s.close()


async def test_a_body_file_vanishing_at_read_time_quarantines(store: SqliteStore) -> None:
    m = spooled(store.spool_dir, b"soon gone\r\n")
    await store.enqueue(m)
    assert isinstance(m.body, SpooledBody)
    m.body.path.unlink()
    with pytest.raises(QueueError):
        await store.read_body(m.queue_id)
    assert (await store.get_message(m.queue_id)).quarantined


async def test_enqueue_refuses_a_spool_file_that_is_not_what_was_announced(
    store: SqliteStore,
) -> None:
    m = spooled(store.spool_dir, b"twelve bytes")
    assert isinstance(m.body, SpooledBody)
    wrong = NewMessage(m.queue_id, m.sender, m.recipients, SpooledBody(m.body.path, 99), T0)
    with pytest.raises(QueueError):
        await store.enqueue(wrong)
    m.body.path.unlink()
    with pytest.raises(QueueError):
        await store.enqueue(m)
    assert await store.list_messages() == []


# --- a real crash ---------------------------------------------------------------------------

CHILD = r"""
import asyncio, os, sys
from pathlib import Path
from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, SpooledBody, Transport
from gannet.queue.prefetch import PREFETCH_BODY, PREFETCH_PER_CLAIM
from gannet.queue.sqlite import SqliteStore

async def main(db, spool, writer):
    store = SqliteStore(Path(db), spool_dir=Path(spool), enqueue_process=writer == "process")
    await store.open()
    rcpt = (NewRecipient("bob@b.test", Transport.SMTP, "b.test"),)

    async def session(n):
        i = 0
        while True:
            i += 1
            qid = new_queue_id()
            if i % 4 == 0:  # a large body: spool and fsync first, as the session does
                path = Path(spool, qid + ".eml")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, b"x" * 20000)
                os.fsync(fd)
                os.close(fd)
                body = SpooledBody(path, 20000)
            else:
                body = InlineBody(b"y" * 4096)
            await store.enqueue(NewMessage(qid, "a@a.test", rcpt, body, 1.0))
            sys.stdout.write(qid + "\n")  # "250 queued as qid"
            sys.stdout.flush()

    await asyncio.gather(*(session(n) for n in range(8)))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_sigkilled_process_loses_no_acknowledged_message(tmp_path: Path, writer: str) -> None:
    """The server SIGKILLed while eight sessions enqueue; with `process`, its
    enqueue writer process dies with it (prctl), at whatever point it was."""
    db, spool = tmp_path / "queue.db", tmp_path / "spool"
    root = Path(gannet.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    seed = random.randrange(1 << 30)
    wanted = random.Random(seed).randrange(100, 800)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(spool), writer],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    loop = asyncio.get_running_loop()
    try:
        while len(acknowledged) < wanted:
            line = await asyncio.wait_for(loop.run_in_executor(None, child.stdout.readline), 20)
            assert line, f"child exited early with {child.wait()}"
            acknowledged.append(line.decode().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        rest = child.communicate()[0]
    # Lines already written before the kill count too; a torn last line does not.
    acknowledged += [x for x in rest.decode().split("\n")[:-1] if x]
    assert child.returncode == -signal.SIGKILL

    store = make(tmp_path)
    await store.open()
    try:
        views = {v.queue_id: v for v in await store.list_messages()}
        missing = set(acknowledged) - set(views)
        assert not missing, f"seed {seed}: lost {len(missing)} acknowledged messages"
        assert not any(v.quarantined for v in views.values())
        named = {f"{q}.eml" for q, v in views.items() if v.size == 20000}
        assert {p.name for p in spool.iterdir()} == named  # unacknowledged spool files gone
    finally:
        await store.close()
