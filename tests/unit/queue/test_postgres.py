"""What the PostgreSQL store must do beyond the shared contract (tests/contract/):
several nodes on one database. Each "node" is a PostgresStore of its own (own
pool, own spool directory) on the same fresh schema of the session's real
PostgreSQL (tests/conftest.py `postgres_url`). Times are explicit; nothing
sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import peers
import psycopg
import pytest

from gannet.queue import postgres_ops as ops
from gannet.queue.ids import new_queue_id
from gannet.queue.model import (
    Claim,
    Deferred,
    Delivered,
    InlineBody,
    NewMessage,
    NewRecipient,
    NoSuchMessage,
    QueueError,
    RecipientOutcome,
    RecipientState,
    SpooledBody,
    Transport,
)
from gannet.queue.postgres import PREFETCH_BODY, PostgresStore
from gannet.queue.postgres_schema import CHUNK, SCHEMA_VERSION, migrate

T0 = 1_800_000_000.0
LEASE = 300.0

Nodes = Callable[..., PostgresStore]


@pytest.fixture
async def nodes(postgres_url: str, tmp_path: Path) -> AsyncIterator[Nodes]:
    """A factory of opened stores ("nodes") on one schema; all closed at the end."""
    opened: list[PostgresStore] = []
    counter = itertools.count(1)

    async def make(name: str | None = None, **kw: object) -> PostgresStore:
        n = next(counter)
        spool = tmp_path / f"spool{n}"
        spool.mkdir()
        store = PostgresStore(postgres_url, spool_dir=spool, node=name or f"node{n}", **kw)  # type: ignore[arg-type]
        await store.open()
        opened.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in opened:
        await store.close()


def message(*addresses: str) -> NewMessage:
    rcpts = tuple(
        NewRecipient(a, Transport.SMTP, a.rpartition("@")[2]) for a in (addresses or ("bob@b.test",))
    )
    return NewMessage(new_queue_id(), "alice@a.test", rcpts, InlineBody(b"Subject: x\r\n\r\nhi\r\n"), T0)


async def claim(store: PostgresStore, now: float = T0, owner: str = "w", limit: int = 100) -> list[Claim]:
    return await store.claim_due(now, limit=limit, lease_seconds=LEASE, owner=owner)


def outcomes(c: Claim, result: Delivered | Deferred, at: float = T0 + 1) -> list[RecipientOutcome]:
    return [RecipientOutcome(r.recipient_id, r.lease_token, result, at) for r in c.recipients]


# --- several nodes --------------------------------------------------------------------


async def test_two_nodes_claiming_at_once_never_get_the_same_recipient(nodes: Nodes) -> None:
    a, b = await nodes("a"), await nodes("b")
    messages = [message(f"r{i}@x.test", f"s{i}@y.test") for i in range(150)]
    await asyncio.gather(*(a.enqueue(m) for m in messages[:75]), *(b.enqueue(m) for m in messages[75:]))

    async def worker(store: PostgresStore, name: str) -> list[int]:
        got = []
        while batch := await claim(store, owner=name, limit=7):
            got += [r.recipient_id for c in batch for r in c.recipients]
        return got

    results = await asyncio.gather(*(worker(s, f"{s.node}/w{i}") for s in (a, b) for i in range(4)))
    claimed = list(itertools.chain.from_iterable(results))
    assert len(claimed) == 300
    assert len(set(claimed)) == 300
    assert all(results)  # both nodes' claimers took part (8 claimers, 300 rows, 7 at a time)


async def test_a_dead_nodes_lease_expires_and_another_node_takes_the_work(nodes: Nodes) -> None:
    a, b = await nodes("a"), await nodes("b")
    m = message("x@x.test", "y@y.test")
    await a.enqueue(m)
    (lost,) = await claim(a, owner="a/smtp")
    await a.close()  # node a dies holding the lease: nobody releases it
    assert await claim(b, now=T0 + LEASE - 1, owner="b/smtp") == []
    assert await b.next_due() == T0 + LEASE  # b knows when to look again
    (taken,) = await claim(b, now=T0 + LEASE, owner="b/smtp")
    assert taken.queue_id == m.queue_id
    assert [r.attempts for r in taken.recipients] == [0, 0]
    assert {r.lease_token for r in taken.recipients}.isdisjoint({r.lease_token for r in lost.recipients})
    assert await b.record(outcomes(taken, Delivered("250 ok"), at=T0 + LEASE + 1)) == [m.queue_id]


async def test_a_node_that_comes_back_late_cannot_overwrite_the_newer_outcome(nodes: Nodes) -> None:
    a, b = await nodes("a"), await nodes("b")
    m = message()
    await a.enqueue(m)
    (stale,) = await claim(a, owner="a/smtp")
    (fresh,) = await claim(b, now=T0 + LEASE, owner="b/smtp")
    await b.record(outcomes(fresh, Deferred("451 4.7.1 later", T0 + 900), at=T0 + LEASE + 1))
    # a was only slow, not dead: its "delivered" arrives after b's outcome.
    assert await a.record(outcomes(stale, Delivered("250 late"), at=T0 + LEASE + 2)) == []
    (r,) = (await a.get_message(m.queue_id)).recipients
    assert (r.state, r.attempts, r.last_error) == (RecipientState.DEFERRED, 1, "451 4.7.1 later")


async def test_release_leases_touches_only_that_owners_rows(nodes: Nodes) -> None:
    a, b = await nodes("a"), await nodes("b")
    for i in range(4):
        await a.enqueue(message(f"r{i}@x.test"))
    mine = await claim(a, owner="a/local", limit=2)
    theirs = await claim(b, owner="b/local", limit=2)
    # b's worker restarts: it releases b's leases, never a's (which are alive).
    assert await b.release_leases("b/local") == 2
    again = await claim(b, owner="b/local")
    assert {c.queue_id for c in again} == {c.queue_id for c in theirs}
    assert await a.record([o for c in mine for o in outcomes(c, Delivered())]) == [c.queue_id for c in mine]


async def test_the_last_two_recipients_finished_on_two_nodes_at_once_complete_the_message(
    nodes: Nodes,
) -> None:
    """Each node records one recipient of the same message in the same instant:
    whichever commits second must see the first's outcome and remove the message."""
    a, b = await nodes("a"), await nodes("b")
    messages = [message(f"x{i}@x.test", f"y{i}@y.test") for i in range(40)]
    await asyncio.gather(*(a.enqueue(m) for m in messages))
    for m in messages:
        (on_a,) = await claim(a, owner="a/smtp", limit=1)
        (on_b,) = await claim(b, owner="b/smtp", limit=1)
        assert on_a.queue_id == on_b.queue_id == m.queue_id
        done = await asyncio.gather(
            a.record(outcomes(on_a, Delivered("ok"))), b.record(outcomes(on_b, Delivered("ok")))
        )
        assert sorted(done) == [[], [m.queue_id]]
    assert await a.list_messages() == []


