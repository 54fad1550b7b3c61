"""The RFC 7208 test suite (openspf.org, release 2014.04), every case, against gannet.mailauth.spf.

Each scenario of the YAML suite gives DNS zone data and cases (client IP,
MAIL FROM, HELO, the acceptable results, sometimes the explanation). The cases
run through `spf.check()` exactly as a session's check does — pyspf replayed
over an asynchronous lookup — with the lookup answering from the scenario's
zone instead of Gannet's resolver (no network). The zone translation follows
the suite's own driver (pyspf's test/testspf.py): a type SPF record also
serves as TXT unless the name has TXT records, "TIMEOUT" is a temporary DNS
failure (after the records listed before it), names under "error." time out,
and a CNAME comes with its target's records.

The suite is /work/shared/testdata/rfc7208-tests.yml (the repository's
sibling `shared/testdata/`); without that folder it is taken from the pyspf
source distribution (`pip download --no-deps --no-binary :all: pyspf==2.0.14`,
file test/rfc7208-tests.yml).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from gannet.mailauth import spf
from gannet.mailauth.spf import Answer, SpfDnsError

REPO = Path(__file__).resolve().parents[3]
SUITE_NAME = "rfc7208-tests.yml"


def _suite_path(cache: Path) -> Path:
    shared = REPO.parent / "shared" / "testdata" / SUITE_NAME
    if shared.exists():
        return shared
    target = cache / SUITE_NAME
    if not target.exists():
        cache.mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "pyspf==2.0.14", "-d", str(cache)],
            check=True, timeout=300,
        )  # fmt: skip
        with tarfile.open(next(cache.glob("pyspf-*.tar.gz"))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("test/" + SUITE_NAME))
            extracted = tar.extractfile(member)
            assert extracted is not None
            target.write_bytes(extracted.read())
    return target


def _load_cases() -> list[Any]:
    path = _suite_path(Path(__file__).resolve().parent / ".suite-cache")
    cases = []
    with open(path, "rb") as f:
        for scenario in yaml.safe_load_all(f):
            zone = _zone(scenario.get("zonedata") or {})
            for name, case in scenario["tests"].items():
                cases.append(pytest.param(zone, case, id=f"{scenario['description'][:30]}/{name}"))
    return cases


def _zone(zonedata: dict[str, Any]) -> dict[str, list[Any]]:
    """name → entries: "TIMEOUT" or (type, value, name), with SPF copied to TXT when there is no TXT."""
    zone: dict[str, list[Any]] = {}
    for name, records in zonedata.items():
        entries: list[Any] = []
        generated: list[Any] = []
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
        for record in records:
            if not isinstance(record, dict):
                entries.append(record)  # "TIMEOUT"
                continue
            for rdtype, value in record.items():
                if rdtype in ("TXT", "SPF") and isinstance(value, str):
                    value = (value,)
                if rdtype == "SPF" and not has_txt:
                    generated.append(("TXT", value, name))
                if value != ("NONE",):
                    entries.append((rdtype, value, name))
        zone[name.lower()] = entries + generated
    return zone


def _lookup_in(zone: dict[str, list[Any]]) -> spf.SpfDns:
    async def lookup(name: str, qtype: str, level: int = 0) -> Answer:
        entries = zone.get(name.lower())
        if entries is None:
            if name.lower().startswith("error."):
                raise SpfDnsError("DNS timeout")
            return []
        out: Answer = []
        seen_type = False
        for entry in entries:
            if entry == "TIMEOUT":
                if not seen_type:
                    raise SpfDnsError("DNS timeout")
                return out
            rdtype, value, owner = entry
            seen_type = seen_type or rdtype == qtype
            if value == "TIMEOUT":
                if rdtype == qtype:
                    raise SpfDnsError("DNS timeout")
                continue
            if rdtype == qtype:
                if rdtype in ("TXT", "SPF"):
                    value = tuple(s.encode("utf-8") for s in value)
                elif rdtype == "MX":
                    value = (value[0], value[1])
                out.append(((owner, rdtype), value))
            elif rdtype == "CNAME":
                out.append(((owner, "CNAME"), value))
                if not level:  # the target's records come along, one level (as pydns gave them)
                    out += await lookup(value, qtype, 1)
        return out

    return lookup  # type: ignore[return-value]


CASES = _load_cases()


def test_the_whole_suite_is_here() -> None:
    assert len(CASES) >= 200  # the 2014.04 release has 203 cases


@pytest.mark.parametrize(("zone", "case"), CASES)
async def test_rfc7208(zone: dict[str, list[Any]], case: dict[str, Any]) -> None:
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    outcome = await spf.check(
        case["host"], case.get("mailfrom", ""), case.get("helo", ""), _lookup_in(zone),
        receiver=case.get("receiver", ""), default_explanation="DEFAULT",
    )  # fmt: skip
    assert outcome.result.value in expected, f"{case.get('spec')}: {case.get('description')}"
    if "explanation" in case:
        assert outcome.explanation == case["explanation"]
