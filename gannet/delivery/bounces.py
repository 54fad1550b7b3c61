"""Bounces: turns the report lines of one attempt into DSN messages to enqueue
(with the attempt's outcomes, in the same store transaction), addressed and
routed like any other mail.

The report itself (RFC 3464 format) is `dsn.build_report`'s; who receives it
is `dsn.report_recipient`'s rule: the sender; for mail from the null sender
(a bounce that failed), postmaster (CONTRACT.md: `postmaster@` the first
local domain); never a report about such a double bounce. A report recipient
in a local domain is resolved through the recipient table (aliases,
accounts); if it does not exist, postmaster gets the report instead.

Must never: raise into the delivery path (a report that cannot be built is
logged and skipped: the outcomes are still recorded), or read the whole of a
large body when only its headers are returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gannet.delivery.dsn import (
    Action,
    OriginalMessage,
    RecipientReport,
    build_report,
    is_double_bounce,
    report_recipient,
)
from gannet.policy.recipients import RecipientTable
from gannet.queue.ids import new_queue_id
from gannet.queue.model import Claim, InlineBody, NewMessage, NewRecipient
from gannet.queue.store import QueueStore

log = logging.getLogger("gannet.delivery.bounces")

MAX_RETURNED = 10 * 1024 * 1024  # larger originals are returned as headers only
HEADER_READ = 256 * 1024  # how much of a large body is read to find its headers


class Bounces:
    """Builds DSN NewMessages. One per claim and call (all its reported recipients)."""

    def __init__(
        self,
        store: QueueStore,
        *,
        hostname: str,
        table: Callable[[], RecipientTable],
        max_returned: int = MAX_RETURNED,
    ) -> None:
        self._store = store
        self._hostname = hostname
        self._table = table
        self._max_returned = max_returned

    async def reports(
        self, claim: Claim, reports: Sequence[RecipientReport], *, now: float, content: bytes | None = None
    ) -> list[NewMessage]:
        """The DSN for `reports` about `claim` (none when nobody is to be told).
        `content`: the message as stored, when the caller has it in memory."""
        if not reports:
            return []
        try:
            return await self._build(claim, reports, now, content)
        except Exception:
            log.exception("%s: building the delivery status notification failed", claim.queue_id)
            return []

    async def _build(
        self, claim: Claim, reports: Sequence[RecipientReport], now: float, content: bytes | None
    ) -> list[NewMessage]:
        table = self._table()
        postmaster = table.postmaster()
        to = report_recipient(
            claim.sender,
            postmaster,
            is_bounce_to_postmaster=is_double_bounce(
                claim.sender, (r.final_recipient for r in reports), postmaster
            ),
        )
        if to is None:
            kinds = ", ".join(sorted({r.action.value for r in reports}))
            log.warning("%s: no report sent (%s) about a double bounce", claim.queue_id, kinds)
            return []
        destinations = table.resolve(to)
        if destinations is None and postmaster is not None and to != postmaster:
            log.warning("%s: report recipient <%s> does not exist; telling postmaster", claim.queue_id, to)
            to, destinations = postmaster, table.resolve(postmaster)
        if not destinations:
            log.error("%s: nobody to send the report to (<%s> does not exist)", claim.queue_id, to)
            return []
        if content is None:
            content = await self._content(claim, reports)
        original = OriginalMessage(
            queue_id=claim.queue_id,
            sender=claim.sender,
            received_at=claim.received_at,
            envid=claim.envid,
            ret=claim.ret,
            smtputf8=claim.smtputf8,
            content=content,
            size=claim.size if len(content) < claim.size else None,  # headers only: say how large it was
        )
        queue_id = new_queue_id()
        report = build_report(
            original,
            reports,
            reporting_mta=self._hostname,
            to=to,
            now=now,
            message_id=f"{queue_id}.dsn@{self._hostname}",
            max_returned=self._max_returned,
        )
        recipients = tuple(
            NewRecipient(
                d.address, d.transport, d.domain, mailbox=d.mailbox, original=to if d.address != to else ""
            )
            for d in destinations
        )
        return [
            NewMessage(
                queue_id=queue_id,
                sender="",  # RFC 3464 §2 / RFC 5321 §4.5.5: reports come from the null sender
                recipients=recipients,
                body=InlineBody(report.content),
                received_at=now,
                body_8bit=report.body_8bit,
                smtputf8=report.smtputf8,
                client="gannet (delivery status notification)",
                message_id=f"<{queue_id}.dsn@{self._hostname}>",
                report_for=claim.queue_id,
            )
        ]

    async def _content(self, claim: Claim, reports: Sequence[RecipientReport]) -> bytes:
        """The original as far as the report needs it: whole when it may be
        returned, else the start of it (headers)."""
        whole = claim.ret == "FULL" or (claim.ret is None and any(r.action is Action.FAILED for r in reports))
        if whole and claim.size <= self._max_returned:
            return await self._store.read_body(claim.queue_id)
        path = await self._store.body_file(claim.queue_id)
        if path is None:
            return await self._store.read_body(claim.queue_id)
        with open(path, "rb") as f:  # small, bounded read
            head = f.read(HEADER_READ)
        end = head.find(b"\r\n\r\n")
        return head if end < 0 else head[: end + 4]
