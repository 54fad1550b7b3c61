"""Gannet's DKIM signatures checked by independent verifiers, with keys from `gannet dkim keygen`.

The verifiers are OpenDKIM's `opendkim-testmsg` (libopendkim, C) and dkimpy's
`dkimverify` script. Both find the public key in the DNS through
/etc/resolv.conf only, with no way to name a server or port; so each runs in
its own mount namespace (`unshare -m`, root only) where /etc/resolv.conf is a
bind-mounted file naming a dnsmasq on 127.0.0.58 port 53, and the records it
serves are the ones `gannet dkim keygen` printed. Nothing outside the
namespace sees that file.

- keygen: key file mode 0600, refusal to overwrite, --force, bad arguments
  (exit 2), the printed TXT record and config snippet used as printed;
- signatures (rsa-sha256 and ed25519-sha256, and both at once) verify with
  both tools, and a changed body fails with both;
- end to end through `gannet serve` to a local Maildir, the delivered file
  checked with both tools: alice submits (AUTH on the submission port); a
  program on a trusted network sends to port 25 without AUTH; a 3 MiB message
  over `[mailauth] max_verify_size` (signed from a streamed body hash); and
  mail from an untrusted client is not signed at all.
"""

from __future__ import annotations

import os
import re
import smtplib
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import peers
import pytest

from gannet.config import load
from gannet.mailauth.signing import Signer

pytestmark = pytest.mark.interop

RESOLVER_HOST = "127.0.0.58"  # a dnsmasq on port 53 here: the only server the namespaced resolv.conf names
DKIMVERIFY = str(Path(sys.executable).with_name("dkimverify"))

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@elsewhere.test>\r\n"
    b"Subject: signed by Gannet\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <dkim-interop@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\n\r\nthis line ends with spaces   \r\n-- \r\nAlice\r\n"
)


def need_namespaces() -> None:
    """Skip (fail in CI) unless we may make a mount namespace and bind-mount over /etc/resolv.conf."""
    unshare = peers.need("unshare")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, text=True, check=False)
    if os.geteuid() != 0 or probe.returncode != 0:
        reason = f"needs root to bind-mount /etc/resolv.conf in a mount namespace ({probe.stderr.strip()})"
        if peers.in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def resolver_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[peers.DnsServer, Path]]:
    peers.need("opendkim-testmsg")
    need_namespaces()
    workdir = tmp_path_factory.mktemp("dkim-dns")
    server = peers.DnsServer(workdir, address=RESOLVER_HOST, port=53, records={})
    resolv_conf = workdir / "resolv.conf"
    resolv_conf.write_text(f"nameserver {RESOLVER_HOST}\noptions timeout:2 attempts:2\n")
    yield server, resolv_conf
    server.stop()


def run_verifier(resolv_conf: Path, command: list[str], message: bytes) -> subprocess.CompletedProcess[bytes]:
    """`command` with `message` on stdin, seeing `resolv_conf` as /etc/resolv.conf."""
    wrapped = [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$0" /etc/resolv.conf && exec "$@"',
        str(resolv_conf),
        *command,
    ]
    return subprocess.run(wrapped, input=message, capture_output=True, timeout=60, check=False)


def opendkim_ok(resolv_conf: Path, message: bytes) -> bool:
    # opendkim-testmsg verifies when given no -d/-k/-s: silent exit 0 when valid, else a reason and 70
    result = run_verifier(resolv_conf, [peers.need("opendkim-testmsg")], message)
    return result.returncode == 0 and result.stderr == b""


def dkimverify_ok(resolv_conf: Path, message: bytes, index: int = 0) -> bool:
    result = run_verifier(resolv_conf, [DKIMVERIFY, "--index", str(index)], message)
    return result.returncode == 0 and result.stdout.strip() == b"signature ok"


def printed_txt(stdout: str) -> tuple[str, list[str]]:
    """(name, strings) of the `NAME. IN TXT "..." "..."` line keygen printed."""
    m = re.search(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$', stdout, re.MULTILINE)
    assert m, stdout
    return m.group(1), re.findall(r'"([^"]*)"', m.group(2))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "gannet.toml").write_text(
        'hostname = "mx.example.test"\ndata_dir = "var"\n[relay]\nlocal_domains = ["example.test"]\n'
    )
    return tmp_path


