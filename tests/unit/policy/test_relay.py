"""Relay rules as golden tables, in the spirit of Postfix's `.in/.ref` tests.

Each line of a table is one decision: who asks, for what, and the reply
expected ("accept", or "code enhanced").
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gannet.config import MailboxesConfig, RelayConfig
from gannet.policy.accounts import Accounts
from gannet.policy.recipients import RecipientTable
from gannet.policy.relay import RcptFacts, is_trusted, rcpt_verdict, sender_verdict
from gannet.policy.verdict import Accept, Reject
from gannet.queue.model import Transport
from gannet.smtp.replies import R553_SENDER_NOT_OWNED, R554_RELAY_DENIED

FAKE_HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"
NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:1::/48"))


def make_table(aliases: dict[str, tuple[str, ...]] | None = None,
               local_domains: tuple[str, ...] = ("example.test", "other.test")) -> RecipientTable:
    relay = RelayConfig(local_domains=local_domains, relay_domains=("backup.test",),
                        trusted_networks=NETWORKS)
    if aliases is None:
        aliases = {
            "postmaster@example.test": ("alice@example.test",),
            "team@example.test": ("alice@example.test", "bob@example.test"),
            "sales@example.test": ("team@example.test",),
            "fwd@example.test": ("someone@remote.test",),
        }
    mailboxes = MailboxesConfig(maildir="/m/{domain}/{user}", users_file=Path("/nonexistent"),
                                aliases=aliases)
    accounts = Accounts((a, FAKE_HASH) for a in ("alice@example.test", "bob@example.test",
                                                 "carol@other.test"))
    return RecipientTable.from_config(relay, mailboxes, accounts)


FACTS = {
    "outside": RcptFacts("203.0.113.5", authenticated=False, trusted=False),
    "outside6": RcptFacts("2001:db8:ff::5", authenticated=False, trusted=False),
    "unix": RcptFacts("", authenticated=False, trusted=False),
    "trusted": RcptFacts("192.0.2.10", authenticated=False, trusted=True),
    "authed": RcptFacts("198.51.100.7", authenticated=True, trusted=False),
    # computed the way the session does it
    "mapped": RcptFacts("::ffff:127.0.0.1", False, is_trusted("::ffff:127.0.0.1", NETWORKS)),
    "v6net": RcptFacts("2001:db8:1::25", False, is_trusted("2001:db8:1::25", NETWORKS)),
    "mapped_out": RcptFacts("::ffff:203.0.113.5", False,
                            is_trusted("::ffff:203.0.113.5", NETWORKS)),
}

RCPT_GOLDEN = """
# facts      recipient                          expected
outside      alice@example.test                  accept
outside      ALICE+tag@Example.Test              accept
outside      carol@other.test                    accept
outside      team@example.test                   accept
outside      fwd@example.test                    accept
outside      nobody@example.test                 550 5.1.1
trusted      nobody@example.test                 550 5.1.1
authed       nobody@example.test                 550 5.1.1
outside      alice%remote.test@example.test      550 5.1.1
outside      x@backup.test                       accept
unix         x@backup.test                       accept
outside      someone@remote.test                 554 5.7.1
outside6     someone@remote.test                 554 5.7.1
unix         someone@remote.test                 554 5.7.1
mapped_out   someone@remote.test                 554 5.7.1
outside      alice@example.test@remote.test      554 5.7.1
trusted      someone@remote.test                 accept
authed       someone@remote.test                 accept
mapped       someone@remote.test                 accept
v6net        someone@remote.test                 accept
outside      user@[192.0.2.1]                    554 5.7.1
outside      user@[IPv6:2001:db8::1]             554 5.7.1
trusted      user@[192.0.2.1]                    accept
authed       user@[192.0.2.1]                    accept
outside      postmaster                          accept
outside      PostMaster                          accept
outside      postmaster@example.test             accept
outside      <>                                  501 5.1.3
outside      alice                               501 5.1.3
outside      alice@                              501 5.1.3
authed       @example.test                       501 5.1.3
"""


def _golden(text: str) -> list[tuple[str, str, str]]:
    rows = []
    for line in text.strip().splitlines():
        if line.startswith("#"):
            continue
        facts, address, expected = line.split(None, 2)
        rows.append((facts, address, expected))
    return rows


@pytest.mark.parametrize(("facts", "address", "expected"), _golden(RCPT_GOLDEN),
                         ids=lambda v: str(v))
def test_rcpt_golden(facts: str, address: str, expected: str) -> None:
    verdict, destinations = rcpt_verdict(make_table(), FACTS[facts], address)
    if expected == "accept":
        assert isinstance(verdict, Accept)
        assert destinations, "an accepted recipient always has somewhere to go"
    else:
        assert isinstance(verdict, Reject)
        assert f"{verdict.reply.code} {verdict.reply.enhanced}" == expected
        assert destinations == []
        assert verdict.reason, "a refusal always says why, for the log"
        assert verdict.reason not in " ".join(verdict.reply.text)


def test_empty_recipient_is_a_syntax_error() -> None:
    verdict, _ = rcpt_verdict(make_table(), FACTS["trusted"], "")
    assert isinstance(verdict, Reject)
    assert (verdict.reply.code, verdict.reply.enhanced) == (501, "5.1.3")


def test_accepted_destinations() -> None:
    table = make_table()
    _, dests = rcpt_verdict(table, FACTS["outside"], "team@example.test")
    assert [(d.address, d.transport, d.mailbox) for d in dests] == [
        ("alice@example.test", Transport.LOCAL, "alice@example.test"),
        ("bob@example.test", Transport.LOCAL, "bob@example.test"),
    ]
    _, [relayed] = rcpt_verdict(table, FACTS["outside"], "X@Backup.Test")
    assert (relayed.address, relayed.transport, relayed.domain) == \
        ("X@Backup.Test", Transport.SMTP, "backup.test")
    _, [foreign] = rcpt_verdict(table, FACTS["authed"], "someone@Remote.Test")
    assert (foreign.transport, foreign.domain) == (Transport.SMTP, "remote.test")
    _, [literal] = rcpt_verdict(table, FACTS["trusted"], "user@[192.0.2.1]")
    assert (literal.transport, literal.domain) == (Transport.SMTP, "[192.0.2.1]")


def test_relay_denied_reply_and_reason() -> None:
    verdict, _ = rcpt_verdict(make_table(), FACTS["outside"], "someone@remote.test")
    assert isinstance(verdict, Reject)
    assert verdict.reply == R554_RELAY_DENIED
    assert "203.0.113.5" in verdict.reason


def test_bare_postmaster_goes_to_the_first_local_domain() -> None:
    table = make_table(local_domains=("other.test", "example.test"),
                       aliases={"postmaster@other.test": ("carol@other.test",),
                                "postmaster@example.test": ("alice@example.test",)})
    verdict, dests = rcpt_verdict(table, FACTS["outside"], "Postmaster")
    assert isinstance(verdict, Accept)
    assert [d.mailbox for d in dests] == ["carol@other.test"]


def test_bare_postmaster_unaliased_or_without_domains_is_refused() -> None:
    verdict, _ = rcpt_verdict(make_table(aliases={}), FACTS["outside"], "postmaster")
    assert isinstance(verdict, Reject) and verdict.reply.code == 550
    verdict, _ = rcpt_verdict(make_table(local_domains=()), FACTS["trusted"], "postmaster")
    assert isinstance(verdict, Reject) and verdict.reply.code == 550


# -- is_trusted ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("client_ip", "expected"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped (RFC 4291 §2.5.5.2)
        ("::ffff:7f00:1", True),  # the same, written in hex
        ("::FFFF:192.0.2.77", True),
        ("::ffff:10.0.0.1", False),
        ("2001:db8:1::25", True),
        ("2001:db8:1:ffff::1", True),
        ("2001:db8:2::1", False),
        ("10.0.0.1", False),
        ("::2", False),
        ("", False),  # unix socket: no IP
        ("localhost", False),
        ("999.1.1.1", False),
        ("127.0.0.1:25", False),
        ("fe80::1%eth0", False),
    ],
)
def test_is_trusted(client_ip: str, expected: bool) -> None:
    assert is_trusted(client_ip, NETWORKS) is expected


def test_is_trusted_with_zone_and_no_networks() -> None:
    link_local = (ipaddress.ip_network("fe80::/10"),)
    assert is_trusted("fe80::1%eth0", link_local)
    assert not is_trusted("127.0.0.1", ())
    assert not is_trusted("127.0.0.1", (ipaddress.ip_network("::1/128"),))  # versions differ


# -- sender_verdict ------------------------------------------------------------------

SENDER_GOLDEN = """
# auth user             MAIL FROM                   expected
-                       anyone@anywhere.test        accept
-                       alice@example.test          accept
alice@example.test      alice@example.test          accept
alice@example.test      ALICE@Example.TEST          accept
alice@example.test      alice+lists@example.test    accept
ALICE@EXAMPLE.TEST      alice@example.test          accept
alice@example.test      <>                          accept
alice@example.test      team@example.test           accept
alice@example.test      team+x@example.test         accept
alice@example.test      sales@example.test          accept
alice@example.test      postmaster@example.test     accept
bob@example.test        team@example.test           accept
bob@example.test        postmaster@example.test     553 5.7.1
bob@example.test        alice@example.test          553 5.7.1
bob@example.test        alice+bob@example.test      553 5.7.1
alice@example.test      bob+alice@example.test      553 5.7.1
alice@example.test      fwd@example.test            553 5.7.1
alice@example.test      nobody@example.test         553 5.7.1
alice@example.test      alice@other.test            553 5.7.1
alice@example.test      alice@remote.test           553 5.7.1
alice@example.test      alice                       553 5.7.1
carol@other.test        carol@other.test            accept
"""


@pytest.mark.parametrize(("auth_user", "sender", "expected"), _golden(SENDER_GOLDEN),
                         ids=lambda v: str(v))
def test_sender_golden(auth_user: str, sender: str, expected: str) -> None:
    user = None if auth_user == "-" else auth_user
    verdict = sender_verdict(make_table(), user, "" if sender == "<>" else sender)
    if expected == "accept":
        assert isinstance(verdict, Accept)
    else:
        assert isinstance(verdict, Reject)
        assert verdict.reply == R553_SENDER_NOT_OWNED
        assert f"{verdict.reply.code} {verdict.reply.enhanced}" == expected
        assert auth_user in verdict.reason and sender in verdict.reason


def test_an_empty_auth_user_owns_nothing() -> None:
    for sender in ("alice@example.test", "team@example.test", "x@remote.test"):
        assert isinstance(sender_verdict(make_table(), "", sender), Reject)
    assert isinstance(sender_verdict(make_table(), "", ""), Accept)


def test_null_sender_is_allowed_in_both_spellings() -> None:
    for sender in ("", "<>"):
        assert isinstance(sender_verdict(make_table(), "bob@example.test", sender), Accept)
