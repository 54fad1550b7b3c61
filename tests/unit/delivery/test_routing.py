"""Routing rules (RFC 5321 §5.1, RFC 7505) against a stub DNS; the pure helpers directly.

The stub answers `mx` and `addresses` from dicts and records the questions,
so each test states the DNS facts and the route (or error) they must give.
The same rules against a real DNS server are in tests/interop/test_dns.py.
"""

from __future__ import annotations

import random

import pytest

from gannet.delivery.dns import DnsError, MxRecord
from gannet.delivery.routing import (
    MAX_HOPS,
    SMARTHOST,
    NextHop,
    Route,
    Router,
    drop_self,
    null_mx,
    order_mx,
    parse_host_port,
)

SERVFAIL = DnsError(True, 451, "4.4.3", "SERVFAIL")
NXDOMAIN = DnsError(False, 554, "5.4.4", "NXDOMAIN")


class StubDns:
    """`mx[domain]` and `addr[host]`: a list, or a DnsError to raise; missing → NXDOMAIN."""

    def __init__(self, mx: dict[str, list[MxRecord] | DnsError] | None = None,
                 addr: dict[str, list[str] | DnsError] | None = None) -> None:
        self.mx_answers = mx or {}
        self.addr_answers = addr or {}
        self.asked: list[tuple[str, str]] = []

    async def mx(self, domain: str) -> list[MxRecord]:
        self.asked.append(("MX", domain))
        answer = self.mx_answers.get(domain, DnsError(False, 550, "5.1.2", f"{domain} NXDOMAIN"))
        if isinstance(answer, DnsError):
            raise answer
        return answer

    async def addresses(self, host: str) -> list[str]:
        self.asked.append(("ADDR", host))
        answer = self.addr_answers.get(host, NXDOMAIN)
        if isinstance(answer, DnsError):
            raise answer
        return answer


def router(dns: StubDns, **kw: object) -> Router:
    kw.setdefault("own_names", ("mx.gannet.test",))
    return Router(dns, port=25, rng=random.Random(1), **kw)  # type: ignore[arg-type]


def mx(*pairs: tuple[int, str]) -> list[MxRecord]:
    return [MxRecord(p, h) for p, h in pairs]


async def error_of(r: Router, domain: str) -> DnsError:
    with pytest.raises(DnsError) as info:
        await r.route(domain)
    return info.value


# --------------------------------------------------------------------------- pure helpers


def test_order_mx_sorts_by_preference() -> None:
    records = mx((30, "c"), (10, "a"), (20, "b"))
    for seed in range(20):
        assert [r.host for r in order_mx(records, random.Random(seed))] == ["a", "b", "c"]
    assert [r.host for r in records] == ["c", "a", "b"]  # the input is not changed


def test_order_mx_shuffles_equal_preferences() -> None:
    records = mx((10, "a"), (10, "b"), (5, "first"), (20, "last"))
    seen = {tuple(r.host for r in order_mx(records, random.Random(seed))) for seed in range(50)}
    assert seen == {("first", "a", "b", "last"), ("first", "b", "a", "last")}


def test_drop_self_drops_us_and_every_mx_at_our_preference_or_worse() -> None:
    records = mx((10, "a"), (20, "b"), (30, "mx.gannet.test"), (30, "c"), (40, "d"))
    assert drop_self(records, {"mx.gannet.test"}) == mx((10, "a"), (20, "b"))


def test_drop_self_compares_names_without_case_or_trailing_dot() -> None:
    records = mx((10, "a"), (20, "mx.gannet.test"))
    assert drop_self(records, {"MX.Gannet.Test."}) == mx((10, "a"))


def test_drop_self_without_us_changes_nothing() -> None:
    records = mx((10, "a"), (20, "b"))
    assert drop_self(records, {"mx.gannet.test"}) == records
    assert drop_self(records, ()) == records


