"""What one outbound attempt means for each of its recipients: pure decisions
(STYLE habit 8). No I/O, no clock, no asyncio: the scheduler passes `now` in,
carries the Verdicts out (store.record, DSNs, the mail log).

Rules:
- a 2xx for a recipient: Delivered; a success report only when the sender
  asked (NOTIFY=SUCCESS) and the next hop cannot pass the request on (no DSN
  extension: "relayed", RFC 3461 §5.2.2) or the mail reached its mailbox here
  (LMTP: "delivered");
- a 5xx: Failed, and a failure report unless NOTIFY says otherwise;
- a 4xx, a connection that failed, a DNS lookup that failed temporarily:
  Deferred on the retry schedule (never sooner than a destination's backoff),
  and Failed with 4.4.7 once the message is older than `give_up_after`;
  one delay report when the message has waited `warn_after` (RFC 3461 §4.1:
  absent NOTIFY, Gannet sends it; NOTIFY without DELAY suppresses it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gannet.config import DeliveryConfig
from gannet.delivery.dsn import Action, RecipientReport, should_notify
from gannet.delivery.retry import defer_or_expire
from gannet.queue.model import Claim, ClaimedRecipient, Deferred, Delivered, Failed, Outcome
from gannet.smtp.replies import ENHANCED_STATUS


@dataclass(frozen=True, slots=True)
class Verdict:
    """One recipient after one attempt: what the store records, and the DSN
    line to send about it (None: no report)."""

    rcpt: ClaimedRecipient
    outcome: Outcome
    report: RecipientReport | None = None


def status_of(text: str, default: str) -> str:
    """The enhanced status code in a reason ("550 5.1.1 no such user" → "5.1.1");
    RFC 3463 §2: class "." 1-3 digits "." 1-3 digits."""
    for word in text.split(" ", 2)[:2]:
        if ENHANCED_STATUS.fullmatch(word):
            return word
    return default


def verdict(
    claim: Claim,
    rcpt: ClaimedRecipient,
    outcome: Outcome,
    *,
    now: float,
    delivery: DeliveryConfig,
    remote_mta: str = "",
    next_hop_has_dsn: bool = False,
    final: bool = False,
) -> Verdict:
    """`outcome` with the report it calls for (see the module docstring).
    `final`: the message reached its mailbox (LMTP, Maildir), not another MTA."""
    if isinstance(outcome, Delivered):
        action = Action.DELIVERED if final else Action.RELAYED
        if not should_notify(rcpt.notify, action) or (next_hop_has_dsn and not final):
            return Verdict(rcpt, outcome)
        return Verdict(rcpt, outcome, _report(rcpt, action, outcome.detail, "2.0.0", now, remote_mta))
    if isinstance(outcome, Failed):
        if not should_notify(rcpt.notify, Action.FAILED):
            return Verdict(rcpt, outcome)
        return Verdict(rcpt, outcome, _report(rcpt, Action.FAILED, outcome.reason, "5.0.0", now, remote_mta))
    warn = (
        not rcpt.warned
        and now - claim.received_at >= delivery.warn_after
        and should_notify(rcpt.notify, Action.DELAYED)
    )
    if not warn:
        return Verdict(rcpt, outcome)
    report = _report(rcpt, Action.DELAYED, outcome.reason, "4.0.0", now, remote_mta)
    report = replace(report, will_retry_until=claim.received_at + delivery.give_up_after)
    return Verdict(rcpt, replace(outcome, warned=True), report)


def _report(
    rcpt: ClaimedRecipient, action: Action, text: str, default: str, now: float, remote_mta: str
) -> RecipientReport:
    return RecipientReport(
        final_recipient=rcpt.address,
        action=action,
        status=status_of(text, default),
        original_recipient=rcpt.orcpt,
        diagnostic=text,
        remote_mta=remote_mta,
        last_attempt=now,
    )


def temporary_outcome(
    claim: Claim,
    rcpt: ClaimedRecipient,
    reason: str,
    *,
    now: float,
    delivery: DeliveryConfig,
    not_before: float = 0.0,
) -> Deferred | Failed:
    """A temporary failure: Deferred on the schedule, or Failed (4.4.7) past `give_up_after`."""
    when, why = defer_or_expire(
        reason,
        attempts=rcpt.attempts + 1,
        received_at=claim.received_at,
        now=now,
        schedule=delivery.retry,
        give_up_after=delivery.give_up_after,
        not_before=not_before,
    )
    return Failed(why) if when is None else Deferred(why, when)


def temporary(
    claim: Claim,
    rcpt: ClaimedRecipient,
    reason: str,
    *,
    now: float,
    delivery: DeliveryConfig,
    remote_mta: str = "",
    not_before: float = 0.0,
) -> Verdict:
    outcome = temporary_outcome(claim, rcpt, reason, now=now, delivery=delivery, not_before=not_before)
    return verdict(claim, rcpt, outcome, now=now, delivery=delivery, remote_mta=remote_mta)


def failed(
    claim: Claim,
    rcpt: ClaimedRecipient,
    reason: str,
    *,
    now: float,
    delivery: DeliveryConfig,
    remote_mta: str = "",
) -> Verdict:
    return verdict(claim, rcpt, Failed(reason), now=now, delivery=delivery, remote_mta=remote_mta)


def by_reply(
    claim: Claim,
    rcpt: ClaimedRecipient,
    code: int,
    text: str,
    *,
    now: float,
    delivery: DeliveryConfig,
    remote_mta: str,
    next_hop_has_dsn: bool,
    final: bool = False,
) -> Verdict:
    """The Verdict for a recipient the next hop answered with `code` (`text` is
    the whole reason, reply included, as it goes to logs and DSNs)."""
    outcome: Outcome
    if code < 400:
        outcome = Delivered(text)
    elif code < 500:
        outcome = temporary_outcome(claim, rcpt, text, now=now, delivery=delivery)
    else:
        outcome = Failed(text)
    return verdict(
        claim, rcpt, outcome, now=now, delivery=delivery, remote_mta=remote_mta,
        next_hop_has_dsn=next_hop_has_dsn, final=final,
    )  # fmt: skip


def destination_backoff(failures: int, schedule: tuple[float, ...]) -> float:
    """How long a destination that failed `failures` times in a row (1-based) is
    left alone: the retry schedule again, so a dead destination is probed about
    as often as its mail is retried."""
    index = min(max(failures, 1), len(schedule)) - 1
    return float(schedule[index])
