"""The recipient table: a golden table of address → destinations (or None)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gannet.config import MailboxesConfig, RelayConfig
from gannet.policy.accounts import Accounts
from gannet.policy.recipients import MAX_ALIAS_DEPTH, Destination, RecipientTable
from gannet.queue.model import Transport

LOCAL, SMTP = Transport.LOCAL, Transport.SMTP
FAKE_HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"  # never verified here

ACCOUNTS = ("alice@example.test", "Bob.Smith@example.test", "carol@other.test",
            "postmaster@other.test")

# Chains of aliases a0 → a1 → … → alice, exactly at and one past the depth limit.
_OK_CHAIN = {f"ok{i}@example.test": (f"ok{i + 1}@example.test",) for i in range(MAX_ALIAS_DEPTH)}
_OK_CHAIN[f"ok{MAX_ALIAS_DEPTH - 1}@example.test"] = ("alice@example.test",)
_LONG_CHAIN = {f"long{i}@example.test": (f"long{i + 1}@example.test",)
               for i in range(MAX_ALIAS_DEPTH + 1)}
_LONG_CHAIN[f"long{MAX_ALIAS_DEPTH}@example.test"] = ("alice@example.test",)

ALIASES: dict[str, tuple[str, ...]] = {
    "postmaster@example.test": ("alice@example.test",),
    "info@example.test": ("alice@example.test", "Bob.Smith@example.test"),
    "sales@example.test": ("info@example.test",),
    "fwd@example.test": ("Someone@Remote.test",),
    "tagfwd@example.test": ("x+y@remote.test",),
    "mixed@example.test": ("alice@example.test", "friend@remote.test", "carol@other.test"),
    "loop1@example.test": ("loop2@example.test",),
    "loop2@example.test": ("loop1@example.test",),
    "ring1@example.test": ("ring2@example.test", "alice@example.test"),
    "ring2@example.test": ("ring1@example.test",),
    "ghost@example.test": ("nobody@example.test",),
    "half@example.test": ("nobody@example.test", "alice@example.test"),
    "dup@example.test": ("alice@example.test", "ALICE@example.test", "alice+x@example.test",
                         "info@example.test", "a@remote.test", "a@REMOTE.test"),
    "alice+lists@example.test": ("lists@remote.test",),
    **_OK_CHAIN,
    **_LONG_CHAIN,
}


def make_table(aliases: dict[str, tuple[str, ...]] | None = None,
               accounts: tuple[str, ...] = ACCOUNTS) -> RecipientTable:
    relay = RelayConfig(local_domains=("example.test", "other.test", "third.test"),
                        relay_domains=("backup.test",))
    mailboxes = MailboxesConfig(maildir="/m/{domain}/{user}", users_file=Path("/nonexistent"),
                                aliases=ALIASES if aliases is None else aliases)
    return RecipientTable.from_config(relay, mailboxes, Accounts((a, FAKE_HASH) for a in accounts))


def local(address: str) -> Destination:
    return Destination(address, LOCAL, address.rpartition("@")[2].lower(), address.lower())


def smtp(address: str) -> Destination:
    return Destination(address, SMTP, address.rpartition("@")[2].lower())


ALICE, BOB, CAROL = local("alice@example.test"), local("Bob.Smith@example.test"), \
    local("carol@other.test")

GOLDEN: list[tuple[str, list[Destination] | None]] = [
    # accounts, any case; the address delivered to is the account as written
    ("alice@example.test", [ALICE]),
    ("ALICE@Example.TEST", [ALICE]),
    ("alice@example.test.", [ALICE]),  # a root dot is still the same domain
    ("postmaster@other.test", [local("postmaster@other.test")]),
    # +tag reaches the base address; a tag-specific alias wins over it
    ("alice+news@example.test", [ALICE]),
    ("Alice+News@example.test", [ALICE]),
    ("alice+@example.test", [ALICE]),
    ("alice+lists@example.test", [smtp("lists@remote.test")]),
    ("info+x@example.test", [ALICE, BOB]),
    ("+tag@example.test", None),
    # unknown local addresses
    ("nobody@example.test", None),
    ("nobody+tag@example.test", None),
    ("alice@third.test", None),  # accounts are per domain
    ("alice%remote.test@example.test", None),  # the percent hack reaches nobody
    ("postmaster@third.test", None),  # not aliased: operators must alias it
    # aliases: lists, chains, remote targets
    ("postmaster@example.test", [ALICE]),
    ("PostMaster@example.test", [ALICE]),
    ("info@example.test", [ALICE, BOB]),
    ("sales@example.test", [ALICE, BOB]),
    ("fwd@example.test", [smtp("Someone@Remote.test")]),
    ("tagfwd@example.test", [smtp("x+y@remote.test")]),
    ("mixed@example.test", [ALICE, smtp("friend@remote.test"), CAROL]),
    # loops, dead ends, depth, duplicates
    ("loop1@example.test", None),
    ("ring1@example.test", [ALICE]),
    ("ghost@example.test", None),
    ("half@example.test", [ALICE]),
    ("dup@example.test", [ALICE, BOB, smtp("a@remote.test")]),
    ("ok0@example.test", [ALICE]),
    ("long0@example.test", None),
    # other domains resolve to themselves; relaying is relay.py's question
    ("someone@remote.test", [smtp("someone@remote.test")]),
    ("Someone@REMOTE.test", [Destination("Someone@REMOTE.test", SMTP, "remote.test")]),
    ("x@backup.test", [smtp("x@backup.test")]),
    ("x@[192.0.2.1]", [smtp("x@[192.0.2.1]")]),
    # not addresses
    ("", None),
    ("alice", None),
    ("@example.test", None),
    ("alice@", None),
]


@pytest.mark.parametrize(("address", "expected"), GOLDEN, ids=[g[0] or "<empty>" for g in GOLDEN])
def test_resolve(address: str, expected: list[Destination] | None) -> None:
    assert make_table().resolve(address) == expected


def test_alias_over_an_account_is_expanded_first() -> None:
    """Aliases are looked up before accounts (Postfix virtual, chasquid), and an
    alias that names its own address keeps a local copy (self-reference rule)."""
    table = make_table(aliases={
        "carol@other.test": ("carol@other.test", "carol@elsewhere.test"),
        "bob.smith@example.test": ("alice@example.test",),
        "info@example.test": ("Bob.Smith@example.test", "carol@other.test"),
    })
    assert table.resolve("carol@other.test") == [CAROL, smtp("carol@elsewhere.test")]
    assert table.resolve("Carol+x@other.test") == [CAROL, smtp("carol@elsewhere.test")]
    assert table.resolve("bob.smith@example.test") == [ALICE]  # the mailbox is shadowed
    assert table.resolve("info@example.test") == [ALICE, CAROL, smtp("carol@elsewhere.test")]


def test_local_destinations_name_their_mailbox() -> None:
    [bob] = make_table().resolve("BOB.SMITH+x@EXAMPLE.TEST") or []
    assert bob.mailbox == "bob.smith@example.test"
    assert bob.address == "Bob.Smith@example.test"
    assert bob.domain == "example.test"
    assert bob.transport is LOCAL


def test_smtp_destinations_have_no_mailbox() -> None:
    for d in make_table().resolve("mixed@example.test") or []:
        assert (d.mailbox == "") == (d.transport is SMTP)


def test_accounts_alone_without_aliases() -> None:
    table = make_table(aliases={})
    assert table.resolve("alice@example.test") == [ALICE]
    assert table.resolve("info@example.test") is None


def test_is_local_domain() -> None:
    table = make_table()
    assert table.is_local_domain("example.test")
    assert table.is_local_domain("EXAMPLE.Test")
    assert table.is_local_domain("example.test.")
    assert not table.is_local_domain("backup.test")
    assert not table.is_local_domain("sub.example.test")
    assert table.is_relay_domain("Backup.Test")


def test_from_config_normalizes_and_freezes() -> None:
    relay = RelayConfig(local_domains=("Second.Test", "first.test"), relay_domains=("B.test",))
    mailboxes = MailboxesConfig(maildir="/m", users_file=Path("/x"),
                                aliases={"Info@First.Test": ("a@first.test",)})
    table = RecipientTable.from_config(relay, mailboxes, Accounts())
    assert table.local_domains == frozenset({"second.test", "first.test"})
    assert table.relay_domains == frozenset({"b.test"})
    assert dict(table.aliases) == {"info@first.test": ("a@first.test",)}
    assert table.postmaster_domain == "second.test"  # the first listed, as in CONTRACT.md
    assert table.postmaster() == "postmaster@second.test"
    with pytest.raises(TypeError):
        table.aliases["x@first.test"] = ()  # type: ignore[index]


def test_postmaster_without_any_local_domain() -> None:
    table = RecipientTable(frozenset(), frozenset(), {}, Accounts())
    assert table.postmaster() is None
    assert table.missing_postmaster() == []


def test_missing_postmaster_lists_domains_that_need_an_alias() -> None:
    # example.test: alias; other.test: an account; third.test: nothing.
    assert make_table().missing_postmaster() == ["third.test"]
    # An alias that leads nowhere does not count.
    table = make_table(aliases={"postmaster@example.test": ("nobody@example.test",)})
    assert table.missing_postmaster() == ["example.test", "third.test"]
