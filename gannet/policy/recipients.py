"""Who a recipient address is: the recipient table (Postfix trivial-rewrite +
virtual aliasing, chasquid `aliases.go`).

`RecipientTable.resolve(address)` turns one RCPT TO address into the final
destinations the queue stores (`gannet.queue.model.NewRecipient` takes the
same fields), or None when a local address does not exist. It answers only
"who is this"; whether *this client* may send there is `relay.py`'s question.

Rules, in order, for an address in a local domain:

1. Try the address as given, then — if its local part has a "+tag" — the
   address without the tag (CONTRACT.md: "user+tag@" reaches "user@"). A more
   specific entry (an alias for "bob+lists@") therefore wins over "bob@".
2. For each of those candidates, an alias is expanded first, then an account
   is looked up (virtual aliasing happens before mailbox lookup, as in Postfix
   `virtual_alias_maps` and chasquid). An alias that lists its own address
   ("alice@d" = ["alice@d", "alice@elsewhere"]) keeps a local copy: an
   address already being expanded is not expanded again, it falls through to
   the account lookup (Postfix's self-reference rule).
3. Alias targets in a local domain resolve by these same rules; targets
   elsewhere become SMTP destinations. A branch that loops, nests deeper than
   `MAX_ALIAS_DEPTH`, or ends at an unknown local address is dropped; if no
   branch remains the address does not exist (None), so RCPT is refused with
   550 5.1.1 rather than accepted and bounced later.
4. An account becomes a LOCAL destination whose `mailbox` is the account
   (lowercased) and whose `address` is the account as written in the file.

An address in any other domain resolves to itself with transport SMTP.

postmaster: RFC 5321 §4.5.1 says every SMTP domain MUST accept mail for
"postmaster". Gannet does not invent a mailbox for it: it exists when it is
an account or an alias, like any other address. Operators must alias it
(`[mailboxes] aliases = { "postmaster@example.test" = ["alice@example.test"] }`),
and `missing_postmaster()` lists the local domains where they have not, so
`gannet check-config` can warn.

Pure: no I/O (the `Accounts` snapshot is already in memory), no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gannet.config import MailboxesConfig, RelayConfig
from gannet.policy.accounts import Accounts
from gannet.queue.model import Transport

# How many alias expansions one address may go through (chasquid uses 10 too).
MAX_ALIAS_DEPTH = 10


@dataclass(frozen=True, slots=True)
class Destination:
    """One final recipient: where the queue must deliver a copy."""

    address: str  # final address to deliver to
    transport: Transport  # LOCAL or SMTP
    domain: str  # lowercased domain of address
    mailbox: str = ""  # LOCAL: the account address (lowercased) whose Maildir gets it


def split_address(address: str) -> tuple[str, str] | None:
    """("local", "domain-as-written") or None when either side is missing.

    Splits on the *last* "@": a quoted local part may contain "@" (RFC 5321
    §4.1.2), a domain never does.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain


def normalize_domain(domain: str) -> str:
    """Domains compare case-insensitively (RFC 5321 §2.4); drop a trailing root dot."""
    return domain.lower().rstrip(".")


def strip_tag(local: str) -> str | None:
    """"user+tag" → "user"; None when there is no tag to strip ("+tag" alone stays)."""
    base, plus, _ = local.partition("+")
    return base if plus and base else None


@dataclass(frozen=True, slots=True)
class RecipientTable:
    """Local and relay domains, aliases and accounts: everything `resolve` needs."""

    local_domains: frozenset[str]
    relay_domains: frozenset[str]
    aliases: Mapping[str, tuple[str, ...]]  # lowercased alias address → targets
    accounts: Accounts
    # The first of relay.local_domains, where a bare "postmaster" and double
    # bounces go (CONTRACT.md). "" = the alphabetically first local domain.
    postmaster_domain: str = ""

    @classmethod
    def from_config(cls, relay: RelayConfig, mailboxes: MailboxesConfig,
                    accounts: Accounts) -> RecipientTable:
        local = [normalize_domain(d) for d in relay.local_domains]
        return cls(
            local_domains=frozenset(local),
            relay_domains=frozenset(normalize_domain(d) for d in relay.relay_domains),
            aliases=MappingProxyType({k.lower(): tuple(v) for k, v in mailboxes.aliases.items()}),
            accounts=accounts,
            postmaster_domain=local[0] if local else "",
        )

    def is_local_domain(self, domain: str) -> bool:
        return normalize_domain(domain) in self.local_domains

    def is_relay_domain(self, domain: str) -> bool:
        return normalize_domain(domain) in self.relay_domains

    def postmaster(self) -> str | None:
        """"postmaster@<first local domain>", or None when there is no local domain."""
        domain = self.postmaster_domain or min(self.local_domains, default="")
        return f"postmaster@{domain}" if domain else None

    def resolve(self, address: str) -> list[Destination] | None:
        """The final destinations for `address`, or None if it is an unknown local address.

        See the module docstring for the rules. The list has no duplicates and
        keeps the order in which the aliases name the targets.
        """
        parts = split_address(address.strip())
        if parts is None:
            return None
        domain = normalize_domain(parts[1])
        if domain not in self.local_domains:
            return [Destination(address.strip(), Transport.SMTP, domain)]
        found = self._expand(address.strip(), 0, frozenset())
        return _dedupe(found) or None

    def missing_postmaster(self) -> list[str]:
        """Local domains (sorted) where "postmaster@" reaches nobody (RFC 5321 §4.5.1)."""
        return sorted(d for d in self.local_domains if self.resolve(f"postmaster@{d}") is None)

    def _expand(self, address: str, depth: int, expanding: frozenset[str]) -> list[Destination]:
        """Destinations for one address; [] when this branch leads nowhere.

        `expanding` holds the (lowercased) aliases on the current path: it both
        stops loops and implements the self-reference rule.
        """
        parts = split_address(address)
        if parts is None:
            return []
        local, domain = parts[0], normalize_domain(parts[1])
        if domain not in self.local_domains:
            return [Destination(address, Transport.SMTP, domain)]
        base = strip_tag(local)
        candidates = [f"{local}@{domain}"] + ([f"{base}@{domain}"] if base else [])
        for candidate in candidates:
            key = candidate.lower()
            targets = self.aliases.get(key)
            if targets is not None and key not in expanding:
                if depth >= MAX_ALIAS_DEPTH:
                    return []
                inner = expanding | {key}
                return [d for t in targets for d in self._expand(t.strip(), depth + 1, inner)]
            account = self.accounts.canonical(key)
            if account is not None:
                return [_local(account)]
        return []


def _local(account: str) -> Destination:
    parts = split_address(account)
    domain = normalize_domain(parts[1]) if parts else ""
    return Destination(account, Transport.LOCAL, domain, mailbox=account.lower())


def _dedupe(destinations: list[Destination]) -> list[Destination]:
    """Drop repeats, keeping the first. LOCAL copies are the same when they land in
    the same mailbox; remote ones when the address is the same — the local part
    compared exactly, since only the remote host may interpret its case
    (RFC 5321 §2.4)."""
    seen: set[tuple[Transport, str]] = set()
    out: list[Destination] = []
    for d in destinations:
        key: tuple[Transport, str]
        if d.transport is Transport.LOCAL:
            key = (d.transport, d.mailbox)
        else:
            parts = split_address(d.address)
            key = (d.transport, f"{parts[0]}@{d.domain}" if parts else d.address)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out
