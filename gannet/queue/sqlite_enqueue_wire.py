"""What the server and its enqueue writer process say to each other: frames of
marshal'd builtins on a socketpair.

Owns: encoding a NewMessage and the reply to a batch of them, and cutting a
byte stream into frames. Pure: no I/O, no clock. Used by sqlite_enqueue_process
(the server's side) and sqlite_enqueue_child (the writer's side).

Why marshal and not pickle: both ends are the same interpreter (the child is
started from sys.executable with the same package), which is marshal's one
condition, and a message flattened to a tuple of str/bytes/float costs the
event loop less than pickling the dataclasses (session 9 measured pickle's cost
eating the whole gain on reused connections). Never decode a frame from anyone
but our own child: marshal is not safe against crafted input.

Frames (gannet/util/frames.py): a 4-byte big-endian length, then marshal.dumps(value).
  server → writer  (number, message tuple)            one per enqueue
  writer → server  READY                               once, when the database is open
                   (answers, commits, stats, taken, released)
                                                       one per transaction group
"""

from __future__ import annotations

import marshal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gannet.queue.model import InlineBody, NewMessage, NewRecipient, QueueError, SpooledBody, Transport
from gannet.util import frames

READY = "ready"

# (request number, None on success, or (is a ValueError, the error's text))
Answer = tuple[int, tuple[bool, str] | None]
# (seconds, fsync) of one COMMIT that changed the database: for the metrics histogram
Commit = tuple[float, bool]
# WriterStats fields, in this order, counted since the previous reply
STAT_FIELDS = (
    "batches",
    "commits",
    "jobs",
    "max_batch",
    "failed_commits",
    "unsynced_commits",
    "lock_waits",
    "lock_wait_seconds",
    "lock_held_seconds",
    "cpu_seconds",
    "direct_messages",
    "direct_groups",
)


def frame(value: Any) -> bytes:
    return frames.frame(marshal.dumps(value))


def request(number: int, message: NewMessage) -> bytes:
    """The frame that asks the writer to enqueue `message`."""
    m = message
    body: bytes | tuple[str, int] = (
        m.body.data if isinstance(m.body, InlineBody) else (str(m.body.path), m.body.size)
    )
    recipients = tuple(
        (r.address, r.transport.value, r.domain, r.mailbox, r.original, r.orcpt, r.notify)
        for r in m.recipients
    )
    return frame(
        (number, (m.queue_id, m.sender, recipients, body, m.received_at, m.envid, m.ret, m.smtputf8,
                  m.body_8bit, m.client, m.auth_user, m.message_id, m.held, m.report_for, m.events))
    )  # fmt: skip


Request = tuple[int, NewMessage]  # a request as the writer reads it: its number, its message


def message_of(value: Any) -> Request:
    """The inverse of `request` (on a frame's decoded value)."""
    number, fields = value
    (queue_id, sender, recipients, body, received_at, envid, ret, smtputf8,
     body_8bit, client, auth_user, message_id, held, report_for, events) = fields  # fmt: skip
    return number, NewMessage(
        queue_id=queue_id,
        sender=sender,
        recipients=tuple(
            NewRecipient(a, Transport(t), d, mailbox, original, orcpt, notify)
            for a, t, d, mailbox, original, orcpt, notify in recipients
        ),
        body=InlineBody(body) if isinstance(body, bytes) else SpooledBody(Path(body[0]), body[1]),
        received_at=received_at,
        envid=envid,
        ret=ret,
        smtputf8=smtputf8,
        body_8bit=body_8bit,
        client=client,
        auth_user=auth_user,
        message_id=message_id,
        held=held,
        report_for=report_for,
        events=events,  # marshal keeps tuples as tuples
    )


def error_of(exc: BaseException | None) -> tuple[bool, str] | None:
    return None if exc is None else (isinstance(exc, ValueError), str(exc))


def exception_of(error: tuple[bool, str]) -> Exception:
    """The exception the caller of enqueue sees: ValueError for a caller's bug
    (a message without recipients), QueueError for everything else."""
    is_value_error, text = error
    return ValueError(text) if is_value_error else QueueError(text)


@dataclass(slots=True)
class Reply:
    """What the writer says after a group of transactions."""

    answers: list[Answer] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    stats: tuple[float, ...] = (0.0,) * len(STAT_FIELDS)
    # Local delivery at enqueue (delivery/local_at_enqueue.py): the requests whose
    # recipients the writer delivers itself, and whether it gave any back to the
    # delivery loop (the server then wakes it).
    taken: list[int] = field(default_factory=list)
    released: bool = False

    def encode(self) -> bytes:
        return frame((self.answers, self.commits, self.stats, self.taken, self.released))

    @classmethod
    def of(cls, value: Any) -> Reply:
        answers, commits, stats, taken, released = value
        return cls(answers, commits, tuple(stats), taken, released)


class FrameBuffer(frames.FrameBuffer[Any]):
    """Bytes in, whole frames' marshal'd values out (gannet/util/frames.py)."""

    def __init__(self) -> None:
        super().__init__(marshal.loads)
