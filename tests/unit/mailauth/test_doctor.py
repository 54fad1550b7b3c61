"""The pure parts of `gannet doctor`: SPF terms, suggested records, DMARC tags, the report's forms.

The DNS-facing checks run against dnsmasq in tests/interop/test_doctor.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gannet.config import load
from gannet.mailauth import doctor, doctor_spf
from gannet.mailauth.doctor_checks import Check, Status, dmarc_problems


def test_spf_records_are_only_v_spf1_then_space_or_end() -> None:
    texts = ["v=spf1 -all", "V=SPF1", "v=spf10 +all", "google-site-verification=x", "v=spf1"]
    assert doctor_spf.spf_records(texts) == ["v=spf1 -all", "V=SPF1", "v=spf1"]


def test_parse_terms_reads_qualifiers_mechanisms_and_modifiers() -> None:
    terms = doctor_spf.parse_terms(
        "v=spf1 ip4:192.0.2.0/24 ~a:mail.test/28//64 -mx include:x.test redirect=y.test exp=why.test"
    )
    assert [(t.qualifier, t.name, t.value, t.modifier) for t in terms] == [
        ("+", "ip4", "192.0.2.0/24", False),
        ("~", "a", "mail.test/28//64", False),
        ("-", "mx", "", False),
        ("+", "include", "x.test", False),
        ("+", "redirect", "y.test", True),
        ("+", "exp", "why.test", True),
    ]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("v=spf1 ip4:300.1.1.1 -all", "not a network"),
        ("v=spf1 ip6:192.0.2.1 -all", "not an IPv6 network"),
        ("v=spf1 include -all", "needs a value"),
        ("v=spf1 foo:bar -all", "unknown mechanism"),
        ("v=spf1 all:x", "takes no value"),
        ("v=spf1 redirect=a.test redirect=b.test", "more than once"),
        ("v=spf1 -redirect=a.test", "no qualifier"),
        ("v=spf1 @@@", "not an SPF term"),
    ],
)
def test_parse_terms_names_the_bad_term(record: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        doctor_spf.parse_terms(record)


def test_with_addresses_inserts_before_all_or_redirect() -> None:
    assert doctor_spf.with_addresses("v=spf1 mx -all", ["192.0.2.7"]) == "v=spf1 mx ip4:192.0.2.7 -all"
    assert (
        doctor_spf.with_addresses("v=spf1 redirect=_spf.example.test", ["2001:db8::7"])
        == "v=spf1 ip6:2001:db8::7 redirect=_spf.example.test"
    )
    assert doctor_spf.with_addresses("v=spf1 mx", ["192.0.2.7"]) == "v=spf1 mx ip4:192.0.2.7"


def test_recommended_record() -> None:
    both = doctor_spf.recommended_record(["192.0.2.7", "2001:db8::7"])
    assert both == "v=spf1 ip4:192.0.2.7 ip6:2001:db8::7 -all"
    assert doctor_spf.recommended_record([]) == "v=spf1 mx -all"


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ({"v": "DMARC1", "p": "reject"}, None),
        ({"v": "DMARC1", "p": "none", "sp": "quarantine", "pct": "50", "rua": "mailto:a@x.test"}, None),
        ({"v": "DMARC1"}, "p= (the policy) is missing"),
        ({"v": "DMARC1", "p": "block"}, "p=block is not one of"),
        ({"v": "DMARC1", "p": "none", "adkim": "x"}, "adkim=x"),
        ({"v": "DMARC1", "p": "none", "pct": "150"}, "pct=150"),
        ({"v": "DMARC1", "p": "none", "rua": "a@x.test"}, "not a mailto:"),
        ({"v": "DMARC2", "p": "none"}, "v=DMARC1"),
    ],
)
def test_dmarc_problems(tags: dict[str, str], problem: str | None) -> None:
    problems = dmarc_problems(tags)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


CHECKS = [
    Check("mx", "", Status.PASS, "example.test has 1 MX host(s)."),
    Check(
        "ptr",
        "192.0.2.7",
        Status.WARN,
        "Names differ. " * 20,
        "7.2.0.192.in-addr.arpa. IN PTR mx.example.test.",
    ),
    Check("spf", "", Status.FAIL, "No SPF.", 'example.test. IN TXT "v=spf1 ip4:192.0.2.7 -all"'),
]


def test_json_is_a_list_of_checks() -> None:
    data = json.loads(doctor.to_json(CHECKS))
    assert data[2] == {
        "name": "spf",
        "subject": "",
        "status": "fail",
        "explanation": "No SPF.",
        "record": 'example.test. IN TXT "v=spf1 ip4:192.0.2.7 -all"',
    }
    assert data[0]["record"] is None


def test_text_report_wraps_explanations_but_never_records() -> None:
    text = doctor.render_text("example.test", CHECKS, ["127.0.0.53:53"], width=60)
    lines = text.splitlines()
    assert lines[0] == "gannet doctor example.test (DNS: 127.0.0.53:53)"
    assert "FAIL    spf" in text and "WARN    ptr 192.0.2.7" in text
    assert '        publish: example.test. IN TXT "v=spf1 ip4:192.0.2.7 -all"' in lines
    assert all(len(line) <= 60 for line in lines if not line.lstrip().startswith(("publish:", "gannet")))
    assert lines[-1] == "3 checks: 1 passed, 1 warning(s), 1 failed."


def test_exit_status_fails_only_on_fail() -> None:
    assert doctor.exit_status(CHECKS) == 1
    assert doctor.exit_status(CHECKS[:2]) == 0  # a warning is advice


def test_listener_addresses_skip_loopback_and_wildcards(tmp_path: Path) -> None:
    path = tmp_path / "gannet.toml"
    path.write_text(
        'hostname = "mx.example.test"\n'
        + "".join(
            f'[[listen]]\naddress = "{a}"\n'
            for a in (
                "127.0.0.1:25",
                "0.0.0.0:587",
                "[::]:25",
                "192.0.2.7:25",
                "[2001:db8::7]:25",
                "192.0.2.7:587",
            )
        )
    )
    assert doctor.listener_addresses(load(path)) == ["192.0.2.7", "2001:db8::7"]


def test_bad_domain_or_address_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "gannet.toml"
    path.write_text('hostname = "mx.example.test"\n')
    with pytest.raises(ValueError, match="not a domain name"):
        doctor.main(load(path), "not a domain", [], False, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        doctor.main(load(path), "example.test", ["999.1.1.1"], False, None)  # type: ignore[arg-type]
