"""Resolver and Router against a real DNS server: dnsmasq (peers.DnsServer) on 127.0.0.53.

Each test starts dnsmasq with the zone below and asks through Gannet's
Resolver (dnspython over real UDP), with a FakeClock for the cache so TTL
expiry needs no sleeping. dnsmasq's query log is the witness that a cached
answer really sent no query. SERVFAIL comes from dnsmasq forwarding
servfail.test to an upstream that says SERVFAIL; the timeout case uses a UDP
socket that never answers.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Iterator

import peers
import pytest

from gannet.clock import FakeClock
from gannet.delivery.dns import NEGATIVE_TTL_WITHOUT_SOA, DnsError, MxRecord, Resolver
from gannet.delivery.routing import NextHop, Router

pytestmark = pytest.mark.interop

OWN_NAME = "mx.gannet.test"
SPF = 'v=spf1 ip4:127.0.0.1 include:"quoted", -all # not a comment'
LONG = "p=" + "A" * 400  # longer than one 255-byte character-string: dnsmasq splits it

ZONE: peers.DnsRecords = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")],
                     "TXT": [SPF, ("two ", "strings")]},
    "mx1.example.test": {"A": ["127.0.0.10"], "AAAA": ["fd00::10"]},
    "mx2.example.test": {"A": ["127.0.0.20"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test")]},
    "a.equal.test": {"A": ["127.0.0.31"]},
    "b.equal.test": {"A": ["127.0.0.32"]},
    "implicit.test": {"A": ["127.0.0.40"], "AAAA": ["fd00::40"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "loop.test": {"MX": [(10, OWN_NAME), (20, "mx2.example.test")]},
    "dangling.test": {"MX": [(10, "nowhere.dangling.test")]},
    "sel._domainkey.example.test": {"TXT": [LONG]},
}


@pytest.fixture
def dnsmasq(dns_server: Callable[..., peers.DnsServer]) -> peers.DnsServer:
    return dns_server(records=ZONE, servfail=["servfail.test"], ttl=300)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dnsmasq: peers.DnsServer, clock: FakeClock) -> Resolver:
    return Resolver([dnsmasq.nameserver], timeout=3.0, clock=clock)


@pytest.fixture
def silent_nameserver() -> Iterator[str]:
    """A UDP socket that takes queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((peers.DNS_HOST, 0))
        yield f"{peers.DNS_HOST}:{sock.getsockname()[1]}"


def router(resolver: Resolver, seed: int = 0) -> Router:
    return Router(resolver, port=25, own_names=(OWN_NAME,), rng=random.Random(seed))


def logged(server: peers.DnsServer, rdtype: str, name: str, count: int) -> None:
    """dnsmasq logged exactly `count` queries for (rdtype, name) (its log may lag a little)."""
    peers.wait_for(lambda: server.queries().count((rdtype, name)) >= count, 5, f"{count} x {rdtype} {name}")
    assert server.queries().count((rdtype, name)) == count


async def test_mx_records_and_route_by_preference(resolver: Resolver) -> None:
    assert sorted(await resolver.mx("example.test"), key=lambda r: r.preference) == [
        MxRecord(10, "mx1.example.test"), MxRecord(20, "mx2.example.test")]
    route = await router(resolver).route("example.test")
    assert route.destination == "example.test"
    assert [(h.host, h.preference) for h in route.hops] == [
        ("mx1.example.test", 10), ("mx1.example.test", 10), ("mx2.example.test", 20)]


async def test_ipv6_and_ipv4_are_both_hops_ipv6_first(resolver: Resolver) -> None:
    route = await router(resolver).route("example.test")
    assert route.hops[:2] == (NextHop("mx1.example.test", "fd00::10", 25, 10),
                              NextHop("mx1.example.test", "127.0.0.10", 25, 10))
    assert route.hops[0].label == "mx1.example.test[fd00::10]:25"


