"""What happens to a finished message between the end of DATA and the enqueue.

The session calls `process()` once the body is spooled (and fsync'd, if it is
a file) and before `store.enqueue()`. In order:

1. inbound checks (mx listener, client neither authenticated nor trusted):
   SPF (started at MAIL FROM), DKIM, ARC, DMARC → the Authentication-Results
   field, perhaps `X-Gannet-Quarantine: dmarc`, perhaps a 550 5.7.1 refusal
   (DMARC enforce, p=reject); nothing is rewritten for a refused message;
2. forged fields dropped: any Authentication-Results claiming our hostname
   (RFC 8601 §5) from every client outside `trusted_networks` (the checked
   ones also lose X-Gannet-Quarantine);
3. signing (authenticated or trusted clients): `Signer.sign` over the message
   as it will be queued (after Gannet's Received/Message-ID/Date), its
   DKIM-Signature lines prepended;
4. sealing (checked mail that an alias forwards to a remote address):
   `Signer.seal` over the message with our Authentication-Results, its ARC set
   prepended, so the next hop can trust our results (RFC 8617);
5. one rewrite of the body (in memory, or a new fsync'd spool file renamed
   over the old one) with everything prepended and the forged fields gone.

Size. Up to `[mailauth] max_verify_size` the message is signed or sealed in
memory. Above it, signing still happens (our users' mail is signed whatever
its size): the header section is read (at most 1 MiB of it) and the body
streamed from the spool file through `bodyhash.RelaxedBodyHash`, so memory
stays bounded. Sealing is skipped above that size, with a log line: dkimpy's
ARC code needs the whole message (and so does verification, which has
already reported such a message as too large). A header section that does
not end within 1 MiB is not signed either. All of it is CPU work in the
default executor.

Logged: a DMARC result other than pass/none, an SPF fail, a quarantine, a
refusal; every message's results are stored with it (`gannet trace ID`).

Never raises for a signer's failure (the mail goes on unsigned, logged); an
OSError while rewriting a spool file propagates, and the session answers
451 (nothing was acknowledged).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gannet.config import DmarcMode
from gannet.mailauth import authres
from gannet.mailauth.bodyhash import RelaxedBodyHash
from gannet.mailauth.checks import InboundChecks, Verdict
from gannet.mailauth.signing import Signer
from gannet.mailauth.spf import SpfOutcome
from gannet.message.rewrite import (
    COPY_CHUNK,
    FieldFilter,
    header_end,
    read_all,
    read_head,
    rewrite,
    rewrite_bytes,
)
from gannet.queue.model import Body, InlineBody
from gannet.smtp.replies import Reply

log = logging.getLogger("gannet.mailauth")


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the session knows about the message, for deciding what to do with it."""

    queue_id: str
    hostname: str
    sender: str
    helo: str
    check: bool  # run the inbound checks
    dmarc: DmarcMode
    strip_forged: bool  # drop Authentication-Results claiming our hostname
    sign: bool  # DKIM-sign (authenticated or trusted client)
    forwarded: bool  # an alias sends it on to a remote address: ARC-seal it
    max_size: int  # [mailauth] max_verify_size


@dataclass(frozen=True, slots=True)
class Processed:
    body: Body
    reject: Reply | None = None
    reason: str = ""  # for the reject's log line
    events: tuple[tuple[str, str], ...] = ()  # stored with the message ("check", "spf=pass ...")


async def process(
    facts: MessageFacts,
    body: Body,
    checks: InboundChecks | None,
    signer: Signer | None,
    spf_task: asyncio.Future[SpfOutcome] | None,
) -> Processed:
    verdict: Verdict | None = None
    if facts.check and checks is not None:
        verdict = await checks.finish(spf_task, body, facts.dmarc, sender=facts.sender, helo=facts.helo)
        if verdict.quarantine or not _all_well(verdict.summary):  # the rest: `gannet trace ID`
            note = " (quarantined: dmarc)" if verdict.quarantine else ""
            log.info("%s: %s%s", facts.queue_id, verdict.summary, note)
        if verdict.reject is not None:
            return Processed(body, verdict.reject, "; ".join(verdict.reasons), (("check", verdict.summary),))
    elif spf_task is not None:
        spf_task.cancel()
    prepend = verdict.prepend if verdict is not None else b""
    drop: FieldFilter | None = verdict.drop if verdict is not None else None
    if drop is None and facts.strip_forged:
        hostname = facts.hostname
        drop = FieldFilter(frozenset({b"authentication-results"}), lambda f: authres.is_ours(f, hostname))
    if signer is not None and (facts.sign or (facts.forwarded and verdict is not None)):
        prepend = await _signatures(facts, body, prepend, drop, signer, verdict) + prepend
    body, dropped = await rewrite(body, prepend, drop)
    if dropped:
        log.info("%s: removed %d forged header field(s) claiming %s", facts.queue_id, dropped, facts.hostname)
    events = (("check", verdict.summary),) if verdict is not None else ()
    return Processed(body, events=events)


async def _signatures(
    facts: MessageFacts,
    body: Body,
    prepend: bytes,
    drop: FieldFilter | None,
    signer: Signer,
    verdict: Verdict | None,
) -> bytes:
    """DKIM-Signature or ARC lines for the message as it will be queued (CPU work, in an executor)."""
    what = "signed" if facts.sign else "sealed"
    if body.size > facts.max_size and not facts.sign:
        log.info("%s: not sealed: %d bytes is over [mailauth] max_verify_size", facts.queue_id, body.size)
        return b""
    loop = asyncio.get_running_loop()
    try:
        if body.size > facts.max_size:
            return await _sign_streamed(facts, body, prepend, drop, signer)
        message, _ = rewrite_bytes(await read_all(body), prepend, drop)
        if facts.sign:
            return await loop.run_in_executor(None, signer.sign, message)
        assert verdict is not None
        return await loop.run_in_executor(None, signer.seal, message, verdict.value)
    except Exception as exc:  # a signer bug must not cost the message
        log.error("%s: not %s: %r", facts.queue_id, what, exc)
        return b""


async def _sign_streamed(
    facts: MessageFacts, body: Body, prepend: bytes, drop: FieldFilter | None, signer: Signer
) -> bytes:
    """Sign a message too large to load: its header section as it will be queued, its body
    hashed from the spool in chunks."""
    start = await read_head(body)
    end = header_end(start)
    if end < 0:
        log.warning("%s: not signed: the header section does not end within %d bytes", facts.queue_id,
                    len(start))  # fmt: skip
        return b""
    head, _ = rewrite_bytes(start[:end], prepend, drop)  # our fields on top, the blank line kept
    if not signer.signs(head):
        return b""

    def work() -> bytes:
        return signer.sign_header(head, _body_hash(body, end))

    return await asyncio.get_running_loop().run_in_executor(None, work)


def _body_hash(body: Body, offset: int) -> bytes:
    """The relaxed body hash of everything after `offset` (the end of the header section)."""
    digest = RelaxedBodyHash()
    if isinstance(body, InlineBody):
        digest.update(body.data[offset:])
        return digest.digest()
    with open(body.path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _all_well(summary: str) -> bool:
    """Nothing worth a log line: DMARC passed (or had no policy) and SPF did not fail."""
    words = summary.split()
    return ("dmarc=pass" in words or "dmarc=none" in words) and "spf=fail" not in words
