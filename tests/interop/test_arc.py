"""ARC end to end (RFC 8617): chains verified on arrival, and sealed when an alias forwards.

Real peers: dnsmasq (peers.DnsServer) serves every key, SPF and DMARC record;
chains are sealed by dkimpy's own `arc_sign`; Gannet runs as `gannet serve`.

- Arrival: a message that went through a mailing list (lists.test sealed it,
  i=1) reaches Gannet's mx listener from an untrusted address: the
  Authentication-Results field says arc=pass; the same message with its body
  changed after sealing says arc=fail.
- Forwarding: bob@sender.test (DKIM-signed, DMARC p=reject, SPF only for
  127.0.0.20) writes to fwd@example.test, an alias of someone@remote.test.
  Gannet A (mx.example.test) checks the message, seals it with its
  example.test key and relays it through remote.test's MX to Gannet B
  (mx.remote.test on 127.0.0.30), which trusts nobody. At B, SPF fails (the
  mail now comes from A) but the chain A sealed verifies: B's
  Authentication-Results says arc=pass, and so does dkimpy's `arc_verify`
  asking dnsmasq itself for the keys.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import re
import smtplib
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import peers
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

pytestmark = pytest.mark.interop

CLIENT = "127.0.0.20"  # the only address sender.test's SPF allows
REMOTE_MX = "127.0.0.30"  # mx.remote.test: Gannet B
UNTRUSTED = {"trusted_networks": ["127.0.0.99/32"]}  # nobody that sends in these tests
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


def txt_strings(record: str) -> list[str]:
    """A TXT record as the <=255-octet strings of one record (RFC 1035 §3.3.14)."""
    return [record[i : i + 255] for i in range(0, len(record), 255)]


class Key:
    def __init__(self, domain: str, selector: str) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        self.domain, self.selector = domain, selector

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def pem(self, pkcs8: bool = False) -> bytes:
        fmt = serialization.PrivateFormat.PKCS8 if pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
        return self.private.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {"sender": Key("sender.test", "s1"), "list": Key("lists.test", "arc"),
            "gannet": Key("example.test", "arc1")}  # fmt: skip


@pytest.fixture
def dns_world(dns_server: Callable[..., peers.DnsServer], keys: dict[str, Key]) -> peers.DnsServer:
    records: peers.DnsRecords = {
        "sender.test": {"TXT": [f"v=spf1 ip4:{CLIENT} -all"]},
        "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject"]},
        "lists.test": {"TXT": ["v=spf1 -all"]},
        "remote.test": {"MX": [(10, "mx.remote.test")]},
        "mx.remote.test": {"A": [REMOTE_MX]},
        **{k.name: {"TXT": [txt_strings(k.record)]} for k in keys.values()},
    }
    return dns_server(records=records)


def original(subject: str, to: str) -> bytes:
    """bob@sender.test's message (unsigned: `dkim_signed` signs it)."""
    return (
        f"From: Bob <bob@sender.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@sender.test>\r\n"
        "\r\nHello through the forwarders.\r\n"
    ).encode()


def dkim_signed(keys: dict[str, Key], message: bytes) -> bytes:
    key = keys["sender"]
    signature = dkim.sign(
        message, key.selector.encode(), key.domain.encode(), key.pem(), include_headers=SIGNED
    )
    return signature + message


def list_sealed(keys: dict[str, Key], message: bytes) -> bytes:
    """What lists.test makes of it: its Authentication-Results, then dkimpy's ARC set (i=1)."""
    key = keys["list"]
    with_ar = b"Authentication-Results: mx.lists.test; dkim=pass header.d=sender.test; arc=none\r\n" + message
    block = dkim.arc_sign(with_ar, key.selector.encode(), key.domain.encode(), key.pem(), b"mx.lists.test",
                          include_headers=SIGNED)  # fmt: skip
    return b"".join(block) + with_ar


def send(address: tuple[str, int], rcpt: str, data: bytes) -> None:
    with smtplib.SMTP(*address, local_hostname="client.sender.test", timeout=30,
                      source_address=(CLIENT, 0)) as client:  # fmt: skip
        client.sendmail("bob@sender.test", [rcpt], data)


def delivered(g: peers.GannetProcess, mailbox: str, subject: str) -> tuple[bytes, Message]:
    def find() -> Path | None:
        wanted = f"\nSubject: {subject}\n".encode()  # Maildir: LF
        return next((p for p in g.delivered(mailbox) if wanted in p.read_bytes()), None)

    path = peers.wait_for(find, 30, f"{subject!r} in {mailbox}'s Maildir")
    raw = path.read_bytes()
    return raw, email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)