def keygen(workdir: Path, selector: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return peers.gannet_cli(
        workdir, "dkim", "keygen", "--domain", "example.test", "--selector", selector, *extra, check=False
    )


def install(workdir: Path, result: subprocess.CompletedProcess[str]) -> None:
    """Append the printed [[dkim]] snippet to the config, as the output tells the postmaster to."""
    snippet = result.stdout.split("[[dkim]]", 1)[1].split("\nThen check", 1)[0]
    with open(workdir / "gannet.toml", "a") as f:
        f.write("\n[[dkim]]" + snippet)


# ---------------------------------------------------------------------------- keygen


def test_keygen_writes_a_0600_pkcs8_key_and_prints_record_and_config(workdir: Path) -> None:
    result = keygen(workdir, "s1")
    assert result.returncode == 0, result.stderr
    key_file = workdir / "var" / "dkim" / "example.test.s1.key"
    assert f"wrote {key_file} (2048-bit rsa, mode 0600)" in result.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    name, strings = printed_txt(result.stdout)
    assert name == "s1._domainkey.example.test" and all(len(s) <= 255 for s in strings) and len(strings) == 2
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    install(workdir, result)
    config = load(workdir / "gannet.toml")
    assert [(k.domain, k.selector, k.key_file) for k in config.dkim] == [("example.test", "s1", key_file)]
    assert peers.gannet_cli(workdir, "check-config", check=False).returncode == 0


def test_keygen_refuses_to_overwrite_unless_forced(workdir: Path) -> None:
    assert keygen(workdir, "s1", "--algorithm", "ed25519").returncode == 0
    key_file = workdir / "var" / "dkim" / "example.test.s1.key"
    before = key_file.read_bytes()
    again = keygen(workdir, "s1", "--algorithm", "ed25519")
    assert again.returncode == 1 and "exists; not replacing" in again.stderr and "--force" in again.stderr
    assert key_file.read_bytes() == before
    forced = keygen(workdir, "s1", "--algorithm", "ed25519", "--force")
    assert forced.returncode == 0 and key_file.read_bytes() != before
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_keygen_uses_the_path_the_config_names(workdir: Path) -> None:
    with open(workdir / "gannet.toml", "a") as f:
        f.write('[[dkim]]\ndomain = "example.test"\nselector = "s9"\nkey_file = "keys/deep/s9.pem"\n')
    result = keygen(workdir, "s9", "--algorithm", "ed25519")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((workdir / "keys" / "deep" / "s9.pem").stat().st_mode) == 0o600
    assert "already names this key" in result.stdout and "[[dkim]]" not in result.stdout


def test_check_config_refuses_an_unusable_key(workdir: Path) -> None:
    result = keygen(workdir, "s1")
    install(workdir, result)
    (workdir / "var" / "dkim" / "example.test.s1.key").write_text("-----BEGIN PRIVATE KEY-----\nbroken\n")
    check = peers.gannet_cli(workdir, "check-config", check=False)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "dkim[0].key_file" in check.stderr and "not a PEM private key" in check.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--domain", "not a domain", "--selector", "s1"], "is not a domain name"),
        (["--domain", "example.test", "--selector", "bad_selector"], "is not a selector"),
        (["--domain", "example.test", "--selector", "s1", "--bits", "512"], "--bits 512"),
        (["--domain", "example.test", "--selector", "s1", "--algorithm", "dsa"], "invalid choice"),
        (["--selector", "s1"], "the following arguments are required: --domain"),
    ],
)
def test_keygen_bad_arguments_exit_2(workdir: Path, args: list[str], message: str) -> None:
    result = peers.gannet_cli(workdir, "dkim", "keygen", *args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "var" / "dkim").exists()


