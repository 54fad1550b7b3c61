"""Outbound DNS: an asyncio resolver with a TTL cache, for routing and (later) SPF/DKIM/DMARC.

Owns: the questions Gannet asks of DNS (MX, A/AAAA, TXT, PTR), the cache of
their answers, and the mapping of DNS outcomes onto the one decision delivery
cares about: retry later (`DnsError.temporary`) or give up (permanent).
Callers: `routing.Router` (MX and addresses), later `mailauth` (TXT, PTR).
All methods run on the event loop's thread.

What it must never do:

- Block the event loop. Queries go through `dns.asyncresolver` (sockets on the
  loop); `/etc/resolv.conf` is read once, in the constructor.
- Turn a temporary failure into a permanent one. Only an authoritative
  answer is permanent: NXDOMAIN (RFC 1035 §4.1.1 RCODE 3, RFC 8020) or
  "the name exists but has no such records" (NODATA, RFC 2308 §2.2).
  SERVFAIL, REFUSED, a timeout, a network error or anything unexpected is
  temporary (RFC 5321 §5.1: "temporary error ... the message is queued").
  When a question is split (AAAA and A for one host) and one half failed
  temporarily while the other found nothing, the whole is temporary.

Error codes (`DnsError`, an SMTP-like reply for the DSN and the log):

- 451 4.4.3 temporary: SERVFAIL/REFUSED/timeout/no nameserver answered
  (RFC 3463 X.4.3 "routing server failure").
- 550 5.1.2 the mail domain does not exist: NXDOMAIN for MX
  (X.1.2 "bad destination system address").
- 554 5.4.4 a host (MX target) does not exist: NXDOMAIN for A/AAAA
  (X.4.4 "unable to route").
- 553 5.1.3 the name is not a valid domain name at all (X.1.3 "bad destination
  address syntax"); no query is sent.

Cache. Keyed by (lowercased name without the trailing dot, rdtype); times
come from the injected `Clock` (monotonic), so tests expire entries with a
FakeClock. A positive answer lives for its TTL (the minimum over the RRset
and any CNAMEs, RFC 2181 §5.2) capped at `MAX_POSITIVE_TTL`; a negative answer
(NXDOMAIN or NODATA) for the SOA's negative TTL, min(SOA TTL, SOA MINIMUM)
(RFC 2308 §5), or `NEGATIVE_TTL_WITHOUT_SOA` when the server sent no SOA,
capped at `MAX_NEGATIVE_TTL`. A TTL of 0 means "do not cache". Temporary
failures are NOT cached: the queue's retry schedule already spaces the next
attempt, and caching a SERVFAIL would only delay recovery (RFC 2308 §7.1
permits up to 5 minutes; we choose 0). The cache holds at most `max_entries`;
inserting into a full cache evicts the oldest entry. Identical questions
asked while one is in flight share that query (and its failure), so a burst
of messages to one domain costs one MX query.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TXT import TXT

from gannet import metrics
from gannet.clock import Clock, SystemClock

MAX_POSITIVE_TTL = 86_400.0
MAX_NEGATIVE_TTL = 3_600.0
NEGATIVE_TTL_WITHOUT_SOA = 60.0
# dnspython's per-nameserver attempt timeout; the whole question is bounded by `timeout`.
ATTEMPT_TIMEOUT = 2.0


class DnsError(Exception):
    """A lookup or route that failed. `temporary` decides defer vs bounce.

    `code` and `status` form an SMTP-like reply (for the DSN's Diagnostic-Code
    and the log); `reason` is the human part, naming the name and the cause.
    """

    def __init__(self, temporary: bool, code: int, status: str, reason: str) -> None:
        super().__init__(temporary, code, status, reason)
        self.temporary = temporary
        self.code = code
        self.status = status
        self.reason = reason

    def reply_text(self) -> str:
        return f"{self.code} {self.status} {self.reason}"

    def __str__(self) -> str:
        return self.reply_text()


def temporary_error(reason: str) -> DnsError:
    return DnsError(True, 451, "4.4.3", reason)


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: str  # lowercased, no trailing dot; "" for the null MX target "." (RFC 7505)


@dataclass(slots=True)
class DnsStats:
    """Counters for /metrics. `lookups` counts queries sent; `cache_hits` questions
    answered from the cache; `shared` questions that joined a query already in
    flight; `failures` queries that failed temporarily; `seconds` the summed
    latency of the queries sent."""

    lookups: int = 0
    cache_hits: int = 0
    failures: int = 0
    seconds: float = 0.0
    shared: int = 0


Kind = Literal["ok", "nodata", "nxdomain"]


@dataclass(frozen=True, slots=True)
class _Answer:
    kind: Kind
    rdatas: tuple[dns.rdata.Rdata, ...] = ()


@dataclass(slots=True)
class _Entry:
    answer: _Answer
    expires: float  # clock.monotonic()


def parse_nameserver(text: str) -> tuple[str, int]:
    """`"127.0.0.1"`, `"127.0.0.1:5353"`, `"::1"` or `"[::1]:5353"` → (address, port)."""
    host, port = text.strip(), 53
    if host.startswith("["):
        inner, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not a nameserver address")
        host, port = inner, int(rest[1:]) if rest else 53
    elif host.count(":") == 1:
        host, _, port_text = host.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # ValueError for a name: nameservers are addresses
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


def to_dns_name(name: str) -> dns.name.Name:
    """An absolute dnspython Name for `name`; DnsError(553 5.1.3) when it cannot be one."""
    text = name.strip().rstrip(".")
    try:
        if not text:
            raise ValueError("empty name")
        return dns.name.from_text(text)
    except (ValueError, UnicodeError, dns.exception.DNSException):
        raise DnsError(False, 553, "5.1.3", f"{name!r} is not a valid domain name") from None


def negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) of the authority section's SOA, else the default."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                soa = cast(SOA, rrset[0])
                return float(min(rrset.ttl, soa.minimum, MAX_NEGATIVE_TTL))
    return NEGATIVE_TTL_WITHOUT_SOA


def _why(exc: BaseException, timeout: float) -> str:
    """A short cause for the log line of a temporary failure."""
    if isinstance(exc, dns.exception.Timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        answers = sorted({e[3] for e in errors if isinstance(e[3], str)})  # rcodes: "SERVFAIL", "REFUSED"
        if answers:
            return f"nameserver answered {'/'.join(answers)}"
        problems = sorted({f"{type(e[3]).__name__}: {e[3]}" for e in errors})
        return "no nameserver answered" + (f" ({'; '.join(problems)})" if problems else "")
    return f"{type(exc).__name__}: {exc}"


class QueryBackend(Protocol):
    """What sends the queries: `dns.asyncresolver.Resolver`, or a test double that
    returns `dns.resolver.Answer`s built from canned responses (tests/unit/delivery)."""

    async def resolve(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        *,
        raise_on_no_answer: bool,
        lifetime: float,
        search: bool,
    ) -> dns.resolver.Answer: ...


class Resolver:
    """Asynchronous lookups with a TTL cache, in-flight sharing and temporary/permanent errors.

    `nameservers` as in the config's `[dns] nameservers` ("127.0.0.1",
    "127.0.0.1:5353", "[::1]:5353"); empty means the system's (/etc/resolv.conf).
    `timeout` bounds each question (all nameservers and retries together).
    `backend` replaces dnspython's resolver (then `nameservers` is unused).
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 5.0,
        clock: Clock | None = None,
        max_entries: int = 10_000,
        backend: QueryBackend | None = None,
    ) -> None:
        self._backend: QueryBackend = backend or _dnspython_resolver(nameservers, timeout)
        self.timeout = timeout
        self._clock: Clock = clock or SystemClock()
        self._max_entries = max(1, max_entries)
        self._cache: dict[tuple[str, int], _Entry] = {}
        self._inflight: dict[tuple[str, int], asyncio.Task[_Answer]] = {}
        self.stats = DnsStats()

    # ------------------------------------------------------------------ public

    async def mx(self, domain: str) -> list[MxRecord]:
        """MX records of `domain` as published (unordered); [] when it has none (NODATA).

        NXDOMAIN → DnsError 550 5.1.2; temporary failures → DnsError 451 4.4.3.
        """
        answer = await self._lookup(domain, dns.rdatatype.MX)
        if answer.kind == "nxdomain":
            raise DnsError(False, 550, "5.1.2", f"domain {_show(domain)} does not exist (NXDOMAIN)")
        records = []
        for rdata in answer.rdatas:
            mx = cast(MX, rdata)
            host = "" if mx.exchange == dns.name.root else _text(mx.exchange)
            records.append(MxRecord(int(mx.preference), host))
        return records

    async def addresses(self, host: str) -> list[str]:
        """IPv6 then IPv4 addresses of `host` (AAAA and A asked concurrently).

        [] when the host exists with neither. Any address found wins; else a
        temporary failure of either half → DnsError 451 4.4.3; else NXDOMAIN →
        DnsError 554 5.4.4.
        """
        results = await asyncio.gather(
            self._lookup(host, dns.rdatatype.AAAA),
            self._lookup(host, dns.rdatatype.A),
            return_exceptions=True,
        )
        found: list[str] = []
        failure: BaseException | None = None
        nxdomain = False
        for result in results:
            if isinstance(result, _Answer):
                found += [rdata.to_text() for rdata in result.rdatas]
                nxdomain = nxdomain or result.kind == "nxdomain"
            elif isinstance(result, DnsError) and result.temporary:
                failure = failure or result
            else:
                raise result  # a permanent DnsError (bad name) or a bug
        if found:
            return found
        if failure is not None:
            raise failure
        if nxdomain:
            raise DnsError(False, 554, "5.4.4", f"host {_show(host)} does not exist (NXDOMAIN)")
        return []

    async def txt(self, name: str) -> list[str]:
        """Each TXT record's strings joined (RFC 7208 §3.3); [] on NODATA or NXDOMAIN."""
        return _txt_strings(await self._lookup(name, dns.rdatatype.TXT))

    def cached_txt(self, name: str) -> list[str] | None:
        """What `txt(name)` would return when its answer is cached and fresh, else None.

        Synchronous: no query, no task. The inbound checks ask this first, so a
        message whose records are all cached costs no trip through the event loop.
        """
        answer = self._cached(name, int(dns.rdatatype.TXT))
        return None if answer is None else _txt_strings(answer)

    async def ptr(self, ip: str) -> list[str]:
        """Names that `ip` maps back to (for FCrDNS); [] on NODATA or NXDOMAIN.

        ValueError when `ip` is not an IP address.
        """
        name = dns.reversename.from_address(str(ipaddress.ip_address(ip))).to_text(omit_final_dot=True)
        answer = await self._lookup(name, dns.rdatatype.PTR)
        return [_text(cast(PTR, r).target) for r in answer.rdatas]

    def clear(self) -> None:
        """Forget every cached answer (queries in flight are unaffected)."""
        self._cache.clear()

    # ------------------------------------------------------------------ cache and queries

    def _cached(self, name: str, rdtype: int) -> _Answer | None:
        """The fresh cached answer, found by the name's text alone.

        Building a dnspython Name costs more than the rest of a cache hit, so
        this looks the name up as written (stripped, lowercased, no final dot).
        That text equals the cache key whenever the name is in its usual
        spelling; for any other (escapes, IDNA) it simply misses, and
        `_lookup` finds the entry through the Name. It can never find a wrong
        entry: a key is the text of its Name, and that text reads back as
        that same Name.
        """
        entry = self._cache.get((name.strip().rstrip(".").lower(), rdtype))
        if entry is None or entry.expires <= self._clock.monotonic():
            return None  # an expired entry is removed by `_lookup`
        self.stats.cache_hits += 1
        return entry.answer

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        cached = self._cached(name, int(rdtype))
        if cached is not None:
            return cached
        qname = to_dns_name(name)
        key = (_text(qname), int(rdtype))
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > self._clock.monotonic():
                self.stats.cache_hits += 1
                return entry.answer
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key, qname, rdtype))
            task.add_done_callback(_retrieve)
            self._inflight[key] = task
        else:
            self.stats.shared += 1
        # shield: one caller being cancelled must not cancel the others' query
        return await asyncio.shield(task)

    async def _fetch(
        self, key: tuple[str, int], qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> _Answer:
        start = self._clock.monotonic()
        self.stats.lookups += 1
        failed = False
        try:
            answer, ttl = await self._query(qname, rdtype)
        except DnsError:
            self.stats.failures += 1
            failed = True
            raise
        finally:
            elapsed = self._clock.monotonic() - start
            self.stats.seconds += elapsed
            metrics.dns_lookup(dns.rdatatype.to_text(rdtype), elapsed, ok=not failed)
            self._inflight.pop(key, None)
        if ttl > 0:
            self._store(key, _Entry(answer, self._clock.monotonic() + ttl))
        return answer

    async def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> tuple[_Answer, float]:
        """One question to the nameservers: (answer, seconds to cache it)."""
        label = f"{_text(qname)} {dns.rdatatype.to_text(rdtype)}"
        try:
            # a guard above dnspython's own lifetime: whatever happens, we answer in time
            async with asyncio.timeout(self.timeout + 1.0):
                result = await self._backend.resolve(
                    qname, rdtype, raise_on_no_answer=False, lifetime=self.timeout, search=False
                )
        except dns.resolver.NXDOMAIN as exc:
            responses = cast(dict[dns.name.Name, dns.message.Message], exc.kwargs.get("responses") or {})
            ttl = min((negative_ttl(r) for r in responses.values()), default=NEGATIVE_TTL_WITHOUT_SOA)
            return _Answer("nxdomain"), min(ttl, MAX_NEGATIVE_TTL)
        except TimeoutError:
            raise temporary_error(
                f"DNS lookup of {label} failed: no answer within {self.timeout:g}s"
            ) from None
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            raise temporary_error(f"DNS lookup of {label} failed: {_why(exc, self.timeout)}") from None
        if result.rrset is None or not len(result.rrset):
            return _Answer("nodata"), min(negative_ttl(result.response), MAX_NEGATIVE_TTL)
        ttl = min(float(result.chaining_result.minimum_ttl), MAX_POSITIVE_TTL)
        return _Answer("ok", tuple(result.rrset)), ttl

    def _store(self, key: tuple[str, int], entry: _Entry) -> None:
        self._cache.pop(key, None)
        while len(self._cache) >= self._max_entries:
            del self._cache[next(iter(self._cache))]  # dicts keep insertion order: oldest first
        self._cache[key] = entry


def _dnspython_resolver(nameservers: Sequence[str], timeout: float) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(s)) for s in nameservers]
    else:  # the system's: /etc/resolv.conf, read once here
        resolver = dns.asyncresolver.Resolver()
    resolver.cache = None  # ours is the cache: one place for TTLs, negative caching and stats
    resolver.timeout = min(ATTEMPT_TIMEOUT, timeout)
    resolver.lifetime = timeout
    return resolver


def _txt_strings(answer: _Answer) -> list[str]:
    return [b"".join(cast(TXT, r).strings).decode("utf-8", "replace") for r in answer.rdatas]


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _show(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _retrieve(task: asyncio.Task[_Answer]) -> None:
    """Mark a shared query's exception as seen, in case every caller was cancelled."""
    if not task.cancelled():
        task.exception()
