"""The queue's records: what goes in (NewMessage), what comes out (Claim), what
a delivery attempt reports (Outcome), and what the admin tools see (views).

Pure values; no I/O. Times are POSIX seconds (float, UTC) passed in by the
caller, never read from a clock here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class RecipientState(enum.Enum):
    """A recipient's state in the store. The CONTRACT.md names are the values.

    `held` is a property of the message (`QueuedMessageView.held`); its
    undelivered recipients are *shown* as held but keep their state here.
    """

    QUEUED = "queued"  # due now or at next_attempt, never tried
    DEFERRED = "deferred"  # tried, failed temporarily, due at next_attempt
    DELIVERING = "delivering"  # claimed under a lease by a delivery worker
    DELIVERED = "delivered"
    FAILED = "failed"  # permanently; a DSN was (or will be) generated

    @property
    def is_final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.FAILED)


class Transport(enum.Enum):
    """How a recipient leaves the queue. Decided at enqueue time by routing."""

    LOCAL = "local"  # Maildir or LMTP on this host (issue 2)
    SMTP = "smtp"  # relay to the next hop: MX or smarthost (issue 3)


@dataclass(frozen=True, slots=True)
class InlineBody:
    """A body small enough to hold in memory; the store keeps it in its database."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class SpooledBody:
    """A body already written *and fsync'd* to a spool file by the session.

    The store takes ownership: it moves or copies it into its own keeping in
    the same commit, and removes the file when the message is done.
    """

    path: Path
    size: int


Body = InlineBody | SpooledBody


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str  # the final address to deliver to (after alias expansion)
    transport: Transport
    domain: str  # lowercased domain of `address`; the grouping key for delivery
    mailbox: str = ""  # LOCAL: the account ("user@domain") whose Maildir receives it
    original: str = ""  # the RCPT TO address as given, when an alias changed it
    orcpt: str | None = None  # RFC 3461 ORCPT, "rfc822;addr"
    notify: int | None = None  # gannet.smtp.Notify flag value; None = not given


@dataclass(frozen=True, slots=True)
class NewMessage:
    """Everything `QueueStore.enqueue` needs. `queue_id` is chosen by the caller
    (it is already in the Received header it wrote)."""

    queue_id: str
    sender: str  # "" for the null sender
    recipients: tuple[NewRecipient, ...]
    body: Body
    received_at: float
    envid: str | None = None  # RFC 3461
    ret: str | None = None  # "FULL" | "HDRS" | None
    smtputf8: bool = False
    body_8bit: bool = False  # BODY=8BITMIME was given
    client: str = ""  # "helo [ip]:port" for `queue show`
    auth_user: str = ""
    message_id: str = ""  # the Message-ID header, for tracing
    held: bool = False
    # A delivery status notification: the queue ID of the message it reports on
    # (the store adds a "dsn" event to that message's history).
    report_for: str = ""
    # Events to store with the message, e.g. ("check", "spf=pass …") from the
    # SMTP-time checks; `gannet trace` shows them after "received".
    events: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    recipient_id: int
    address: str
    transport: Transport
    domain: str
    mailbox: str
    original: str
    orcpt: str | None
    notify: int | None
    attempts: int  # attempts made before this one
    lease_token: str  # fencing: `record` is ignored unless this still holds
    warned: bool = False  # a delay DSN was already sent for it


@dataclass(frozen=True, slots=True)
class Claim:
    """One message with the recipients a worker now owns until `lease_until`."""

    queue_id: str
    sender: str
    received_at: float
    envid: str | None
    ret: str | None
    smtputf8: bool
    body_8bit: bool
    size: int
    recipients: tuple[ClaimedRecipient, ...]
    lease_until: float


@dataclass(frozen=True, slots=True)
class Delivered:
    detail: str = ""  # e.g. the mailbox path, or the remote "250 ..." reply


@dataclass(frozen=True, slots=True)
class Deferred:
    reason: str  # the reply or error text, for logs and `queue list`
    retry_at: float
    warned: bool = False  # a delay DSN goes out with this outcome: never send another


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


Outcome = Delivered | Deferred | Failed


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    recipient_id: int
    lease_token: str
    outcome: Outcome
    at: float  # when the attempt ended


@dataclass(frozen=True, slots=True)
class RecipientView:
    recipient_id: int
    address: str
    state: RecipientState
    attempts: int
    next_attempt: float | None
    last_error: str
    original: str = ""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: float
    recipient: str  # "" for message-level entries
    event: str  # "queued", "delivered", "deferred", "failed", "held", "released", "retry",
    # "quarantined"
    detail: str


@dataclass(frozen=True, slots=True)
class QueuedMessageView:
    queue_id: str
    sender: str
    size: int
    received_at: float
    held: bool
    recipients: tuple[RecipientView, ...]
    client: str = ""
    auth_user: str = ""
    message_id: str = ""
    envid: str | None = None
    ret: str | None = None
    history: tuple[HistoryEntry, ...] = field(default=())
    # The body could not be read back (crash recovery, or a failed read_body):
    # never claimed, never deleted by the store; a postmaster looks at it.
    quarantined: bool = False


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """`gannet queue list` filters; every field optional (None = any)."""

    sender: str | None = None
    recipient: str | None = None
    domain: str | None = None
    state: RecipientState | None = None
    held: bool | None = None
    older_than: float | None = None  # received_at < this
    newer_than: float | None = None  # received_at >= this
    # Keyset paging: only messages after this (received_at, queue_id) in list order.
    after: tuple[float, str] | None = None
    quarantined: bool | None = None
    limit: int | None = None  # at most this many messages (the oldest)


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One step in a message's life, as `QueueStore.trace` returns it (see store.py
    for the event names)."""

    at: float
    queue_id: str
    recipient: str  # "" for message-level events
    event: str
    detail: str


@dataclass(frozen=True, slots=True)
class StateCount:
    """Unfinished recipients in one shown state (`QueueStore.queue_stats`)."""

    state: str  # "queued", "deferred", "delivering", "held" or "quarantined"
    recipients: int
    messages: int  # messages with at least one recipient in this state
    oldest: float  # received_at of the oldest of those messages


@dataclass(frozen=True, slots=True)
class QueueStats:
    messages: int  # messages in the queue
    states: tuple[StateCount, ...]  # only the states that have recipients


@dataclass(frozen=True, slots=True)
class DeferralReason:
    """Deferred recipients of one destination domain that share a last error."""

    domain: str
    reason: str
    recipients: int
    oldest: float  # received_at of the oldest such message


class QueueError(Exception):
    """The store could not do what was asked (I/O error, disk full, database gone).

    Enqueue callers answer 451 4.3.0 (never 250) when they see it.
    """


class NoSuchMessage(QueueError):
    """No message with that queue ID."""
