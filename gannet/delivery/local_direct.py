"""Local delivery before the reply: the enqueue writer process writes a message
whose every recipient is a local Maildir straight into those Maildirs, durably,
and only then answers the server, which says 250; such a message is never
queued. What the queue keeps of it is what it keeps of any delivered message:
its history and its summary for `gannet trace`, written after the answer.

Why: queued first, a local message costs the queue an fsync'd commit of its
body and recipients, a lease, and a second fsync'd commit to record the
delivery and delete the rows, besides its Maildir file. Written here, it
costs its Maildir file, its batch's syncfs, and the rows of its trace
(recorded together, without fsync). Measured (bench/README.md, "Session 16";
10 sessions, one message per connection): the enqueue writer's CPU a message
0.49-0.51 → 0.38-0.41 ms, Gannet's in all 1.24-1.28 → 1.14-1.21 ms, the disk
writes 83 → 70 KB a message; the rate did not move beyond noise there, and
rose 5-15 % on reused connections.

What it takes (`takes`): an inline body (spooled ones are large: the delivery
loop streams them), not held, every recipient LOCAL, none asking NOTIFY=SUCCESS
(a success DSN is the delivery loop's work). Anything else is queued as before;
so is every recipient whose file could not be written or whose mailbox name is
no path (the delivery loop retries it, or fails it with a DSN): the caller
enqueues the message with those recipients only.

How a batch is made durable: with the writer's rename journal
(delivery/maildir_journal.py), one syncfs for the files' data and their
journal lines before the answer, the renames into new/ made durable by a
later one (or, after a crash, by the journal's replay); without it, or for
Maildirs on another filesystem, two syncfs (data, renames) before the answer.

Invariants: a message is answered as delivered only once every recipient's
file is in new/ and either that rename is durable or the file's data and
journal line are (so a lost rename is redone at the next start). A crash
before that leaves the client without a 250: it sends again, and a file
already renamed is a duplicate, never a loss.

Never: touch the database (the writer does, after answering), or answer for a
message with a recipient neither written nor handed back to be queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gannet import maillog
from gannet.delivery.local import RELAY, write_and_commit
from gannet.delivery.maildir import maildir_path, to_lf
from gannet.delivery.maildir_journal import RenameJournal
from gannet.delivery.outcome_log import log_outcome
from gannet.queue.model import Delivered, InlineBody, NewMessage, NewRecipient, Transport
from gannet.queue.sqlite_enqueue_wire import Request
from gannet.smtp.events import Notify

log = logging.getLogger("gannet.delivery.local")

# Body bytes a batch converts and writes at once: up to the writer's 512
# requests of inline bodies (each under the spool threshold) would be far more.
PIECE = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Copy:
    """One recipient's file (delivery/local.MaildirCopy)."""

    maildir: Path
    source: bytes
    return_path: str
    delivered_to: str


@dataclass(slots=True)
class Written:
    """One message this module took: its recipients written (with their file in
    new/) and those left to queue, in the message's order."""

    number: int
    message: NewMessage
    delivered: list[tuple[NewRecipient, Path]] = field(default_factory=list)
    left: list[NewRecipient] = field(default_factory=list)
    at: float = 0.0  # when the files were durable

    @property
    def complete(self) -> bool:
        return not self.left


def takes(message: NewMessage) -> bool:
    """Whether `message` is delivered here rather than queued."""
    return (
        isinstance(message.body, InlineBody)
        and not message.held
        and all(r.transport is Transport.LOCAL and not _wants_success(r) for r in message.recipients)
    )


def _wants_success(rcpt: NewRecipient) -> bool:
    return rcpt.notify is not None and bool(rcpt.notify & Notify.SUCCESS.value)


def deliver(
    maildir_template: str, group: Sequence[Request], journal: RenameJournal | None = None
) -> tuple[list[Written], list[Request]]:
    """Write the files of the messages of `group` that this module takes, in
    batches of at most PIECE body bytes (blocks: file I/O, and a syncfs a batch
    with `journal` for the files on its filesystem, two otherwise).
    Returns those messages, and the requests it did not take, untouched."""
    taken: list[Written] = []
    rest: list[Request] = []
    for number, message in group:
        if takes(message):
            taken.append(Written(number, message))
        else:
            rest.append((number, message))
    piece: list[Written] = []
    held = 0
    for written in taken:
        if piece and held + written.message.body.size > PIECE:
            _write(maildir_template, piece, journal)
            piece, held = [], 0
        piece.append(written)
        held += written.message.body.size
    if piece:
        _write(maildir_template, piece, journal)
    return taken, rest


def _write(maildir_template: str, piece: list[Written], journal: RenameJournal | None) -> None:
    copies: list[_Copy] = []
    owners: list[tuple[Written, NewRecipient]] = []
    for written in piece:
        message = written.message
        assert isinstance(message.body, InlineBody)  # takes() said so
        lf_body = to_lf(message.body.data)
        for rcpt in message.recipients:
            try:
                maildir = maildir_path(maildir_template, rcpt.mailbox or rcpt.address)
            except ValueError:
                continue  # left to the queue: the delivery loop fails it with a DSN
            copies.append(_Copy(maildir, lf_body, message.sender, rcpt.address))
            owners.append((written, rcpt))
    results = write_and_commit(copies, journal) if copies else []
    now = time.time()
    for (written, rcpt), result in zip(owners, results, strict=True):
        if isinstance(result, Path):
            written.delivered.append((rcpt, result))
        else:
            log.warning(
                "%s: local delivery before the reply to %s failed (%s); queued for the delivery loop",
                written.message.queue_id, rcpt.address, result,
            )  # fmt: skip
    for written in piece:
        done = {id(rcpt) for rcpt, _ in written.delivered}
        written.left = [r for r in written.message.recipients if id(r) not in done]
        written.at = now


def log_deliveries(taken: Sequence[Written]) -> None:
    """The log lines of what `deliver` wrote, as the delivery loop's: one
    `delivered` per recipient, and `removed` for a message with none left."""
    for written in taken:
        message = written.message
        for rcpt, path in written.delivered:
            outcome = Delivered(detail=str(path))
            delay = written.at - message.received_at
            log_outcome(message.queue_id, rcpt.address, outcome, relay=RELAY, delay=delay, now=written.at)
        if written.complete:
            maillog.removed(message.queue_id)
