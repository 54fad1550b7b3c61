"""Retry arithmetic: schedule lookup, expiry, and the clamp to the expiry time."""

from __future__ import annotations

import pytest

from gannet.delivery.retry import is_expired, next_retry, retry_at

SCHEDULE = (60.0, 300.0, 900.0)
DAY = 86400.0


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(0, 60.0), (1, 60.0), (2, 300.0), (3, 900.0), (4, 900.0), (1000, 900.0)],
)
def test_next_retry_walks_the_schedule_then_keeps_the_last_interval(
    attempts: int, delay: float
) -> None:
    assert next_retry(attempts, SCHEDULE) == delay


def test_next_retry_needs_a_schedule() -> None:
    with pytest.raises(ValueError):
        next_retry(1, ())


def test_next_retry_never_goes_backwards_in_time() -> None:
    assert next_retry(1, (-5.0,)) == 0.0


def test_is_expired_at_exactly_give_up_after() -> None:
    assert not is_expired(1000.0, 1000.0 + 5 * DAY - 0.001, 5 * DAY)
    assert is_expired(1000.0, 1000.0 + 5 * DAY, 5 * DAY)
    assert is_expired(1000.0, 1000.0 + 6 * DAY, 5 * DAY)


def test_retry_at_is_now_plus_the_delay_for_this_attempt() -> None:
    assert retry_at(1, 0.0, 100.0, schedule=SCHEDULE, give_up_after=DAY) == 160.0
    assert retry_at(2, 0.0, 100.0, schedule=SCHEDULE, give_up_after=DAY) == 400.0


def test_retry_at_is_moved_forward_to_the_expiry_time() -> None:
    # 30 s before expiry, a 900 s wait would overshoot: try once more at expiry.
    now = DAY - 30.0
    assert retry_at(5, 0.0, now, schedule=SCHEDULE, give_up_after=DAY) == DAY


def test_retry_at_gives_up_once_expired() -> None:
    assert retry_at(5, 0.0, DAY, schedule=SCHEDULE, give_up_after=DAY) is None