# ---------------------------------------------------------------------------- verification


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_verified_by_opendkim_and_dkimverify(
    workdir: Path, resolver_dns: tuple[peers.DnsServer, Path], algorithm: str
) -> None:
    dns, resolv_conf = resolver_dns
    result = keygen(workdir, algorithm, "--algorithm", algorithm)
    assert result.returncode == 0, result.stderr
    install(workdir, result)
    name, strings = printed_txt(result.stdout)
    dns.set_records({name: {"TXT": [strings]}})  # exactly as printed: one record of these strings

    signer = Signer.from_config(load(workdir / "gannet.toml"))
    assert signer is not None
    signed = signer.sign(MESSAGE) + MESSAGE
    assert f"a={algorithm}-sha256".encode() in signed
    assert opendkim_ok(resolv_conf, signed)
    assert dkimverify_ok(resolv_conf, signed)
    assert ("TXT", name) in dns.queries()

    altered = signed.replace(b"Hello Bob", b"Hello Eve")
    assert not opendkim_ok(resolv_conf, altered)
    assert not dkimverify_ok(resolv_conf, altered)


def test_dual_signature_both_verify(workdir: Path, resolver_dns: tuple[peers.DnsServer, Path]) -> None:
    dns, resolv_conf = resolver_dns
    records = {}
    for selector, algorithm in (("r1", "rsa"), ("e1", "ed25519")):
        result = keygen(workdir, selector, "--algorithm", algorithm)
        assert result.returncode == 0, result.stderr
        install(workdir, result)
        name, strings = printed_txt(result.stdout)
        records[name] = {"TXT": [strings]}
    dns.set_records(records)
    signer = Signer.from_config(load(workdir / "gannet.toml"))
    assert signer is not None
    signed = signer.sign(MESSAGE) + MESSAGE
    assert signed.count(b"DKIM-Signature:") == 2
    assert dkimverify_ok(resolv_conf, signed, 0) and dkimverify_ok(resolv_conf, signed, 1)
    assert opendkim_ok(resolv_conf, signed)


# ---------------------------------------------------------------------------- end to end


BOTH = (("r1", "rsa"), ("e1", "ed25519"))


def gannet_keys(
    workdir: Path, dns: peers.DnsServer, specs: tuple[tuple[str, str], ...] = BOTH
) -> list[dict[str, str]]:
    """`gannet dkim keygen` for example.test, one key per (selector, algorithm); the printed
    records published in `dns`; the `[[dkim]]` entries for a `gannet` fixture."""
    workdir.mkdir()
    (workdir / "gannet.toml").write_text('hostname = "mx.example.test"\ndata_dir = "var"\n')
    records, entries = {}, []
    for selector, algorithm in specs:
        result = keygen(workdir, selector, "--algorithm", algorithm)
        assert result.returncode == 0, result.stderr
        name, strings = printed_txt(result.stdout)
        records[name] = {"TXT": [strings]}
        key_file = workdir / "var" / "dkim" / f"example.test.{selector}.key"
        entries.append({"domain": "example.test", "selector": selector, "key_file": str(key_file)})
    dns.set_records(records)
    return entries


def test_mail_submitted_to_gannet_arrives_signed(
    gannet: Callable[..., peers.GannetProcess],
    resolver_dns: tuple[peers.DnsServer, Path],
    tls_certs: peers.TlsCerts,
    tmp_path: Path,
) -> None:
    dns, resolv_conf = resolver_dns
    server = gannet(dkim=gannet_keys(tmp_path / "keys", dns), dns={"nameservers": [dns.nameserver]})

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Alice <alice@example.test>", "bob@example.test", "end to end"
    msg["Message-ID"] = "<e2e-dkim@example.test>"
    msg.set_content("Signed on the way in.\n")
    host, port = server.address("submission")
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.starttls(context=tls_certs.client_context())
        client.login("alice@example.test", peers.USERS["alice@example.test"])
        client.send_message(msg)
    files = peers.wait_for(lambda: server.delivered("bob@example.test"), 30, "delivery to bob's Maildir")
    delivered = files[0].read_bytes()
    assert delivered.count(b"DKIM-Signature:") == 2, delivered[:2000]
    assert opendkim_ok(resolv_conf, delivered)
    assert dkimverify_ok(resolv_conf, delivered, 0) and dkimverify_ok(resolv_conf, delivered, 1)