def test_drop_self_when_we_are_the_best_mx_is_a_loop() -> None:
    with pytest.raises(DnsError) as info:
        drop_self(mx((10, "mx.gannet.test"), (10, "other"), (20, "backup")), {"mx.gannet.test"}, "d.test")
    assert not info.value.temporary
    assert info.value.reply_text() == "554 5.4.6 mail for d.test loops back to myself"


@pytest.mark.parametrize(("records", "expected"), [
    (mx((0, "")), True),
    (mx((10, "")), True),  # RFC 7505 says 0; the "." is what matters
    (mx((0, ""), (10, "mx.test")), False),  # invalid mix: not a null MX
    (mx((10, "mx.test")), False),
    ([], False),
])
def test_null_mx(records: list[MxRecord], expected: bool) -> None:
    assert null_mx(records) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("relay.test", ("relay.test", 25)),
    ("Relay.Test:587", ("relay.test", 587)),
    ("[relay.test]:587", ("relay.test", 587)),
    ("[relay.test]", ("relay.test", 25)),
    ("192.0.2.1:2525", ("192.0.2.1", 2525)),
    ("[::1]:2525", ("::1", 2525)),
    ("2001:db8::1", ("2001:db8::1", 25)),
])
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, 25) == expected


@pytest.mark.parametrize("text", ["[relay.test", "[relay.test]587", "relay.test:x", "a:b:c", "[]:25"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text, 25)


def test_next_hop_label() -> None:
    assert NextHop("mx.test", "192.0.2.1", 25, 10).label == "mx.test[192.0.2.1]:25"
    assert NextHop("mx.test", "2001:db8::1", 25, 10).label == "mx.test[2001:db8::1]:25"


# --------------------------------------------------------------------------- MX routes


async def test_route_follows_mx_order_ipv6_first_within_each_host() -> None:
    dns = StubDns(mx={"d.test": mx((20, "b.d.test"), (10, "a.d.test"))},
                  addr={"a.d.test": ["2001:db8::a", "192.0.2.10"], "b.d.test": ["192.0.2.20"]})
    route = await router(dns).route("D.Test.")
    assert route == Route("d.test", (
        NextHop("a.d.test", "2001:db8::a", 25, 10),
        NextHop("a.d.test", "192.0.2.10", 25, 10),
        NextHop("b.d.test", "192.0.2.20", 25, 20),
    ))


async def test_no_mx_means_the_implicit_mx() -> None:
    dns = StubDns(mx={"d.test": []}, addr={"d.test": ["192.0.2.1"]})
    assert await router(dns).route("d.test") == Route("d.test", (NextHop("d.test", "192.0.2.1", 25, 0),))


async def test_no_mx_and_no_address_is_permanent() -> None:
    dns = StubDns(mx={"d.test": []}, addr={"d.test": []})
    err = await error_of(router(dns), "d.test")
    assert err.reply_text() == "554 5.4.4 d.test has no mail exchanger and no address"


async def test_no_mx_and_address_lookup_failing_is_temporary() -> None:
    dns = StubDns(mx={"d.test": []}, addr={"d.test": SERVFAIL})
    assert (await error_of(router(dns), "d.test")).temporary


async def test_null_mx_is_556_5_1_10() -> None:
    dns = StubDns(mx={"d.test": mx((0, ""))})
    err = await error_of(router(dns), "d.test")
    assert (err.temporary, err.code, err.status) == (False, 556, "5.1.10")
    assert dns.asked == [("MX", "d.test")]  # and no address lookup


async def test_a_null_mx_target_among_real_mx_records_is_ignored() -> None:
    dns = StubDns(mx={"d.test": mx((0, ""), (10, "a.d.test"))}, addr={"a.d.test": ["192.0.2.1"]})
    assert [h.host for h in (await router(dns).route("d.test")).hops] == ["a.d.test"]


async def test_nxdomain_is_permanent_and_servfail_temporary() -> None:
    assert not (await error_of(router(StubDns()), "gone.test")).temporary
    assert (await error_of(router(StubDns(mx={"d.test": SERVFAIL})), "d.test")).temporary


async def test_mx_hosts_without_address_are_skipped() -> None:
    dns = StubDns(mx={"d.test": mx((10, "gone.d.test"), (20, "empty.d.test"), (30, "ok.d.test"))},
                  addr={"empty.d.test": [], "ok.d.test": ["192.0.2.3"]})
    assert [h.host for h in (await router(dns).route("d.test")).hops] == ["ok.d.test"]


async def test_no_mx_host_with_an_address_is_permanent() -> None:
    dns = StubDns(mx={"d.test": mx((10, "gone.d.test"), (20, "empty.d.test"))}, addr={"empty.d.test": []})
    err = await error_of(router(dns), "d.test")
    assert err.reply_text() == "554 5.4.4 d.test has no mail exchanger with an address"


async def test_no_address_but_one_host_failed_temporarily_is_temporary() -> None:
    dns = StubDns(mx={"d.test": mx((10, "gone.d.test"), (20, "flaky.d.test"))},
                  addr={"flaky.d.test": SERVFAIL})
    err = await error_of(router(dns), "d.test")
    assert err.temporary and err.status == "4.4.3"


async def test_mx_host_addresses_are_looked_up_once_each() -> None:
    dns = StubDns(mx={"d.test": mx((10, "a.d.test"), (20, "a.d.test"))}, addr={"a.d.test": ["192.0.2.1"]})
    route = await router(dns).route("d.test")
    assert len(route.hops) == 1  # the same address is not tried twice
    assert dns.asked.count(("ADDR", "a.d.test")) == 1


async def test_hops_are_capped() -> None:
    hosts = [(10 * i, f"h{i}.d.test") for i in range(1, 5)]
    dns = StubDns(mx={"d.test": mx(*hosts)},
                  addr={h: [f"2001:db8::{i}:{j}" for j in range(1, 4)] for i, (_, h) in enumerate(hosts)})
    route = await router(dns).route("d.test")
    assert len(route.hops) == MAX_HOPS
    assert [h.preference for h in route.hops] == sorted(h.preference for h in route.hops)


# --------------------------------------------------------------------------- loops


async def test_our_own_name_as_best_mx_is_a_loop() -> None:
    dns = StubDns(mx={"d.test": mx((10, "mx.gannet.test"), (20, "backup.d.test"))},
                  addr={"backup.d.test": ["192.0.2.1"]})
    err = await error_of(router(dns), "d.test")
    assert err.reply_text() == "554 5.4.6 mail for d.test loops back to myself"


async def test_we_as_backup_mx_deliver_to_the_primary_only() -> None:
    dns = StubDns(mx={"d.test": mx((10, "primary.d.test"), (20, "mx.gannet.test"), (30, "other.d.test"))},
                  addr={"primary.d.test": ["192.0.2.1"], "other.d.test": ["192.0.2.3"]})
    assert [h.host for h in (await router(dns).route("d.test")).hops] == ["primary.d.test"]
    assert ("ADDR", "other.d.test") not in dns.asked


async def test_an_mx_host_at_our_address_and_port_is_us() -> None:
    dns = StubDns(mx={"d.test": mx((10, "alias.d.test"), (20, "backup.d.test"))},
                  addr={"alias.d.test": ["192.0.2.9"], "backup.d.test": ["192.0.2.1"]})
    err = await error_of(router(dns, own_addresses=("192.0.2.9:25",)), "d.test")
    assert err.status == "5.4.6"
    assert (await error_of(router(dns, own_addresses=("192.0.2.9",)), "d.test")).status == "5.4.6"
    # a listener on another port is not where we deliver to: not a loop
    route = await router(dns, own_addresses=("192.0.2.9:2525", "[::1]:25", "localhost:25")).route("d.test")
    assert route.hops[0].address == "192.0.2.9"


async def test_dropping_ourselves_keeps_a_temporary_failure_of_the_better_mx_temporary() -> None:
    dns = StubDns(mx={"d.test": mx((10, "primary.d.test"), (20, "alias.d.test"))},
                  addr={"primary.d.test": SERVFAIL, "alias.d.test": ["192.0.2.9"]})
    err = await error_of(router(dns, own_addresses=("192.0.2.9",)), "d.test")
    assert err.temporary


async def test_implicit_mx_that_is_us_is_a_loop() -> None:
    dns = StubDns(mx={"mx.gannet.test": []}, addr={"mx.gannet.test": ["192.0.2.9"]})
    assert (await error_of(router(dns), "mx.gannet.test")).status == "5.4.6"


# --------------------------------------------------------------------------- literals and smarthost


@pytest.mark.parametrize(("domain", "address"), [
    ("[192.0.2.1]", "192.0.2.1"),
    ("[IPv6:2001:DB8::1]", "2001:db8::1"),
])
async def test_address_literal_routes_to_the_address(domain: str, address: str) -> None:
    dns = StubDns()
    route = await router(dns).route(domain)
    assert route.hops == (NextHop(address, address, 25, 0),)
    assert dns.asked == []


@pytest.mark.parametrize("domain", ["[192.0.2]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[example.test]"])
async def test_bad_address_literal(domain: str) -> None:
    err = await error_of(router(StubDns()), domain)
    assert (err.temporary, err.code, err.status) == (False, 553, "5.1.3")


async def test_address_literal_of_ourselves_is_a_loop() -> None:
    err = await error_of(router(StubDns(), own_addresses=("192.0.2.9:25",)), "[192.0.2.9]")
    assert err.status == "5.4.6"


@pytest.mark.parametrize(("smarthost", "port"), [
    ("relay.test", 25), ("relay.test:587", 587), ("[relay.test]:587", 587), ("[relay.test]", 25)])
async def test_smarthost_takes_all_mail_by_address_lookup_never_mx(smarthost: str, port: int) -> None:
    dns = StubDns(addr={"relay.test": ["2001:db8::25", "192.0.2.25"]})
    route = await router(dns, smarthost=smarthost).route("anywhere.test")
    assert route == Route(SMARTHOST, (NextHop("relay.test", "2001:db8::25", port, 0),
                                      NextHop("relay.test", "192.0.2.25", port, 0)))
    assert dns.asked == [("ADDR", "relay.test")]


@pytest.mark.parametrize(("smarthost", "address", "port"), [
    ("192.0.2.25:2525", "192.0.2.25", 2525), ("[::1]:2525", "::1", 2525), ("[192.0.2.25]", "192.0.2.25", 25)])
async def test_smarthost_address_needs_no_dns(smarthost: str, address: str, port: int) -> None:
    dns = StubDns()
    route = await router(dns, smarthost=smarthost).route("anywhere.test")
    assert route.hops == (NextHop(address, address, port, 0),)
    assert dns.asked == []


@pytest.mark.parametrize("answer", [NXDOMAIN, SERVFAIL, []])
async def test_smarthost_failures_are_always_temporary(answer: list[str] | DnsError) -> None:
    dns = StubDns(addr={"relay.test": answer})
    err = await error_of(router(dns, smarthost="relay.test"), "anywhere.test")
    assert err.temporary and err.code == 451


async def test_smarthost_pointing_at_ourselves_is_a_temporary_loop() -> None:
    own = ("127.0.0.1:2525",)
    err = await error_of(router(StubDns(), smarthost="127.0.0.1:2525", own_addresses=own), "d")
    assert (err.temporary, err.status) == (True, "4.4.6")
    route = await router(StubDns(), smarthost="127.0.0.1:2526", own_addresses=own).route("d")
    assert route.hops[0].port == 2526