async def test_equal_preferences_are_shuffled(resolver: Resolver) -> None:
    orders = {tuple(h.host for h in (await router(resolver, seed).route("equal.test")).hops)
              for seed in range(30)}
    assert orders == {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")}


async def test_implicit_mx(resolver: Resolver) -> None:
    route = await router(resolver).route("implicit.test")
    assert route.hops == (NextHop("implicit.test", "fd00::40", 25, 0),
                          NextHop("implicit.test", "127.0.0.40", 25, 0))


async def test_null_mx_is_556_5_1_10(resolver: Resolver) -> None:
    assert await resolver.mx("nullmx.test") == [MxRecord(0, "")]
    with pytest.raises(DnsError) as info:
        await router(resolver).route("nullmx.test")
    assert not info.value.temporary
    assert info.value.reply_text() == "556 5.1.10 nullmx.test does not accept mail (null MX, RFC 7505)"


async def test_nxdomain_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(DnsError) as info:
        await router(resolver).route("nosuch.test")
    assert (info.value.temporary, info.value.code, info.value.status) == (False, 550, "5.1.2")


async def test_mx_host_that_does_not_exist_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(DnsError) as info:
        await router(resolver).route("dangling.test")
    assert (info.value.temporary, info.value.status) == (False, "5.4.4")


async def test_servfail_is_temporary(resolver: Resolver, dnsmasq: peers.DnsServer) -> None:
    for _ in range(2):  # and not cached: asked again
        with pytest.raises(DnsError) as info:
            await router(resolver).route("servfail.test")
        assert (info.value.temporary, info.value.code, info.value.status) == (True, 451, "4.4.3")
        assert "SERVFAIL" in info.value.reason
    assert resolver.stats.failures == 2
    logged(dnsmasq, "MX", "servfail.test", 2)


async def test_refused_is_temporary(resolver: Resolver) -> None:
    with pytest.raises(DnsError) as info:  # dnsmasq REFUSES names outside its local zones
        await resolver.mx("example.invalid")
    assert info.value.temporary and "REFUSED" in info.value.reason


async def test_a_silent_nameserver_is_temporary_within_the_timeout(silent_nameserver: str) -> None:
    resolver = Resolver([silent_nameserver], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(DnsError) as info:
        await router(resolver).route("example.test")
    elapsed = time.monotonic() - started
    assert info.value.temporary and info.value.status == "4.4.3"
    assert 0.9 <= elapsed < 2.5, elapsed


async def test_our_own_hostname_as_best_mx_is_a_loop(resolver: Resolver) -> None:
    with pytest.raises(DnsError) as info:
        await router(resolver).route("loop.test")
    assert info.value.reply_text() == "554 5.4.6 mail for loop.test loops back to myself"


async def test_answers_are_cached_for_their_ttl(resolver: Resolver, dnsmasq: peers.DnsServer,
                                                clock: FakeClock) -> None:
    await resolver.mx("example.test")
    clock.advance(299)
    await resolver.mx("example.test")
    assert (resolver.stats.lookups, resolver.stats.cache_hits) == (1, 1)
    logged(dnsmasq, "MX", "example.test", 1)
    clock.advance(1)  # dnsmasq said TTL 300
    await resolver.mx("example.test")
    assert (resolver.stats.lookups, resolver.stats.cache_hits) == (2, 1)
    logged(dnsmasq, "MX", "example.test", 2)


async def test_the_server_ttl_is_the_one_used(dns_server: Callable[..., peers.DnsServer],
                                              clock: FakeClock) -> None:
    server = dns_server(records=ZONE, ttl=7)
    resolver = Resolver([server.nameserver], clock=clock)
    await resolver.addresses("mx2.example.test")
    clock.advance(6.5)
    await resolver.addresses("mx2.example.test")
    clock.advance(0.5)
    await resolver.addresses("mx2.example.test")
    logged(server, "A", "mx2.example.test", 2)


async def test_negative_answers_are_cached(resolver: Resolver, dnsmasq: peers.DnsServer,
                                           clock: FakeClock) -> None:
    # dnsmasq sends no SOA with its negative answers: the default negative TTL applies
    for _ in range(2):
        assert await resolver.txt("mx2.example.test") == []  # NODATA
        assert await resolver.txt("nosuch.test") == []  # NXDOMAIN
    clock.advance(NEGATIVE_TTL_WITHOUT_SOA)
    assert await resolver.txt("nosuch.test") == []
    logged(dnsmasq, "TXT", "mx2.example.test", 1)
    logged(dnsmasq, "TXT", "nosuch.test", 2)


async def test_txt(resolver: Resolver) -> None:
    assert sorted(await resolver.txt("example.test")) == sorted([SPF, "two strings"])
    assert await resolver.txt("sel._domainkey.example.test") == [LONG]


async def test_txt_records_change_on_update(dnsmasq: peers.DnsServer, clock: FakeClock) -> None:
    dnsmasq.update({"_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]}})
    resolver = Resolver([dnsmasq.nameserver], clock=clock)
    assert await resolver.txt("_dmarc.example.test") == ["v=DMARC1; p=reject"]
    assert await resolver.mx("example.test")  # the rest of the zone is still there


async def test_ptr(resolver: Resolver) -> None:
    assert await resolver.ptr("127.0.0.20") == ["mx2.example.test"]
    assert await resolver.ptr("fd00::10") == ["mx1.example.test"]
    assert await resolver.ptr("127.0.0.99") == []


async def test_concurrent_routes_share_queries(resolver: Resolver, dnsmasq: peers.DnsServer) -> None:
    routes = await asyncio.gather(*(router(resolver).route("example.test") for _ in range(50)))
    assert all(r.hops == routes[0].hops for r in routes)
    logged(dnsmasq, "MX", "example.test", 1)
    logged(dnsmasq, "AAAA", "mx1.example.test", 1)
