"""SPF (RFC 7208): pyspf's evaluator, fed by an asynchronous DNS lookup.

pyspf (which passes the RFC 7208 test suite itself) does the evaluation:
record selection, mechanisms, macros, include/redirect/exists/ptr, the
10-lookup and 2-void-lookup limits (RFC 7208 §4.6.4), all seven results. It
is synchronous and asks DNS through the module global `spf.DNSLookup`.

How its DNS becomes asynchronous without a thread per check ("replay"):
pyspf runs on the event loop against a per-check dict of answers. The first
question it asks that is not in the dict raises `_Missing`; we then fetch
that answer with the asynchronous lookup (Gannet's Resolver and its TTL
cache; nothing blocks), store it, and run pyspf again from the start. pyspf
is deterministic given its DNS answers, so the last run is exactly the run a
synchronous resolver would have made — same lookup counts, same void
counts, same result. A check with k distinct questions costs k+1 short runs
(microseconds each); MX and PTR answers prefetch the addresses pyspf will
ask next, so a record at the lookup limit still needs only a few dozen. We
chose this over "pyspf in an executor thread, DNS bridged back to the loop":
no thread is held while DNS is slow, and a check whose answers are cached
costs no thread hop at all.

The hook: `spf.DNSLookup` is replaced once, at import, by a dispatcher that
serves the current check's answers (a ContextVar, so concurrent checks in
different tasks never see each other's) and otherwise calls pyspf's own
lookup, so other users of pyspf in the process keep working.

Never blocks the loop on DNS, never raises: a DNS failure is `temperror`,
anything unexpected is `temperror` with a log line.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import spf as pyspf

log = logging.getLogger("gannet.mailauth")

# (name, rdtype) → the answer in pyspf's format: [((name, rdtype), value), ...]
Answer = list[tuple[tuple[str, str], Any]]
# An asynchronous DNS question for pyspf: returns the Answer ([] for NXDOMAIN or
# no data) or raises SpfDnsError for a temporary failure.
SpfDns = Callable[[str, str], Awaitable[Answer]]

# Replays before giving up. RFC 7208 §4.6.4 allows 10 lookup terms, each "mx"
# or "ptr" up to 10 address lookups; with prefetching a legal record needs far fewer.
MAX_ROUNDS = 60


class SpfDnsError(Exception):
    """A temporary DNS failure (SERVFAIL, timeout): the SPF result is temperror."""


class SpfResult(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    result: SpfResult
    identity: str  # "mailfrom" or "helo" (RFC 7208 §2.3, §2.4)
    domain: str  # the domain whose policy was checked ("" when there was none to check)
    explanation: str = ""  # pyspf's text: the record's exp= for a fail, or the error

    @property
    def property_name(self) -> str:
        """The RFC 8601 ptype.property for the Authentication-Results header."""
        return "smtp.helo" if self.identity == "helo" else "smtp.mailfrom"


class _Missing(Exception):
    """Raised into pyspf when it asks a question this check has no answer for yet."""


@dataclass(slots=True)
class _Answers:
    results: dict[tuple[str, str], Answer | SpfDnsError] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)
    asked: list[tuple[str, str]] = field(default_factory=list)  # this run's questions, in order


class Hints:
    """The TXT questions the last check of each domain asked (its record, its includes),
    asked up front next time so that a check whose answers are cached runs pyspf once.
    Only a hint: pyspf still asks what it asks, and a stale hint costs one lookup."""

    def __init__(self, max_domains: int = 4096) -> None:
        self._max = max_domains
        self._by_domain: dict[str, tuple[tuple[str, str], ...]] = {}

    def get(self, domain: str) -> tuple[tuple[str, str], ...]:
        return self._by_domain.get(domain, ())

    def remember(self, domain: str, asked: list[tuple[str, str]]) -> None:
        txt = tuple(k for k in dict.fromkeys(asked) if k[1] == "TXT")
        if self._by_domain.get(domain) == txt:
            return
        self._by_domain.pop(domain, None)
        if len(self._by_domain) >= self._max:
            del self._by_domain[next(iter(self._by_domain))]
        self._by_domain[domain] = txt


_current: contextvars.ContextVar[_Answers | None] = contextvars.ContextVar("gannet_spf_answers", default=None)
_original_lookup: Callable[..., Any] = pyspf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Any:
    answers = _current.get()
    if answers is None:  # someone else's pyspf query: behave as pyspf always did
        return _original_lookup(name, qtype, strict, timeout)
    key = (str(name).lower().rstrip("."), qtype)
    answers.asked.append(key)
    found = answers.results.get(key)
    if found is None:
        if key not in answers.missing:
            answers.missing.append(key)
        raise _Missing(key)
    if isinstance(found, SpfDnsError):
        raise pyspf.TempError(f"DNS {found}")
    return found


if getattr(pyspf.DNSLookup, "__name__", "") != "_dispatch":
    pyspf.DNSLookup = _dispatch


def identity_for(sender: str, helo: str) -> tuple[str, str, str]:
    """(identity, domain, sender-as-pyspf-wants-it): MAIL FROM, or HELO for the null sender."""
    if sender:
        return "mailfrom", sender.rpartition("@")[2].lower().rstrip("."), sender
    return "helo", helo.lower().rstrip("."), ""


async def check(
    ip: str,
    sender: str,
    helo: str,
    dns: SpfDns,
    *,
    receiver: str = "",
    default_explanation: str = "",
    hints: Hints | None = None,
) -> SpfOutcome:
    """The SPF result for a client `ip`, MAIL FROM `sender` ("" = null) and HELO name.
    `default_explanation` replaces pyspf's text for a fail without exp= (the RFC suite's "DEFAULT")."""
    identity, domain, s = identity_for(sender, helo)
    if not domain or domain.startswith("["):  # an address literal is no domain to ask about (§4.3)
        return SpfOutcome(SpfResult.NONE, identity, "", "no domain to check")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return SpfOutcome(SpfResult.NONE, identity, domain, f"client address {ip!r} unknown")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    ip = str(addr)
    answers = _Answers()
    address_type = "AAAA" if addr.version == 6 else "A"
    try:
        if hints is not None and hints.get(domain):
            await _fetch(answers, list(hints.get(domain)), dns, address_type)
        for _ in range(MAX_ROUNDS):
            answers.asked = []
            outcome = _run(answers, ip, s, helo, receiver, identity, domain, default_explanation)
            if not answers.missing:
                assert outcome is not None
                if hints is not None:
                    hints.remember(domain, answers.asked)
                return outcome
            wanted, answers.missing = answers.missing, []
            await _fetch(answers, wanted, dns, address_type)
    except Exception as exc:  # fail soft: never a crash for one message
        log.warning("spf: check of %s for %s failed unexpectedly: %r", domain, ip, exc)
        return SpfOutcome(SpfResult.TEMPERROR, identity, domain, f"internal error: {type(exc).__name__}")
    return SpfOutcome(SpfResult.PERMERROR, identity, domain, "too many DNS lookups")


def _run(
    answers: _Answers,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    identity: str,
    domain: str,
    default_explanation: str,
) -> SpfOutcome | None:
    token = _current.set(answers)
    try:
        query = pyspf.query(i=ip, s=sender, h=helo, receiver=receiver or None, strict=True)
        if default_explanation:
            query.set_default_explanation(default_explanation)
        result, _code, explanation = query.check()
    except _Missing:
        return None
    finally:
        _current.reset(token)
    return SpfOutcome(SpfResult(result), identity, domain, str(explanation))


async def _fetch(answers: _Answers, wanted: list[tuple[str, str]], dns: SpfDns, address_type: str) -> None:
    """Ask every wanted question at once; then the addresses of the MX and PTR
    names they returned, which pyspf asks for next (RFC 7208 §5.4, §5.5)."""
    await asyncio.gather(*(_ask(answers, key, dns) for key in wanted))
    follow: list[tuple[str, str]] = []
    for key in wanted:
        found = answers.results.get(key)
        if key[1] not in ("MX", "PTR") or not isinstance(found, list):
            continue
        for (_name, rdtype), value in found[:10]:
            host = value[1] if rdtype == "MX" else value
            follow.append((str(host).lower().rstrip("."), address_type))
    follow = [k for k in dict.fromkeys(follow) if k[0] and k not in answers.results]
    await asyncio.gather(*(_ask(answers, key, dns) for key in follow))


async def _ask(answers: _Answers, key: tuple[str, str], dns: SpfDns) -> None:
    try:
        answers.results[key] = await dns(*key)
    except SpfDnsError as exc:
        answers.results[key] = exc
