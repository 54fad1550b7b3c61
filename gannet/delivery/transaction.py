"""One message to one destination: the envelope built from a claim, the
transaction over an open connection, and the fallback RFC 5321 §5.1 asks for.

Fallback: when the next hop answers every recipient with a temporary failure
(4xx at MAIL, DATA or the final ".", or every RCPT) or the connection breaks
mid-transaction, the same transaction is tried on the destination's later MX
hosts, each on a connection of its own (closed afterwards), before the
recipients are deferred. The last answer counts. Answers decided locally
before anything was sent (e.g. 552 5.3.4 over the server's SIZE) are final.

Never raises anything but asyncio.CancelledError: every failure comes back
inside `Sent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gannet.delivery.outbound import (
    Envelope,
    OutboundConnection,
    OutboundOptions,
    OutboundRecipient,
    RecipientResult,
    SessionFailure,
)
from gannet.delivery.routing import NextHop
from gannet.queue.model import Claim, ClaimedRecipient
from gannet.smtp.events import Notify


@dataclass(frozen=True, slots=True)
class Sent:
    """What became of one transaction, and over which connection."""

    results: list[RecipientResult] | None  # one per recipient, or None when `failure`
    failure: SessionFailure | None
    label: str  # "host[ip]:port" of the hop that answered
    host: str  # its name, for Remote-MTA
    tls: str
    next_hop_has_dsn: bool

    @property
    def all_temporary(self) -> bool:
        if self.failure is not None:
            return self.failure.temporary
        assert self.results is not None
        return all(r.temporary and r.stage for r in self.results)


def envelope_for(claim: Claim, recipients: Sequence[ClaimedRecipient], *, lmtp: bool) -> Envelope:
    """The envelope of `claim` for `recipients`; over LMTP, RCPT TO names the
    mailbox (the account) rather than the address it was sent to."""
    return Envelope(
        sender=claim.sender,
        recipients=tuple(
            OutboundRecipient(
                (r.mailbox or r.address) if lmtp else r.address,
                None if r.notify is None else Notify(r.notify),
                r.orcpt,
            )
            for r in recipients
        ),
        size=claim.size,
        body_8bit=claim.body_8bit,
        smtputf8=claim.smtputf8,
        ret=claim.ret,
        envid=claim.envid,
    )


def reason(result: RecipientResult) -> str:
    """A reply as logs, `queue list` and DSNs show it:
    "550 5.1.1 <b@x>: User unknown (in reply to RCPT TO command)"."""
    reply = result.reply
    text = " ".join(t for t in (str(reply.code), reply.enhanced, " ".join(reply.text).strip()) if t)
    if reply.code < 400 or not result.stage:  # no stage: decided here, before sending
        return text
    return f"{text} (in reply to {result.stage} command)"


async def open_hop(hop: NextHop, options: OutboundOptions) -> OutboundConnection:
    if hop.address.startswith("unix:"):
        return await OutboundConnection.open_unix(hop.address[5:], options)
    return await OutboundConnection.open(
        hop_host=hop.host, address=hop.address, port=hop.port, options=options
    )


async def send(conn: OutboundConnection, envelope: Envelope, body: bytes | Path) -> Sent:
    try:
        results: list[RecipientResult] | None = await conn.send_message(envelope, body)
        failure = None
    except SessionFailure as exc:
        results, failure = None, exc
    return Sent(results, failure, conn.label, conn.host, conn.tls, conn.capabilities.dsn)


async def send_with_fallback(
    conn: OutboundConnection,
    hops: Sequence[NextHop],
    options: OutboundOptions,
    envelope: Envelope,
    body: bytes | Path,
) -> Sent:
    """`send`, then the later hops while every answer is temporary (see above)."""
    sent = await send(conn, envelope, body)
    if not sent.all_temporary:
        return sent
    labels = [hop.label for hop in hops]
    later = hops[labels.index(conn.label) + 1 :] if conn.label in labels else ()
    for hop in later:
        try:
            other = await open_hop(hop, options)
        except SessionFailure:
            continue
        try:
            sent = await send(other, envelope, body)
        finally:
            await other.close()
        if not sent.all_temporary:
            break
    return sent
