"""DMARC (RFC 7489) as tables: record parsing, organizational domains from the Public Suffix List,
strict and relaxed alignment of SPF and DKIM, p/sp for subdomains, pct, and policy discovery."""

from __future__ import annotations

import random

import pytest

from gannet.mailauth import dmarc
from gannet.mailauth.dmarc import Alignment, Discovery, DmarcRecord, Policy
from gannet.mailauth.dns_bridge import TxtAnswer


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("mail.example.com", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("example.co.uk", "example.co.uk"),  # co.uk is a public suffix
        ("news.example.co.uk", "example.co.uk"),
        ("sender.test", "sender.test"),  # not on the list: the last label is the suffix ("*" rule)
        ("mx.sender.test", "sender.test"),
        ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
        ("Mail.Example.COM.", "example.com"),
        ("user.github.io", "user.github.io"),  # the list's private section counts too
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert dmarc.org_domain(domain) == org


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", DmarcRecord(Policy.REJECT, Policy.REJECT)),
        ("v=DMARC1; p=quarantine; sp=none; adkim=s; aspf=s; pct=20",
         DmarcRecord(Policy.QUARANTINE, Policy.NONE, Alignment.STRICT, Alignment.STRICT, 20)),
        ("v=DMARC1;p=none", DmarcRecord(Policy.NONE, Policy.NONE)),
        ("v=DMARC1; p=REJECT; sp=bogus", DmarcRecord(Policy.REJECT, Policy.REJECT)),
        ("v=DMARC1; p=reject; pct=150", DmarcRecord(Policy.REJECT, Policy.REJECT)),
        ("v=DMARC1; p=reject; pct=x", DmarcRecord(Policy.REJECT, Policy.REJECT)),
        ("v=DMARC1; rua=mailto:d@example.com", DmarcRecord(Policy.NONE, Policy.NONE)),  # §6.6.3 step 6
        ("v=DMARC1; p=bogus", None),
        ("v=DMARC1", None),
        ("p=reject; v=DMARC1", None),  # v= must come first
        ("v=spf1 -all", None),
    ],
)  # fmt: skip
def test_parse_record(text: str, expected: DmarcRecord | None) -> None:
    assert dmarc.parse_record(text) == expected


REJECT = DmarcRecord(Policy.REJECT, Policy.QUARANTINE)
STRICT = DmarcRecord(Policy.REJECT, Policy.REJECT, Alignment.STRICT, Alignment.STRICT)


@pytest.mark.parametrize(
    ("from_domain", "found", "spf", "dkim", "result", "disposition"),
    [
        # aligned SPF or DKIM passes, relaxed: same organizational domain
        ("example.com", Discovery(REJECT, "example.com"), "example.com", [], "pass", Policy.NONE),
        ("example.com", Discovery(REJECT, "example.com"), "", ["example.com"], "pass", Policy.NONE),
        ("example.com", Discovery(REJECT, "example.com"), "bounce.example.com", [], "pass", Policy.NONE),
        ("news.example.com", Discovery(REJECT, "example.com"), "", ["example.com"], "pass", Policy.NONE),
        # strict: the names themselves must match
        ("example.com", Discovery(STRICT, "example.com"), "bounce.example.com", [], "fail", Policy.REJECT),
        ("example.com", Discovery(STRICT, "example.com"), "", ["mail.example.com"], "fail", Policy.REJECT),
        ("example.com", Discovery(STRICT, "example.com"), "", ["example.com"], "pass", Policy.NONE),
        # a pass for another organization does not align
        ("example.com", Discovery(REJECT, "example.com"), "other.net", ["other.net"], "fail", Policy.REJECT),
        ("example.co.uk", Discovery(REJECT, "example.co.uk"), "other.co.uk", [], "fail", Policy.REJECT),
        # subdomain: the record found at the organizational domain gives sp=
        ("news.example.com", Discovery(REJECT, "example.com"), "", [], "fail", Policy.QUARANTINE),
        # the From domain's own record gives p=, even when it is a subdomain
        ("news.example.com", Discovery(REJECT, "news.example.com"), "", [], "fail", Policy.REJECT),
        # no record, temporary failure
        ("example.com", Discovery(None), "", [], "none", Policy.NONE),
        ("example.com", Discovery(None, "example.com", "SERVFAIL"), "", [], "temperror", Policy.NONE),
    ],
)  # fmt: skip
def test_evaluate(
    from_domain: str, found: Discovery, spf: str, dkim: list[str], result: str, disposition: Policy
) -> None:
    outcome = dmarc.evaluate(from_domain, found, spf_pass_domain=spf, dkim_pass_domains=dkim)
    assert (outcome.result, outcome.disposition) == (result, disposition)


