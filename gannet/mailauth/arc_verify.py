"""ARC verification (RFC 8617): the chain of ARC sets an incoming message carries.

dkimpy's `ARC.verify` does the chain logic (RFC 8617 §5.2: instances 1..n
complete, each ARC-Seal valid, the newest ARC-Message-Signature valid, no
cv=fail) and the signatures; as for DKIM, the key records of every
ARC-Seal and ARC-Message-Signature are fetched first, asynchronously, through
Gannet's resolver, and dkimpy gets a dnsfunc that answers from them.

Result (the `arc=` method of RFC 8617 §10.1 in Authentication-Results):
none (no ARC set), pass, or fail (with dkimpy's reason, e.g. "ARC-Seal[2]
did not validate"). A key lookup that failed temporarily makes the chain
unverifiable: reported as fail with that reason, never as pass.

`verify` is CPU only (no I/O); never raises for anything in the message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import dkim

from gannet.mailauth.dkim_verify import MIN_KEY_BITS, key_names
from gannet.mailauth.dns_bridge import TxtAnswer

log = logging.getLogger("gannet.mailauth")
_quiet = logging.getLogger("gannet.mailauth.dkimpy")


@dataclass(frozen=True, slots=True)
class ArcOutcome:
    result: str  # none | pass | fail
    reason: str = ""
    instances: int = 0  # how many ARC sets the message carries


def arc_key_names(head: bytes) -> list[str]:
    names = key_names(head, b"arc-seal") + key_names(head, b"arc-message-signature")
    return list(dict.fromkeys(names))


def has_arc(head: bytes) -> bool:
    return b"\narc-seal:" in b"\n" + head.lower()


def verify(message: bytes, keys: Mapping[str, TxtAnswer]) -> ArcOutcome:
    failed = [n for n, a in keys.items() if a.temporary_error]
    if failed:
        return ArcOutcome("fail", f"key lookup failed temporarily: {failed[0]}")

    def dnsfunc(qname: bytes, timeout: float = 5) -> bytes | None:
        answer = keys.get(qname.decode("ascii", "replace").lower().rstrip("."))
        if answer is None or not answer.records:
            return None
        return answer.records[0].encode("utf-8", "replace")

    try:
        arc = dkim.ARC(message, logger=_quiet, minkey=MIN_KEY_BITS)
        cv, results, reason = arc.verify(dnsfunc=dnsfunc)
    except dkim.DKIMException as exc:
        return ArcOutcome("fail", str(exc)[:120])
    except Exception as exc:  # hostile input must not reach the session
        log.warning("arc: verification raised %r", exc)
        return ArcOutcome("fail", f"verification error: {type(exc).__name__}")
    instances = len(results)
    if cv == dkim.CV_Pass:
        return ArcOutcome("pass", "", instances)
    if cv == dkim.CV_None:
        return ArcOutcome("none", "", 0)
    text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    return ArcOutcome("fail", text[:120], instances)
