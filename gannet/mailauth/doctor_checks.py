"""The checks of `gannet doctor`: one async function per DNS record family, each returning `Check`s.

Every check says, in plain words, what it found and why it matters, and when
something is missing or wrong, the exact record to publish (zone-file syntax,
TXT values split into 255-octet strings). A DNS failure (SERVFAIL, timeout)
fails the check with that reason: the doctor never guesses. All lookups go
through `gannet.delivery.dns.Resolver`, so `[dns] nameservers` is honoured.

Families and their rules: MX (RFC 5321 §5.1, null MX RFC 7505), A/AAAA of the
MX hosts, forward-confirmed reverse DNS of this server's addresses (RFC 8601
§3 "iprev"; receivers distrust a server whose PTR does not lead back to it),
SPF (RFC 7208, in `doctor_spf`), DKIM keys (RFC 6376 §3.6.1, RFC 8463),
DMARC (RFC 7489 §6.3, §6.6.3), MTA-STS (RFC 8461 §3.1), TLS-RPT (RFC 8460 §3).
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import re
from dataclasses import dataclass

import dns.reversename
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from publicsuffixlist import PublicSuffixList

from gannet.config import ConfigError, DkimKey
from gannet.delivery.dns import DnsError, MxRecord, Resolver
from gannet.mailauth import doctor_spf
from gannet.mailauth.dkim_tags import InvalidTagValueList, parse_tags
from gannet.mailauth.keys import SigningKey, load_key, zone_line


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"  # works, but could be better: does not change the exit status
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # the family: mx, mx-host, hostname, ptr, spf, spf-lookups, spf-covers, dkim, dmarc, ...
    subject: str  # what was checked: a host, an address, a selector ("" for the domain itself)
    status: Status
    explanation: str
    record: str | None = None  # the record to publish, zone-file syntax


def txt_line(name: str, text: str) -> str:
    return zone_line(name, text)


def _failed_lookup(name: str, subject: str, exc: DnsError) -> Check:
    return Check(name, subject, Status.FAIL, f"The DNS lookup failed ({exc.reason}); try again later.")


# ---------------------------------------------------------------------------- MX


async def check_mx(resolver: Resolver, domain: str, hostname: str) -> tuple[list[Check], list[MxRecord]]:
    """The domain's MX records, then the addresses of each MX host."""
    publish = f"{domain}. IN MX 10 {hostname}."
    try:
        records = sorted(await resolver.mx(domain), key=lambda r: r.preference)
    except DnsError as exc:
        if exc.temporary:
            return [_failed_lookup("mx", "", exc)], []
        return [Check("mx", "", Status.FAIL, f"{domain} does not exist in the DNS (NXDOMAIN).", publish)], []
    if not records:
        return [
            Check(
                "mx", "", Status.FAIL,
                f"{domain} has no MX record: other servers will try to deliver to the domain's own "
                "address (implicit MX), which is rarely the mail server. Publish an MX naming this server.",
                publish,
            )
        ], []  # fmt: skip
    if any(r.host == "" for r in records):
        return [
            Check(
                "mx", "", Status.FAIL,
                f"{domain} publishes a null MX (RFC 7505): it declares that it accepts no mail at all, "
                "and mail to it bounces at once. Replace it if this domain should receive mail.",
                publish,
            )
        ], []  # fmt: skip
    hosts = ", ".join(f"{r.host} (preference {r.preference})" for r in records)
    own = any(r.host == hostname for r in records)
    note = (
        "" if own else f" None of them is this server ({hostname}); fine if another server receives its mail."
    )
    checks = [Check("mx", "", Status.PASS, f"{domain} has {len(records)} MX host(s): {hosts}.{note}")]
    for r in records:
        checks.append(await _check_mx_host(resolver, r.host))
    return checks, records


async def _check_mx_host(resolver: Resolver, host: str) -> Check:
    try:
        ipaddress.ip_address(host)
        return Check(
            "mx-host", host, Status.FAIL,
            f"The MX target {host} is an address, but an MX must name a host (RFC 5321 §5.1).",
        )  # fmt: skip
    except ValueError:
        pass
    try:
        addresses = await resolver.addresses(host)
    except DnsError as exc:
        if exc.temporary:
            return _failed_lookup("mx-host", host, exc)
        addresses = []
    if not addresses:
        return Check(
            "mx-host", host, Status.FAIL,
            f"The MX host {host} has no A or AAAA record, so nobody can deliver to it.",
            f"{host}. IN A <the server's IPv4 address>",
        )  # fmt: skip
    return Check("mx-host", host, Status.PASS, f"{host} has address(es) {', '.join(addresses)}.")