@pytest.mark.parametrize("seed", [7, 8, 9])
async def test_mixed_work_from_two_nodes_never_deadlocks(nodes: Nodes, seed: int) -> None:
    """Claims, outcomes, holds, retries, deletes, sweeps and per-destination backoff from
    two nodes at once, on the same rows: lock order (message row first, then
    recipient rows by id or SKIP LOCKED) means PostgreSQL never has to abort one
    of them as a deadlock (which would surface here as QueueError)."""
    a, b = await nodes("a"), await nodes("b")
    rng = random.Random(seed)
    messages = [message(*(f"u{j}@d{rng.randrange(3)}.test" for j in range(3))) for _ in range(60)]
    await asyncio.gather(*(a.enqueue(m) for m in messages))
    ids = [m.queue_id for m in messages]

    async def node_work(store: PostgresStore, seed: int) -> None:
        r = random.Random(seed)
        now = T0
        for _ in range(60):
            now += r.choice((1.0, LEASE))
            action = r.randrange(7)
            if action < 2:
                for c in await claim(store, now=now, owner=f"{store.node}/w", limit=5):
                    result = Delivered("ok") if r.random() < 0.5 else Deferred("451", now + 5)
                    await store.record(outcomes(c, result, at=now))
            elif action == 2:
                with contextlib.suppress(NoSuchMessage):  # completed meanwhile: fine; a deadlock is not
                    await (store.hold if r.random() < 0.5 else store.release)(r.choice(ids), now)
            elif action == 3:
                await store.retry(None, now)
            elif action == 4:
                domain = f"d{r.randrange(3)}.test"
                await store.defer_destination(Transport.SMTP, domain, until=now + 2, reason="x")
            elif action == 5:
                await store.release_expired_leases(now, expired_before=now)
            elif r.random() < 0.3:
                with contextlib.suppress(NoSuchMessage):
                    await store.delete(r.choice(ids), now)

    await asyncio.gather(*(node_work(store, seed * 10 + i) for i, store in enumerate((a, a, b, b))))


# --- bodies ----------------------------------------------------------------------------