@pytest.mark.parametrize(
    ("policy", "milder"), [(Policy.REJECT, Policy.QUARANTINE), (Policy.QUARANTINE, Policy.NONE)]
)
def test_pct_applies_the_policy_to_that_share(policy: Policy, milder: Policy) -> None:
    """pct=25 (RFC 7489 §6.6.4): a quarter of failing mail gets the policy, the rest the next milder one."""
    record = DmarcRecord(policy, policy, pct=25)
    rng = random.Random(7)
    counts = {policy: 0, milder: 0}
    for _ in range(2000):
        outcome = dmarc.evaluate(
            "example.com", Discovery(record, "example.com"), spf_pass_domain="", dkim_pass_domains=[], rng=rng
        )
        counts[outcome.disposition] += 1
    assert 400 < counts[policy] < 600 and counts[policy] + counts[milder] == 2000


def test_pct_zero_and_hundred() -> None:
    for pct, expected in ((0, Policy.QUARANTINE), (100, Policy.REJECT)):
        record = DmarcRecord(Policy.REJECT, Policy.REJECT, pct=pct)
        outcome = dmarc.evaluate("example.com", Discovery(record, "example.com"), spf_pass_domain="",
                                 dkim_pass_domains=[], rng=random.Random(1))  # fmt: skip
        assert outcome.disposition is expected


def zone(records: dict[str, list[str]], failing: tuple[str, ...] = ()) -> tuple[object, list[str]]:
    asked: list[str] = []

    async def lookup(name: str) -> TxtAnswer:
        asked.append(name)
        if name in failing:
            return TxtAnswer(temporary_error="SERVFAIL")
        return TxtAnswer(tuple(records.get(name, [])))

    return lookup, asked


async def test_discover_falls_back_to_the_organizational_domain() -> None:
    lookup, asked = zone({"_dmarc.example.co.uk": ["v=DMARC1; p=reject; sp=none"]})
    found = await dmarc.discover("a.b.example.co.uk", lookup)  # type: ignore[arg-type]
    assert asked == ["_dmarc.a.b.example.co.uk", "_dmarc.example.co.uk"]
    assert found == Discovery(DmarcRecord(Policy.REJECT, Policy.NONE), "example.co.uk")


async def test_discover_prefers_the_from_domain_and_ignores_other_txt() -> None:
    lookup, asked = zone({"_dmarc.news.example.com": ["some other text", "v=DMARC1; p=quarantine"],
                          "_dmarc.example.com": ["v=DMARC1; p=reject"]})  # fmt: skip
    found = await dmarc.discover("news.example.com", lookup)  # type: ignore[arg-type]
    assert asked == ["_dmarc.news.example.com"]
    assert found.record is not None and found.record.p is Policy.QUARANTINE


async def test_discover_two_records_means_no_policy() -> None:
    lookup, _ = zone({"_dmarc.example.com": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert await dmarc.discover("example.com", lookup) == Discovery(None, "example.com")  # type: ignore[arg-type]


async def test_discover_temporary_failure() -> None:
    lookup, _ = zone({}, failing=("_dmarc.example.com",))
    found = await dmarc.discover("example.com", lookup)  # type: ignore[arg-type]
    assert found.temporary_error == "SERVFAIL"


async def test_discover_nothing_anywhere() -> None:
    lookup, asked = zone({})
    assert await dmarc.discover("mail.example.com", lookup) == Discovery(None)  # type: ignore[arg-type]
    assert asked == ["_dmarc.mail.example.com", "_dmarc.example.com"]