# ---------------------------------------------------------------------------- this server


async def check_hostname(resolver: Resolver, hostname: str) -> tuple[Check, list[str]]:
    try:
        addresses = await resolver.addresses(hostname)
    except DnsError as exc:
        if exc.temporary:
            return _failed_lookup("hostname", hostname, exc), []
        addresses = []
    if not addresses:
        return Check(
            "hostname", hostname, Status.FAIL,
            f"This server's hostname {hostname} (the name in its greeting and EHLO) has no A or AAAA "
            "record. Receivers check that the name exists; publish its address(es), or name them with "
            "--address.",
            f"{hostname}. IN A <this server's IPv4 address>",
        ), []  # fmt: skip
    return Check(
        "hostname", hostname, Status.PASS, f"{hostname} has address(es) {', '.join(addresses)}."
    ), addresses


async def check_ptr(resolver: Resolver, ip: str, hostname: str) -> Check:
    """Forward-confirmed reverse DNS: PTR of ip → a name whose A/AAAA include ip."""
    reverse = dns.reversename.from_address(ip).to_text()
    publish = f"{reverse} IN PTR {hostname}."
    who = "Reverse DNS is set by whoever holds the address (usually the hosting provider's panel)."
    try:
        names = await resolver.ptr(ip)
    except DnsError as exc:
        return _failed_lookup("ptr", ip, exc)
    if not names:
        return Check(
            "ptr", ip, Status.FAIL,
            f"{ip} has no reverse DNS (PTR) record. Many receivers refuse or distrust mail from an "
            f"address without one. {who}",
            publish,
        )  # fmt: skip
    confirmed = []
    for name in names:
        try:
            forward = await resolver.addresses(name)
        except DnsError as exc:
            if exc.temporary:
                return _failed_lookup("ptr", ip, exc)
            forward = []
        if any(ipaddress.ip_address(a) == ipaddress.ip_address(ip) for a in forward):
            confirmed.append(name)
    if not confirmed:
        return Check(
            "ptr", ip, Status.FAIL,
            f"{ip} points back to {', '.join(names)}, but that name does not resolve to {ip} "
            f"(forward-confirmed reverse DNS fails). Make the PTR name {hostname} and give {hostname} "
            f"the address {ip}. {who}",
            publish,
        )  # fmt: skip
    if hostname not in confirmed:
        return Check(
            "ptr", ip, Status.WARN,
            f"{ip} ↔ {confirmed[0]} is forward-confirmed, but Gannet greets as {hostname}. Receivers "
            f"prefer the two to match: set hostname = \"{confirmed[0]}\" or change the PTR.",
            publish,
        )  # fmt: skip
    return Check("ptr", ip, Status.PASS, f"{ip} ↔ {hostname}: reverse DNS is forward-confirmed.")


# ---------------------------------------------------------------------------- SPF


