"""The pure rules of one outbound attempt (gannet/delivery/attempts.py), as tables:
the enhanced code in a reason, which outcomes call for which report (NOTIFY,
final or relayed, the next hop's DSN support, warn_after), the retry schedule
with a destination's backoff and the expiry, the reply classes, and a
destination's backoff. No loop, no store: facts in, Verdict out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gannet.config import DeliveryConfig
from gannet.delivery import attempts
from gannet.delivery.attempts import (
    by_reply,
    destination_backoff,
    status_of,
    temporary,
    temporary_outcome,
    verdict,
)
from gannet.delivery.dsn import Action
from gannet.queue.model import Claim, ClaimedRecipient, Deferred, Delivered, Failed, Outcome, Transport
from gannet.smtp.events import Notify

T0 = 1_800_000_000.0
HOUR = 3600.0
DAY = 86400.0
CONFIG = DeliveryConfig(retry=(60.0, 300.0, 900.0), give_up_after=5 * DAY, warn_after=4 * HOUR)

SUCCESS = Notify.SUCCESS.value
FAILURE = Notify.FAILURE.value
DELAY = Notify.DELAY.value
NEVER = Notify.NEVER.value


def rcpt(
    notify: int | None = None, *, attempts: int = 0, warned: bool = False, orcpt: str | None = None
) -> ClaimedRecipient:
    return ClaimedRecipient(
        recipient_id=7,
        address="bob@y.test",
        transport=Transport.SMTP,
        domain="y.test",
        mailbox="",
        original="",
        orcpt=orcpt,
        notify=notify,
        attempts=attempts,
        lease_token="tok",
        warned=warned,
    )


def claim(received_at: float = T0) -> Claim:
    return Claim(
        queue_id="QID1",
        sender="alice@x.test",
        received_at=received_at,
        envid=None,
        ret=None,
        smtputf8=False,
        body_8bit=False,
        size=100,
        recipients=(rcpt(),),
        lease_until=received_at + 3600,
    )


def judge(
    outcome: Outcome,
    r: ClaimedRecipient | None = None,
    *,
    received_at: float = T0,
    now: float = T0,
    final: bool = False,
    next_hop_has_dsn: bool = False,
) -> attempts.Verdict:
    return verdict(
        claim(received_at),
        r or rcpt(),
        outcome,
        now=now,
        delivery=CONFIG,
        remote_mta="mx.y.test",
        next_hop_has_dsn=next_hop_has_dsn,
        final=final,
    )


# -- status_of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("550 5.1.1 <bob@y.test>: no such user", "5.0.0", "5.1.1"),
        ("5.1.1 no such user", "5.0.0", "5.1.1"),
        ("451 4.4.1 connect to mx.y.test: Connection refused", "4.0.0", "4.4.1"),
        ("250 2.0.0 queued as X", "2.0.0", "2.0.0"),
        ("250 2.6.0 message accepted", "2.0.0", "2.6.0"),
        ("4.4.7 message expired after 5 days; last error: 550 5.1.1 x", "5.0.0", "4.4.7"),
        ("250 ok", "2.0.0", "2.0.0"),
        ("", "4.0.0", "4.0.0"),
        ("550 user unknown 5.1.1", "5.0.0", "5.0.0"),  # only the first two words count
        ("550 5.1 short", "5.0.0", "5.0.0"),
        ("550 6.1.1 no such class", "5.0.0", "5.0.0"),
        ("550 x.y.z letters", "5.0.0", "5.0.0"),
        ("550-5.1.1 a continuation line", "5.0.0", "5.0.0"),
        ("550 5.1.1. trailing dot", "5.0.0", "5.0.0"),
    ],
)
def test_status_of(text: str, default: str, expected: str) -> None:
    assert status_of(text, default) == expected


@pytest.mark.parametrize("text", ["550 5..1 odd", "550 5.1.1234 long detail"])
def test_status_of_rejects_malformed_codes(text: str) -> None:
    assert status_of(text, "5.0.0") == "5.0.0"


# -- verdict: Delivered -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "final", "has_dsn", "action"),
    [
        (None, False, False, None),  # no NOTIFY: successes are not reported
        (None, True, False, None),
        (None, False, True, None),
        (SUCCESS, False, False, Action.RELAYED),  # the next hop cannot pass the request on
        (SUCCESS, False, True, None),  # it can: it reports, not us
        (SUCCESS, True, False, Action.DELIVERED),  # final (LMTP): delivered, whatever the hop says
        (SUCCESS, True, True, Action.DELIVERED),
        (SUCCESS | FAILURE, False, False, Action.RELAYED),
        (SUCCESS | FAILURE | DELAY, True, False, Action.DELIVERED),
        (SUCCESS | FAILURE, False, True, None),
        (FAILURE, False, False, None),
        (FAILURE, True, False, None),
        (DELAY, True, False, None),
        (NEVER, False, False, None),
        (NEVER, True, False, None),
        (NEVER | SUCCESS, True, False, None),  # NEVER wins over anything beside it
    ],
)
def test_delivered_reports(notify: int | None, final: bool, has_dsn: bool, action: Action | None) -> None:
    outcome = Delivered("250 2.6.0 queued as ABC")
    v = judge(outcome, rcpt(notify, orcpt="rfc822;Bob@y.test"), now=T0 + 5, final=final,
              next_hop_has_dsn=has_dsn)
    assert v.outcome == outcome  # a report never changes what is recorded
    if action is None:
        assert v.report is None
        return
    assert v.report is not None
    assert v.report.action is action
    assert v.report.final_recipient == "bob@y.test"
    assert v.report.original_recipient == "rfc822;Bob@y.test"
    assert v.report.status == "2.6.0"
    assert v.report.diagnostic == "250 2.6.0 queued as ABC"
    assert v.report.remote_mta == "mx.y.test"
    assert v.report.last_attempt == T0 + 5
    assert v.report.will_retry_until is None


def test_a_success_report_without_a_code_says_2_0_0() -> None:
    v = judge(Delivered("250 ok"), rcpt(SUCCESS))
    assert v.report is not None and v.report.status == "2.0.0"


# -- verdict: Failed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "reported"),
    [
        (None, True),
        (FAILURE, True),
        (FAILURE | DELAY, True),
        (SUCCESS | FAILURE, True),
        (SUCCESS, False),
        (DELAY, False),
        (SUCCESS | DELAY, False),
        (NEVER, False),
    ],
)
def test_failed_reports(notify: int | None, reported: bool) -> None:
    outcome = Failed("550 5.1.1 <bob@y.test>: no such user (in reply to RCPT TO command)")
    v = judge(outcome, rcpt(notify), now=T0 + 9)
    assert v.outcome == outcome
    if not reported:
        assert v.report is None
        return
    assert v.report is not None
    assert v.report.action is Action.FAILED
    assert v.report.status == "5.1.1"
    assert v.report.diagnostic == outcome.reason
    assert v.report.remote_mta == "mx.y.test"
    assert v.report.last_attempt == T0 + 9


def test_a_failure_without_a_code_says_5_0_0() -> None:
    v = attempts.failed(claim(), rcpt(), "no route", now=T0, delivery=CONFIG)
    assert v.outcome == Failed("no route")
    assert v.report is not None and v.report.status == "5.0.0" and v.report.remote_mta == ""


# -- verdict: Deferred ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waited", "notify", "warned", "reported"),
    [
        (0.0, None, False, False),  # fresh: nothing to tell yet
        (4 * HOUR - 1, None, False, False),
        (4 * HOUR, None, False, True),  # warn_after reached exactly
        (2 * DAY, None, False, True),
        (2 * DAY, None, True, False),  # one delay report, never a second
        (2 * DAY, DELAY, False, True),
        (2 * DAY, DELAY | FAILURE, False, True),
        (2 * DAY, FAILURE, False, False),  # NOTIFY without DELAY suppresses it
        (2 * DAY, SUCCESS | FAILURE, False, False),
        (2 * DAY, SUCCESS, False, False),
        (2 * DAY, NEVER, False, False),
    ],
)
def test_deferred_reports(waited: float, notify: int | None, warned: bool, reported: bool) -> None:
    now = T0 + waited
    outcome = Deferred("451 4.3.0 try later (in reply to RCPT TO command)", now + 60)
    v = judge(outcome, rcpt(notify, warned=warned), now=now)
    assert isinstance(v.outcome, Deferred)
    # The outcome is marked warned exactly when this verdict carries the delay report.
    assert v.outcome.warned is reported
    assert v.outcome == replace(outcome, warned=reported)
    if not reported:
        assert v.report is None
        return
    assert v.report is not None
    assert v.report.action is Action.DELAYED
    assert v.report.status == "4.3.0"
    assert v.report.diagnostic == outcome.reason
    assert v.report.will_retry_until == T0 + CONFIG.give_up_after  # received_at + give_up_after
    assert v.report.last_attempt == now


def test_a_delay_report_without_a_code_says_4_0_0() -> None:
    v = judge(Deferred("connection went away", T0 + DAY + 60), now=T0 + DAY)
    assert v.report is not None and v.report.status == "4.0.0"


# -- temporary_outcome ------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts_made", "delay"), [(0, 60.0), (1, 300.0), (2, 900.0), (9, 900.0)])
def test_temporary_follows_the_schedule(attempts_made: int, delay: float) -> None:
    out = temporary_outcome(claim(), rcpt(attempts=attempts_made), "451 4.3.0 busy", now=T0 + 10,
                            delivery=CONFIG)
    assert out == Deferred("451 4.3.0 busy", T0 + 10 + delay)


@pytest.mark.parametrize(
    ("not_before", "retry_at"),
    [
        (0.0, T0 + 60),
        (T0 + 30, T0 + 60),  # sooner than the schedule: the schedule wins
        (T0 + 60, T0 + 60),
        (T0 + 3600, T0 + 3600),  # a destination's backoff pushes it later
    ],
)
def test_not_before_pushes_later_never_sooner(not_before: float, retry_at: float) -> None:
    out = temporary_outcome(claim(), rcpt(), "4.4.1 refused", now=T0, delivery=CONFIG, not_before=not_before)
    assert out == Deferred("4.4.1 refused", retry_at)


def test_the_last_retry_is_moved_to_the_expiry_time() -> None:
    received = T0 - CONFIG.give_up_after + 30
    out = temporary_outcome(claim(received), rcpt(attempts=5), "4.4.1 refused", now=T0, delivery=CONFIG)
    assert out == Deferred("4.4.1 refused", T0 + 30)


@pytest.mark.parametrize("not_before", [0.0, T0 + DAY])
def test_a_temporary_failure_past_give_up_after_fails_with_4_4_7(not_before: float) -> None:
    received = T0 - CONFIG.give_up_after
    out = temporary_outcome(claim(received), rcpt(attempts=40), "451 4.3.0 busy", now=T0, delivery=CONFIG,
                            not_before=not_before)
    assert out == Failed("4.4.7 message expired after 5 days; last error: 451 4.3.0 busy")


def test_temporary_verdict_of_an_expired_message_reports_the_failure() -> None:
    v = temporary(claim(T0 - 6 * DAY), rcpt(), "4.4.1 refused", now=T0, delivery=CONFIG,
                  remote_mta="mx.y.test")
    assert isinstance(v.outcome, Failed)
    assert v.report is not None
    assert v.report.action is Action.FAILED
    assert v.report.status == "4.4.7"
    assert v.report.diagnostic.endswith("last error: 4.4.1 refused")


def test_temporary_verdict_warns_once_the_message_is_old_enough() -> None:
    v = temporary(claim(T0 - 5 * HOUR), rcpt(attempts=3), "4.4.1 refused", now=T0, delivery=CONFIG)
    assert v.outcome == Deferred("4.4.1 refused", T0 + 900, warned=True)
    assert v.report is not None and v.report.action is Action.DELAYED


# -- by_reply ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (250, "250 2.0.0 queued as X", Delivered("250 2.0.0 queued as X")),
        (251, "251 2.1.5 forwarded", Delivered("251 2.1.5 forwarded")),
        (421, "421 4.4.2 closing", Deferred("421 4.4.2 closing", T0 + 60)),
        (451, "451 4.7.1 greylisted", Deferred("451 4.7.1 greylisted", T0 + 60)),
        (499, "499 odd", Deferred("499 odd", T0 + 60)),
        (500, "500 5.5.1 what", Failed("500 5.5.1 what")),
        (550, "550 5.1.1 no such user", Failed("550 5.1.1 no such user")),
        (554, "554 5.7.1 rejected", Failed("554 5.7.1 rejected")),
    ],
)
def test_by_reply_classes(code: int, text: str, expected: Outcome) -> None:
    v = by_reply(claim(), rcpt(), code, text, now=T0, delivery=CONFIG, remote_mta="mx.y.test",
                 next_hop_has_dsn=False)
    assert v.outcome == expected
    assert (v.report is None) is isinstance(expected, Delivered | Deferred)  # no NOTIFY, a fresh message


def test_by_reply_4xx_of_an_expired_message_fails() -> None:
    v = by_reply(claim(T0 - 5 * DAY), rcpt(), 451, "451 4.7.1 greylisted", now=T0, delivery=CONFIG,
                 remote_mta="mx.y.test", next_hop_has_dsn=True)
    assert v.outcome == Failed("4.4.7 message expired after 5 days; last error: 451 4.7.1 greylisted")
    assert v.report is not None and v.report.status == "4.4.7"


def test_by_reply_success_reports_follow_final_and_the_hops_dsn() -> None:
    def action(final: bool, dsn: bool) -> Action | None:
        v = by_reply(claim(), rcpt(SUCCESS), 250, "250 2.0.0 ok", now=T0, delivery=CONFIG,
                     remote_mta="lmtp", next_hop_has_dsn=dsn, final=final)
        return None if v.report is None else v.report.action

    assert action(final=True, dsn=True) is Action.DELIVERED
    assert action(final=False, dsn=False) is Action.RELAYED
    assert action(final=False, dsn=True) is None


# -- destination_backoff ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "backoff"), [(0, 60.0), (1, 60.0), (2, 300.0), (3, 900.0), (4, 900.0), (1000, 900.0)]
)
def test_destination_backoff_follows_the_retry_schedule(failures: int, backoff: float) -> None:
    result = destination_backoff(failures, CONFIG.retry)
    assert result == backoff and isinstance(result, float)