def results(msg: Message, authserv_id: str) -> str:
    found = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []]
    ours = [r for r in found if r.startswith(authserv_id + ";")]
    assert len(ours) == 1, found
    return ours[0]


# ---------------------------------------------------------------------------- arrival


def test_a_chain_sealed_by_dkimpy_passes_and_a_broken_one_fails(
    gannet: Callable[..., peers.GannetProcess], dns_world: peers.DnsServer, keys: dict[str, Key]
) -> None:
    g = gannet(relay=UNTRUSTED, dns={"nameservers": [dns_world.nameserver]})
    sealed = list_sealed(keys, dkim_signed(keys, original("via the list", "alice@example.test")))
    send(g.address("mx"), "alice@example.test", sealed)
    ar = results(delivered(g, "alice@example.test", "via the list")[1], "mx.example.test")
    assert ar.endswith("; arc=pass") and "dkim=pass header.d=sender.test" in ar
    assert ("TXT", keys["list"].name) in dns_world.queries()  # the seal's key came from dnsmasq

    broken = list_sealed(keys, dkim_signed(keys, original("changed after sealing", "alice@example.test")))
    send(g.address("mx"), "alice@example.test", broken.replace(b"Hello through", b"Goodbye through"))
    ar = results(delivered(g, "alice@example.test", "changed after sealing")[1], "mx.example.test")
    assert "arc=fail (Most recent ARC-Message-Signature did not validate)" in ar
    assert "dkim=fail (body hash mismatch)" in ar


# ---------------------------------------------------------------------------- forwarding


def arc_verify_with_dnsmasq(message: bytes, dns_world: peers.DnsServer) -> tuple[Any, str]:
    """dkimpy's own ARC verifier, its key lookups sent to dnsmasq."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_world.host]
    resolver.port = dns_world.port

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except dns.resolver.NXDOMAIN:
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    cv, _, reason = dkim.arc_verify(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), dnsfunc=txt)
    return cv, reason


def test_mail_an_alias_forwards_is_sealed_and_its_chain_verifies_at_the_next_hop(
    gannet: Callable[..., peers.GannetProcess], dns_world: peers.DnsServer, keys: dict[str, Key],
    tmp_path: Path,
) -> None:  # fmt: skip
    port = peers.free_port(REMOTE_MX)
    key_file = tmp_path / "example.test.arc1.key"
    key_file.write_bytes(keys["gannet"].pem(pkcs8=True))
    key_file.chmod(0o600)
    b = gannet(
        hostname="mx.remote.test",
        listen=[{"address": f"{REMOTE_MX}:{port}", "mode": "mx"}],
        # example.test stays local only because the fixture's base config has an alias there
        relay={"local_domains": ["remote.test", "example.test"], **UNTRUSTED},
        mailboxes={"aliases": {"postmaster@remote.test": ["someone@remote.test"]}},
        dns={"nameservers": [dns_world.nameserver]},
        users={"someone@remote.test": "someone-password"},
    )
    a = gannet(
        relay=UNTRUSTED,
        mailboxes={"aliases": {"fwd@example.test": ["someone@remote.test"]}},
        dns={"nameservers": [dns_world.nameserver]},
        delivery={"port": port, "retry": ["2s"]},
        dkim=[{"domain": "example.test", "selector": "arc1", "key_file": str(key_file)}],
    )
    send(a.address("mx"), "fwd@example.test", dkim_signed(keys, original("forwarded", "fwd@example.test")))

    raw, msg = delivered(b, "someone@remote.test", "forwarded")
    at_b = results(msg, "mx.remote.test")
    # SPF fails at B: the mail comes from A now, not from 127.0.0.20
    assert re.match(r"mx\.remote\.test; spf=fail \(.*\) smtp\.mailfrom=bob@sender\.test;", at_b), at_b
    assert "dkim=pass header.d=sender.test" in at_b and "dmarc=pass" in at_b
    assert at_b.endswith("; arc=pass")

    seal = " ".join(str(msg["ARC-Seal"]).split())
    assert re.search(r"\bi=1; cv=none; a=rsa-sha256; d=example\.test; s=arc1\b", seal), seal
    aar = " ".join(str(msg["ARC-Authentication-Results"]).split())
    assert aar.startswith("i=1; mx.example.test; spf=pass smtp.mailfrom=bob@sender.test")  # A's results
    cv, reason = arc_verify_with_dnsmasq(raw, dns_world)
    assert (cv, reason) == (b"pass", "success")