async def check_spf(resolver: Resolver, domain: str, ips: list[str]) -> list[Check]:
    analyser = doctor_spf.SpfAnalyser(resolver)
    recommended = txt_line(domain, doctor_spf.recommended_record(ips))
    try:
        report = await analyser.analyse(domain)
    except doctor_spf.SpfTempError as exc:
        return [Check("spf", "", Status.FAIL, f"The DNS lookup failed ({exc}); try again later.")]
    if not report.records:
        return [
            Check(
                "spf", "", Status.FAIL,
                f"{domain} publishes no SPF record, so receivers cannot tell which servers may send "
                "its mail (and DMARC has only DKIM to go on). Publish one listing this server.",
                recommended,
            )
        ]  # fmt: skip
    if len(report.records) > 1:
        listed = "; ".join(f'"{r}"' for r in report.records)
        return [
            Check(
                "spf", "", Status.FAIL,
                f"{domain} publishes {len(report.records)} SPF records ({listed}). RFC 7208 §4.5 makes "
                "that a permanent error: every receiver ignores them all. Merge them into one.",
                recommended,
            )
        ]  # fmt: skip
    record = report.records[0]
    checks = []
    if report.errors:
        checks.append(
            Check(
                "spf", "", Status.FAIL,
                f'The SPF record "{record}" is broken: {"; ".join(report.errors)}. Receivers treat it '
                "as a permanent error (as if there were none).",
                recommended,
            )
        )  # fmt: skip
        return checks
    checks.append(Check("spf", "", Status.PASS, f'{domain} has one SPF record: "{record}".'))
    costs = ", ".join(f"{term} {n}" for term, n in report.cost) or "none"
    if report.lookups > doctor_spf.MAX_LOOKUPS or report.void_lookups > doctor_spf.MAX_VOID_LOOKUPS:
        too_many = (
            f"{report.lookups} DNS lookups (the limit is {doctor_spf.MAX_LOOKUPS})"
            if report.lookups > doctor_spf.MAX_LOOKUPS
            else f"{report.void_lookups} lookups that find nothing "
            f"(the limit is {doctor_spf.MAX_VOID_LOOKUPS})"
        )
        checks.append(
            Check(
                "spf-lookups", "", Status.FAIL,
                f"Evaluating the record takes {too_many}; receivers stop there with a permanent error "
                f"(RFC 7208 §4.6.4). Lookups per term: {costs}. Remove includes of services that no "
                "longer send for you, or list addresses with ip4:/ip6: instead of a, mx and includes. "
                "The record below lists this server alone: add back only the includes still needed.",
                recommended,
            )
        )  # fmt: skip
    else:
        checks.append(
            Check(
                "spf-lookups", "", Status.PASS,
                f"{report.lookups} of at most {doctor_spf.MAX_LOOKUPS} DNS lookups (per term: {costs}).",
            )
        )  # fmt: skip
    for ip in ips:
        checks.append(await _check_spf_covers(analyser, domain, record, ip))
    return checks


async def _check_spf_covers(analyser: doctor_spf.SpfAnalyser, domain: str, record: str, ip: str) -> Check:
    try:
        result = await analyser.result(domain, ip)
    except doctor_spf.SpfTempError as exc:
        return Check("spf-covers", ip, Status.FAIL, f"The DNS lookup failed ({exc}); try again later.")
    if result == "pass":
        return Check("spf-covers", ip, Status.PASS, f"Mail from {ip} gets SPF pass for {domain}.")
    publish = txt_line(domain, doctor_spf.with_addresses(record, [ip]))
    if result == "unknown":
        return Check(
            "spf-covers", ip, Status.WARN,
            f"Whether {ip} may send for {domain} depends on macros or ptr/exists terms the doctor does "
            f"not evaluate; if it is not covered, add ip{ipaddress.ip_address(ip).version}:{ip}.",
            publish,
        )  # fmt: skip
    return Check(
        "spf-covers", ip, Status.FAIL,
        f"Mail from this server's address {ip} gets SPF {result} for {domain}: receivers will treat "
        "it as not authorized. Add the address to the record.",
        publish,
    )  # fmt: skip


# ---------------------------------------------------------------------------- DKIM


def _record_key(p: str) -> bytes:
    return base64.b64decode(re.sub(r"\s+", "", p), validate=True)


def _same_key(key: SigningKey, p: str) -> bool:
    published = _record_key(p)
    if published == _record_key(key.public_key_b64()):
        return True
    if isinstance(key.private_key, rsa.RSAPrivateKey):  # p= may be a bare RSAPublicKey (PKCS#1)
        pkcs1 = key.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
        return published == pkcs1
    return False


