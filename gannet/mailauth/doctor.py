"""`gannet doctor DOMAIN`: check a domain's mail DNS records and say what to publish.

Runs the checks of `doctor_checks` (MX, MX hosts, this server's hostname and
reverse DNS, SPF, DKIM for every `[[dkim]]` key of the domain, DMARC, MTA-STS,
TLS-RPT) through Gannet's resolver and `[dns] nameservers`, then prints them
for people (one block per check; records to publish on their own line, never
wrapped, so they can be pasted into a zone file) or, with `--json`, as a JSON
array of {"name", "subject", "status", "explanation", "record"} objects.

This server's addresses are the `--address` options when given; else the
addresses of `hostname` and of every `[[listen]]` address that is neither
loopback nor a wildcard.

Exit status: 0 when no check failed (warnings are advice), 1 otherwise; bad
usage or config is 2 (the CLI's). It only reads DNS: it never changes a file
or sends mail. Plain text rather than a table library: a table would wrap the
records to publish inside its cells, and they must stay copyable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import textwrap
from collections.abc import Sequence
from typing import TextIO

from gannet.config import Config
from gannet.delivery.dns import Resolver
from gannet.mailauth import doctor_checks as dc
from gannet.mailauth.doctor_checks import Check, Status
from gannet.mailauth.keys import valid_domain

DNS_TIMEOUT = 5.0


def listener_addresses(config: Config) -> list[str]:
    """Listener addresses that say where this server is reachable: not loopback, not a wildcard."""
    found = []
    for lst in config.listen:
        try:
            ip = ipaddress.ip_address(lst.host)
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified) and str(ip) not in found:
            found.append(str(ip))
    return found


async def run_checks(
    config: Config, domain: str, addresses: Sequence[str] = (), resolver: Resolver | None = None
) -> list[Check]:
    """Every check, in the order they are shown."""
    resolver = resolver or Resolver(config.dns.nameservers, timeout=DNS_TIMEOUT)
    domain = domain.lower().rstrip(".")
    hostname = config.hostname.lower().rstrip(".")
    checks: list[Check] = []
    mx_checks, _ = await dc.check_mx(resolver, domain, hostname)
    checks += mx_checks
    ips = list(addresses)
    if not ips:
        host_check, host_ips = await dc.check_hostname(resolver, hostname)
        checks.append(host_check)
        ips = list(dict.fromkeys([*host_ips, *listener_addresses(config)]))
    ptrs = await asyncio.gather(*(dc.check_ptr(resolver, ip, hostname) for ip in ips))
    checks += ptrs
    checks += await dc.check_spf(resolver, domain, ips)
    keys = [(i, e) for i, e in enumerate(config.dkim) if e.domain == domain]
    if keys:
        checks += await asyncio.gather(*(dc.check_dkim(resolver, e, str(config.file), i) for i, e in keys))
    else:
        checks.append(
            Check(
                "dkim", "", Status.WARN,
                f"No [[dkim]] key for {domain} in {config.file}: mail from it leaves unsigned, and DMARC "
                f"then rests on SPF alone. Create one with `gannet dkim keygen --domain {domain} "
                "--selector s1`.",
            )
        )  # fmt: skip
    checks.append(await dc.check_dmarc(resolver, domain))
    checks.append(await dc.check_mta_sts(resolver, domain))
    checks.append(await dc.check_tls_rpt(resolver, domain))
    return checks


def exit_status(checks: Sequence[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps(
        [
            {
                "name": c.name,
                "subject": c.subject,
                "status": c.status.value,
                "explanation": c.explanation,
                "record": c.record,
            }
            for c in checks
        ],
        indent=1,
        ensure_ascii=False,
    )


def render_text(domain: str, checks: Sequence[Check], nameservers: Sequence[str], width: int = 0) -> str:
    """The report for people: STATUS CHECK SUBJECT, the explanation wrapped below, then the record."""
    width = width or min(110, shutil.get_terminal_size((100, 24)).columns)
    servers = ", ".join(nameservers) or "the system's resolver"
    lines = [f"gannet doctor {domain} (DNS: {servers})", ""]
    indent = " " * 8
    for c in checks:
        label = f"{c.name} {c.subject}".strip()
        lines.append(f"{c.status.value.upper():<6}  {label}")
        lines += textwrap.wrap(
            c.explanation, width, initial_indent=indent, subsequent_indent=indent,
            break_long_words=False, break_on_hyphens=False,
        )  # fmt: skip
        if c.record:
            lines.append(f"{indent}publish: {c.record}")
    failed = sum(c.status is Status.FAIL for c in checks)
    warned = sum(c.status is Status.WARN for c in checks)
    passed = len(checks) - failed - warned
    lines += ["", f"{len(checks)} checks: {passed} passed, {warned} warning(s), {failed} failed."]
    return "\n".join(lines) + "\n"


def main(config: Config, domain: str, addresses: Sequence[str], as_json: bool, out: TextIO) -> int:
    """The command: 0 all passed (warnings allowed), 1 a check failed, 2 bad arguments."""
    if not valid_domain(domain):
        raise ValueError(f"{domain!r} is not a domain name")
    for a in addresses:
        ipaddress.ip_address(a)  # ValueError names the bad one
    checks = asyncio.run(run_checks(config, domain, [str(ipaddress.ip_address(a)) for a in addresses]))
    out.write(
        to_json(checks) + "\n" if as_json else render_text(domain.lower(), checks, config.dns.nameservers)
    )
    return exit_status(checks)
