"""swaks against `gannet serve`: the sessions users run by hand, and every refusal with its code.

One Gannet per test (the ``gannet`` fixture) configured so that every refusal
can be provoked from 127.0.0.1: ``relay.trusted_networks = ["127.0.0.9/32"]``
(so the test client is not trusted and relaying is denied), at most 3
recipients, messages up to 64 KiB. swaks transcripts mark the server's
accepting replies ``<-`` (``<~`` under TLS) and its refusals ``<**`` (``<~*``); its exit status says where
it stopped (23 MAIL, 24 RCPT, 25 DATA, 26 end of data, 28 AUTH). swaks (2020 version here) has
no SMTPUTF8 option and no BDAT: those are exercised with smtplib in
tests/integration.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
from peers import USERS

pytestmark = pytest.mark.interop

MAX_SIZE = 64 * 1024


@pytest.fixture
def mx(gannet: Callable[..., peers.GannetProcess]) -> peers.GannetProcess:
    peers.need("swaks")
    return gannet(relay={"trusted_networks": ["127.0.0.9/32"]},
                  smtp={"max_recipients": 3, "max_message_size": MAX_SIZE})


def run(*args: str) -> peers.subprocess.CompletedProcess[str]:
    return peers.swaks("--timeout", "20", *args)


def refusals(result: peers.subprocess.CompletedProcess[str]) -> list[str]:
    return re.findall(r"^<(?:\*\*|~\*) +(.*)$", result.stdout, re.MULTILINE)


def accepted_ids(result: peers.subprocess.CompletedProcess[str]) -> list[str]:
    return re.findall(r"^<[-~]  250 2\.0\.0 queued as (\S+)", result.stdout, re.MULTILINE)


def transcript(result: peers.subprocess.CompletedProcess[str]) -> str:
    return f"swaks exit {result.returncode}\n{result.stdout}{result.stderr}"


def delivered_one(g: peers.GannetProcess, address: str, marker: str) -> Path:
    """Wait for exactly one message containing ``marker`` in ``address``'s Maildir."""
    def found() -> list[Path]:
        return [p for p in g.delivered(address) if marker.encode() in p.read_bytes()]
    paths = peers.wait_for(found, 20, f"a message with {marker!r} in {address}'s Maildir")
    assert len(paths) == 1, paths
    return paths[0]


# -- sessions that deliver -----------------------------------------------------------


def test_plain_session_delivers(mx: peers.GannetProcess) -> None:
    r = run("-s", mx.target(), "-f", "sender@remote.test", "-t", "alice@example.test",
            "--h-Subject", "plain swaks", "--body", "marker-plain")
    assert r.returncode == 0, transcript(r)
    assert len(accepted_ids(r)) == 1, transcript(r)
    text = delivered_one(mx, "alice@example.test", "marker-plain").read_text()
    assert "Subject: plain swaks" in text
    assert "Return-Path: <sender@remote.test>" in text
    assert "Delivered-To: alice@example.test" in text


def test_starttls_with_verified_certificate(mx: peers.GannetProcess, tls_certs: peers.TlsCerts) -> None:
    r = run("-s", mx.target(), "--tls", "--tls-verify", "--tls-ca-path", str(tls_certs.ca_file),
            "--tls-sni", "mx.example.test",
            "-f", "sender@remote.test", "-t", "bob@example.test", "--body", "marker-starttls")
    assert r.returncode == 0, transcript(r)
    assert "TLS started" in r.stdout, transcript(r)
    text = delivered_one(mx, "bob@example.test", "marker-starttls").read_text()
    assert re.search(r"with ESMTPS\b", text), text


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_over_starttls_on_submission(mx: peers.GannetProcess, tls_certs: peers.TlsCerts,
                                          mechanism: str) -> None:
    marker = f"marker-auth-{mechanism.lower()}"
    r = run("-s", mx.target("submission"), "--tls", "--tls-verify", "--tls-ca-path", str(tls_certs.ca_file),
            "-a", mechanism, "-au", "alice@example.test", "-ap", USERS["alice@example.test"],
            "-f", "alice@example.test", "-t", "bob@example.test", "--body", marker)
    assert r.returncode == 0, transcript(r)
    assert re.search(r"^<~  235 ", r.stdout, re.MULTILINE), transcript(r)
    text = delivered_one(mx, "bob@example.test", marker).read_text()
    assert re.search(r"with ESMTPSA\b", text), text


def test_auth_on_implicit_tls_submissions(mx: peers.GannetProcess, tls_certs: peers.TlsCerts) -> None:
    r = run("-s", mx.target("submissions"), "--tls-on-connect", "--tls-verify",
            "--tls-ca-path", str(tls_certs.ca_file),
            "-a", "PLAIN", "-au", "bob@example.test", "-ap", USERS["bob@example.test"],
            "-f", "bob@example.test", "-t", "alice@example.test", "--body", "marker-submissions")
    assert r.returncode == 0, transcript(r)
    delivered_one(mx, "alice@example.test", "marker-submissions")


