"""An in-memory QueueStore for delivery tests, faithful to the contract in
gannet/queue/store.py where delivery depends on it:

- claim_due leases due, unheld, non-final recipients (oldest due first) under
  (owner, token, lease_until); a recipient whose lease expired is due again
  (like the SQLite store, a leased recipient is due at its lease_until);
- record applies an outcome only while the lease token still matches
  (fencing), counts the attempt, and removes a message once every recipient
  is final, returning its queue ID;
- renew_leases extends only leases still held under (owner, token) and
  returns the recipient ids of the others;
- read_body returns CRLF content.

It also records calls (claims, records, body reads) and can inject errors
(`fail_claims`, `fail_records`) or hold `record` until a gate opens.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gannet.queue.model import (
    Claim,
    ClaimedRecipient,
    Deferred,
    Delivered,
    HistoryEntry,
    InlineBody,
    NewMessage,
    NewRecipient,
    NoSuchMessage,
    QueuedMessageView,
    QueueError,
    QueueFilter,
    RecipientOutcome,
    RecipientState,
    RecipientView,
    TraceEvent,
    Transport,
)


@dataclass(slots=True)
class _Rcpt:
    id: int
    queue_id: str
    new: NewRecipient
    state: RecipientState = RecipientState.QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    lease_owner: str | None = None
    lease_token: str | None = None
    lease_until: float | None = None

    def due_at(self) -> float | None:
        if self.state in (RecipientState.QUEUED, RecipientState.DEFERRED):
            return self.next_attempt
        if self.state is RecipientState.DELIVERING:
            return self.lease_until
        return None


@dataclass(slots=True)
class _Msg:
    message: NewMessage
    body: bytes
    held: bool
    history: list[HistoryEntry] = field(default_factory=list)


class FakeStore:
    def __init__(self) -> None:
        self.messages: dict[str, _Msg] = {}
        self.rcpts: dict[int, _Rcpt] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self.claim_calls: list[int] = []  # how many recipients each claim returned
        self.record_calls: list[list[RecipientOutcome]] = []
        self.record_enqueued: list[NewMessage] = []
        self.body_reads: list[str] = []
        self.body_files: dict[str, Path] = {}
        self.fenced: list[RecipientOutcome] = []
        self.fail_claims = 0
        self.fail_records = 0
        self.record_gate: asyncio.Event | None = None
        self.pruned_before: list[float] = []  # prune_history calls
        self.renew_calls: list[int] = []  # leases passed to each renew_leases call

    # -- lifecycle ------------------------------------------------------------
    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # -- the delivery side ----------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        await asyncio.sleep(0)
        self._add(message)

    def _add(self, message: NewMessage) -> None:
        if message.queue_id in self.messages:
            raise QueueError(f"duplicate queue id {message.queue_id}")
        body = message.body
        data = body.data if isinstance(body, InlineBody) else body.path.read_bytes()
        self.messages[message.queue_id] = _Msg(message, data, message.held)
        for new in message.recipients:
            rid = next(self._ids)
            self.rcpts[rid] = _Rcpt(rid, message.queue_id, new, next_attempt=message.received_at)

    def _claimable(self, r: _Rcpt, now: float, transport: Transport | None) -> bool:
        due = r.due_at()
        return (
            due is not None
            and due <= now
            and not self.messages[r.queue_id].held
            and (transport is None or r.new.transport is transport)
        )

    async def claim_due(
        self,
        now: float,
        *,
        limit: int,
        lease_seconds: float,
        owner: str,
        transport: Transport | None = None,
    ) -> list[Claim]:
        await asyncio.sleep(0)
        if self.fail_claims:
            self.fail_claims -= 1
            raise QueueError("injected claim failure")
        due = sorted(
            (r for r in self.rcpts.values() if self._claimable(r, now, transport)),
            key=lambda r: (r.due_at(), r.id),
        )[:limit]
        by_message: dict[str, list[ClaimedRecipient]] = {}
        for r in due:
            r.state = RecipientState.DELIVERING
            r.lease_owner, r.lease_token = owner, f"t{next(self._tokens)}"
            r.lease_until = now + lease_seconds
            by_message.setdefault(r.queue_id, []).append(self._claimed(r))
        self.claim_calls.append(len(due))
        return [
            self._claim(self.messages[qid], tuple(rs), now + lease_seconds) for qid, rs in by_message.items()
        ]

    @staticmethod
    def _claimed(r: _Rcpt) -> ClaimedRecipient:
        n = r.new
        assert r.lease_token is not None
        return ClaimedRecipient(
            r.id,
            n.address,
            n.transport,
            n.domain,
            n.mailbox,
            n.original,
            n.orcpt,
            n.notify,
            r.attempts,
            r.lease_token,
        )

    @staticmethod
    def _claim(m: _Msg, rcpts: tuple[ClaimedRecipient, ...], lease_until: float) -> Claim:
        msg = m.message
        return Claim(
            msg.queue_id,
            msg.sender,
            msg.received_at,
            msg.envid,
            msg.ret,
            msg.smtputf8,
            msg.body_8bit,
            len(m.body),
            rcpts,
            lease_until,
        )

    async def body_file(self, queue_id: str) -> Path | None:
        """Set `body_files[queue_id]` to make the store hand out a file instead."""
        await asyncio.sleep(0)
        if queue_id not in self.messages:
            raise NoSuchMessage(queue_id)
        return self.body_files.get(queue_id)

    async def read_body(self, queue_id: str) -> bytes:
        await asyncio.sleep(0)
        self.body_reads.append(queue_id)
        if queue_id not in self.messages:
            raise NoSuchMessage(queue_id)
        return self.messages[queue_id].body

    async def record(
        self, outcomes: Sequence[RecipientOutcome], enqueue: Sequence[NewMessage] = ()
    ) -> list[str]:
        if self.record_gate is not None:
            await self.record_gate.wait()
        await asyncio.sleep(0)
        if self.fail_records:
            self.fail_records -= 1
            raise QueueError("injected record failure")
        self.record_calls.append(list(outcomes))
        touched: set[str] = set()
        for o in outcomes:
            r = self.rcpts.get(o.recipient_id)
            if r is None or r.state is not RecipientState.DELIVERING or r.lease_token != o.lease_token:
                self.fenced.append(o)
                continue
            self._apply(r, o)
            touched.add(r.queue_id)
        for message in enqueue:
            self.record_enqueued.append(message)
            self._add(message)
        return [qid for qid in sorted(touched) if self._complete(qid)]

    def _apply(self, r: _Rcpt, o: RecipientOutcome) -> None:
        r.attempts += 1
        r.lease_owner = r.lease_token = None
        r.lease_until = None
        out = o.outcome
        if isinstance(out, Delivered):
            r.state = RecipientState.DELIVERED
        elif isinstance(out, Deferred):
            r.state, r.next_attempt, r.last_error = RecipientState.DEFERRED, out.retry_at, out.reason
        else:
            r.state, r.last_error = RecipientState.FAILED, out.reason
        event = r.state.value
        self.messages[r.queue_id].history.append(HistoryEntry(o.at, r.new.address, event, ""))

    def _complete(self, queue_id: str) -> bool:
        rs = [r for r in self.rcpts.values() if r.queue_id == queue_id]
        if not all(r.state.is_final for r in rs):
            return False
        del self.messages[queue_id]
        for r in rs:
            del self.rcpts[r.id]
        return True

    async def renew_leases(self, owner: str, leases: Sequence[tuple[int, str]], *, until: float) -> list[int]:
        await asyncio.sleep(0)
        self.renew_calls.append(len(leases))
        lost = []
        for rid, token in leases:
            r = self.rcpts.get(rid)
            if (
                r is None
                or r.state is not RecipientState.DELIVERING
                or (r.lease_owner, r.lease_token) != (owner, token)
            ):
                lost.append(rid)
            elif r.lease_until is not None:
                r.lease_until = max(r.lease_until, until)
        return lost

    async def next_due(self, transport: Transport | None = None) -> float | None:
        await asyncio.sleep(0)
        times = [
            due
            for r in self.rcpts.values()
            if (due := r.due_at()) is not None
            and not self.messages[r.queue_id].held
            and (transport is None or r.new.transport is transport)
        ]
        return min(times, default=None)

    # -- the admin side (enough for the protocol) -----------------------------
    async def list_messages(self, filter: QueueFilter | None = None) -> list[QueuedMessageView]:
        return [self._view(qid) for qid in self.messages]

    async def get_message(self, queue_id: str) -> QueuedMessageView:
        if queue_id not in self.messages:
            raise NoSuchMessage(queue_id)
        return self._view(queue_id)

    def _view(self, queue_id: str) -> QueuedMessageView:
        m = self.messages[queue_id]
        rcpts = tuple(
            RecipientView(r.id, r.new.address, r.state, r.attempts, r.due_at(), r.last_error)
            for r in self.rcpts.values()
            if r.queue_id == queue_id
        )
        msg = m.message
        return QueuedMessageView(
            queue_id, msg.sender, len(m.body), msg.received_at, m.held, rcpts, history=tuple(m.history)
        )

    async def hold(self, queue_id: str, now: float) -> None:
        self.messages[queue_id].held = True

    async def release(self, queue_id: str, now: float) -> None:
        self.messages[queue_id].held = False

    async def retry(self, queue_id: str | None, now: float) -> int:
        touched = 0
        for r in self.rcpts.values():
            if r.state is RecipientState.DEFERRED and queue_id in (None, r.queue_id):
                r.next_attempt = now
                touched += 1
        return touched

    async def delete(self, queue_id: str, now: float) -> None:
        if self.messages.pop(queue_id, None) is None:
            raise NoSuchMessage(queue_id)
        for rid in [r.id for r in self.rcpts.values() if r.queue_id == queue_id]:
            del self.rcpts[rid]

    async def trace(self, key: str) -> list[TraceEvent]:
        m = self.messages.get(key)
        if m is None:
            return []
        return [TraceEvent(h.at, key, h.recipient, h.event, h.detail) for h in m.history]

    async def prune_history(self, before: float, *, limit: int) -> int:
        self.pruned_before.append(before)
        return 0  # completed messages are not kept here

    # -- test helpers ---------------------------------------------------------
    def recipient(self, address: str) -> _Rcpt:
        (r,) = [r for r in self.rcpts.values() if r.new.address == address]
        return r

    @property
    def empty(self) -> bool:
        return not self.messages


def local_message(
    queue_id: str,
    *recipients: str,
    received_at: float,
    sender: str = "sender@remote.test",
    body: bytes | None = None,
    mailboxes: Sequence[str] = (),
) -> NewMessage:
    """A message for LOCAL recipients; each recipient's mailbox is itself
    unless `mailboxes` names them."""
    boxes = list(mailboxes) or list(recipients)
    content = (
        body
        if body is not None
        else (f"Message-ID: <{queue_id}@test>\r\nSubject: test\r\n\r\nhello\r\n.. dots\r\n".encode())
    )
    rcpts = tuple(
        NewRecipient(address=a, transport=Transport.LOCAL, domain=a.rpartition("@")[2].lower(), mailbox=box)
        for a, box in zip(recipients, boxes, strict=True)
    )
    return NewMessage(
        queue_id=queue_id, sender=sender, recipients=rcpts, body=InlineBody(content), received_at=received_at
    )
