"""The QueueStore interface: the ONLY way anyone touches the queue.

Implementations: `sqlite.SqliteStore` (embedded default, WAL, group commit)
and `postgres.PostgresStore` (several nodes, SKIP LOCKED leases, bodies in
the database); `configured.make_store` picks one from `[queue] url`.
Both pass `tests/contract/`.

The commit protocol (docs/queue.md):
1. The session spools the body (small: in memory; large: a file it fsyncs).
2. `enqueue()` writes the message, its recipients and the body in ONE
   transaction, batched with other sessions' enqueues (group commit), and
   returns only when that transaction is durable. Only then does the caller
   answer "250 2.0.0 queued as ID". If it raises, the caller answers 451.
3. Until that commit nothing of the message is visible to `claim_due`.
4. Delivery claims recipients under a lease (owner + token + expiry). A claim
   whose lease expired (the worker died) is claimable again: at worst a
   message is delivered twice, never lost. A live worker renews the leases
   it still holds (`renew_leases`), so leases can be short.
5. `record()` applies outcomes only where the lease token still matches
   (fencing): a late worker cannot overwrite a newer outcome. A message whose
   recipients are all final is removed with its body, in the same transaction.

History and trace (`gannet trace`). Every store keeps, per message, a list
of events (at, recipient or "", event, detail) and returns them from
`get_message` (the message's own) and `trace` (by queue ID or Message-ID).
When a message leaves the queue (all recipients final, or `delete`), its
envelope, body and recipients go, but a summary (queue ID, Message-ID,
sender, size, client, received and completion times) and its events stay
until `prune_history` forgets them (`[queue] keep_history`, run by the sweep;
the hot path never deletes history). Event names, in `trace` order:
  received     derived from the envelope: detail "from=<S> size=N client=C
               message-id=M" (not stored as a row)
  check        a result of an SMTP-time check, from NewMessage.events
  held, released, retry, quarantined, deleted   admin actions and recovery
  delivered, deferred, failed    one per attempt and recipient; detail is the
               reply or reason (deferred/failed), or where it went (delivered)
  released     (with a recipient) a stuck lease given back by the sweep
  dsn          a report about this message was queued: "report queued as ID
               to <R>"; stored when a NewMessage with `report_for` is enqueued
  completed    derived: the message left the queue (all recipients final)
Events with equal times keep the order in which they were recorded.

Times are passed in (`now`), never read from a clock inside the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from gannet.queue.model import (
    Claim,
    DeferralReason,
    NewMessage,
    QueuedMessageView,
    QueueFilter,
    QueueStats,
    RecipientOutcome,
    TraceEvent,
    Transport,
)


class QueueStore(Protocol):
    async def open(self) -> None:
        """Create or migrate the schema; recover from a crash (quarantine what is unreadable)."""

    async def close(self) -> None:
        """Flush pending writes and release the database."""

    async def enqueue(self, message: NewMessage) -> bool:
        """Durably store `message` (group-committed). Raises QueueError on failure.
        True when every recipient is already in a delivery agent's hands (the
        SQLite enqueue writer delivering local mail itself): nobody need wake the
        delivery loops for it. False: wake them."""

    async def claim_due(
        self,
        now: float,
        *,
        limit: int,
        lease_seconds: float,
        owner: str,
        transport: Transport | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` due recipients (next_attempt <= now, not held, not
        final, lease free or expired), grouped by message. Oldest due first."""

    async def read_body(self, queue_id: str) -> bytes:
        """The stored message content (CRLF line endings), Received header included."""

    async def body_file(self, queue_id: str) -> Path | None:
        """The file holding the stored content when the store keeps it in one (large
        bodies), so that a reader can stream it; None when it is held otherwise
        (then use read_body). The file must not be modified."""

    async def record(
        self, outcomes: Sequence[RecipientOutcome], enqueue: Sequence[NewMessage] = ()
    ) -> list[str]:
        """Apply attempt outcomes (fenced by lease token) and enqueue follow-up
        messages (DSNs) in the same transaction. Returns the queue IDs of the
        messages that became complete (and were removed)."""

    async def next_due(self, transport: Transport | None = None) -> float | None:
        """Earliest next_attempt of a claimable recipient, or None if none waits."""

    async def release_leases(self, owner: str) -> int:
        """Make every recipient leased by `owner` claimable now (a restarted worker
        of that name knows its predecessor is dead). Returns how many."""

    async def renew_leases(self, owner: str, leases: Sequence[tuple[int, str]], *, until: float) -> list[int]:
        """Keep claims alive while their worker still holds them (in memory or in
        flight): extend to `until` the lease of each (recipient_id, lease_token)
        whose recipient is still delivering under that very token and `owner`
        (fenced like record), all in one statement; a lease is never shortened.
        Returns the recipient ids whose lease is gone (recorded, released, or
        taken over under a new token): their holder drops that work without
        recording it. A row another transaction is writing at that moment may be
        left for the next renewal, but is not reported gone for that."""

    async def claim_expired(
        self, now: float, *, received_before: float, limit: int, lease_seconds: float, owner: str
    ) -> list[Claim]:
        """The expiry sweep: lease up to `limit` unfinished, unheld recipients of
        messages received before `received_before`, whatever their next attempt,
        unless under a live lease. Oldest messages first."""

    async def release_expired_leases(
        self, now: float, *, expired_before: float
    ) -> list[tuple[str, str, str]]:
        """The stuck-claim sweep: make recipients whose lease ended before
        `expired_before` due at `now`. Returns (queue_id, address, owner) of each."""

    async def defer_destination(
        self, transport: Transport, domain: str | None, *, until: float, reason: str
    ) -> int:
        """Per-destination backoff: every waiting (not leased) recipient of `domain`
        over `transport` (None: all of the transport's) becomes due no sooner than
        `until`, with `reason` as its last error. Not an attempt. Returns how many."""

    async def list_messages(self, filter: QueueFilter | None = None) -> list[QueuedMessageView]:
        """Messages still in the queue, oldest first, without history."""

    async def get_message(self, queue_id: str) -> QueuedMessageView:
        """One message with its history. Raises NoSuchMessage."""

    async def hold(self, queue_id: str, now: float) -> None: ...

    async def release(self, queue_id: str, now: float) -> None: ...

    async def retry(self, queue_id: str | None, now: float) -> int:
        """Make deferred recipients of one message (or all, for None) due now.
        Returns how many recipients were touched."""

    async def delete(self, queue_id: str, now: float) -> None:
        """Remove a message and its body without delivering it (its history is
        kept, with a "deleted" event, like a completed message's)."""

    async def trace(self, key: str) -> list[TraceEvent]:
        """The events of every message whose queue ID is `key`, or whose Message-ID
        is `key` with or without the angle brackets (several messages may share
        one), in the queue or completed and not yet pruned; in time order. An
        empty list when nothing matches, and for "" or "<>" (never "every
        message without a Message-ID")."""

    async def prune_history(self, before: float, *, limit: int) -> int:
        """Forget up to `limit` messages that left the queue before `before` (their
        summary and events), oldest first. Returns how many; call again while it
        returns `limit`. Each call is one short transaction."""

    async def queue_stats(self) -> QueueStats:
        """For /metrics and the dashboard: unfinished recipients by shown state
        (queued, deferred, delivering; "held"/"quarantined" for those of held or
        quarantined messages), with their message count and oldest received_at.
        A scan of the queue: callers cache it; it must not stall enqueues."""

    async def deferral_reasons(self, limit: int) -> list[DeferralReason]:
        """The `limit` largest groups of deferred recipients (of messages neither
        held nor quarantined) by (domain, last error), largest first."""
