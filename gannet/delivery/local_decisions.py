"""The decisions of local delivery, as pure functions (STYLE habit 8): what an
attempt's result means for the recipient, which directories a batch must
fsync, and how long the loop may sleep. No I/O, no clock, no asyncio: the
loop in `local.py` passes `now` in and carries the answers out.

Results of one Maildir write attempt:
  Written(path)      staged in new/; delivered once new/ is fsync'd
  TempError(reason)  an OSError or an unreadable body: retried by the schedule
  BadMailbox(name)   the mailbox cannot be a path: fails at once (5.1.3)

A TempError never drops a recipient: it is Deferred until the message is
older than `delivery.give_up_after`, then Failed with 4.4.7 (and bounced).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gannet.config import DeliveryConfig
from gannet.delivery.retry import defer_or_expire
from gannet.queue.model import Deferred, Delivered, Failed, Outcome

IDLE_CAP = 30.0  # never sleep longer: a missed wake() or a clock jump costs at most this
IDLE_FLOOR = 0.1  # next_due <= now yet nothing claimed (a race): retry soon, do not spin


@dataclass(frozen=True, slots=True)
class Written:
    """The message is in `path` (in new/; durable once new/ is fsync'd)."""

    path: Path


@dataclass(frozen=True, slots=True)
class TempError:
    """The write failed and may succeed later (an OSError, an unreadable body)."""

    reason: str  # with its enhanced status code, "4.3.0 ..."


@dataclass(frozen=True, slots=True)
class BadMailbox:
    """The mailbox name cannot be a Maildir path; no retry will change that."""

    mailbox: str


WriteResult = Written | TempError | BadMailbox


def decide_outcome(
    result: WriteResult,
    *,
    attempts: int,
    received_at: float,
    now: float,
    delivery: DeliveryConfig,
) -> Outcome:
    """The Outcome of one attempt. `attempts` counts the attempts made before it."""
    if isinstance(result, Written):
        return Delivered(detail=str(result.path))
    if isinstance(result, BadMailbox):
        return Failed("5.1.3 bad mailbox name")
    when, reason = defer_or_expire(
        result.reason,
        attempts=attempts + 1,
        received_at=received_at,
        now=now,
        schedule=delivery.retry,
        give_up_after=delivery.give_up_after,
    )
    return Failed(reason) if when is None else Deferred(reason=reason, retry_at=when)


def dirs_to_sync(results: Iterable[WriteResult]) -> list[Path]:
    """The new/ directories to fsync after a batch was staged, each once."""
    return list(dict.fromkeys(r.path.parent for r in results if isinstance(r, Written)))


def apply_sync_errors(result: WriteResult, errors: Mapping[Path, str]) -> WriteResult:
    """A staged file whose new/ could not be fsync'd is not delivered: its
    rename may not survive a crash, so it is retried (maybe a duplicate)."""
    if isinstance(result, Written) and result.path.parent in errors:
        return TempError(errors[result.path.parent])
    return result


def idle_delay(
    now: float, next_due: float | None, *, cap: float = IDLE_CAP, floor: float = IDLE_FLOOR
) -> float:
    """How long to sleep when a claim found nothing (wake() cuts it short)."""
    if next_due is None:
        return cap
    return min(cap, max(floor, next_due - now))
