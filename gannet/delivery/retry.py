"""Retry arithmetic for deferred recipients: pure functions of the attempt
count, the configured schedule and `now` (no clock, no I/O).

The schedule is `delivery.retry` from the config: the delay after the 1st,
2nd, … failed attempt; past its end the last interval repeats (Postfix's
maximal_backoff_time, without the doubling). A message older than
`delivery.give_up_after` is not retried again: its recipients fail and the
sender gets a DSN. Any delivery agent (local, remote) may call these.
"""

from __future__ import annotations

from collections.abc import Sequence


def next_retry(attempts: int, schedule: Sequence[float]) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
    if not schedule:
        raise ValueError("the retry schedule is empty")
    index = min(max(attempts, 1), len(schedule)) - 1
    return max(0.0, float(schedule[index]))


def is_expired(received_at: float, now: float, give_up_after: float) -> bool:
    """True once a message received at `received_at` has waited `give_up_after`."""
    return now - received_at >= give_up_after


def retry_at(
    attempts: int,
    received_at: float,
    now: float,
    *,
    schedule: Sequence[float],
    give_up_after: float,
) -> float | None:
    """When to try again after the `attempts`-th failure, or None to give up.

    The retry is moved forward to the expiry time when the schedule would
    overshoot it, so a message gets one last attempt at `give_up_after` and
    bounces then, not up to one retry interval later.
    """
    if is_expired(received_at, now, give_up_after):
        return None
    return min(now + next_retry(attempts, schedule), received_at + give_up_after)


def defer_or_expire(
    reason: str,
    *,
    attempts: int,
    received_at: float,
    now: float,
    schedule: Sequence[float],
    give_up_after: float,
    not_before: float = 0.0,
) -> tuple[float | None, str]:
    """After a temporary failure (`attempts` counts it): (when to retry, reason), or
    (None, expiry reason) when the message has waited too long and must bounce
    with 4.4.7 (RFC 3463: "delivery time expired"). `not_before` pushes the retry
    no sooner than a destination's backoff."""
    when = retry_at(attempts, received_at, now, schedule=schedule, give_up_after=give_up_after)
    if when is None:
        days = give_up_after / 86400
        return None, f"4.4.7 message expired after {days:g} days; last error: {reason}"
    return max(when, not_before), reason
