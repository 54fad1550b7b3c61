"""Delivery status notifications: the decisions, not the bytes.

Who gets a report, whether a recipient's NOTIFY asks for one, and how much of
the original goes back with it. `gannet.delivery.dsn` builds the report itself
from these answers. Pure functions of their arguments: no I/O, no clock.

The loop rule (RFC 5321 §4.5.5)
    A DSN is sent with the null reverse-path (MAIL FROM:<>), so that a DSN that
    cannot be delivered is never answered with another DSN to its sender. One
    exception: when a message from the null sender (a bounce) fails, the
    postmaster gets a report once (a "double bounce", CONTRACT.md). A report
    about that double bounce is never sent: it goes nowhere (the log keeps it).
    `report_recipient` is the single place that applies this rule.

What goes back (RFC 3461 §4.3)
    RET=HDRS returns the header section only. RET=FULL asks for the whole
    message in a *failure* report; RET says nothing about delay and success
    reports, and they carry the headers only whatever RET says (as Postfix's
    delay and success notices do): the sender wrote the message, a "your mail
    is late" or "your mail arrived" notice does not need to mail it back.
    Without RET the choice is ours: the whole message for failures (the sender
    may want to resend it), the headers for the rest. A message larger than
    the caller's limit comes back as its headers, and a header section larger
    than the limit does not come back at all; the report's text says which.

Who may call: the delivery agents (local, remote) and the scheduler, when an
attempt ends in a failure, a delay past `delivery.warn_after`, or a success
that the recipient's NOTIFY asked about.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from gannet.smtp.events import Notify


class Action(enum.Enum):
    """RFC 3464 §2.3.3 action-value: what happened to one recipient."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"  # handed to a system that will not send success DSNs itself
    EXPANDED = "expanded"  # delivered, then forwarded to several addresses (an alias or list)

    @property
    def is_success(self) -> bool:
        return self in _SUCCESS


_SUCCESS = frozenset({Action.DELIVERED, Action.RELAYED, Action.EXPANDED})

# Most severe first: a report that mixes kinds is titled and returned by the worst one.
_SEVERITY = (Action.FAILED, Action.DELAYED, Action.DELIVERED, Action.RELAYED, Action.EXPANDED)

SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.DELIVERED: "Successful Mail Delivery Report",
    Action.RELAYED: "Successful Mail Delivery Report",
    Action.EXPANDED: "Successful Mail Delivery Report",
}


class Returned(enum.Enum):
    """How much of the original message a report carries."""

    FULL = "full"  # the whole message (message/rfc822 or message/global)
    HEADERS = "headers"  # the header section, because RET or the report kind says so
    HEADERS_TOO_BIG = "headers-too-big"  # the header section, the message exceeds the limit
    NOTHING_TOO_BIG = "nothing-too-big"  # not even the header section fits under the limit


def should_notify(notify: int | None, action: Action) -> bool:
    """RFC 3461 §4.1: does this recipient's NOTIFY ask for a report of `action`?

    `notify` is the stored `gannet.smtp.Notify` value; None means NOTIFY was
    not given, and then failures and delays are reported, successes are not.
    NEVER (alone, or wrongly combined with other words) means no report at
    all, and so does an explicit empty set (0, which the parser never stores).
    Otherwise only the named kinds: FAILURE for failed, DELAY for delayed,
    SUCCESS for delivered, relayed and expanded.
    """
    if notify is None:
        return action in (Action.FAILED, Action.DELAYED)
    if notify & Notify.NEVER.value:
        return False
    if action is Action.FAILED:
        wanted = Notify.FAILURE
    elif action is Action.DELAYED:
        wanted = Notify.DELAY
    else:
        wanted = Notify.SUCCESS
    return bool(notify & wanted.value)


def report_recipient(sender: str, postmaster: str | None, *, is_bounce_to_postmaster: bool) -> str | None:
    """Where a report about a message goes, or None when it must not be sent.

    - A message with a sender: to the sender.
    - A message from the null sender (a bounce or other DSN that failed): to
      `postmaster`, once: the "double bounce".
    - A double bounce itself (`is_bounce_to_postmaster`, see
      `is_double_bounce`), or a bounce when no postmaster is configured
      (None or ""): nobody. Reporting on it could only loop.
    """
    if is_bounce_to_postmaster:
        return None
    if sender:
        return sender
    return postmaster or None


def is_double_bounce(sender: str, recipients: Iterable[str], postmaster: str | None) -> bool:
    """True for a null-sender message addressed to the postmaster only.

    That is what a double bounce looks like in the queue. It also matches an
    ordinary bounce of mail the postmaster sent, and rightly so: a report about
    its failure would go to the postmaster again, which is the loop to avoid.
    """
    if sender or not postmaster:
        return False
    wanted = postmaster.lower()
    addresses = [address.lower() for address in recipients]
    return bool(addresses) and all(address == wanted for address in addresses)


def worst_action(actions: Iterable[Action]) -> Action:
    """The most severe action: failed, then delayed, then the successes."""
    present = set(actions)
    for action in _SEVERITY:
        if action in present:
            return action
    raise ValueError("a report needs at least one recipient")


def returned_content(
    ret: str | None, worst: Action, *, size: int, header_size: int, max_returned: int
) -> Returned:
    """How much of the original goes back, from RET and the report's worst action.

    See "What goes back" in the module docstring. `size` is the whole stored
    message, `header_size` its header section, both in octets.
    """
    want_full = worst is Action.FAILED and (ret or "").upper() != "HDRS"
    if want_full and size <= max_returned:
        return Returned.FULL
    if header_size > max_returned:
        return Returned.NOTHING_TOO_BIG
    return Returned.HEADERS_TOO_BIG if want_full else Returned.HEADERS
