"""Inbound checks end to end: dnsmasq serves SPF, DKIM and DMARC records, OpenDKIM signs, Gannet verifies.

A real `gannet serve` with `[dns] nameservers` pointed at dnsmasq (peers.DnsServer
on 127.0.0.53) and two mx listeners: the first enforces DMARC (the default),
the second only reports (`dmarc = "report"`). 127.0.0.1, where smtplib sends
from, is taken out of `trusted_networks`, so every message is checked. Messages
are signed by OpenDKIM itself (the `opendkim` filter in test mode), with
rsa-sha256 and ed25519-sha256 keys made here and published in dnsmasq.

What the delivered copy in alice's Maildir must show: one Authentication-Results
field with our authserv-id and the right results; a forged one claiming our
name gone (also in a message large enough to be spooled to a file); DMARC
p=reject refused with 550 5.7.1 on the enforcing listener and only recorded on
the reporting one; p=quarantine marked with X-Gannet-Quarantine; a nameserver
that fails gives temperror and the mail is still accepted.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import smtplib
from collections.abc import Callable
from email.message import Message
from pathlib import Path

import peers
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

pytestmark = pytest.mark.interop

HOST = "mx.example.test"
RCPT = "alice@example.test"


def _keys(directory: Path) -> dict[str, tuple[Path, str]]:
    """selector → (private key file for OpenDKIM, the TXT record to publish)."""
    directory.mkdir(parents=True, exist_ok=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    out = {}
    for selector, key, kind in (("s1", rsa_key, "rsa"), ("ed1", ed_key, "ed25519")):
        path = directory / f"{selector}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        if kind == "rsa":
            der = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            der = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        out[selector] = (path, f"v=DKIM1; k={kind}; p={base64.b64encode(der).decode()}")
    return out


@pytest.fixture
def world(
    tmp_path: Path, dns_server: Callable[..., peers.DnsServer], gannet: Callable[..., peers.GannetProcess]
) -> dict[str, object]:
    peers.need("opendkim")
    keys = _keys(tmp_path / "keys")
    records: peers.DnsRecords = {
        "sender.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject; adkim=s"]},
        "s1._domainkey.sender.test": {"TXT": [keys["s1"][1]]},
        "ed1._domainkey.sender.test": {"TXT": [keys["ed1"][1]]},
        "reject.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
        "_dmarc.reject.test": {"TXT": ["v=DMARC1; p=reject"]},
        "quarantine.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    }
    dns = dns_server(records=records, servfail=["broken.test"])
    host = peers.GANNET_HOST
    enforce, report = peers.free_port(host), peers.free_port(host)
    g = gannet(
        listen=[{"address": f"{host}:{enforce}", "mode": "mx"},
                {"address": f"{host}:{report}", "mode": "mx", "dmarc": "report"},
                {"address": f"{host}:{peers.free_port(host)}", "mode": "submission"}],
        relay={"trusted_networks": ["127.0.0.99/32"]},
        dns={"nameservers": [dns.nameserver]},
    )  # fmt: skip
    return {"g": g, "keys": keys, "enforce": (host, enforce), "report": (host, report), "dir": tmp_path}


def message(sender: str, subject: str, body: str = "Hello from the test.\r\n", extra: str = "") -> bytes:
    return (f"From: Someone <{sender}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@test>\r\n"
            f"{extra}\r\n{body}").encode()  # fmt: skip


def send(address: tuple[str, int], sender: str, data: bytes) -> None:
    with smtplib.SMTP(*address, local_hostname="client.sender.test", timeout=30) as s:
        s.sendmail(sender, [RCPT], data)


def delivered(g: peers.GannetProcess, subject: str) -> Message:
    def find() -> Path | None:
        for path in g.delivered(RCPT):
            if f"\nSubject: {subject}\n".encode() in path.read_bytes()[:300_000]:  # Maildir: LF
                return path
        return None

    path = peers.wait_for(find, 20, f"the message {subject!r} in {RCPT}'s Maildir")
    return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(path.read_bytes())


def results(msg: Message) -> list[str]:
    """The resinfos of every Authentication-Results field, unfolded, per field."""
    return [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results") or []]


def sign(world: dict[str, object], data: bytes, selector: str, algorithm: str) -> bytes:
    keys = world["keys"]
    assert isinstance(keys, dict)
    directory = world["dir"]
    assert isinstance(directory, Path)
    return peers.opendkim_sign(directory / "opendkim", data, domain="sender.test", selector=selector,
                               key_file=keys[selector][0], algorithm=algorithm)  # fmt: skip


@pytest.mark.parametrize(("selector", "algorithm"), [("s1", "rsa-sha256"), ("ed1", "ed25519-sha256")])
def test_opendkim_signed_mail_passes(world: dict[str, object], selector: str, algorithm: str) -> None:
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    subject = f"signed by opendkim {selector}"
    send(
        world["enforce"],
        "alice@sender.test",
        sign(world, message("bob@sender.test", subject), selector, algorithm),
    )  # type: ignore[arg-type]
    [ar] = results(delivered(g, subject))
    assert ar.startswith(f"{HOST}; spf=pass smtp.mailfrom=alice@sender.test;")
    assert f"dkim=pass header.d=sender.test header.s={selector} header.b=" in ar
    assert "dmarc=pass (p=reject sp=reject dis=none) header.from=sender.test" in ar
    assert ar.endswith("arc=none")


def test_body_altered_in_transit_fails_dkim(world: dict[str, object]) -> None:
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    signed = sign(world, message("bob@sender.test", "altered"), "s1", "rsa-sha256")
    send(world["enforce"], "alice@sender.test", signed.replace(b"Hello from", b"Goodbye from"))  # type: ignore[arg-type]
    [ar] = results(delivered(g, "altered"))
    assert "dkim=fail (body hash mismatch) header.d=sender.test header.s=s1" in ar
    assert "spf=pass" in ar and "dmarc=pass" in ar  # SPF still aligns (adkim=s does not concern SPF)


@pytest.mark.parametrize("size", [0, 400_000], ids=["inline", "spooled"])
def test_forged_authentication_results_is_removed(world: dict[str, object], size: int) -> None:
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    forged = (f"Authentication-Results: {HOST}; spf=pass smtp.mailfrom=ceo@reject.test; dmarc=pass\r\n"
              f"Authentication-Results: (comment) {HOST.upper()}; arc=pass\r\n"
              "Authentication-Results: other.test; spf=fail\r\n")  # fmt: skip
    subject = f"forged {size}"
    body = "Hello from the test.\r\n" + ("0123456789" * 9 + "\r\n") * (size // 92)
    signed = sign(world, message("bob@sender.test", subject, body, extra=forged), "s1", "rsa-sha256")
    send(world["enforce"], "alice@sender.test", signed)  # type: ignore[arg-type]
    msg = delivered(g, subject)
    fields = results(msg)
    assert len(fields) == 2 and fields[1] == "other.test; spf=fail"
    assert (
        fields[0].startswith(f"{HOST}; spf=pass") and "dkim=pass" in fields[0]
    )  # ours, and the signature holds
    assert msg.get_payload() == body.replace("\r\n", "\n")  # Maildir: LF; the body intact


def test_dmarc_reject_is_refused_on_an_enforcing_listener(world: dict[str, object]) -> None:
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(world["enforce"], "ceo@reject.test", message("ceo@reject.test", "spoofed"))  # type: ignore[arg-type]
    assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1 ")
    assert b"DMARC" in refused.value.smtp_error
    peers.wait_for(
        lambda: "dmarc=fail p=reject header.from=reject.test" in g.log_text(), 10, "the reject log line"
    )
    assert not any(b"\nSubject: spoofed\n" in p.read_bytes() for p in g.delivered(RCPT))


def test_dmarc_reject_is_only_recorded_on_a_reporting_listener(world: dict[str, object]) -> None:
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    send(world["report"], "ceo@reject.test", message("ceo@reject.test", "reported"))  # type: ignore[arg-type]
    msg = delivered(g, "reported")
    [ar] = results(msg)
    assert "spf=fail" in ar and "dkim=none" in ar
    assert "dmarc=fail (p=reject sp=reject dis=reject) header.from=reject.test" in ar
    assert msg["X-Gannet-Quarantine"] is None


def test_dmarc_quarantine_is_marked(world: dict[str, object]) -> None:
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    fake = "X-Gannet-Quarantine: dmarc\r\n"  # one the sender wrote must not be mistaken for ours either
    send(world["enforce"], "x@quarantine.test", message("x@quarantine.test", "to quarantine"))  # type: ignore[arg-type]
    send(world["enforce"], "alice@sender.test", message("bob@sender.test", "self-marked", extra=fake))  # type: ignore[arg-type]
    msg = delivered(g, "to quarantine")
    assert msg.get_all("X-Gannet-Quarantine") == ["dmarc"]
    assert "dmarc=fail (p=quarantine sp=quarantine dis=quarantine)" in results(msg)[0]
    assert delivered(g, "self-marked").get_all("X-Gannet-Quarantine") is None
    peers.wait_for(lambda: "(quarantined: dmarc)" in g.log_text(), 10, "the quarantine log line")


def test_dns_failure_is_temperror_and_the_mail_is_accepted(world: dict[str, object]) -> None:
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    send(world["enforce"], "someone@broken.test", message("someone@broken.test", "broken dns"))  # type: ignore[arg-type]
    [ar] = results(delivered(g, "broken dns"))
    assert "spf=temperror" in ar and "dmarc=temperror" in ar


def test_trusted_and_authenticated_mail_is_not_checked(world: dict[str, object]) -> None:
    """Submission (AUTH): no inbound checks, but a forged result claiming our name is still removed."""
    g = world["g"]
    assert isinstance(g, peers.GannetProcess)
    forged = f"Authentication-Results: {HOST}; dmarc=pass\r\n"
    with smtplib.SMTP(*g.address("submission"), timeout=30) as s:
        s.starttls(context=__import__("ssl")._create_unverified_context())
        s.login(RCPT, peers.USERS[RCPT])
        s.sendmail(RCPT, [RCPT], message(RCPT, "submitted", extra=forged))
    assert results(delivered(g, "submitted")) == []
