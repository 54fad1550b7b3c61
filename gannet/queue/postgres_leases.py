"""Lease renewal on the PostgreSQL store: one statement per owner and interval.

A delivery worker holds its claims under short leases and renews them while it
still has the work (waiting in memory for a connection, or in flight), so that
a node that dies loses them within one lease length (store.py
`renew_leases`). Kept apart from postgres_ops so that the hot statements there
stay in one place; like them it never begins or commits (the caller runs it
in autocommit) and never reads a clock.

Concurrency (the rules of postgres_ops' docstring): the rows to extend are
locked with SKIP LOCKED, so a renewal never waits and never deadlocks with a
record, a claim or an admin action; a row locked at that moment is simply
left for the next renewal. Which leases are *gone* is read from the
statement's snapshot (`still`): a row whose token already changed, or that
was recorded or released, is reported; a row merely locked is not.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

Conn = AsyncConnection[TupleRow]

# `lazy`: like a claim, a renewal commits without waiting for the WAL flush
# (lost in a database crash, the lease only ends sooner: a duplicate at worst).
_RENEW = """
    WITH lazy AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),
    held AS MATERIALIZED (
        SELECT * FROM unnest(%(ids)s::int8[], %(tokens)s::text[]) AS h(id, token)
    ), still AS MATERIALIZED (
        SELECT r.id FROM recipients r JOIN held ON r.id = held.id
        WHERE r.lease_token = held.token AND r.lease_owner = %(owner)s AND r.state = 'delivering'
    ), picked AS (
        SELECT r.id FROM recipients r JOIN held ON r.id = held.id
        WHERE r.lease_token = held.token AND r.lease_owner = %(owner)s AND r.state = 'delivering'
        FOR UPDATE OF r SKIP LOCKED
    ), renewed AS (
        UPDATE recipients r SET lease_until = greatest(r.lease_until, %(until)s)
        FROM picked WHERE r.id = picked.id
    )
    SELECT held.id FROM held CROSS JOIN lazy WHERE NOT EXISTS (SELECT 1 FROM still WHERE still.id = held.id)
"""


async def renew_leases(conn: Conn, owner: str, leases: Sequence[tuple[int, str]], until: float) -> list[int]:
    """Extend the leases `owner` still holds to `until`; returns the recipient ids it lost."""
    if not leases:
        return []
    params = {
        "ids": [rid for rid, _token in leases],
        "tokens": [token for _rid, token in leases],
        "owner": owner,
        "until": until,
    }
    cur = await conn.execute(_RENEW, params)
    return [int(rid) for (rid,) in await cur.fetchall()]
