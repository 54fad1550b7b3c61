"""The inbound checks' DNS: Gannet's asynchronous `Resolver` in the shapes SPF and DKIM want.

One `Resolver` (gannet/delivery/dns.py) per server process answers every
check, so SPF, DKIM and DMARC share its TTL cache, its in-flight sharing and
`[dns] nameservers`. This module only translates:

- `spf_dns(resolver)`: pyspf's questions (TXT, MX, A, AAAA, PTR by reverse
  name) → answers in pyspf's format; NXDOMAIN and "no data" are [] (pyspf
  counts them as void lookups), a temporary failure is `SpfDnsError`.
- `txt_records(resolver, name)`: a TXT lookup as `TxtAnswer` — the records,
  or "temporary failure", never an exception — for DKIM keys and DMARC.

Never raises anything but `SpfDnsError` (from the SPF adapter), never blocks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.reversename

from gannet.delivery.dns import DnsError, Resolver
from gannet.mailauth.spf import Answer, SpfDns, SpfDnsError


@dataclass(frozen=True, slots=True)
class TxtAnswer:
    records: tuple[str, ...] = ()
    temporary_error: str = ""  # non-empty: the lookup failed temporarily (the records are unknown)


async def txt_records(resolver: Resolver, name: str) -> TxtAnswer:
    try:
        return TxtAnswer(tuple(await resolver.txt(name)))
    except DnsError as exc:
        if exc.temporary:
            return TxtAnswer(temporary_error=exc.reason)
        return TxtAnswer()  # not a valid name: nothing published there


def spf_dns(resolver: Resolver) -> SpfDns:
    async def lookup(name: str, qtype: str) -> Answer:
        key = (name, qtype)
        try:
            if qtype == "TXT":
                return [(key, (text.encode("utf-8"),)) for text in await resolver.txt(name)]
            if qtype == "MX":
                return [(key, (mx.preference, mx.host)) for mx in await resolver.mx(name) if mx.host]
            if qtype in ("A", "AAAA"):
                version = 6 if qtype == "AAAA" else 4
                found = await resolver.addresses(name)
                return [(key, a) for a in found if ipaddress.ip_address(a).version == version]
            if qtype == "PTR":
                try:
                    ip = dns.reversename.to_address(dns.name.from_text(name))
                except (dns.exception.DNSException, ValueError):
                    return []
                return [(key, host) for host in await resolver.ptr(ip)]
        except DnsError as exc:
            if exc.temporary:
                raise SpfDnsError(exc.reason) from None
            return []  # NXDOMAIN for MX/A, or a name that cannot be one
        return []  # a type SPF never needs here (type SPF/99 is obsolete, RFC 7208 §3.1)

    return lookup
