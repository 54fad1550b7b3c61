"""`gannet doctor` against a real DNS server: dnsmasq (peers.DnsServer) serving good and broken domains.

Every domain below is one situation a postmaster meets. The doctor runs as the
real command (`python -m gannet doctor`), its config pointing `[dns]
nameservers` at dnsmasq; `--json` is parsed, and each broken domain must fail
with the right check, explanation and record to publish. The addresses are
TEST-NET ones served as DNS data only: nothing connects to them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peers
import pytest

from gannet.mailauth.keys import KeyAlgorithm, SigningKey, generate_key, split_txt, write_key

pytestmark = pytest.mark.interop

SERVER_IP = "192.0.2.10"  # mx.good.test, this server's address (from its A record)
HOSTNAME = "mx.good.test"
DOMAINS = (
    "good.test",
    "nospf.test",
    "twospf.test",
    "manyspf.test",
    "badkey.test",
    "nodmarc.test",
    "nomx.test",
)


def spf_zone() -> dict[str, dict[str, list[Any]]]:
    many = {f"i{n}.manyspf.test": {"TXT": [f"v=spf1 ip4:198.51.100.{n} -all"]} for n in range(1, 12)}
    includes = " ".join(f"include:i{n}.manyspf.test" for n in range(1, 12))
    return {
        "manyspf.test": {"MX": [(10, HOSTNAME)], "TXT": [f"v=spf1 ip4:{SERVER_IP} {includes} -all"]},
        **many,
        # a nested tree well under the limit: include (1) → a (1) + mx (1); redirect (1) → ip4
        "nested.test": {
            "MX": [(10, HOSTNAME)],
            "TXT": ["v=spf1 include:_spf.nested.test redirect=_r.nested.test"],
        },
        "_spf.nested.test": {"TXT": ["v=spf1 a:mx.good.test mx:good.test ~all"]},
        "_r.nested.test": {"TXT": ["v=spf1 ip4:198.51.100.99 -all"]},
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    """A configured key per domain (badkey.test's DNS will publish another one)."""
    directory = tmp_path_factory.mktemp("doctor-keys")
    made = {}
    for domain in ("good.test", "badkey.test"):
        private = generate_key(KeyAlgorithm.RSA)
        path = directory / f"{domain}.s1.key"
        write_key(path, private)
        made[domain] = SigningKey(domain, "s1", KeyAlgorithm.RSA, private, path)
    ed = generate_key(KeyAlgorithm.ED25519)
    write_key(directory / "good.test.ed.key", ed)
    made["good.test/ed"] = SigningKey(
        "good.test", "ed", KeyAlgorithm.ED25519, ed, directory / "good.test.ed.key"
    )
    return made


@pytest.fixture(scope="module")
def dnsmasq(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]
) -> Iterator[peers.DnsServer]:
    other = SigningKey("badkey.test", "s1", KeyAlgorithm.RSA, generate_key(KeyAlgorithm.RSA), Path("-"))
    good, ed = keys["good.test"], keys["good.test/ed"]
    mx = {"MX": [(10, HOSTNAME)]}
    dmarc = {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@good.test"]}
    spf = f"v=spf1 ip4:{SERVER_IP} -all"
    zone: dict[str, dict[str, list[Any]]] = {
        HOSTNAME: {"A": [SERVER_IP]},  # also answers the PTR of SERVER_IP
        "good.test": {**mx, "TXT": [spf]},
        good.record_name: {"TXT": [split_txt(good.txt_record())]},  # 392 octets: two strings
        ed.record_name: {"TXT": [ed.txt_record()]},
        "_dmarc.good.test": dmarc,
        "_mta-sts.good.test": {"TXT": ["v=STSv1; id=20261122T1000"]},
        "mta-sts.good.test": {"A": ["192.0.2.20"]},
        "_smtp._tls.good.test": {"TXT": ["v=TLSRPTv1; rua=mailto:tls@good.test"]},
        "nospf.test": {**mx, "TXT": ["google-site-verification=abc"]},
        "_dmarc.nospf.test": dmarc,
        "twospf.test": {**mx, "TXT": [spf, "v=spf1 include:_spf.other.test ~all"]},
        "_dmarc.twospf.test": dmarc,
        "_dmarc.manyspf.test": dmarc,
        "badkey.test": {**mx, "TXT": [spf]},
        "s1._domainkey.badkey.test": {"TXT": [split_txt(other.txt_record())]},
        "_dmarc.badkey.test": dmarc,
        "nodmarc.test": {**mx, "TXT": [spf]},
        "nomx.test": {"TXT": [spf]},
        "_dmarc.nomx.test": dmarc,
        # addresses named with --address: one with a PTR that does not lead back, one without
        "40.2.0.192.in-addr.arpa": {"PTR": ["mail.other.test"]},
        "mail.other.test": {"A": ["192.0.2.41"]},
        **spf_zone(),
    }
    server = peers.DnsServer(tmp_path_factory.mktemp("doctor-dns"), records=zone, servfail=["broken.test"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def config(
    tmp_path_factory: pytest.TempPathFactory, dnsmasq: peers.DnsServer, keys: dict[str, SigningKey]
) -> Path:
    workdir = tmp_path_factory.mktemp("doctor")
    entries = [
        ("good.test", "s1", keys["good.test"].key_file),
        ("good.test", "ed", keys["good.test/ed"].key_file),
        ("badkey.test", "s1", keys["badkey.test"].key_file),
    ]
    doc = {
        "hostname": HOSTNAME,
        "data_dir": str(workdir / "var"),
        "relay": {"local_domains": list(DOMAINS)},
        "dns": {"nameservers": [dnsmasq.nameserver]},
        "dkim": [{"domain": d, "selector": s, "key_file": str(f)} for d, s, f in entries],
    }
    path = workdir / "gannet.toml"
    path.write_text(peers.to_toml(doc))
    return path


def doctor(config: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    result = peers.gannet_cli(config, "doctor", *args, "--json", check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def find(checks: list[dict[str, Any]], name: str, subject: str = "") -> dict[str, Any]:
    found = [c for c in checks if c["name"] == name and c["subject"] == subject]
    assert len(found) == 1, f"no single {name} {subject} in {checks}"
    return found[0]


def failed(checks: list[dict[str, Any]]) -> list[str]:
    return [f"{c['name']} {c['subject']}".strip() for c in checks if c["status"] == "fail"]


def test_a_good_domain_passes_every_check(config: Path, dnsmasq: peers.DnsServer) -> None:
    status, checks = doctor(config, "good.test")
    assert status == 0 and failed(checks) == []
    assert [c["status"] for c in checks] == ["pass"] * len(checks)
    names = [f"{c['name']} {c['subject']}".strip() for c in checks]
    assert names == [
        "mx",
        f"mx-host {HOSTNAME}",
        f"hostname {HOSTNAME}",
        f"ptr {SERVER_IP}",
        "spf",
        "spf-lookups",
        f"spf-covers {SERVER_IP}",
        "dkim s1",
        "dkim ed",
        "dmarc",
        "mta-sts",
        "tls-rpt",
    ]
    assert "https://mta-sts.good.test/.well-known/mta-sts.txt" in find(checks, "mta-sts")["explanation"]
    assert ("TXT", "s1._domainkey.good.test") in dnsmasq.queries()  # asked through [dns] nameservers


def test_text_report_for_people(config: Path) -> None:
    result = peers.gannet_cli(config, "doctor", "good.test", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("gannet doctor good.test (DNS: 127.0.0.53:")
    assert "PASS    spf-covers 192.0.2.10" in result.stdout
    assert result.stdout.rstrip().endswith("12 checks: 12 passed, 0 warning(s), 0 failed.")


def test_missing_spf(config: Path) -> None:
    status, checks = doctor(config, "nospf.test")
    assert status == 1 and failed(checks) == ["spf"]
    spf = find(checks, "spf")
    assert "publishes no SPF record" in spf["explanation"]
    assert spf["record"] == f'nospf.test. IN TXT "v=spf1 ip4:{SERVER_IP} -all"'


def test_two_spf_records(config: Path) -> None:
    status, checks = doctor(config, "twospf.test")
    assert status == 1 and failed(checks) == ["spf"]
    spf = find(checks, "spf")
    assert "2 SPF records" in spf["explanation"] and "§4.5" in spf["explanation"]
    assert spf["record"] == f'twospf.test. IN TXT "v=spf1 ip4:{SERVER_IP} -all"'


def test_spf_over_ten_lookups(config: Path) -> None:
    status, checks = doctor(config, "manyspf.test")
    assert status == 1 and failed(checks) == ["spf-lookups"]
    lookups = find(checks, "spf-lookups")
    assert "11 DNS lookups (the limit is 10)" in lookups["explanation"]
    assert "include:i11.manyspf.test 1" in lookups["explanation"]
    assert lookups["record"] == f'manyspf.test. IN TXT "v=spf1 ip4:{SERVER_IP} -all"'
    assert find(checks, "spf-covers", SERVER_IP)["status"] == "pass"  # the ip4 comes first


def test_nested_spf_is_counted_through_includes_and_redirect(config: Path) -> None:
    _, checks = doctor(config, "nested.test")
    lookups = find(checks, "spf-lookups")
    assert lookups["status"] == "pass"
    assert lookups["explanation"].startswith("4 of at most 10 DNS lookups")
    assert "include:_spf.nested.test 3" in lookups["explanation"]
    assert find(checks, "spf-covers", SERVER_IP)["status"] == "pass"  # through include → a:mx.good.test


def test_dkim_record_with_another_key(config: Path, keys: dict[str, SigningKey]) -> None:
    status, checks = doctor(config, "badkey.test")
    assert status == 1 and failed(checks) == ["dkim s1"]
    dkim = find(checks, "dkim", "s1")
    assert "does not match" in dkim["explanation"] and "not the one of" in dkim["explanation"]
    assert dkim["record"] == keys["badkey.test"].zone_line()


def test_missing_dmarc(config: Path) -> None:
    status, checks = doctor(config, "nodmarc.test")
    assert status == 1 and failed(checks) == ["dmarc"]
    dmarc = find(checks, "dmarc")
    assert "publishes no DMARC record" in dmarc["explanation"]
    assert (
        dmarc["record"]
        == '_dmarc.nodmarc.test. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@nodmarc.test"'
    )
    assert find(checks, "dkim")["status"] == "warn"  # no [[dkim]] key for it: advice, not failure


def test_missing_mx(config: Path) -> None:
    status, checks = doctor(config, "nomx.test")
    assert status == 1 and failed(checks) == ["mx"]
    assert find(checks, "mx")["record"] == f"nomx.test. IN MX 10 {HOSTNAME}."


def test_bad_and_missing_ptr_and_spf_not_covering(config: Path) -> None:
    status, checks = doctor(config, "good.test", "--address", "192.0.2.40", "--address", "192.0.2.50")
    assert status == 1
    assert failed(checks) == [
        "ptr 192.0.2.40",
        "ptr 192.0.2.50",
        "spf-covers 192.0.2.40",
        "spf-covers 192.0.2.50",
    ]
    bad = find(checks, "ptr", "192.0.2.40")
    assert (
        "points back to mail.other.test, but that name does not resolve to 192.0.2.40" in bad["explanation"]
    )
    assert bad["record"] == f"40.2.0.192.in-addr.arpa. IN PTR {HOSTNAME}."
    assert "has no reverse DNS" in find(checks, "ptr", "192.0.2.50")["explanation"]
    cover = find(checks, "spf-covers", "192.0.2.40")
    assert "gets SPF fail" in cover["explanation"]
    assert cover["record"] == f'good.test. IN TXT "v=spf1 ip4:{SERVER_IP} ip4:192.0.2.40 -all"'
    assert not any(c["name"] == "hostname" for c in checks)  # --address replaces the hostname's


def test_servfail_fails_with_the_reason(config: Path) -> None:
    status, checks = doctor(config, "broken.test")
    assert status == 1
    assert "The DNS lookup failed" in find(checks, "mx")["explanation"]
    assert "SERVFAIL" in find(checks, "mx")["explanation"]


def test_bad_arguments_exit_2(config: Path) -> None:
    for args in (("not_a domain",), ("good.test", "--address", "mx.good.test")):
        result = peers.gannet_cli(config, "doctor", *args, check=False)
        assert result.returncode == 2 and result.stderr.startswith("gannet: "), result.stderr
        assert "Traceback" not in result.stderr
