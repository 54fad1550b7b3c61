"""DMARC (RFC 7489): policy discovery, identifier alignment, the result and what to do.

Written here rather than taken from a library: the checks are small (a tag
list, two alignment modes, p/sp/pct), the Python DMARC packages are either
unmaintained or synchronous with their own DNS, and we need the lookups
through Gannet's resolver and the outcome as plain values.

- `parse_record(text)` (RFC 7489 §6.3, §6.6.3 step 6): v=DMARC1 first; p
  required (a record without a valid p but with rua counts as p=none, else it
  is discarded); sp defaults to p; adkim/aspf r or s (default r); pct 0..100
  (default 100); anything invalid falls back to its default.
- `discover(domain)` (§6.6.3; `discover_step` is its synchronous core, for
  answers already cached): TXT at _dmarc.<From domain>; if that holds no
  DMARC record, at _dmarc.<organizational domain>. Exactly one record must
  remain at a name, else DMARC does not apply (result none). A temporary DNS
  failure is temperror.
- Organizational domain (§3.2): the public suffix plus one label, from the
  Public Suffix List shipped with `publicsuffixlist` (no network); a name
  that is itself a public suffix is its own organizational domain.
- `evaluate(...)` (§3.1, §6.6.2): DMARC passes when SPF passed for an aligned
  domain (MAIL FROM, or HELO for the null sender) or any DKIM signature passed
  with an aligned d=; relaxed alignment compares organizational domains,
  strict the names themselves. The policy is sp when the record came from the
  organizational domain for a subdomain, else p; pct (§6.6.4) applies it to
  that share of failing mail and the next milder policy to the rest
  (reject → quarantine → none).

Pure except `discover` (asynchronous DNS through the lookup it is given).
"""

from __future__ import annotations

import enum
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from gannet.mailauth.dns_bridge import TxtAnswer


class Policy(enum.Enum):
    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


class Alignment(enum.Enum):
    RELAXED = "r"
    STRICT = "s"


_MILDER = {Policy.REJECT: Policy.QUARANTINE, Policy.QUARANTINE: Policy.NONE, Policy.NONE: Policy.NONE}


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: Policy
    sp: Policy
    adkim: Alignment = Alignment.RELAXED
    aspf: Alignment = Alignment.RELAXED
    pct: int = 100


@dataclass(frozen=True, slots=True)
class Discovery:
    record: DmarcRecord | None
    domain: str = ""  # where the record was found (the From domain or its organizational domain)
    temporary_error: str = ""


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    result: str  # pass | fail | none | temperror
    from_domain: str
    policy: Policy | None = None  # the policy that applies (p, or sp for a subdomain)
    disposition: Policy = Policy.NONE  # what to do after pct: none | quarantine | reject
    published: DmarcRecord | None = None
    reason: str = ""


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the list shipped with the package; ~40 ms to load, once


@functools.lru_cache(maxsize=8192)  # the list lookup costs ~0.1 ms; senders repeat
def org_domain(domain: str) -> str:
    """RFC 7489 §3.2 organizational domain ("mail.example.co.uk" → "example.co.uk")."""
    name = domain.lower().rstrip(".")
    return _psl().privatesuffix(name) or name


def aligned(a: str, b: str, mode: Alignment) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if mode is Alignment.STRICT else org_domain(a) == org_domain(b)


@functools.lru_cache(maxsize=4096)  # a domain's record is read for each of its messages
def parse_record(text: str) -> DmarcRecord | None:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    first = text.split(";", 1)[0].replace(" ", "").replace("\t", "")
    if first != "v=DMARC1":
        return None
    p = _policy(tags.get("p", ""))
    if p is None:
        if not tags.get("rua"):
            return None
        p = Policy.NONE
    sp = _policy(tags.get("sp", "")) or p
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    if not 0 <= pct <= 100:
        pct = 100
    return DmarcRecord(p, sp, _alignment(tags.get("adkim", "")), _alignment(tags.get("aspf", "")), pct)


def _policy(text: str) -> Policy | None:
    try:
        return Policy(text.lower())
    except ValueError:
        return None


def _alignment(text: str) -> Alignment:
    return Alignment.STRICT if text.lower() == "s" else Alignment.RELAXED


def discover_step(from_domain: str, known: Callable[[str], TxtAnswer | None]) -> Discovery | str:
    """One step of policy discovery (§6.6.3) over the TXT answers known so far (`known(name)`,
    None when not known): the Discovery, or the next name (`_dmarc.…`) to look up first."""
    domain = from_domain.lower().rstrip(".")
    for name in dict.fromkeys((domain, org_domain(domain))):
        qname = f"_dmarc.{name}"
        answer = known(qname)
        if answer is None:
            return qname
        if answer.temporary_error:
            return Discovery(None, name, answer.temporary_error)
        records = [t for t in answer.records if t.replace(" ", "").startswith("v=DMARC1")]
        if len(records) > 1:
            return Discovery(None, name)  # §6.6.3 step 5: more than one record, no policy
        if records:
            return Discovery(parse_record(records[0]), name)
    return Discovery(None)


async def discover(from_domain: str, lookup: Callable[[str], Awaitable[TxtAnswer]]) -> Discovery:
    answers: dict[str, TxtAnswer] = {}
    while isinstance(step := discover_step(from_domain, answers.get), str):
        answers[step] = await lookup(step)
    return step


def evaluate(
    from_domain: str,
    discovery: Discovery,
    *,
    spf_pass_domain: str,
    dkim_pass_domains: Sequence[str],
    rng: random.Random | None = None,
) -> DmarcOutcome:
    """`spf_pass_domain` is the SPF-authenticated domain ("" unless SPF passed);
    `dkim_pass_domains` the d= of every DKIM signature that passed."""
    domain = from_domain.lower().rstrip(".")
    if discovery.temporary_error:
        return DmarcOutcome(
            "temperror", domain, reason=f"DMARC record lookup failed: {discovery.temporary_error}"
        )
    record = discovery.record
    if record is None:
        return DmarcOutcome("none", domain, reason="no DMARC record")
    subdomain = discovery.domain != domain
    policy = record.sp if subdomain else record.p
    spf_ok = bool(spf_pass_domain) and aligned(spf_pass_domain, domain, record.aspf)
    dkim_ok = any(aligned(d, domain, record.adkim) for d in dkim_pass_domains)
    if spf_ok or dkim_ok:
        return DmarcOutcome("pass", domain, policy, Policy.NONE, record)
    disposition = policy
    if record.pct < 100 and (rng or random.Random()).randrange(100) >= record.pct:
        disposition = _MILDER[policy]
    reason = "no aligned SPF or DKIM pass"
    return DmarcOutcome("fail", domain, policy, disposition, record, reason)