async def check_dkim(resolver: Resolver, entry: DkimKey, config_file: str, index: int) -> Check:
    try:
        key = load_key(entry, config_file, index)
    except ConfigError as exc:
        return Check("dkim", entry.selector, Status.FAIL, f"Cannot use the configured key: {exc}")
    name = key.record_name
    try:
        texts = await resolver.txt(name)
    except DnsError as exc:
        return _failed_lookup("dkim", entry.selector, exc)
    publish = key.zone_line()
    if not texts:
        return Check(
            "dkim", entry.selector, Status.FAIL,
            f"No DKIM key is published at {name}: receivers cannot verify what Gannet signs with "
            f"{key.key_file} ({key.algorithm.value}).",
            publish,
        )  # fmt: skip
    if len(texts) > 1:
        return Check(
            "dkim", entry.selector, Status.FAIL,
            f"{name} has {len(texts)} TXT records; a verifier may pick any of them. Keep only this one.",
            publish,
        )  # fmt: skip
    try:
        tags = {k.decode(): v.decode() for k, v in parse_tags(texts[0].encode()).items()}
    except (InvalidTagValueList, UnicodeError) as exc:
        return Check(
            "dkim", entry.selector, Status.FAIL, f"The record at {name} cannot be parsed ({exc}).", publish
        )
    problem = ""
    if tags.get("v", "DKIM1") != "DKIM1":
        problem = f"v={tags['v']} is not DKIM1"
    elif tags.get("k", "rsa") != key.algorithm.value:
        problem = f"it says k={tags.get('k', 'rsa')}, but the configured key is {key.algorithm.value}"
    elif "p" not in tags:
        problem = "it has no p= (public key)"
    elif not tags["p"].strip():
        problem = "p= is empty: the key is revoked (RFC 6376 §3.6.1)"
    else:
        try:
            if not _same_key(key, tags["p"]):
                problem = f"its public key is not the one of {key.key_file} (an old or another server's key?)"
        except ValueError:
            problem = "p= is not valid base64"
    if problem:
        return Check(
            "dkim", entry.selector, Status.FAIL,
            f"The DKIM record at {name} does not match: {problem}. Signatures made with this key fail.",
            publish,
        )  # fmt: skip
    return Check(
        "dkim", entry.selector, Status.PASS,
        f"{name} publishes the public half of {key.key_file} ({key.algorithm.value}).",
    )  # fmt: skip


# ---------------------------------------------------------------------------- DMARC

_DMARC_VALUES = {
    "p": ("none", "quarantine", "reject"),
    "sp": ("none", "quarantine", "reject"),
    "adkim": ("r", "s"),
    "aspf": ("r", "s"),
}


def dmarc_problems(tags: dict[str, str]) -> list[str]:
    """What is wrong with a parsed DMARC record (RFC 7489 §6.3), [] when nothing is."""
    problems = []
    if tags.get("v") != "DMARC1":
        problems.append("it must begin with v=DMARC1")
    if "p" not in tags:
        problems.append("p= (the policy) is missing")
    for tag, allowed in _DMARC_VALUES.items():
        if tag in tags and tags[tag].lower() not in allowed:
            problems.append(f"{tag}={tags[tag]} is not one of {', '.join(allowed)}")
    if "pct" in tags and not (tags["pct"].isdigit() and 0 <= int(tags["pct"]) <= 100):
        problems.append(f"pct={tags['pct']} is not 0..100")
    for tag in ("rua", "ruf"):
        for uri in filter(None, (u.strip() for u in tags.get(tag, "").split(","))):
            if not uri.lower().startswith(("mailto:", "https:")):
                problems.append(f"{tag} has {uri!r}, not a mailto: address")
    return problems


async def _dmarc_records(resolver: Resolver, name: str) -> list[str]:
    # RFC 7489 §6.6.3: TXT records that do not start with "v=DMARC1" are not DMARC records
    return [t for t in await resolver.txt(f"_dmarc.{name}") if re.match(r"v\s*=\s*DMARC1\b", t)]


async def check_dmarc(resolver: Resolver, domain: str) -> Check:
    publish = txt_line(f"_dmarc.{domain}", f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}")
    try:
        records, where = await _dmarc_records(resolver, domain), domain
        org = PublicSuffixList().privatesuffix(domain) or domain
        if not records and org != domain:
            records, where = await _dmarc_records(resolver, org), org
    except DnsError as exc:
        return _failed_lookup("dmarc", "", exc)
    if not records:
        return Check(
            "dmarc", "", Status.FAIL,
            f"{domain} publishes no DMARC record (_dmarc.{domain}): receivers apply no policy to mail "
            "that fakes your domain, and some (Gmail, Yahoo) refuse bulk mail without one. Start with "
            "p=none to receive reports, then move to quarantine or reject.",
            publish,
        )  # fmt: skip
    if len(records) > 1:
        return Check(
            "dmarc", "", Status.FAIL,
            f"_dmarc.{where} has {len(records)} DMARC records; receivers then apply none (RFC 7489 "
            "§6.6.3). Keep one.",
            publish,
        )  # fmt: skip
    try:
        tags = {k.decode(): v.decode() for k, v in parse_tags(records[0].encode()).items()}
        problems = dmarc_problems(tags)
    except (InvalidTagValueList, UnicodeError) as exc:
        tags, problems = {}, [f"it cannot be parsed ({exc})"]
    if problems:
        return Check(
            "dmarc", "", Status.FAIL,
            f'The DMARC record "{records[0]}" at _dmarc.{where} is broken: {"; ".join(problems)}.',
            publish,
        )  # fmt: skip
    policy = tags.get("sp", tags["p"]) if where != domain else tags["p"]
    inherited = f" (inherited from the organizational domain {where})" if where != domain else ""
    if policy.lower() == "none":
        return Check(
            "dmarc", "", Status.WARN,
            f'DMARC record "{records[0]}"{inherited}: policy none only monitors; once the reports show '
            "your mail passing, raise p to quarantine or reject.",
        )  # fmt: skip
    return Check("dmarc", "", Status.PASS, f'DMARC record "{records[0]}"{inherited}: policy {policy}.')


