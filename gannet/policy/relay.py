"""Relay rules: may this client send to this recipient, may this user use this sender.

`rcpt_verdict` decides one RCPT TO (RFC 5321 §3.3, §4.1.1.3):

| recipient                          | from anyone        | trusted network or AUTH |
|------------------------------------|--------------------|-------------------------|
| local domain, address exists       | Accept (LOCAL/…)   | Accept                  |
| local domain, unknown address      | 550 5.1.1          | 550 5.1.1               |
| relay domain (backup MX)           | Accept (SMTP)      | Accept (SMTP)           |
| any other domain                   | 554 5.7.1          | Accept (SMTP)           |
| address literal (user@[192.0.2.1]) | 554 5.7.1          | Accept (SMTP)           |
| bare "postmaster" (§4.1.1.3)       | as postmaster@<first local domain>          |
| "" / "<>" / no domain              | 501 5.1.3          | 501 5.1.3               |

Unknown local users are refused at RCPT and never accepted to be bounced
later: a later bounce goes to a sender address that is usually forged
(backscatter). Old relay tricks need no special case: "user%other@local"
and "@a:user@b" reach no account and get 550; "user@local@foreign" splits
on the last "@" and is a foreign domain.

`sender_verdict` applies on submission only (the caller decides, RFC 6409
§6.1 lets the MSA check the sender): an authenticated user may use their own
address (any case, any "+tag"), an alias that delivers to their mailbox, or
the null sender; anything else is 553 5.7.1.

Pure: the caller supplies the facts (`RcptFacts`, computing `trusted` with
`is_trusted`), this module returns verdicts. No I/O, no DNS, no logging; the
`reason` of a Reject is the caller's log line.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from gannet.policy.recipients import (
    Destination,
    RecipientTable,
    normalize_domain,
    split_address,
    strip_tag,
)
from gannet.policy.verdict import ACCEPT, Reject, Verdict
from gannet.queue.model import Transport
from gannet.smtp.replies import (
    R550_NO_SUCH_USER,
    R553_SENDER_NOT_OWNED,
    R554_RELAY_DENIED,
    Reply,
)

# RFC 3463 §3.2 X.1.3 "Bad destination mailbox address syntax". Not in the
# shared catalog (yet): the null or domain-less recipient is this module's case.
R501_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RcptFacts:
    """What the session knows about the client when a RCPT arrives."""

    client_ip: str  # "" when unknown (unix socket)
    authenticated: bool
    trusted: bool  # client_ip in trusted_networks (computed by caller with is_trusted())


def is_trusted(client_ip: str, networks: Sequence[IPNetwork]) -> bool:
    """Is `client_ip` inside one of `networks`? False for "" or anything unparsable.

    An IPv4 client on a dual-stack socket shows up as "::ffff:a.b.c.d"
    (RFC 4291 §2.5.5.2); it is matched against the IPv4 networks as well, so
    "127.0.0.0/8" trusts "::ffff:127.0.0.1". An IPv6 zone ("fe80::1%eth0") is
    accepted. A unix-socket client has no IP: whether to trust it is the
    caller's decision, not this function's.
    """
    if not client_ip:
        return False
    try:
        ip = ipaddress.ip_address(client_ip.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    # `in` is False (not an error) when the IP versions differ.
    return any(c in net for net in networks for c in candidates)


def rcpt_verdict(table: RecipientTable, facts: RcptFacts,
                 address: str) -> tuple[Verdict, list[Destination]]:
    """Decide one RCPT TO; on Accept also return where it goes (never empty).

    See the module docstring for the table of rules.
    """
    address = address.strip()
    if address in ("", "<>"):
        return Reject(R501_BAD_RECIPIENT, "null recipient"), []
    if "@" not in address and address.lower() == "postmaster":
        # RFC 5321 §4.1.1.3: "RCPT TO:<Postmaster>" without a domain (case-
        # insensitive) is always accepted by compliant servers.
        postmaster = table.postmaster()
        if postmaster is None:
            return Reject(R550_NO_SUCH_USER, "bare postmaster but no local domain"), []
        address = postmaster
    parts = split_address(address)
    if parts is None:
        return Reject(R501_BAD_RECIPIENT, f"recipient {address!r} has no domain"), []
    domain = normalize_domain(parts[1])
    may_relay = facts.trusted or facts.authenticated

    if domain.startswith("["):
        # An address literal (RFC 5321 §4.1.3) is never one of our domains; it
        # names a host directly, so it is relaying.
        if not may_relay:
            return Reject(R554_RELAY_DENIED, _denied(facts, address)), []
        return ACCEPT, [Destination(address, Transport.SMTP, domain)]
    if domain in table.local_domains:
        destinations = table.resolve(address)
        if destinations is None:
            return Reject(R550_NO_SUCH_USER, f"unknown local recipient {address}"), []
        return ACCEPT, destinations
    if domain in table.relay_domains or may_relay:
        return ACCEPT, [Destination(address, Transport.SMTP, domain)]
    return Reject(R554_RELAY_DENIED, _denied(facts, address)), []


def _denied(facts: RcptFacts, address: str) -> str:
    client = facts.client_ip or "unknown client"
    return f"relay to {address} from {client}: not in trusted_networks, not authenticated"


def sender_verdict(table: RecipientTable, auth_user: str | None, sender: str) -> Verdict:
    """May `auth_user` (None: not authenticated) use MAIL FROM:<sender>?

    ACCEPT when not authenticated (nothing to check here; relay rules apply
    per recipient), for the null sender (bounces and auto-replies, RFC 5321
    §4.5.5), for the user's own address with or without "+tag" (compared
    case-insensitively), and for an alias whose expansion reaches the user's
    mailbox (a shared "team@" or "postmaster@"). Otherwise 553 5.7.1.
    """
    if auth_user is None:
        return ACCEPT
    sender = sender.strip()
    if sender in ("", "<>"):
        return ACCEPT
    user = auth_user.strip().lower()
    if _own_address(user, sender):
        return ACCEPT
    parts = split_address(sender)
    if parts is not None and table.is_local_domain(parts[1]):
        destinations = table.resolve(sender) or []
        if any(d.transport is Transport.LOCAL and d.mailbox == user for d in destinations):
            return ACCEPT
    return Reject(R553_SENDER_NOT_OWNED, f"{auth_user} may not send as {sender}")


def _own_address(user: str, sender: str) -> bool:
    parts = split_address(sender)
    if parts is None:
        return False
    local, domain = parts[0].lower(), normalize_domain(parts[1])
    owned = {f"{local}@{domain}"}
    base = strip_tag(local)
    if base:
        owned.add(f"{base}@{domain}")
    return user in owned
