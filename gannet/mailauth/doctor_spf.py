"""SPF for `gannet doctor`: find a domain's record, count its DNS lookups, and see whom it covers.

A diagnostic reading of RFC 7208, not the receiving-side check (that is
`gannet.mailauth`'s SPF for inbound mail). It answers what a postmaster needs
to fix a record:

- `records`: the TXT records at the domain that begin with "v=spf1" (§4.5:
  more than one is a permerror for every receiver);
- `lookups`: the DNS-querying terms of the whole tree — include, a, mx, ptr,
  exists and redirect, counted through every include and redirect (§4.6.4:
  more than 10 is a permerror). Counted statically, as if no term matched,
  because that is the path a receiver takes for mail from anyone not listed
  early; `void_lookups` counts the names that answered nothing (§4.6.4: more
  than 2 is a permerror) and `cost` the lookups of each top-level term;
- `result(ip)`: what check_host() would give this server's address, evaluated
  in order with includes and redirect (§5, §6.1), "unknown" where the answer
  depends on macros (§7), which this diagnosis does not expand.

Written here rather than with pyspf because pyspf resolves through its own
synchronous resolver (not Gannet's `[dns] nameservers`) and reports a verdict,
not the per-term lookup cost and syntax problems this report explains.
Lookups go through `gannet.delivery.dns.Resolver` (async, cached).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from gannet.delivery.dns import DnsError, Resolver

MAX_LOOKUPS = 10  # RFC 7208 §4.6.4
MAX_VOID_LOOKUPS = 2  # RFC 7208 §4.6.4
LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists")  # + the redirect modifier
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_TERM = re.compile(r"^([+\-~?]?)([a-z0-9]+)(?:([:=])(.*))?$", re.IGNORECASE)
_CIDR = re.compile(r"^(.*?)(?:/(\d{1,2}))?(?://(\d{1,3}))?$")
RESULT_OF = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


class SpfTempError(Exception):
    """A DNS failure (not an answer): the analysis cannot be trusted."""


@dataclass(slots=True)
class Term:
    qualifier: str  # "+", "-", "~", "?"
    name: str  # mechanism or modifier name, lowercased
    value: str  # after ":" or "=" ("" when none)
    modifier: bool


@dataclass(slots=True)
class SpfReport:
    domain: str
    records: list[str] = field(default_factory=list)
    lookups: int = 0
    void_lookups: int = 0
    errors: list[str] = field(default_factory=list)  # permerrors anywhere in the tree
    cost: list[tuple[str, int]] = field(default_factory=list)  # (top-level term, lookups it costs)


def spf_records(texts: list[str]) -> list[str]:
    """The TXT strings that are SPF records (RFC 7208 §4.5: "v=spf1" then a space or the end)."""
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def parse_terms(record: str) -> list[Term]:
    """The terms of an SPF record; ValueError naming the first bad one (RFC 7208 §4.6.1, §12)."""
    terms = []
    for word in record.split()[1:]:
        m = _TERM.match(word)
        if not m:
            raise ValueError(f"{word!r} is not an SPF term")
        qualifier, name, sep, value = m.group(1) or "+", m.group(2).lower(), m.group(3), m.group(4) or ""
        if sep == "=":
            if m.group(1):
                raise ValueError(f"{word!r}: a modifier takes no qualifier")
            terms.append(Term("+", name, value, True))
            continue
        if name not in MECHANISMS:
            raise ValueError(f"{word!r}: unknown mechanism {name!r}")
        if name in ("include", "exists", "ip4", "ip6") and not value:
            raise ValueError(f"{word!r}: {name} needs a value")
        if name == "all" and sep:
            raise ValueError(f"{word!r}: all takes no value")
        if name in ("ip4", "ip6"):
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{word!r}: {value!r} is not a network") from None
            if (net.version == 4) != (name == "ip4"):
                raise ValueError(f"{word!r}: not an IPv{4 if name == 'ip4' else 6} network")
        terms.append(Term(qualifier, name, value, False))
    names = [t.name for t in terms if t.modifier]
    for dup in ("redirect", "exp"):
        if names.count(dup) > 1:
            raise ValueError(f"{dup}= appears more than once (RFC 7208 §6)")
    return terms


def _split_target(value: str, default: str) -> tuple[str, int | None, int | None]:
    """a/mx value "domain/24//64" → (domain or default, ip4 cidr, ip6 cidr)."""
    m = _CIDR.match(value)
    assert m is not None  # the pattern matches every string
    target = m.group(1) or default
    return target, int(m.group(2)) if m.group(2) else None, int(m.group(3)) if m.group(3) else None


class SpfAnalyser:
    """Walks a domain's SPF tree through the Resolver (its cache makes repeated walks cheap)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def record_texts(self, domain: str) -> list[str]:
        try:
            return spf_records(await self.resolver.txt(domain))
        except DnsError as exc:
            if exc.temporary:
                raise SpfTempError(str(exc)) from None
            return []

    # ------------------------------------------------------------------ counting

    async def analyse(self, domain: str) -> SpfReport:
        report = SpfReport(domain, records=await self.record_texts(domain))
        if len(report.records) == 1:
            try:
                terms = parse_terms(report.records[0])
            except ValueError as exc:
                report.errors.append(f"{domain}: {exc}")
                return report
            for term in _effective(terms):
                before = report.lookups
                await self._count_term(term, domain, report, {domain})
                if report.lookups > before:
                    report.cost.append((_term_text(term), report.lookups - before))
        return report

    async def _count_tree(self, domain: str, report: SpfReport, seen: set[str]) -> None:
        records = await self.record_texts(domain)
        if len(records) != 1:
            report.errors.append(
                f"{domain} has {'no' if not records else len(records)} SPF record{'s' if records else ''}"
            )
            if not records:
                report.void_lookups += 1
            return
        try:
            terms = parse_terms(records[0])
        except ValueError as exc:
            report.errors.append(f"{domain}: {exc}")
            return
        for term in _effective(terms):
            await self._count_term(term, domain, report, seen)

    async def _count_term(self, term: Term, domain: str, report: SpfReport, seen: set[str]) -> None:
        if term.name not in (*LOOKUP_TERMS, "redirect") or (term.modifier and term.name != "redirect"):
            return
        report.lookups += 1
        if "%" in term.value:
            return  # macros: the target depends on the message; counted, not followed
        if term.name in ("include", "redirect"):
            target = term.value.lower().rstrip(".")
            if target in seen:
                report.errors.append(f"{term.name}:{target} loops back to itself")
                return
            await self._count_tree(target, report, seen | {target})
        elif term.name in ("a", "mx"):
            target, _, _ = _split_target(term.value, domain)
            if not await self._answers(term.name, target):
                report.void_lookups += 1

    async def _answers(self, kind: str, name: str) -> bool:
        try:
            return bool(await (self.resolver.mx(name) if kind == "mx" else self.resolver.addresses(name)))
        except DnsError as exc:
            if exc.temporary:
                raise SpfTempError(str(exc)) from None
            return False

    # ------------------------------------------------------------------ evaluating

    async def result(self, domain: str, ip: str, depth: int = 0) -> str:
        """check_host(ip, domain) without macros: pass/fail/softfail/neutral/none/permerror/unknown."""
        if depth > MAX_LOOKUPS:
            return "permerror"
        records = await self.record_texts(domain)
        if not records:
            return "none"
        if len(records) > 1:
            return "permerror"
        try:
            terms = parse_terms(records[0])
        except ValueError:
            return "permerror"
        address = ipaddress.ip_address(ip)
        for term in terms:
            if term.modifier:
                continue
            if "%" in term.value:
                return "unknown"
            matched = await self._matches(term, domain, address, depth)
            if matched is None:
                return "unknown"
            if isinstance(matched, str):
                return matched  # an error from an include
            if matched:
                return RESULT_OF[term.qualifier]
        redirect = next((t for t in terms if t.modifier and t.name == "redirect"), None)
        if redirect is not None:
            if "%" in redirect.value:
                return "unknown"
            sub = await self.result(redirect.value.lower().rstrip("."), ip, depth + 1)
            return "permerror" if sub == "none" else sub
        return "neutral"

    async def _matches(
        self, term: Term, domain: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, depth: int
    ) -> bool | str | None:
        """True/False, an error result string from an include, or None when it cannot be told."""
        name = term.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            return ip in ipaddress.ip_network(term.value, strict=False)
        if name == "include":
            sub = await self.result(term.value.lower().rstrip("."), str(ip), depth + 1)
            if sub in ("none", "permerror"):
                return "permerror"  # RFC 7208 §5.2
            return None if sub == "unknown" else sub == "pass"
        if name in ("a", "mx"):
            target, cidr4, cidr6 = _split_target(term.value, domain)
            hosts = [target]
            if name == "mx":
                try:
                    hosts = [mx.host for mx in await self.resolver.mx(target) if mx.host][:10]
                except DnsError as exc:
                    if exc.temporary:
                        raise SpfTempError(str(exc)) from None
                    return False
            for host in hosts:
                for text in await self._addresses(host):
                    addr = ipaddress.ip_address(text)
                    prefix = (cidr4 if addr.version == 4 else cidr6) or addr.max_prefixlen
                    if addr.version == ip.version and ip in ipaddress.ip_network(f"{addr}/{prefix}", False):
                        return True
            return False
        return None  # ptr and exists: not evaluated here (ptr is deprecated, exists wants macros)

    async def _addresses(self, host: str) -> list[str]:
        try:
            return await self.resolver.addresses(host)
        except DnsError as exc:
            if exc.temporary:
                raise SpfTempError(str(exc)) from None
            return []


def _effective(terms: list[Term]) -> list[Term]:
    """The terms a receiver may evaluate: redirect= is ignored when an "all" is present (RFC 7208 §6.1)."""
    if any(t.name == "all" and not t.modifier for t in terms):
        return [t for t in terms if not (t.modifier and t.name == "redirect")]
    return terms


def _term_text(term: Term) -> str:
    prefix = "" if term.qualifier == "+" else term.qualifier
    sep = "=" if term.modifier else ":"
    return f"{prefix}{term.name}{sep + term.value if term.value else ''}"


def with_addresses(record: str, ips: list[str]) -> str:
    """`record` with ip4:/ip6: terms for `ips` inserted before its all/redirect (for "publish this")."""
    words = record.split()
    new = [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips]
    for i, word in enumerate(words[1:], start=1):
        bare = word.lstrip("+-~?").lower()
        if bare == "all" or bare.startswith("redirect="):
            return " ".join(words[:i] + new + words[i:])
    return " ".join(words + new)


def recommended_record(ips: list[str]) -> str:
    """A starting record: this server's addresses, nobody else (RFC 7208 §4.6.2's "-all")."""
    if not ips:
        return "v=spf1 mx -all"
    return " ".join(["v=spf1", *(f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips), "-all"])