def test_mail_from_a_trusted_network_on_mx_arrives_signed(
    gannet: Callable[..., peers.GannetProcess], resolver_dns: tuple[peers.DnsServer, Path], tmp_path: Path
) -> None:
    """No AUTH: 127.0.0.1 is in trusted_networks (the fixture's default), as a local program or an
    internal host would send through port 25."""
    dns, resolv_conf = resolver_dns
    server = gannet(dkim=gannet_keys(tmp_path / "keys", dns, (("r1", "rsa"),)),
                    dns={"nameservers": [dns.nameserver]})  # fmt: skip
    with smtplib.SMTP(*server.address("mx"), timeout=30) as client:
        client.sendmail("alice@example.test", ["bob@example.test"], MESSAGE)
    files = peers.wait_for(lambda: server.delivered("bob@example.test"), 30, "delivery to bob's Maildir")
    delivered = files[0].read_bytes()
    assert delivered.count(b"DKIM-Signature:") == 1 and b"s=r1;" in delivered
    assert dkimverify_ok(resolv_conf, delivered) and opendkim_ok(resolv_conf, delivered)
    assert not dkimverify_ok(resolv_conf, delivered.replace(b"Hello Bob", b"Hello Eve"))


def test_mail_over_max_verify_size_is_still_signed(
    gannet: Callable[..., peers.GannetProcess],
    resolver_dns: tuple[peers.DnsServer, Path],
    tls_certs: peers.TlsCerts,
    tmp_path: Path,
) -> None:
    """A 3 MiB message with [mailauth] max_verify_size = 64 KiB: signed from its header section and
    a body hash streamed from the spool file, and the signatures hold."""
    dns, resolv_conf = resolver_dns
    server = gannet(dkim=gannet_keys(tmp_path / "keys", dns), dns={"nameservers": [dns.nameserver]},
                    mailauth={"max_verify_size": 65536})  # fmt: skip
    line = b"A long line of a long message,  with  double spaces\tand a tab.   \r\n"
    big = MESSAGE.replace(b"Subject: signed by Gannet", b"Subject: big and signed") + line * 48_000
    with smtplib.SMTP(*server.address("submission"), timeout=60) as client:
        client.starttls(context=tls_certs.client_context())
        client.login("alice@example.test", peers.USERS["alice@example.test"])
        client.sendmail("alice@example.test", ["bob@example.test"], big)
    files = peers.wait_for(lambda: server.delivered("bob@example.test"), 60, "delivery to bob's Maildir")
    delivered = files[0].read_bytes()
    assert len(delivered) > 3_000_000 and delivered.count(b"DKIM-Signature:") == 2
    assert dkimverify_ok(resolv_conf, delivered, 0) and dkimverify_ok(resolv_conf, delivered, 1)
    assert opendkim_ok(resolv_conf, delivered)
    assert "not signed" not in server.log_text()


def test_mail_from_an_untrusted_client_is_not_signed(
    gannet: Callable[..., peers.GannetProcess], dns_server: Callable[..., peers.DnsServer], tmp_path: Path
) -> None:
    """Our domain in From is not enough: only users and trusted networks get our signature."""
    dns = dns_server()
    server = gannet(dkim=gannet_keys(tmp_path / "keys", dns, (("r1", "rsa"),)),
                    relay={"trusted_networks": ["127.0.0.99/32"]},
                    dns={"nameservers": [dns.nameserver]})  # fmt: skip
    with smtplib.SMTP(*server.address("mx"), timeout=30) as client:
        client.sendmail("alice@example.test", ["bob@example.test"], MESSAGE)
    files = peers.wait_for(lambda: server.delivered("bob@example.test"), 30, "delivery to bob's Maildir")
    delivered = files[0].read_bytes()
    assert b"DKIM-Signature:" not in delivered and b"Authentication-Results: mx.example.test;" in delivered
