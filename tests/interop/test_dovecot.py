"""A real Dovecot reads what Gannet delivered: IMAP over Gannet's Maildir tree.

Gannet accepts a message over SMTP (smtplib) and writes it into
``mail/example.test/bob/new``; a private Dovecot imapd pointed at the same
Maildir root (``ROOT/%d/%n``) serves it to imaplib: login, SELECT INBOX,
FETCH, with the Subject and body intact and the Return-Path and Delivered-To
that Gannet added. How Dovecot is set up to read root-owned files (it will not
run as root) is in tests/peers/dovecot.py, DovecotImap.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import smtplib
from collections.abc import Callable

import peers
import pytest
from peers import USERS

pytestmark = pytest.mark.interop

SUBJECT = "Dovecot reads Gannet's Maildir"
BODY = "First line.\r\n.A line that starts with a dot.\r\nLast line, with ünïcödé.\r\n"


def test_dovecot_serves_a_message_gannet_delivered(
        gannet: Callable[..., peers.GannetProcess], dovecot: Callable[..., peers.DovecotImap]) -> None:
    peers.need("dovecot")
    g = gannet()
    message = (f"From: Sender <sender@remote.test>\r\nTo: bob@example.test\r\nSubject: {SUBJECT}\r\n"
               "Message-ID: <dovecot-1@remote.test>\r\nMIME-Version: 1.0\r\n"
               "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
               f"\r\n{BODY}").encode()
    with smtplib.SMTP(*g.address(), timeout=30) as client:
        client.sendmail("sender@remote.test", ["bob@example.test"], message)
    peers.wait_for(lambda: g.delivered("bob@example.test"), 20, "delivery to bob's Maildir")

    imap = dovecot(maildir_root=g.maildir_root)
    with imaplib.IMAP4(*imap.imap_address, timeout=30) as m:
        assert m.login("bob@example.test", USERS["bob@example.test"])[0] == "OK"
        typ, data = m.select("INBOX")
        assert typ == "OK" and int(data[0]) == 1, (typ, data, imap.log_text()[-2000:])
        typ, fetched = m.fetch("1", "(RFC822)")
        assert typ == "OK", fetched
        raw = fetched[0][1]
        m.logout()

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == SUBJECT
    assert msg["Message-ID"] == "<dovecot-1@remote.test>"
    assert msg["Return-Path"] == "<sender@remote.test>"
    assert msg["Delivered-To"] == "bob@example.test"
    assert msg["Received"] and "mx.example.test" in msg["Received"]
    # IMAP sends CRLF whatever the file holds (Gannet writes LF, as Maildir expects)
    assert msg.get_content().replace("\r\n", "\n") == BODY.replace("\r\n", "\n")
    # Dovecot found the file where Gannet put it, and moved it to cur/ on SELECT
    assert [p.parent.name for p in g.delivered("bob@example.test")] == ["cur"]
