"""Where a domain's mail goes: the ordered next hops for remote delivery (RFC 5321 §5.1).

Owns the routing rules; asks DNS through a `dns.Resolver` (or anything with
its `mx` and `addresses` methods) and returns a `Route`, or raises
`DnsError` whose `temporary` flag decides defer vs bounce. The rules
themselves (`order_mx`, `drop_self`, `null_mx`) are pure functions.
Callers: the remote delivery agent, once per destination batch.

Rules of `Router.route(domain)`:

1. A smarthost, when configured, takes all mail: Route("smarthost", its
   addresses). Its name is only ever looked up as A/AAAA, never MX (Postfix
   writes `[host]` for that; we always behave so). Every failure to route to
   the smarthost is temporary (451 4.4.3 / 451 4.4.6): it is our own
   configuration, and the queue should hold mail while it is fixed.
2. An address literal `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3)
   routes to that address; anything else in brackets is 553 5.1.3.
3. Otherwise MX (RFC 5321 §5.1): NXDOMAIN → 550 5.1.2; a null MX → 556 5.1.10
   (RFC 7505 §4.2; a "." target among other MX records is ignored as
   invalid); no MX at all → the implicit MX, the domain itself at preference 0.
4. Loop prevention: an MX host that is us, and every MX with an equal or
   higher preference value, is dropped; if that leaves nothing → 554 5.4.6.
   "Us" is a host whose name is in `own_names`, or one whose address is in
   `own_addresses`. An `own_addresses` entry is either a bare IP (us on any
   port) or `ip:port` / `[ip]:port` (us only when that port is the port we
   deliver to), so listener addresses can be passed as configured. Wildcard
   listen addresses (0.0.0.0, ::) are not expanded, and entries that are not
   IP addresses are ignored: `own_names` covers those.
5. The MX hosts' addresses are looked up concurrently. A host with no address
   (NXDOMAIN or NODATA) is skipped; if no host has one, the route fails:
   temporary (451 4.4.3) if any host lookup failed temporarily, else 554 5.4.4.
6. Hops: each MX in order, each of its addresses, IPv6 first then IPv4, at
   most `MAX_HOPS` in all (Postfix's smtp_mx_address_limit is 5; we allow 10
   so that a dual-stack primary and backup both fit), duplicates removed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from gannet.delivery.dns import DnsError, MxRecord, temporary_error

MAX_HOPS = 10
SMARTHOST = "smarthost"


class DnsSource(Protocol):
    """What routing needs from DNS: `dns.Resolver` has it; tests may pass a stub."""

    async def mx(self, domain: str) -> list[MxRecord]: ...

    async def addresses(self, host: str) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class NextHop:
    host: str  # the MX host name: for logs, TLS SNI and certificate checks
    address: str  # one IP address
    port: int
    preference: int

    @property
    def label(self) -> str:
        """`host[ip]:port`, as in Postfix's relay= log field."""
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    destination: str  # the key for per-destination concurrency and backoff: the domain, or "smarthost"
    hops: tuple[NextHop, ...]  # in the order to try them


