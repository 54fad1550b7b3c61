"""InboundChecks end of data, with the resolver's cache: what is asked of DNS, and when not.

A counting query backend stands in for the nameservers (dnsmasq is in
tests/interop/test_mailauth.py): it answers from canned records and records
every query, so the tests see that a message whose records are cached costs no
query, that an SPF result is reused for the same (address, MAIL FROM, HELO)
for SPF_CACHE_SECONDS only, and that a temporary failure is never reused.
The message is signed here with dkimpy.
"""

from __future__ import annotations

import asyncio

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from gannet.clock import FakeClock
from gannet.config import DmarcMode
from gannet.delivery.dns import Resolver
from gannet.mailauth.checks import INLINE_VERIFY_LIMIT, SPF_CACHE_SECONDS, InboundChecks
from gannet.queue.model import InlineBody

HOST = "mx.example.test"


class CountingBackend:
    """Answers TXT questions from `records` (name → strings), NXDOMAIN otherwise, SERVFAIL for
    names in `failing`; `queries` lists every question asked."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.failing: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    async def resolve(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, *, raise_on_no_answer: bool,
        lifetime: float, search: bool,
    ) -> dns.resolver.Answer:  # fmt: skip
        name = qname.to_text(omit_final_dot=True)
        self.queries.append((name, dns.rdatatype.to_text(rdtype)))
        query = dns.message.make_query(qname, rdtype)
        if name in self.failing:
            failure = [("127.0.0.1", False, 53, "SERVFAIL", None)]
            raise dns.resolver.NoNameservers(request=query, errors=failure)
        texts = self.records.get(name) if rdtype == dns.rdatatype.TXT else None
        if texts is None:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.NXDOMAIN)
            raise dns.resolver.NXDOMAIN(qnames=[qname], responses={qname: reply})
        reply = dns.message.make_response(query)
        rrset = reply.find_rrset(reply.answer, qname, dns.rdataclass.IN, rdtype, create=True)
        for text in texts:
            parts = " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))
            rrset.add(dns.rdata.from_text("IN", "TXT", parts), 300)
        assert isinstance(reply, dns.message.QueryMessage)
        return dns.resolver.Answer(qname, rdtype, dns.rdataclass.IN, reply)


@pytest.fixture
def world(signed: tuple[bytes, str]) -> tuple[InboundChecks, CountingBackend, FakeClock]:
    backend = CountingBackend({
        "sender.test": ["v=spf1 ip4:192.0.2.0/24 -all"],
        "_dmarc.sender.test": ["v=DMARC1; p=reject"],
        "s1._domainkey.sender.test": [signed[1]],
    })  # fmt: skip
    clock = FakeClock()
    resolver = Resolver(backend=backend, clock=clock)
    return InboundChecks(resolver, HOST, clock=clock), backend, clock


async def check(checks: InboundChecks, message: bytes, ip: str = "192.0.2.1") -> str:
    spf = checks.start_spf(ip, "bob@sender.test", "client.sender.test")
    verdict = await checks.finish(spf, InlineBody(message), DmarcMode.ENFORCE, sender="bob@sender.test",
                                  helo="client.sender.test")  # fmt: skip
    return verdict.summary


async def test_a_second_message_costs_no_query(
    world: tuple[InboundChecks, CountingBackend, FakeClock], signed: tuple[bytes, str]
) -> None:
    checks, backend, _ = world
    assert await check(checks, signed[0]) == "spf=pass dkim=pass dmarc=pass arc=none"
    assert sorted(backend.queries) == [
        ("_dmarc.sender.test", "TXT"), ("s1._domainkey.sender.test", "TXT"), ("sender.test", "TXT"),
    ]  # fmt: skip
    backend.queries.clear()
    assert await check(checks, signed[0]) == "spf=pass dkim=pass dmarc=pass arc=none"
    assert backend.queries == []
    altered = signed[0].replace(b"Hello.", b"Bye.")
    assert await check(checks, altered) == "spf=pass dkim=fail dmarc=pass arc=none"  # SPF still aligns


async def test_the_spf_result_is_reused_briefly_for_the_same_client_and_sender(
    world: tuple[InboundChecks, CountingBackend, FakeClock], signed: tuple[bytes, str]
) -> None:
    checks, backend, clock = world
    first = checks.start_spf("192.0.2.1", "bob@sender.test", "client.sender.test")
    outcome = await first
    again = checks.start_spf("192.0.2.1", "bob@sender.test", "client.sender.test")
    assert again.done() and again.result() == outcome  # no task, no pyspf run
    other = checks.start_spf("198.51.100.7", "bob@sender.test", "client.sender.test")
    assert isinstance(other, asyncio.Task) and (await other).result.value == "fail"
    backend.records["sender.test"] = ["v=spf1 -all"]
    checks.resolver.clear()
    cached = checks.start_spf("192.0.2.1", "bob@sender.test", "client.sender.test")
    assert cached.done() and cached.result().result.value == "pass"  # the old result, for now
    clock.advance(SPF_CACHE_SECONDS + 1)
    late = checks.start_spf("192.0.2.1", "bob@sender.test", "client.sender.test")
    assert not late.done() and (await late).result.value == "fail"  # checked again: the new record


async def test_a_temporary_failure_is_not_reused(
    world: tuple[InboundChecks, CountingBackend, FakeClock], signed: tuple[bytes, str]
) -> None:
    checks, backend, _ = world
    backend.failing.add("sender.test")
    assert "spf=temperror" in await check(checks, signed[0])
    backend.failing.clear()
    spf = checks.start_spf("192.0.2.1", "bob@sender.test", "client.sender.test")
    assert not spf.done() and (await spf).result.value == "pass"


async def test_a_key_lookup_that_fails_is_asked_again(
    world: tuple[InboundChecks, CountingBackend, FakeClock], signed: tuple[bytes, str]
) -> None:
    checks, backend, _ = world
    backend.failing.add("s1._domainkey.sender.test")
    assert await check(checks, signed[0]) == "spf=pass dkim=temperror dmarc=pass arc=none"
    backend.failing.clear()
    backend.queries.clear()
    assert await check(checks, signed[0]) == "spf=pass dkim=pass dmarc=pass arc=none"
    assert backend.queries == [("s1._domainkey.sender.test", "TXT")]


async def test_verdict_now_answers_only_what_needs_no_wait_and_as_finish_does(
    world: tuple[InboundChecks, CountingBackend, FakeClock], signed: tuple[bytes, str]
) -> None:
    """`verdict_now` (the checker child's path with no task) gives None while a record is not
    cached, and once all are, `finish`'s verdict, for a message that passes and one that fails."""
    checks, backend, _ = world
    spf = await checks.start_spf("192.0.2.1", "bob@sender.test", "client.sender.test")
    args = {"sender": "bob@sender.test", "helo": "client.sender.test"}
    assert checks.verdict_now(spf, signed[0], DmarcMode.ENFORCE, **args) is None
    assert backend.queries == [("sender.test", "TXT")]  # looked for in the cache only
    altered = signed[0].replace(b"Hello.", b"Bye.")
    for message in (signed[0], altered):
        waited = await checks.finish(spf, InlineBody(message), DmarcMode.ENFORCE, **args)
        now = checks.verdict_now(spf, message, DmarcMode.ENFORCE, **args)
        assert now == waited
    assert now is not None and now.summary == "spf=pass dkim=fail dmarc=pass arc=none"
    large = signed[0] + b"x" * INLINE_VERIFY_LIMIT  # verified in an executor: not now
    assert checks.verdict_now(spf, large, DmarcMode.ENFORCE, **args) is None
    mode_off = checks.verdict_now(spf, signed[0], DmarcMode.OFF, **args)
    assert mode_off is not None and mode_off.summary == "spf=pass dkim=pass arc=none"
