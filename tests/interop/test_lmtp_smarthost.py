"""The two fixed next hops: local mail handed to a real Dovecot over LMTP
(`[mailboxes] lmtp`), and all outbound mail through a real Postfix as
smarthost with SMTP AUTH checked by Dovecot's auth service
(`[relay] smarthost`, `smarthost_user`, `smarthost_password_file`).
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Callable
from pathlib import Path

import peers
import pytest

pytestmark = pytest.mark.interop


def send(g: peers.GannetProcess, sender: str, recipients: list[str], subject: str) -> str:
    msg_id = f"<{subject.replace(' ', '-')}@client.test>"
    content = f"From: {sender}\r\nSubject: {subject}\r\nMessage-ID: {msg_id}\r\n\r\nhello\r\n"
    with smtplib.SMTP(*g.address("mx"), timeout=30) as client:
        client.sendmail(sender, recipients, content.encode())
    return msg_id


def test_local_mail_goes_to_dovecot_by_lmtp_with_one_reply_per_recipient(
        gannet: Callable[..., peers.GannetProcess], dovecot: Callable[..., peers.DovecotImap]) -> None:
    # Dovecot knows alice only; Gannet knows alice and bob: Dovecot refuses bob
    # inside the same LMTP transaction, and alice gets bob's bounce (by LMTP too).
    dc = dovecot(users={"alice@example.test": "pw"}, lmtp=True)
    host, port = dc.lmtp_address
    g = gannet(mailboxes={"lmtp": f"{host}:{port}"}, delivery={"retry": ["1s"]})
    msg_id = send(g, "alice@example.test", ["alice@example.test", "bob@example.test"], "lmtp test")

    def alice_files() -> list[Path]:
        return peers.maildir_files(dc.maildir_root / "example.test" / "alice")
    files = peers.wait_for(lambda: f if len(f := alice_files()) >= 2 else None, 30,
                           "the message and the bounce")
    messages = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in files]
    originals = [m for m in messages if m["Message-ID"] == msg_id]
    reports = [m for m in messages if m.get_content_type() == "multipart/report"]
    assert len(originals) == 1 and len(reports) == 1
    assert originals[0]["Delivered-To"] == "alice@example.test" or originals[0]["Return-Path"]
    (status,) = [p for p in reports[0].iter_parts() if p.get_content_type() == "message/delivery-status"]
    block = status.get_payload()[1]  # type: ignore[index]
    assert block["Final-Recipient"] == "rfc822; bob@example.test"
    assert block["Action"] == "failed" and block["Status"].startswith("5.1.")
    lines = g.log_text().splitlines()
    hop = f"relay={host}[{host}]:{port}"
    assert any("to=<alice@example.test>" in ln and hop in ln and "status=sent" in ln for ln in lines)
    assert any("to=<bob@example.test>" in ln and hop in ln and "status=bounced" in ln for ln in lines)


@pytest.fixture
def authenticated_postfix(dovecot: Callable[..., peers.DovecotImap],
                          postfix: Callable[..., peers.PostfixInstance]
                          ) -> tuple[peers.PostfixInstance, int]:
    """A Postfix on 127.0.0.2 that delivers postfix.test into Maildirs and takes
    mail only from clients that authenticated (SASL through Dovecot's auth socket)."""
    dc = dovecot(users={"relay@example.test": "relay-secret"}, auth_socket=True)
    assert dc.auth_socket is not None
    port = peers.free_port(peers.POSTFIX_HOST)
    settings = {**peers.postfix_sasl_settings(dc.auth_socket), "mynetworks": "",
                "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
                "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject"}
    pf = postfix(mode="maildir", listen=f"{peers.POSTFIX_HOST}:{port}", domains=["postfix.test"],
                 mailboxes=["bob@postfix.test"], hostname="mx.postfix.test", settings=settings)
    return pf, port


@pytest.mark.parametrize("password", ["relay-secret", "wrong"])
def test_all_outbound_mail_goes_through_the_smarthost_with_auth(
        password: str, tmp_path: Path, gannet: Callable[..., peers.GannetProcess],
        authenticated_postfix: tuple[peers.PostfixInstance, int]) -> None:
    pf, port = authenticated_postfix
    secret = tmp_path / "smarthost-password"
    secret.write_text(password + "\n")
    g = gannet(relay={"smarthost": f"{peers.POSTFIX_HOST}:{port}", "smarthost_user": "relay@example.test",
                      "smarthost_password_file": str(secret)},
               delivery={"retry": ["1s"]})
    msg_id = send(g, "alice@example.test", ["bob@postfix.test"], f"smarthost {password}")
    if password == "wrong":
        lines = peers.wait_for(lambda: [ln for ln in g.log_text().splitlines() if "status=deferred" in ln],
                               30, "a deferral")
        assert "535" in lines[0] and "4." in lines[0], lines[0]  # AUTH refused: retried, never bounced
        assert not pf.delivered("bob@postfix.test")
        return
    files = peers.wait_for(lambda: pf.delivered("bob@postfix.test") or None, 30, "Postfix to deliver")
    assert peers.read_headers(files[0])["Message-ID"] == msg_id
    assert "sasl_username=relay@example.test" in pf.log_text()
    sent = [ln for ln in g.log_text().splitlines() if "status=sent" in ln]
    assert sent and f"[{peers.POSTFIX_HOST}]:{port}" in sent[0], sent