def order_mx(records: Sequence[MxRecord], rng: random.Random) -> list[MxRecord]:
    """By preference, lowest first; equal preferences in random order (RFC 5321 §5.1)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r.preference)  # sorted() is stable: the shuffle survives


def drop_self(records: Sequence[MxRecord], own_names: Collection[str], domain: str = "") -> list[MxRecord]:
    """Drop us and every MX at an equal or higher preference value (RFC 5321 §5.1).

    Raises DnsError 554 5.4.6 when we are the most preferred MX (nothing remains).
    """
    own = {n.lower().rstrip(".") for n in own_names}
    ours = [r.preference for r in records if r.host in own]
    if not ours:
        return list(records)
    kept = [r for r in records if r.preference < min(ours)]
    if not kept:
        raise DnsError(False, 554, "5.4.6", f"mail for {domain or 'this domain'} loops back to myself")
    return kept


def null_mx(records: Sequence[MxRecord]) -> bool:
    """RFC 7505: a single MX whose target is "." → the domain accepts no mail.

    RFC 7505 asks for preference 0, but the target is what counts, so any
    preference is accepted.
    """
    return len(records) == 1 and records[0].host == ""


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[host]:port`, `1.2.3.4:port`, `[::1]:port`, `::1` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or not inner or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not host:port")
        return inner.lower(), int(rest[1:]) if rest else default_port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host.lower(), int(port)
    if ":" in text:
        ipaddress.IPv6Address(text)  # a bare IPv6 address; anything else with colons is an error
    return text.lower(), default_port


def _literal_address(domain: str) -> str:
    """The address in an RFC 5321 §4.1.3 address literal; DnsError 553 5.1.3 if malformed."""
    inner = domain[1:-1] if domain.endswith("]") else ""
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise DnsError(False, 553, "5.1.3", f"{domain!r} is not a valid address literal") from None


def _parse_own(entry: str) -> tuple[str, int | None] | None:
    """An `own_addresses` entry → (ip, port), port None for a bare IP (us on any port);
    None for an entry that is not an IP address (a listener on a host name)."""
    entry = entry.strip()
    has_port = entry.startswith("[") or entry.count(":") == 1
    try:
        host, port = parse_host_port(entry, 0)
        return str(ipaddress.ip_address(host)), (port if has_port else None)
    except ValueError:
        return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Router:
    """Turns a recipient domain into a Route (see the module docstring for the rules)."""

    def __init__(
        self,
        resolver: DnsSource,
        *,
        port: int,
        own_names: Collection[str],
        own_addresses: Collection[str] = (),
        smarthost: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self._resolver = resolver
        self._port = port
        self._own_names = frozenset(n.lower().rstrip(".") for n in own_names)
        self._own_addresses = frozenset(own for a in own_addresses if (own := _parse_own(a)) is not None)
        self._smarthost = parse_host_port(smarthost, port) if smarthost else None
        self._rng = rng or random.Random()

    def _is_own(self, address: str, port: int) -> bool:
        """Is `address:port` one of ours (rule 4)?"""
        ip = str(ipaddress.ip_address(address))
        return (ip, None) in self._own_addresses or (ip, port) in self._own_addresses

    async def route(self, domain: str) -> Route:
        """The hops for `domain`, best first; DnsError when there are none."""
        if self._smarthost is not None:
            return await self._smarthost_route(*self._smarthost)
        domain = domain.strip().rstrip(".").lower()
        if domain.startswith("["):
            address = _literal_address(domain)
            if self._is_own(address, self._port):
                raise DnsError(False, 554, "5.4.6", f"mail for {domain} loops back to myself")
            return Route(domain, (NextHop(address, address, self._port, 0),))
        records = await self._resolver.mx(domain)
        if null_mx(records):
            raise DnsError(False, 556, "5.1.10", f"{domain} does not accept mail (null MX, RFC 7505)")
        records = [r for r in records if r.host]  # a "." beside real MX records is invalid: ignore it
        if not records:
            records = [MxRecord(0, domain)]  # the implicit MX (RFC 5321 §5.1)
        records = drop_self(order_mx(records, self._rng), self._own_names, domain)
        addresses, failed = await self._resolve_hosts(records)
        by_address = {
            r.host for r in records if any(self._is_own(a, self._port) for a in addresses.get(r.host, ()))
        }
        records = drop_self(records, by_address, domain)
        hops = self._hops(records, addresses)
        if hops:
            return Route(domain, hops)
        for record in records:  # rule 5: an MX we would still try failed temporarily → try again later
            if record.host in failed:
                raise failed[record.host]
        implicit = records == [MxRecord(0, domain)]
        what = "no mail exchanger and no address" if implicit else "no mail exchanger with an address"
        raise DnsError(False, 554, "5.4.4", f"{domain} has {what}")

    async def _resolve_hosts(
        self, records: Sequence[MxRecord]
    ) -> tuple[dict[str, list[str]], dict[str, DnsError]]:
        """Each MX host's addresses (hosts without any are absent), and the hosts whose lookup
        failed temporarily, with the error. A permanent error only means "no address"."""
        hosts = list(dict.fromkeys(r.host for r in records))
        results = await asyncio.gather(*(self._resolver.addresses(h) for h in hosts), return_exceptions=True)
        found: dict[str, list[str]] = {}
        failed: dict[str, DnsError] = {}
        for host, result in zip(hosts, results, strict=True):
            if isinstance(result, list):
                if result:
                    found[host] = result
            elif isinstance(result, DnsError):
                if result.temporary:
                    failed[host] = result
            else:
                raise result
        return found, failed

    def _hops(self, records: Sequence[MxRecord], addresses: dict[str, list[str]]) -> tuple[NextHop, ...]:
        hops: list[NextHop] = []
        seen: set[str] = set()
        for record in records:
            for address in addresses.get(record.host, ()):
                if address not in seen and len(hops) < MAX_HOPS:
                    seen.add(address)
                    hops.append(NextHop(record.host, address, self._port, record.preference))
        return tuple(hops)

    async def _smarthost_route(self, host: str, port: int) -> Route:
        """Rule 1: A/AAAA of the smarthost (never MX); every failure temporary."""
        if _is_ip(host):
            addresses = [str(ipaddress.ip_address(host))]
        else:
            try:
                addresses = await self._resolver.addresses(host)
            except DnsError as exc:
                raise temporary_error(f"smarthost {host}: {exc.reason}") from None
        if not addresses:
            raise temporary_error(f"smarthost {host} has no address")
        if any(self._is_own(a, port) for a in addresses):
            raise DnsError(True, 451, "4.4.6", f"smarthost {host}:{port} loops back to myself")
        hops = tuple(NextHop(host, a, port, 0) for a in addresses[:MAX_HOPS])
        return Route(SMARTHOST, hops)