async def test_a_spooled_body_goes_into_the_database_and_any_node_reads_it(
    nodes: Nodes, tmp_path: Path
) -> None:
    a, b = await nodes("a"), await nodes("b")
    data = random.Random(1).randbytes(2 * CHUNK + 12345)
    path = a.spool_dir / "incoming-1"
    path.write_bytes(data)
    m = NewMessage(
        new_queue_id(),
        "a@a.test",
        (NewRecipient("b@b.test", Transport.SMTP, "b.test"),),
        SpooledBody(path, len(data)),
        T0,
    )
    await a.enqueue(m)
    assert not path.exists()  # copied into the database by the commit; the file was only its way in
    assert await b.read_body(m.queue_id) == data  # another node, another disk
    # For delivery to stream: a copy on the asking node's disk, made once.
    copy = await b.body_file(m.queue_id)
    assert copy is not None and copy.is_relative_to(b.spool_dir) and copy.read_bytes() == data
    os.utime(copy, (1e9, 1e9))
    assert await b.body_file(m.queue_id) == copy and copy.stat().st_mtime > 1e9  # reused, touched

    async def chunks(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[tuple[object, ...]]:
        cur = await conn.execute(
            "SELECT seq, length(data) FROM bodies WHERE queue_id = %s ORDER BY seq", (m.queue_id,)
        )
        return await cur.fetchall()

    assert await b.testing_call(chunks) == [(0, CHUNK), (1, CHUNK), (2, 12345)]
    (c,) = await claim(b)
    assert await b.record(outcomes(c, Delivered())) == [m.queue_id]
    assert not copy.exists()  # the message is complete: its copy goes with it


async def test_large_bodies_are_never_whole_in_memory(nodes: Nodes) -> None:
    """Enqueue (spool file → rows) and body_file (rows → file) move a 24 MiB
    body one CHUNK at a time; reading either whole would show here."""
    a = await nodes()
    size = 24 * CHUNK
    path = a.spool_dir / "incoming-big"
    with path.open("wb") as f:
        for i in range(24):
            f.write(bytes([65 + i]) * CHUNK)
    m = NewMessage(new_queue_id(), "a@a.test", (NewRecipient("b@b.test", Transport.SMTP, "b.test"),),
                   SpooledBody(path, size), T0)  # fmt: skip
    tracemalloc.start()
    try:
        await a.enqueue(m)
        copy = await a.body_file(m.queue_id)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * CHUNK, f"peak {peak} bytes of Python memory for a {size}-byte body"
    assert copy is not None and copy.stat().st_size == size
    with copy.open("rb") as f:
        assert [f.read(CHUNK)[:1] for _ in range(24)] == [bytes([65 + i]) for i in range(24)]


async def test_a_spooled_body_commits_beside_a_failing_message_of_its_batch(nodes: Nodes) -> None:
    a = await nodes()
    first = message()
    await a.enqueue(first)
    path = a.spool_dir / "incoming-2"
    data = b"Subject: big\r\n\r\n" + b"z" * (CHUNK + 7)
    path.write_bytes(data)
    spooled = NewMessage(new_queue_id(), "a@a.test", first.recipients, SpooledBody(path, len(data)), T0)
    duplicate = NewMessage(first.queue_id, "a@a.test", first.recipients, InlineBody(b"x\r\n"), T0)
    results = await asyncio.gather(a.enqueue(spooled), a.enqueue(duplicate), return_exceptions=True)
    assert results[0] is False and isinstance(results[1], QueueError)
    assert await a.read_body(spooled.queue_id) == data and not path.exists()


async def test_a_small_body_comes_with_its_claim_and_is_read_from_it_once(nodes: Nodes) -> None:
    a = await nodes()
    small = message()
    big = NewMessage(new_queue_id(), "a@a.test", small.recipients, InlineBody(b"y" * (PREFETCH_BODY + 1)), T0)
    await a.enqueue(small)
    await a.enqueue(big)
    assert len(await claim(a)) == 2

    async def lose_bodies(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        await conn.execute("DELETE FROM bodies")

    await a.testing_call(lose_bodies)  # from here on, only what came with the claim can be read
    assert await a.read_body(small.queue_id) == small.body.data  # type: ignore[union-attr]
    with pytest.raises(QueueError):  # read once: the second read goes to the database
        await a.read_body(small.queue_id)
    with pytest.raises(QueueError):  # too big to come along: read from the database
        await a.read_body(big.queue_id)


async def test_a_lost_body_row_quarantines_the_message(nodes: Nodes) -> None:
    a = await nodes()
    m = message()
    await a.enqueue(m)

    async def lose(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        await conn.execute("DELETE FROM bodies WHERE queue_id = %s", (m.queue_id,))

    await a.testing_call(lose)
    with pytest.raises(QueueError):
        await a.read_body(m.queue_id)
    view = await a.get_message(m.queue_id)
    assert view.quarantined and view.history[-1].event == "quarantined"
    assert await claim(a) == []


async def test_a_spool_file_gone_before_its_commit_fails_only_its_message(nodes: Nodes) -> None:
    a = await nodes()
    gone = a.spool_dir / "incoming-gone"
    lost = NewMessage(new_queue_id(), "a@a.test", message().recipients, SpooledBody(gone, 10), T0)
    kept = message()
    # (past enqueue's own check, as if the file went between that check and the commit)
    submit = a._writer.submit  # type: ignore[union-attr]
    results = await asyncio.gather(submit(ops.Prepared(lost, (), spool=gone)), a.enqueue(kept),
                                   return_exceptions=True)  # fmt: skip
    assert isinstance(results[0], QueueError) and "cannot read the spooled body" in str(results[0])
    assert results[1] is False
    assert [m.queue_id for m in await a.list_messages()] == [kept.queue_id]


async def test_a_short_large_body_is_quarantined_and_leaves_no_copy(nodes: Nodes) -> None:
    a = await nodes()
    m = NewMessage(new_queue_id(), "a@a.test", message().recipients, InlineBody(b"w" * (2 * CHUNK)), T0)
    await a.enqueue(m)

    async def truncate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        await conn.execute("UPDATE bodies SET data = substring(data from 1 for 100) WHERE queue_id = %s",
                           (m.queue_id,))  # fmt: skip

    await a.testing_call(truncate)
    with pytest.raises(QueueError, match="bytes"):
        await a.body_file(m.queue_id)
    assert (await a.get_message(m.queue_id)).quarantined
    assert [p for p in a.spool_dir.rglob("*") if p.is_file()] == []


# --- durability and group commit ----------------------------------------------------------


async def test_enqueues_arriving_together_share_commits(nodes: Nodes) -> None:
    a = await nodes(writers=2)
    await asyncio.gather(*(a.enqueue(message(f"r{i}@x.test")) for i in range(300)))
    assert a.stats.messages == 300
    # All 300 were waiting before the writers ran: a handful of transactions, not 300.
    assert a.stats.commits <= 10, a.stats.summary()
    assert len(await a.list_messages()) == 300


async def test_commits_are_synchronous_whatever_the_database_default(
    postgres_server: peers.PostgresServer, tmp_path: Path
) -> None:
    name = f"async_default_{new_queue_id().lower()}"
    url = postgres_server.create_database(name)
    postgres_server.sql(f"ALTER DATABASE {name} SET synchronous_commit = off")
    store = PostgresStore(url, spool_dir=tmp_path)
    await store.open()
    try:

        async def show(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> object:
            cur = await conn.execute("SHOW synchronous_commit")
            row = await cur.fetchone()
            return row[0] if row else None

        assert await store.testing_call(show) == "on"
    finally:
        await store.close()
        postgres_server.sql(f"DROP DATABASE {name}")


async def test_an_unreachable_database_is_a_queue_error(tmp_path: Path) -> None:
    port = peers.free_port(peers.POSTGRES_HOST)  # nothing listens there
    store = PostgresStore(
        f"postgresql://gannet@{peers.POSTGRES_HOST}:{port}/none", spool_dir=tmp_path, timeout=1.0
    )
    with pytest.raises(QueueError, match="cannot open the queue database"):
        await store.open()
    with pytest.raises(QueueError):
        await store.enqueue(message())


# --- migrations ------------------------------------------------------------------------


async def test_migrate_is_idempotent_and_nodes_starting_together_take_turns(postgres_url: str) -> None:
    conns = [await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) for _ in range(5)]
    try:
        found = await asyncio.gather(*(migrate(c) for c in conns))
        # One created it; the others waited for its lock and found the work done.
        assert sorted(found) == [0] + [SCHEMA_VERSION] * 4
        assert await migrate(conns[0]) == SCHEMA_VERSION
        cur = await conns[0].execute("SELECT version FROM schema_version")
        assert await cur.fetchall() == [(SCHEMA_VERSION,)]
    finally:
        for c in conns:
            await c.close()


async def test_a_database_newer_than_this_code_is_refused(postgres_url: str, tmp_path: Path) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await migrate(conn)
        await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    store = PostgresStore(postgres_url, spool_dir=tmp_path)
    with pytest.raises(QueueError, match="newer version"):
        await store.open()


async def test_the_store_outlives_a_database_restart(tmp_path: Path) -> None:
    """While PostgreSQL is down an enqueue is refused (QueueError: the session says
    451, never 250); once it is back the same store works again, with what was
    committed before, without being reopened."""
    server = peers.PostgresServer(tmp_path / "pg")
    try:
        store = PostgresStore(server.url(), spool_dir=tmp_path, timeout=2.0)
        await store.open()
        try:
            before = message()
            await store.enqueue(before)
            server.stop()
            with pytest.raises(QueueError):
                await store.enqueue(message())
            server.start()
            after = message()
            for _ in range(3):  # connections broken by the restart are dropped as they fail
                with contextlib.suppress(QueueError):
                    await store.enqueue(after)
                    break
            assert {v.queue_id for v in await store.list_messages()} == {before.queue_id, after.queue_id}
        finally:
            await store.close()
    finally:
        server.close()
