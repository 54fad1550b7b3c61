"""Gannet behind a real HAProxy (Debian's), with the PROXY protocol v1 and v2.

HAProxy listens on 127.0.0.8 and passes each connection to Gannet's
`proxy_protocol = true` listener, prefixed with `send-proxy` (v1) or
`send-proxy-v2`. Clients connect to HAProxy from addresses of their own
(127.0.0.7, 127.0.0.5), so the address HAProxy reports differs from the
TCP peer Gannet sees (HAProxy, on 127.0.0.1). What must hold:

- the client's address, not HAProxy's, is in the Received header of the
  delivered message and in the log lines (connect, queued);
- relay rules judge the client's address: with trusted_networks =
  127.0.0.1/32 (HAProxy's own address!), a client on 127.0.0.5 gets
  554 5.7.1 when relaying, one on 127.0.0.1 relays;
- a client connecting straight to the proxy_protocol listener without a
  header hears nothing and is dropped, with a log line naming it and the reason;
- HAProxy's health checks (smtpchk over the PROXY protocol) keep the server up.
"""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Callable
from email.message import EmailMessage

import peers
import pytest

pytestmark = pytest.mark.interop

CLIENT = "127.0.0.7"
UNTRUSTED_CLIENT = "127.0.0.5"


def proxied_gannet(gannet: Callable[..., peers.GannetProcess], **sections: object) -> peers.GannetProcess:
    host = peers.GANNET_HOST
    listen = [{"address": f"{host}:{peers.free_port(host)}", "mode": "mx", "proxy_protocol": True,
               "proxy_from": ["127.0.0.1/32"]}]
    return gannet(listen=listen, **sections)


def send(target: str, to: str, *, source: str, subject: str = "through haproxy") -> str:
    host, port = peers.split_address(target)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "someone@client.test", to, subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@client.test>"
    msg.set_content("hello")
    with smtplib.SMTP(host, port, "client.test", source_address=(source, 0), timeout=30) as s:
        s.send_message(msg)
    return str(msg["Message-ID"])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_client_address_reaches_received_and_the_log(
        gannet: Callable[..., peers.GannetProcess], haproxy: Callable[..., peers.HAProxy],
        version: str) -> None:
    g = proxied_gannet(gannet)
    lb = haproxy(servers=[g.target()], send_proxy=version, check=True)
    message_id = send(lb.target, "alice@example.test", source=CLIENT, subject=f"proxy {version}")
    (path,) = peers.wait_for(lambda: g.delivered("alice@example.test"), 30, "delivery to alice")
    headers = peers.read_headers(path)
    assert headers["Message-ID"] == message_id
    received = " ".join(headers.get_all("Received", [])[0].split())
    assert received.startswith(f"from client.test ([{CLIENT}]) by mx.example.test (Gannet)"), received
    log = g.log_text()
    assert re.search(rf"connect from=\[{re.escape(CLIENT)}\]:\d+", log), log[-3000:]
    assert re.search(rf"client \[{re.escape(CLIENT)}\]:\d+ via proxy \[127\.0\.0\.1\]:\d+ "
                     rf"\(PROXY v{version[1]} proxy inet\)", log)
    queued = [line for line in log.splitlines() if "(queued)" in line]
    assert len(queued) == 1 and f"[{CLIENT}]:" in queued[0], queued
    # HAProxy's checks (smtpchk, with the PROXY header) found the server up all along
    assert "DOWN" not in lb.log_text(), lb.log_text()[-2000:]
    assert "Traceback" not in log


def test_a_direct_connection_without_a_header_is_dropped(
        gannet: Callable[..., peers.GannetProcess]) -> None:
    g = proxied_gannet(gannet)
    host, port = g.address()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        said = b""
        try:
            while chunk := sock.recv(4096):
                said += chunk
        except ConnectionResetError:
            pass
    assert said == b"", said  # no greeting, no reply: the connection was just closed
    peers.wait_for(lambda: "dropped: invalid PROXY header" in g.log_text(), 10, "the drop log line")
    (line,) = [x for x in g.log_text().splitlines() if "dropped: invalid PROXY header" in x]
    assert re.search(rf"connection from \[127\.0\.0\.1\]:\d+ to {re.escape(g.target())} dropped: invalid "
                     r"PROXY header: no PROXY protocol header", line), line
    assert "Traceback" not in g.log_text()


def test_relay_rules_judge_the_client_not_the_proxy(
        gannet: Callable[..., peers.GannetProcess], haproxy: Callable[..., peers.HAProxy],
        smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    sink = smtp_sink()
    # HAProxy connects from 127.0.0.1, the only trusted address.
    g = proxied_gannet(gannet, relay={"trusted_networks": ["127.0.0.1/32"], "smarthost": sink.target})
    lb = haproxy(servers=[g.target()], send_proxy="v2")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(lb.target, "someone@elsewhere.test", source=UNTRUSTED_CLIENT, subject="from untrusted")
    ((code, text),) = refused.value.recipients.values()
    assert code == 554 and text.startswith(b"5.7.1"), (code, text)
    send(lb.target, "someone@elsewhere.test", source="127.0.0.1", subject="from trusted")
    sink.wait_count(1, timeout=30)
    rejected = [line for line in g.log_text().splitlines() if "RCPT" in line and "554" in line]
    assert len(rejected) == 1 and f"[{UNTRUSTED_CLIENT}]:" in rejected[0], rejected
