"""Resolver without a network: canned dnspython responses through a fake backend, a FakeClock.

What is pinned here: the temporary/permanent split, the TTLs the cache uses
(RFC 2181 §5.2 minimum over the RRset, RFC 2308 §5 negative TTL from the SOA,
the caps), that temporary failures are never cached, the size bound, and
that identical concurrent questions share one query. The same behaviour
against a real server (dnsmasq) is in tests/interop/test_dns.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from gannet.clock import FakeClock
from gannet.delivery.dns import (
    MAX_NEGATIVE_TTL,
    MAX_POSITIVE_TTL,
    NEGATIVE_TTL_WITHOUT_SOA,
    DnsError,
    MxRecord,
    Resolver,
    parse_nameserver,
)

Canned = dns.message.Message | Exception


def response(name: str, rdtype: str, records: Sequence[tuple[int, str]] = (), *,
             rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
             soa: tuple[int, int] | None = None) -> dns.message.Message:
    """A response to `name rdtype`: answer records (ttl, text), an optional SOA (ttl, minimum)."""
    query = dns.message.make_query(name, rdtype)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    if records:
        rrset = reply.find_rrset(reply.answer, dns.name.from_text(name), dns.rdataclass.IN,
                                 dns.rdatatype.from_text(rdtype), create=True)
        for ttl, text in records:
            rrset.add(dns.rdata.from_text("IN", rdtype, text), ttl)
    if soa is not None:
        reply.authority.append(dns.rrset.from_text(
            "test.", soa[0], "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {soa[1]}"))
    return reply


class FakeBackend:
    """Answers from `canned[(name, rdtype)]` like dnspython's resolver would: an Answer,
    NXDOMAIN, NoNameservers for SERVFAIL, or the canned exception. Counts queries;
    while `gate` is set and not open, queries wait for it."""

    def __init__(self, canned: dict[tuple[str, str], Canned] | None = None) -> None:
        self.canned = canned or {}
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None

    async def resolve(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, *,
                      raise_on_no_answer: bool, lifetime: float, search: bool) -> dns.resolver.Answer:
        assert qname.is_absolute() and not raise_on_no_answer and not search
        key = (qname.to_text(omit_final_dot=True), dns.rdatatype.to_text(rdtype))
        self.calls.append(key)
        if self.gate is not None:
            await self.gate.wait()
        canned = self.canned.get(key)
        if canned is None:
            canned = response(key[0], key[1], rcode=dns.rcode.NXDOMAIN)
        if isinstance(canned, Exception):
            raise canned
        rcode = canned.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise dns.resolver.NXDOMAIN(qnames=[qname], responses={qname: canned})
        if rcode != dns.rcode.NOERROR:
            raise dns.resolver.NoNameservers(
                request=dns.message.make_query(qname, rdtype),
                errors=[("127.0.0.1", False, 53, dns.rcode.to_text(rcode), canned)])
        assert isinstance(canned, dns.message.QueryMessage)
        return dns.resolver.Answer(qname, rdtype, dns.rdataclass.IN, canned)


def make(canned: dict[tuple[str, str], Canned] | None = None, **kw: int
         ) -> tuple[Resolver, FakeBackend, FakeClock]:
    backend, clock = FakeBackend(canned), FakeClock()
    return Resolver(backend=backend, clock=clock, **kw), backend, clock


EXAMPLE_MX = response("example.test", "MX", [(300, "10 MX1.Example.TEST."), (600, "20 mx2.example.test.")])


# --------------------------------------------------------------------------- answers and errors


async def test_mx_records_are_lowercased_without_the_trailing_dot() -> None:
    resolver, _, _ = make({("example.test", "MX"): EXAMPLE_MX})
    records = await resolver.mx("example.test")
    assert sorted(records, key=lambda r: r.preference) == [
        MxRecord(10, "mx1.example.test"), MxRecord(20, "mx2.example.test")]


async def test_null_mx_target_is_the_empty_host() -> None:
    resolver, _, _ = make({("nullmx.test", "MX"): response("nullmx.test", "MX", [(300, "0 .")])})
    assert await resolver.mx("nullmx.test") == [MxRecord(0, "")]


async def test_mx_nodata_is_an_empty_list() -> None:
    resolver, _, _ = make({("host.test", "MX"): response("host.test", "MX")})
    assert await resolver.mx("host.test") == []


async def test_mx_nxdomain_is_permanent() -> None:
    resolver, _, _ = make()
    with pytest.raises(DnsError) as info:
        await resolver.mx("Nowhere.TEST.")
    assert not info.value.temporary
    assert info.value.reply_text() == "550 5.1.2 domain nowhere.test does not exist (NXDOMAIN)"
    assert str(info.value) == info.value.reply_text()


@pytest.mark.parametrize("failure", [
    response("example.test", "MX", rcode=dns.rcode.SERVFAIL),
    response("example.test", "MX", rcode=dns.rcode.REFUSED),
    dns.resolver.LifetimeTimeout(timeout=5.0, errors=[]),
    dns.exception.Timeout(),
    OSError("network unreachable"),
    dns.resolver.YXDOMAIN(),
], ids=["servfail", "refused", "lifetime", "timeout", "oserror", "yxdomain"])
async def test_failures_are_temporary_counted_and_never_cached(failure: Canned) -> None:
    resolver, backend, _ = make({("example.test", "MX"): failure})
    for _ in range(2):
        with pytest.raises(DnsError) as info:
            await resolver.mx("example.test")
        assert info.value.temporary
        assert (info.value.code, info.value.status) == (451, "4.4.3")
    assert len(backend.calls) == 2
    assert (resolver.stats.lookups, resolver.stats.failures, resolver.stats.cache_hits) == (2, 2, 0)


async def test_servfail_is_named_in_the_reason() -> None:
    servfail = response("example.test", "MX", rcode=dns.rcode.SERVFAIL)
    resolver, _, _ = make({("example.test", "MX"): servfail})
    with pytest.raises(DnsError, match=r"example\.test MX failed: nameserver answered SERVFAIL"):
        await resolver.mx("example.test")


@pytest.mark.parametrize("name", ["a..b", "", "x" * 64 + ".test", "."])
async def test_an_invalid_name_is_permanent_and_sends_no_query(name: str) -> None:
    resolver, backend, _ = make()
    with pytest.raises(DnsError) as info:
        await resolver.mx(name)
    assert (info.value.temporary, info.value.code, info.value.status) == (False, 553, "5.1.3")
    assert backend.calls == []


# --------------------------------------------------------------------------- addresses


def address_canned(aaaa: Canned | None, a: Canned | None) -> dict[tuple[str, str], Canned]:
    canned = {}
    if aaaa is not None:
        canned[("mx.test", "AAAA")] = aaaa
    if a is not None:
        canned[("mx.test", "A")] = a
    return canned


V6 = response("mx.test", "AAAA", [(300, "2001:db8::1")])
V4 = response("mx.test", "A", [(300, "192.0.2.1"), (300, "192.0.2.2")])
SERVFAIL_AAAA = response("mx.test", "AAAA", rcode=dns.rcode.SERVFAIL)
SERVFAIL_A = response("mx.test", "A", rcode=dns.rcode.SERVFAIL)
NODATA_AAAA = response("mx.test", "AAAA")
NODATA_A = response("mx.test", "A")


async def test_addresses_ipv6_first_both_asked() -> None:
    resolver, backend, _ = make(address_canned(V6, V4))
    assert await resolver.addresses("mx.test") == ["2001:db8::1", "192.0.2.1", "192.0.2.2"]
    assert sorted(backend.calls) == [("mx.test", "A"), ("mx.test", "AAAA")]


async def test_addresses_ask_aaaa_and_a_concurrently() -> None:
    resolver, backend, _ = make(address_canned(V6, V4))
    backend.gate = asyncio.Event()
    task = asyncio.create_task(resolver.addresses("mx.test"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(backend.calls) == 2  # both in flight before either answered
    backend.gate.set()
    assert len(await task) == 3


@pytest.mark.parametrize(("aaaa", "a", "expected"), [
    (SERVFAIL_AAAA, V4, ["192.0.2.1", "192.0.2.2"]),
    (V6, SERVFAIL_A, ["2001:db8::1"]),
    (NODATA_AAAA, V4, ["192.0.2.1", "192.0.2.2"]),
    (NODATA_AAAA, NODATA_A, []),
])
async def test_addresses_answer_with_what_was_found(aaaa: Canned, a: Canned, expected: list[str]) -> None:
    resolver, _, _ = make(address_canned(aaaa, a))
    assert await resolver.addresses("mx.test") == expected


@pytest.mark.parametrize(("aaaa", "a"), [
    (SERVFAIL_AAAA, SERVFAIL_A),
    (SERVFAIL_AAAA, NODATA_A),  # half the question unanswered: maybe it has an AAAA
    (SERVFAIL_AAAA, None),  # None: NXDOMAIN; uncertainty wins over a permanent answer
])
async def test_addresses_temporary_when_nothing_found_and_a_half_failed(
    aaaa: Canned, a: Canned | None
) -> None:
    resolver, _, _ = make(address_canned(aaaa, a))
    with pytest.raises(DnsError) as info:
        await resolver.addresses("mx.test")
    assert info.value.temporary


async def test_addresses_nxdomain_is_permanent() -> None:
    resolver, _, _ = make()
    with pytest.raises(DnsError) as info:
        await resolver.addresses("mx.test")
    assert info.value.reply_text() == "554 5.4.4 host mx.test does not exist (NXDOMAIN)"


# --------------------------------------------------------------------------- TXT and PTR


async def test_txt_joins_each_records_strings() -> None:
    spf = response("example.test", "TXT", [(300, '"v=spf1 " "ip4:192.0.2.1 -all"'), (300, '"other"')])
    resolver, _, _ = make({("example.test", "TXT"): spf})
    assert sorted(await resolver.txt("example.test")) == ["other", "v=spf1 ip4:192.0.2.1 -all"]


async def test_txt_absent_is_empty_and_failure_is_temporary() -> None:
    resolver, _, _ = make({("nodata.test", "TXT"): response("nodata.test", "TXT"),
                           ("sf.test", "TXT"): response("sf.test", "TXT", rcode=dns.rcode.SERVFAIL)})
    assert await resolver.txt("nodata.test") == []
    assert await resolver.txt("nxdomain.test") == []
    with pytest.raises(DnsError) as info:
        await resolver.txt("sf.test")
    assert info.value.temporary


async def test_ptr_asks_the_reverse_name() -> None:
    name = "1.2.0.192.in-addr.arpa"
    resolver, backend, _ = make({(name, "PTR"): response(name, "PTR", [(300, "MX.Example.TEST.")])})
    assert await resolver.ptr("192.0.2.1") == ["mx.example.test"]
    assert backend.calls == [(name, "PTR")]
    assert await resolver.ptr("2001:db8::1") == []
    with pytest.raises(ValueError):
        await resolver.ptr("not an address")


# --------------------------------------------------------------------------- cache


async def test_positive_answers_live_for_the_smallest_ttl_of_the_rrset() -> None:
    resolver, backend, clock = make({("example.test", "MX"): EXAMPLE_MX})  # TTLs 300 and 600
    await resolver.mx("example.test")
    clock.advance(299)
    await resolver.mx("Example.Test.")  # same key: lowercased, trailing dot dropped
    assert (len(backend.calls), resolver.stats.cache_hits, resolver.stats.lookups) == (1, 1, 1)
    clock.advance(1)
    await resolver.mx("example.test")
    assert (len(backend.calls), resolver.stats.cache_hits, resolver.stats.lookups) == (2, 1, 2)


async def test_positive_ttl_is_capped() -> None:
    long = response("example.test", "TXT", [(30 * 86400, '"x"')])
    resolver, backend, clock = make({("example.test", "TXT"): long})
    await resolver.txt("example.test")
    clock.advance(MAX_POSITIVE_TTL - 1)
    await resolver.txt("example.test")
    clock.advance(1)
    await resolver.txt("example.test")
    assert len(backend.calls) == 2


async def test_ttl_zero_is_not_cached() -> None:
    resolver, backend, _ = make({("example.test", "TXT"): response("example.test", "TXT", [(0, '"x"')])})
    await resolver.txt("example.test")
    await resolver.txt("example.test")
    assert len(backend.calls) == 2


@pytest.mark.parametrize(("rcode", "soa", "ttl"), [
    (dns.rcode.NXDOMAIN, (900, 120), 120),  # RFC 2308 §5: min(SOA TTL, SOA MINIMUM)
    (dns.rcode.NXDOMAIN, (90, 600), 90),
    (dns.rcode.NOERROR, (900, 120), 120),  # NODATA too
    (dns.rcode.NXDOMAIN, None, NEGATIVE_TTL_WITHOUT_SOA),
    (dns.rcode.NOERROR, None, NEGATIVE_TTL_WITHOUT_SOA),
    (dns.rcode.NXDOMAIN, (86400, 86400), MAX_NEGATIVE_TTL),
])
async def test_negative_answers_are_cached_per_rfc_2308(
    rcode: dns.rcode.Rcode, soa: tuple[int, int] | None, ttl: float
) -> None:
    canned = response("gone.test", "TXT", rcode=rcode, soa=soa)
    resolver, backend, clock = make({("gone.test", "TXT"): canned})
    assert await resolver.txt("gone.test") == []
    clock.advance(ttl - 1)
    assert await resolver.txt("gone.test") == []
    assert len(backend.calls) == 1
    clock.advance(1)
    await resolver.txt("gone.test")
    assert len(backend.calls) == 2


async def test_a_cached_nxdomain_still_raises() -> None:
    resolver, backend, _ = make()
    for _ in range(2):
        with pytest.raises(DnsError):
            await resolver.mx("gone.test")
    assert len(backend.calls) == 1 and resolver.stats.cache_hits == 1


async def test_cache_is_bounded_and_evicts_the_oldest() -> None:
    canned: dict[tuple[str, str], Canned] = {
        (f"{n}.test", "TXT"): response(f"{n}.test", "TXT", [(300, f'"{n}"')]) for n in "abc"}
    resolver, backend, _ = make(canned, max_entries=2)
    for n in "abc":
        await resolver.txt(f"{n}.test")
    await resolver.txt("c.test")
    await resolver.txt("b.test")
    assert len(backend.calls) == 3  # b and c still cached
    await resolver.txt("a.test")
    assert backend.calls[-1] == ("a.test", "TXT")  # a was evicted


async def test_clear_forgets_everything() -> None:
    resolver, backend, _ = make({("example.test", "MX"): EXAMPLE_MX})
    await resolver.mx("example.test")
    resolver.clear()
    await resolver.mx("example.test")
    assert len(backend.calls) == 2


# --------------------------------------------------------------------------- in-flight sharing


async def test_concurrent_identical_questions_share_one_query() -> None:
    resolver, backend, _ = make({("example.test", "MX"): EXAMPLE_MX})
    backend.gate = asyncio.Event()
    tasks = [asyncio.create_task(resolver.mx("example.test")) for _ in range(100)]
    await asyncio.sleep(0)
    backend.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(backend.calls) == 1
    assert all(r == results[0] for r in results) and len(results[0]) == 2
    assert (resolver.stats.lookups, resolver.stats.shared) == (1, 99)


async def test_a_shared_failure_reaches_every_waiter_and_is_not_kept() -> None:
    servfail = response("example.test", "MX", rcode=dns.rcode.SERVFAIL)
    resolver, backend, _ = make({("example.test", "MX"): servfail})
    backend.gate = asyncio.Event()
    tasks = [asyncio.create_task(resolver.mx("example.test")) for _ in range(3)]
    await asyncio.sleep(0)
    backend.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, DnsError) and r.temporary for r in results)
    assert resolver.stats.failures == 1
    with pytest.raises(DnsError):
        await resolver.mx("example.test")
    assert len(backend.calls) == 2


async def test_one_waiter_cancelled_does_not_cancel_the_others() -> None:
    resolver, backend, _ = make({("example.test", "MX"): EXAMPLE_MX})
    backend.gate = asyncio.Event()
    first = asyncio.create_task(resolver.mx("example.test"))
    second = asyncio.create_task(resolver.mx("example.test"))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    backend.gate.set()
    assert len(await second) == 2
    assert first.cancelled()
    await resolver.mx("example.test")  # and the answer was cached
    assert len(backend.calls) == 1


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]:5353", ("::1", 5353)),
    ("[::1]", ("::1", 53)),
    ("::1", ("::1", 53)),
])
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["ns.example.test", "127.0.0.1:0", "[::1", "[::1]x", "127.0.0.1:x"])
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_resolver_accepts_configured_nameservers() -> None:
    Resolver(["127.0.0.1", "127.0.0.1:5353", "[::1]:5353"], timeout=1.0)
    with pytest.raises(ValueError):
        Resolver(["ns.example.test"])


# --------------------------------------------------------------------------- cache hits by name text


async def test_cached_txt_answers_from_the_cache_only() -> None:
    spf = response("example.test", "TXT", [(300, '"v=spf1 -all"')])
    resolver, backend, clock = make({("example.test", "TXT"): spf})
    assert resolver.cached_txt("example.test") is None  # not cached: no query either
    assert backend.calls == []
    assert await resolver.txt("example.test") == ["v=spf1 -all"]
    assert resolver.cached_txt("Example.TEST.") == ["v=spf1 -all"]
    clock.advance(301)
    assert resolver.cached_txt("example.test") is None
    assert backend.calls == [("example.test", "TXT")]


async def test_other_spellings_of_a_cached_name_are_still_found() -> None:
    """The text fast path misses a name written with escapes; the Name-based path finds it."""
    spf = response("example.test", "TXT", [(300, '"v=spf1 -all"')])
    resolver, backend, _ = make({("example.test", "TXT"): spf})
    assert await resolver.txt("example.test.") == ["v=spf1 -all"]
    assert await resolver.txt("ex\\097mple.test") == ["v=spf1 -all"]
    assert backend.calls == [("example.test", "TXT")]
    assert resolver.stats.cache_hits == 1
    with pytest.raises(DnsError):
        await resolver.txt("bad..name")  # never found in the cache under its text