# ---------------------------------------------------------------------------- MTA-STS and TLS-RPT


async def check_mta_sts(resolver: Resolver, domain: str) -> Check:
    name = f"_mta-sts.{domain}"
    records = await _optional_records(
        resolver, "mta-sts", name, "STSv1", "it lets senders insist on TLS, RFC 8461"
    )
    if isinstance(records, Check):
        return records
    url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
    tags = _tags(records[0])
    if len(records) > 1 or not re.fullmatch(r"[A-Za-z0-9]{1,32}", tags.get("id", "")):
        why = "more than one record" if len(records) > 1 else "id= must be 1 to 32 letters and digits"
        return Check(
            "mta-sts", "", Status.FAIL, f"The MTA-STS record at {name} is invalid ({why}; RFC 8461 §3.1).",
            txt_line(name, f"v=STSv1; id={tags.get('id') or '20260101000000'}"),
        )  # fmt: skip
    try:
        policy_host = await resolver.addresses(f"mta-sts.{domain}")
    except DnsError:
        policy_host = []
    if not policy_host:
        return Check(
            "mta-sts", "", Status.WARN,
            f"MTA-STS is announced (id={tags['id']}), but mta-sts.{domain} has no address, so senders "
            f"cannot fetch the policy from {url}.",
        )  # fmt: skip
    return Check(
        "mta-sts", "", Status.PASS,
        f"MTA-STS is announced (id={tags['id']}); the policy is served at {url} (not fetched by the "
        "doctor: check it lists your MX hosts and that its certificate is valid).",
    )  # fmt: skip


async def check_tls_rpt(resolver: Resolver, domain: str) -> Check:
    name = f"_smtp._tls.{domain}"
    records = await _optional_records(
        resolver, "tls-rpt", name, "TLSRPTv1", "senders mail you reports of TLS failures, RFC 8460"
    )
    if isinstance(records, Check):
        return records
    rua = _tags(records[0]).get("rua", "")
    uris = [u.strip() for u in rua.split(",") if u.strip()]
    if len(records) > 1 or not uris or not all(u.startswith(("mailto:", "https:")) for u in uris):
        return Check(
            "tls-rpt", "", Status.FAIL,
            f"The TLS-RPT record at {name} is invalid: it needs exactly one record with rua= "
            "mailto: or https: addresses (RFC 8460 §3).",
            txt_line(name, f"v=TLSRPTv1; rua=mailto:postmaster@{domain}"),
        )  # fmt: skip
    return Check("tls-rpt", "", Status.PASS, f"TLS reports go to {', '.join(uris)}.")


async def _optional_records(
    resolver: Resolver, check: str, name: str, version: str, what_for: str
) -> list[str] | Check:
    """The TXT records at `name` that start with v=`version`; or the Check to report
    when the lookup failed or there are none (these records are optional)."""
    try:
        records = [t for t in await resolver.txt(name) if re.match(rf"v={version}\s*(;|$)", t)]
    except DnsError as exc:
        return _failed_lookup(check, "", exc)
    if not records:
        return Check(check, "", Status.PASS, f"No {check.upper()} record at {name} (optional: {what_for}).")
    return records


def _tags(record: str) -> dict[str, str]:
    """A `tag=value; …` record's tags (RFC 8461 §3.1, RFC 8460 §3); the first of a repeated tag wins."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip(), value.strip())
    return tags
