"""A real `gannet serve` driven by smtplib and raw sockets: every reply path a client sees.

One server per module (starting one costs ~1 s: Python, argon2 for the accounts),
with small limits so the refusals are cheap to reach. 127.0.0.1 is NOT a trusted
network here; 127.0.0.9 is (clients bind it as their source address).
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
import smtplib
import socket
import ssl
import time
from pathlib import Path

import peers
import pytest
from conftest import USERS

from .conftest import TRUSTED


def smtp(server: peers.GannetProcess, mode: str = "mx", *, trusted: bool = False) -> smtplib.SMTP:
    host, port = server.address(mode)
    source = (TRUSTED, 0) if trusted else None
    if mode == "submissions":
        ctx = ssl.create_default_context(
            cafile=str(server.config["tls"]["cert"]).replace("cert.pem", "ca.pem")
        )
        return smtplib.SMTP_SSL(host, port, context=ctx, source_address=source, timeout=10)
    return smtplib.SMTP(host, port, source_address=source, timeout=10)


def client_context(server: peers.GannetProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(Path(server.config["tls"]["cert"]).with_name("ca.pem")))


def message(
    subject: str,
    *,
    sender: str = "someone@elsewhere.test",
    to: str = "alice@example.test",
    extra: str = "",
    body: str = "hello\r\n",
) -> bytes:
    mid = f"<{subject.replace(' ', '-')}.{time.monotonic_ns()}@test>"
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n{extra}\r\n{body}"
    ).encode()


def wait_delivered(
    server: peers.GannetProcess, address: str, subject: str, timeout: float = 10
) -> email.message.Message:
    def find() -> email.message.Message | None:
        for path in server.delivered(address):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if msg["Subject"] == subject:
                return msg
        return None

    return peers.wait_for(find, timeout, f"{subject!r} in {address}'s Maildir")


def count_delivered(server: peers.GannetProcess, address: str, needle: bytes) -> int:
    return sum(needle in p.read_bytes() for p in server.delivered(address))


class Raw:
    """A line-level SMTP client over a plain socket, for what smtplib will not send."""

    def __init__(self, server: peers.GannetProcess, mode: str = "mx", *, trusted: bool = False) -> None:
        host, port = server.address(mode)
        self.sock = socket.create_connection(
            (host, port), timeout=10, source_address=(TRUSTED, 0) if trusted else None
        )
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return "\n".join(x.decode() for x in lines)

    def cmd(self, text: str) -> str:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


# -- accepting and delivering -----------------------------------------------------------
def test_plain_message_is_queued_then_delivered_with_our_headers(server: peers.GannetProcess) -> None:
    with smtp(server) as s:
        s.ehlo("client.test")
        s.mail("someone@elsewhere.test")
        s.rcpt("alice@example.test")
        code, text = s.data(message("plain"))
    assert code == 250
    queue_id = re.fullmatch(r"2\.0\.0 queued as (\w+)", text.decode()).group(1)  # type: ignore[union-attr]
    msg = wait_delivered(server, "alice@example.test", "plain")
    assert msg["Return-Path"] == "<someone@elsewhere.test>"
    assert msg["Delivered-To"] == "alice@example.test"
    received = " ".join(msg["Received"].split())
    assert received.startswith(
        "from client.test ([127.0.0.1]) by mx.example.test (Gannet) with ESMTP id " + queue_id
    )
    assert "for <alice@example.test>" in received
    # The writer logs the delivery after its answer, so the file can show first.
    line = f"{queue_id}: to=<alice@example.test>, relay=maildir"
    peers.wait_for(lambda: line in server.log_text(), 10, "the delivery in the log")


def test_aliases_tags_and_postmaster(server: peers.GannetProcess) -> None:
    with smtp(server) as s:
        s.sendmail("x@elsewhere.test", ["team@example.test"], message("team"))
        s.sendmail("x@elsewhere.test", ["alice+lists@example.test"], message("tagged"))
        s.sendmail("", ["Postmaster@Example.TEST"], message("to postmaster"))
    assert wait_delivered(server, "alice@example.test", "team")["Delivered-To"] == "alice@example.test"
    assert wait_delivered(server, "bob@example.test", "team")["Delivered-To"] == "bob@example.test"
    assert wait_delivered(server, "alice@example.test", "tagged")["Delivered-To"] == "alice@example.test"
    assert wait_delivered(server, "alice@example.test", "to postmaster")["Return-Path"] == "<>"


def test_several_messages_on_one_connection_and_rset(server: peers.GannetProcess) -> None:
    with smtp(server) as s:
        for i in range(3):
            s.sendmail("x@elsewhere.test", ["bob@example.test"], message(f"batch {i}"))
        s.mail("x@elsewhere.test")
        s.rcpt("bob@example.test")
        assert s.rset()[0] == 250
        assert s.noop()[0] == 250
        assert s.verify("bob@example.test")[0] == 252
        assert s.help().startswith(b"2.0.0")
    for i in range(3):
        wait_delivered(server, "bob@example.test", f"batch {i}")


def test_pipelined_group_in_one_write(server: peers.GannetProcess) -> None:
    raw = Raw(server)
    assert "PIPELINING" in raw.cmd("EHLO pipeliner.test")
    body = message("pipelined").replace(b"\r\n.", b"\r\n..")
    raw.send(
        b"MAIL FROM:<p@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    assert raw.reply().startswith("250 2.1.0")
    assert raw.reply().startswith("250 2.1.5")
    assert raw.reply().startswith("550 5.1.1")
    assert raw.reply().startswith("250 2.1.5")
    assert raw.reply().startswith("354")
    raw.send(body + b"\r\n.\r\nQUIT\r\n")
    assert raw.reply().startswith("250 2.0.0 queued as ")
    assert raw.reply().startswith("221")
    wait_delivered(server, "alice@example.test", "pipelined")
    wait_delivered(server, "bob@example.test", "pipelined")


def test_bdat_chunks(server: peers.GannetProcess) -> None:
    raw = Raw(server)
    assert "CHUNKING" in raw.cmd("EHLO chunker.test")
    assert raw.cmd("MAIL FROM:<c@elsewhere.test> BODY=8BITMIME").startswith("250")
    assert raw.cmd("RCPT TO:<bob@example.test>").startswith("250")
    msg = message("chunked", body="caf\u00e9 line\r\n.leading dot stays\r\n").replace(
        b"caf\\u00e9", "café".encode()
    )
    first, second = msg[:30], msg[30:]
    raw.send(b"BDAT %d\r\n" % len(first) + first)
    assert raw.reply() == f"250 2.0.0 {len(first)} octets received"
    raw.send(b"BDAT %d LAST\r\n" % len(second) + second)
    assert raw.reply().startswith("250 2.0.0 queued as ")
    got = wait_delivered(server, "bob@example.test", "chunked")
    assert ".leading dot stays" in got.get_payload()
    assert "BDAT" not in got.get_payload()


def test_smtputf8_address(server: peers.GannetProcess) -> None:
    with smtp(server) as s:
        s.ehlo("utf8.test")
        assert s.has_extn("smtputf8")
        s.sendmail(
            "sender@elsewhere.test", ["rené@example.test"], message("utf8 alias"), mail_options=["SMTPUTF8"]
        )
    msg = wait_delivered(server, "alice@example.test", "utf8 alias")
    assert "UTF8SMTP" in msg["Received"]


def test_large_message_is_spooled_and_arrives_intact(server: peers.GannetProcess) -> None:
    line = "x" * 76 + "\r\n"
    body = line * (1_500_000 // len(line))
    with smtp(server) as s:
        s.sendmail("big@elsewhere.test", ["bob@example.test"], message("large", body=body))
    got = wait_delivered(server, "bob@example.test", "large")
    assert len(got.get_payload()) == len(body.replace("\r\n", "\n"))
    peers.wait_for(lambda: not any(server.data_dir.joinpath("spool").iterdir()), 10, "an empty spool")


# -- TLS and AUTH --------------------------------------------------------------------
def test_submission_starttls_auth_adds_message_id_and_date(server: peers.GannetProcess) -> None:
    with smtp(server, "submission") as s:
        s.ehlo("laptop.test")
        assert not s.has_extn("auth"), "AUTH must not be offered before TLS on submission"
        code, _ = s.mail("alice@example.test")
        assert code == 530
        s.starttls(context=client_context(server))
        s.ehlo("laptop.test")
        assert "PLAIN" in s.esmtp_features["auth"]
        s.login("alice@example.test", USERS["alice@example.test"])
        s.sendmail(
            "alice@example.test",
            ["bob@example.test"],
            b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: submitted\r\n\r\nhi\r\n",
        )
    msg = wait_delivered(server, "bob@example.test", "submitted")
    assert msg["Message-ID"] and msg["Message-ID"].endswith("@mx.example.test>")
    assert msg["Date"]
    received = " ".join(msg["Received"].split())
    assert " with ESMTPSA id " in received and "(using TLSv1." in received


def test_submissions_implicit_tls_with_auth_login(server: peers.GannetProcess) -> None:
    host, port = server.address("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_context(server), timeout=10) as s:
        s.ehlo("laptop.test")
        s.login("bob@example.test", USERS["bob@example.test"])  # smtplib prefers CRAM-MD5, then PLAIN
        s.sendmail(
            "bob@example.test", ["alice@example.test"], message("implicit tls", sender="bob@example.test")
        )
    assert "ESMTPSA" in wait_delivered(server, "alice@example.test", "implicit tls")["Received"]
    raw_sock = socket.create_connection((host, port), timeout=10)
    tls = client_context(server).wrap_socket(raw_sock, server_hostname="mx.example.test")
    tls.recv(1000)
    tls.sendall(b"EHLO x\r\n")
    time.sleep(0.2)
    tls.recv(1000)
    user, password = (
        base64.b64encode(x.encode()) for x in ("alice@example.test", USERS["alice@example.test"])
    )
    tls.sendall(b"AUTH LOGIN\r\n")
    assert tls.recv(1000).startswith(b"334 VXNlcm5hbWU6")
    tls.sendall(user + b"\r\n")
    assert tls.recv(1000).startswith(b"334 UGFzc3dvcmQ6")
    tls.sendall(password + b"\r\n")
    assert tls.recv(1000).startswith(b"235 2.7.0")
    tls.close()


def test_submission_refusals(server: peers.GannetProcess) -> None:
    with smtp(server, "submission") as s:
        s.starttls(context=client_context(server))
        s.ehlo("laptop.test")
        assert s.mail("alice@example.test")[0] == 530
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            s.login("alice@example.test", "wrong")
        assert info.value.smtp_code == 535
        s.login("alice@example.test", USERS["alice@example.test"])
        code, text = s.mail("bob@example.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        assert s.mail("alice+news@example.test")[0] == 250
    assert "auth failed" in server.log_text()


def test_starttls_discards_pipelined_plaintext(server: peers.GannetProcess) -> None:
    """CVE-2011-0411: commands sent with STARTTLS, before the handshake, are never run."""
    raw = Raw(server)
    raw.cmd("EHLO injector.test")
    raw.send(b"STARTTLS\r\nMAIL FROM:<evil@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert raw.reply().startswith("220")
    tls = client_context(server).wrap_socket(raw.sock, server_hostname="mx.example.test")
    tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
    assert tls.recv(1000).startswith(b"503"), "the injected MAIL must not have been executed"
    tls.close()


# -- refusals ------------------------------------------------------------------------
def test_relay_rules(server: peers.GannetProcess) -> None:
    with smtp(server) as s:
        s.ehlo("stranger.test")
        s.mail("x@elsewhere.test")
        code, text = s.rcpt("victim@faraway.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert s.rcpt("nobody@example.test")[:1] == (550,)
        assert s.rcpt("anyone@backup.test")[0] == 250, "relay_domains are accepted from anyone"
    with smtp(server, trusted=True) as s:
        s.ehlo("inside.test")
        s.mail("x@example.test")
        assert s.rcpt("friend@faraway.test")[0] == 250
    with smtp(server) as s:  # loopback mx offers AUTH; authenticated sessions may relay
        s.ehlo("roaming.test")
        s.login("alice@example.test", USERS["alice@example.test"])
        s.mail("alice@example.test")
        assert s.rcpt("friend@faraway.test")[0] == 250
    assert "reject=RCPT" in server.log_text() and "to=<victim@faraway.test>" in server.log_text()


def test_limits(server: peers.GannetProcess) -> None:
    with smtp(server) as s:
        s.ehlo("limits.test")
        s.mail("x@elsewhere.test")
        for _ in range(5):
            assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.rcpt("bob@example.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        s.rset()
        code, text = s.mail("x@elsewhere.test", ["SIZE=3000000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        s.mail("x@elsewhere.test")
        s.rcpt("alice@example.test")
        code, text = s.data(message("too big", body="y" * 2_200_000))
        assert (code, text[:5]) == (552, b"5.3.4")
        assert s.noop()[0] == 250, "the session goes on after a refused message"
    assert count_delivered(server, "alice@example.test", b"Subject: too big") == 0


def test_long_command_line_and_too_many_errors(server: peers.GannetProcess) -> None:
    raw = Raw(server)
    raw.cmd("EHLO errors.test")
    assert raw.cmd("NOOP " + "x" * 600).startswith("500 5.5.2")
    for _ in range(4):
        assert raw.cmd("BOGUS").startswith("500")
    assert raw.cmd("BOGUS").startswith("421 4.7.0")
    assert raw.closed()


@pytest.mark.parametrize("probe", [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n"])
def test_smuggling_probes_never_split_a_message(server: peers.GannetProcess, probe: bytes) -> None:
    marker = f"smuggled-{probe.hex()}".encode()
    raw = Raw(server)
    raw.cmd("EHLO smuggler.test")
    raw.cmd("MAIL FROM:<a@elsewhere.test>")
    raw.cmd("RCPT TO:<bob@example.test>")
    assert raw.cmd("DATA").startswith("354")
    raw.send(
        b"Subject: outer " + marker + b"\r\n\r\nfirst" + probe + b"MAIL FROM:<x@elsewhere.test>\r\n"
        b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: inner " + marker + b"\r\n\r\nsecond\r\n.\r\n"
    )
    reply = raw.reply()
    assert reply.startswith("554 5.5.2"), reply  # bare CR/LF refused (smtp.bare_newline = reject)
    assert raw.cmd("NOOP").startswith("250"), "no smuggled command was executed"
    raw.close()
    time.sleep(0.3)
    assert count_delivered(server, "alice@example.test", marker) == 0
    assert count_delivered(server, "bob@example.test", marker) == 0


def test_lmtp_listener_replies_per_recipient(server: peers.GannetProcess) -> None:
    raw = Raw(server, "lmtp")
    assert raw.cmd("EHLO x").startswith("500"), "LMTP takes LHLO only"
    assert raw.cmd("LHLO mda.test").startswith("250")
    raw.cmd("MAIL FROM:<l@elsewhere.test>")
    assert raw.cmd("RCPT TO:<alice@example.test>").startswith("250")
    assert raw.cmd("RCPT TO:<bob@example.test>").startswith("250")
    assert raw.cmd("DATA").startswith("354")
    raw.send(message("via lmtp") + b".\r\n")
    first, second = raw.reply(), raw.reply()
    assert first.startswith("250 2.0.0 queued as ") and first == second
    assert "with LMTP" in wait_delivered(server, "alice@example.test", "via lmtp")["Received"]
    wait_delivered(server, "bob@example.test", "via lmtp")


# -- the running process -----------------------------------------------------------------
def test_users_added_while_running_can_log_in(server: peers.GannetProcess) -> None:
    server.cli("users", "add", "carol@example.test", "--password-stdin", input="carol-pw\n")
    assert "carol@example.test" in server.cli("users", "list").stdout
    with smtp(server, "submission") as s:
        s.starttls(context=client_context(server))
        s.ehlo("x")
        s.login("carol@example.test", "carol-pw")
        s.sendmail(
            "carol@example.test",
            ["carol@example.test"],
            message("self", sender="carol@example.test", to="carol@example.test"),
        )
    wait_delivered(server, "carol@example.test", "self")
    server.cli("users", "remove", "carol@example.test")
    with smtp(server) as s:
        s.ehlo("x")
        s.mail("x@elsewhere.test")
        assert s.rcpt("carol@example.test")[0] == 550