def test_pipelining(mx: peers.GannetProcess) -> None:
    r = run("-s", mx.target(), "--pipeline", "-f", "sender@remote.test",
            "-t", "alice@example.test,bob@example.test", "--body", "marker-pipeline")
    assert r.returncode == 0, transcript(r)
    assert "PIPELINING" in r.stdout
    delivered_one(mx, "alice@example.test", "marker-pipeline")
    delivered_one(mx, "bob@example.test", "marker-pipeline")


def test_alias_and_plus_tag_reach_the_user(mx: peers.GannetProcess) -> None:
    r = run("-s", mx.target(), "-f", "sender@remote.test",
            "-t", "postmaster@example.test,bob+lists@example.test", "--body", "marker-alias")
    assert r.returncode == 0, transcript(r)
    delivered_one(mx, "alice@example.test", "marker-alias")
    delivered_one(mx, "bob@example.test", "marker-alias")


# -- refusals ------------------------------------------------------------------------


def test_unknown_local_user_is_550_511(mx: peers.GannetProcess) -> None:
    r = run("-s", mx.target(), "-f", "sender@remote.test", "-t", "nobody@example.test")
    assert r.returncode == 24, transcript(r)
    assert refusals(r) and refusals(r)[0].startswith("550 5.1.1"), transcript(r)


def test_relay_from_untrusted_address_is_554_571(mx: peers.GannetProcess) -> None:
    r = run("-s", mx.target(), "-f", "sender@remote.test", "-t", "someone@elsewhere.test")
    assert r.returncode == 24, transcript(r)
    assert refusals(r) and refusals(r)[0].startswith("554 5.7.1"), transcript(r)


def test_too_many_recipients_is_452_453(mx: peers.GannetProcess) -> None:
    rcpts = ["alice@example.test", "bob@example.test", "postmaster@example.test", "alice+x@example.test"]
    r = run("-s", mx.target(), "-f", "sender@remote.test", "-t", ",".join(rcpts), "--body", "marker-limit")
    assert any(line.startswith("452 4.5.3") for line in refusals(r)), transcript(r)
    # the first three were accepted and the message went to them
    assert len(accepted_ids(r)) == 1, transcript(r)


def test_too_large_is_552_534(mx: peers.GannetProcess, tmp_path: Path) -> None:
    body = tmp_path / "big.txt"
    body.write_text(("x" * 76 + "\n") * (MAX_SIZE // 77 + 100))
    r = run("-s", mx.target(), "-f", "sender@remote.test", "-t", "alice@example.test",
            "--body", f"@{body}", "--h-Subject", "too big", "--suppress-data")
    assert r.returncode == 26, transcript(r)
    assert refusals(r) and refusals(r)[-1].startswith("552 5.3.4"), transcript(r)
    assert not [p for p in mx.delivered("alice@example.test") if b"too big" in p.read_bytes()]


def test_submission_requires_auth_530(mx: peers.GannetProcess, tls_certs: peers.TlsCerts) -> None:
    r = run("-s", mx.target("submission"), "--tls", "--tls-ca-path", str(tls_certs.ca_file),
            "-f", "alice@example.test", "-t", "bob@example.test")
    assert r.returncode == 23, transcript(r)
    assert refusals(r) and refusals(r)[0].startswith("530"), transcript(r)


def test_submission_offers_auth_only_after_starttls(mx: peers.GannetProcess) -> None:
    r = run("-s", mx.target("submission"), "-a", "PLAIN", "-au", "alice@example.test",
            "-ap", USERS["alice@example.test"], "-f", "alice@example.test", "-t", "bob@example.test")
    assert r.returncode == 28, transcript(r)
    ehlo = r.stdout[r.stdout.index("EHLO"):]
    assert "AUTH" not in ehlo.split("\n -> ")[0], transcript(r)


def test_sender_not_owned_is_553_571(mx: peers.GannetProcess, tls_certs: peers.TlsCerts) -> None:
    r = run("-s", mx.target("submission"), "--tls", "--tls-ca-path", str(tls_certs.ca_file),
            "-a", "PLAIN", "-au", "alice@example.test", "-ap", USERS["alice@example.test"],
            "-f", "bob@example.test", "-t", "bob@example.test")
    assert r.returncode == 23, transcript(r)
    assert refusals(r) and refusals(r)[0].startswith("553 5.7.1"), transcript(r)


def test_wrong_password_is_535(mx: peers.GannetProcess, tls_certs: peers.TlsCerts) -> None:
    r = run("-s", mx.target("submission"), "--tls", "--tls-ca-path", str(tls_certs.ca_file),
            "-a", "PLAIN", "-au", "alice@example.test", "-ap", "not-the-password",
            "-f", "alice@example.test", "-t", "bob@example.test")
    assert r.returncode == 28, transcript(r)
    assert refusals(r) and refusals(r)[-1].startswith("535"), transcript(r)
