"""Lease renewal on PostgreSQL beyond the contract (tests/contract/
test_store_lease_contract.py): what only concurrent transactions show. A
renewal never waits for a row another transaction holds (a record in
progress, another node's claim): it leaves that row for the next renewal and
does not report it lost. Real PostgreSQL (tests/conftest.py `postgres_url`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, Transport
from gannet.queue.postgres import PostgresStore

T0 = 1_800_000_000.0
LEASE = 300.0


@pytest.fixture
async def store(postgres_url: str, tmp_path: Path) -> AsyncIterator[PostgresStore]:
    (tmp_path / "spool").mkdir()
    s = PostgresStore(postgres_url, spool_dir=tmp_path / "spool", node="n1")
    await s.open()
    yield s
    await s.close()


def message(*addresses: str) -> NewMessage:
    rcpts = tuple(NewRecipient(a, Transport.SMTP, a.rpartition("@")[2]) for a in addresses)
    return NewMessage(new_queue_id(), "alice@a.test", rcpts, InlineBody(b"Subject: x\r\n\r\nhi\r\n"), T0)


async def test_a_row_locked_elsewhere_is_skipped_not_waited_for_nor_reported_lost(
    store: PostgresStore, postgres_url: str
) -> None:
    await store.enqueue(message("a@x.test", "b@x.test"))
    (c,) = await store.claim_due(T0, limit=10, lease_seconds=LEASE, owner="w1")
    held = [(r.recipient_id, r.lease_token) for r in c.recipients]
    locked, free = held[0][0], held[1][0]
    async with await psycopg.AsyncConnection.connect(postgres_url) as other:
        # Another transaction holds one row (as a record in progress would).
        await other.execute("SELECT 1 FROM recipients WHERE id = %s FOR UPDATE", (locked,))
        lost = await asyncio.wait_for(store.renew_leases("w1", held, until=T0 + 2 * LEASE), 30)
        assert lost == []
        await other.rollback()
    assert await _lease_ends(postgres_url) == {locked: T0 + LEASE, free: T0 + 2 * LEASE}
    # The next renewal reaches it.
    assert await store.renew_leases("w1", held, until=T0 + 3 * LEASE) == []
    assert await _lease_ends(postgres_url) == {locked: T0 + 3 * LEASE, free: T0 + 3 * LEASE}


async def _lease_ends(url: str) -> dict[int, float]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT id, lease_until FROM recipients")
        return {int(rid): float(until) for rid, until in await cur.fetchall()}
