"""Gannet relays: mail for other domains leaves through DNS MX records (a real
dnsmasq on 127.0.0.53) to real receiving MTAs — Postfix's smtp-sink on
127.0.0.3 and a private Postfix on 127.0.0.2 — and every failure mode ends as
the issue says: retried on the schedule, or bounced with a DSN that Python's
email package parses field by field.

Every peer listens on one port (`[delivery] port`), each on its own loopback
address, as MX hosts of the test domains do on port 25. Short retry schedules
make the retries happen within a test. Mail is sent from 127.0.0.1, a trusted
network, so Gannet relays it; the sender is alice@example.test, a local
account, so bounces land in her Maildir.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import smtplib
import time
from collections.abc import Callable
from typing import Any

import peers
import pytest

pytestmark = pytest.mark.interop

SENDER = "alice@example.test"
ADDRESSES = (peers.SINK_HOST, peers.POSTFIX_HOST, "127.0.0.5", "127.0.0.6")  # MX hosts of the test domains


def common_port() -> int:
    """A port free on every address a test peer may use (they share `[delivery] port`)."""
    for _ in range(50):
        port = peers.free_port(peers.SINK_HOST)
        if all(not peers.port_open(a, port, 0.05) for a in ADDRESSES):
            return port
    raise peers.PeerError("no common free port")


def records(**extra: dict[str, list[Any]]) -> dict[str, dict[str, list[Any]]]:
    base: dict[str, dict[str, list[Any]]] = {
        "sink.test": {"MX": [(10, "mx.sink.test")]},
        "mx.sink.test": {"A": [peers.SINK_HOST]},
        "postfix.test": {"MX": [(10, "mx.postfix.test")]},
        "mx.postfix.test": {"A": [peers.POSTFIX_HOST]},
        "nullmx.test": {"MX": [(0, ".")]},
        "dead.test": {"MX": [(10, "mx.dead.test")]},
        "mx.dead.test": {"A": ["127.0.0.5"]},
        "example.test": {"MX": [(10, "mx.example.test")]},
        "loop.test": {"MX": [(10, "mx.example.test")]},  # Gannet's own hostname
        "two.test": {"MX": [(10, "mx1.two.test"), (20, "mx2.two.test")]},
        "mx1.two.test": {"A": [peers.SINK_HOST]},
        "mx2.two.test": {"A": ["127.0.0.6"]},
        "backup.test": {"MX": [(10, "mx.dead.test"), (20, "mx2.two.test")]},
        "mx.example.test": {"A": [peers.GANNET_HOST]},
    }
    base.update(extra)
    return base


class Relay:
    """A Gannet that relays through the DNS server, and the port its peers share."""

    def __init__(self, gannet: Callable[..., peers.GannetProcess], dns: peers.DnsServer, port: int,
                 **delivery: Any) -> None:
        self.port = port
        settings = {"port": port, "retry": ["1s"], "connect_timeout": "5s", "command_timeout": "10s",
                    "data_timeout": "10s", "sweep_interval": "1s", **delivery}
        self.g = gannet(dns={"nameservers": [dns.nameserver]}, delivery=settings)

    def send(self, to: str | list[str], *, subject: str = "relay test", sender: str = SENDER,
             mail_options: tuple[str, ...] = (), rcpt_options: tuple[str, ...] = (),
             body: str = "Hello from Gannet.\r\n") -> str:
        recipients = [to] if isinstance(to, str) else to
        msg_id = f"<{time.monotonic_ns()}@client.test>"
        content = (f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
                   f"Message-ID: {msg_id}\r\n\r\n{body}")
        with smtplib.SMTP(*self.g.address("mx"), timeout=30) as client:
            client.sendmail(sender, recipients, content.encode(), mail_options=list(mail_options),
                            rcpt_options=list(rcpt_options))
        return msg_id

    def queue(self) -> list[dict[str, Any]]:
        out = self.g.cli("queue", "list", "--json").stdout
        result: list[dict[str, Any]] = json.loads(out)
        return result

    def wait_queue_empty(self, timeout: float = 30) -> None:
        peers.wait_for(lambda: not self.queue(), timeout, "Gannet's queue to empty")

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.g.log_text().splitlines() if needle in line]

    def reports(self, address: str = SENDER) -> list[email.message.EmailMessage]:
        found = []
        for path in self.g.delivered(address):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if msg.get_content_type() == "multipart/report":
                found.append(msg)
        return found  # type: ignore[return-value]

    def wait_report(self, n: int = 1, address: str = SENDER, timeout: float = 30
                    ) -> list[email.message.EmailMessage]:
        return peers.wait_for(lambda: r if len(r := self.reports(address)) >= n else None, timeout,
                              f"{n} delivery status notification(s) for {address}")


def status_blocks(report: email.message.EmailMessage) -> list[email.message.Message]:
    """The per-recipient blocks of the message/delivery-status part."""
    # The report's own parts only: a returned original may be a report itself.
    (part,) = [p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status"]
    blocks: list[email.message.Message] = part.get_payload()  # type: ignore[assignment]
    return blocks[1:]  # the first block holds the per-message fields


@pytest.fixture
def dns(dns_server: Callable[..., peers.DnsServer]) -> peers.DnsServer:
    return dns_server(records=records())


# -- delivered ------------------------------------------------------------------------


def test_mail_for_a_remote_domain_reaches_its_mx(gannet: Callable[..., peers.GannetProcess],
                                                 dns: peers.DnsServer,
                                                 smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    sink = smtp_sink(listen=f"{peers.SINK_HOST}:{port}", dump=True)
    relay = Relay(gannet, dns, port)
    msg_id = relay.send(["bob@sink.test", "carol@sink.test"])
    sink.wait_count(1, timeout=30)
    relay.wait_queue_empty()
    (dumped,) = sink.messages()
    text = dumped.read_bytes()
    assert msg_id.encode() in text and b"Hello from Gannet." in text
    sent = relay.log_lines("status=sent")
    assert len(sent) == 2, sent
    relay_field = f"relay=mx.sink.test[{peers.SINK_HOST}]:{port}"
    assert all(relay_field in line and "dsn=2.0.0" in line for line in sent), sent
    assert sink.count() == 1  # one transaction carried both recipients


def test_mail_reaches_a_real_postfix(gannet: Callable[..., peers.GannetProcess], dns: peers.DnsServer,
                                     postfix: Callable[..., peers.PostfixInstance]) -> None:
    port = common_port()
    pf = postfix(mode="maildir", listen=f"{peers.POSTFIX_HOST}:{port}", domains=["postfix.test"],
                 mailboxes=["bob@postfix.test"], hostname="mx.postfix.test")
    relay = Relay(gannet, dns, port)
    # One transaction, two RCPTs: Postfix takes bob and refuses nobody (550 5.1.1).
    msg_id = relay.send(["bob@postfix.test", "nobody@postfix.test"])
    files = peers.wait_for(lambda: pf.delivered("bob@postfix.test") or None, 30, "Postfix to deliver")
    headers = peers.read_headers(files[0])
    assert headers["Message-ID"] == msg_id
    assert "mx.example.test" in str(headers.get_all("Received")[0])
    (report,) = relay.wait_report()
    (block,) = status_blocks(report)
    assert block["Final-Recipient"] == "rfc822; nobody@postfix.test" and block["Status"] == "5.1.1"
    assert "RCPT TO" in block["Diagnostic-Code"]
    relay.wait_queue_empty()


# -- deferred, then delivered -----------------------------------------------------------


def test_a_destination_that_is_down_gets_the_mail_on_a_retry(
        gannet: Callable[..., peers.GannetProcess], dns: peers.DnsServer,
        smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    relay = Relay(gannet, dns, port, retry=["2s"])
    relay.send("bob@sink.test")
    deferred = peers.wait_for(lambda: relay.log_lines("status=deferred") or None, 20, "a deferral")
    assert "to=<bob@sink.test>" in deferred[0] and "Connection refused" in deferred[0], deferred[0]
    (queued,) = relay.queue()
    (rcpt,) = queued["recipients"]
    assert rcpt["state"] == "deferred" and "refused" in rcpt["last_error"].lower(), rcpt
    sink = smtp_sink(listen=f"{peers.SINK_HOST}:{port}")
    sink.wait_count(1, timeout=30)
    relay.wait_queue_empty()
    assert relay.log_lines("status=sent")


@pytest.mark.parametrize("primary", ["temporary refusal", "connection refused"])
def test_the_next_mx_is_tried_before_deferring(primary: str, gannet: Callable[..., peers.GannetProcess],
                                               dns: peers.DnsServer,
                                               smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    if primary == "temporary refusal":  # mx1 answers 4xx to every RCPT; mx2 takes the mail
        smtp_sink(listen=f"{peers.SINK_HOST}:{port}", extra_args=["-r", "rcpt"])
        domain = "two.test"
    else:  # the first MX (mx.dead.test) refuses the connection
        domain = "backup.test"
    backup = smtp_sink(listen=f"127.0.0.6:{port}")
    relay = Relay(gannet, dns, port)
    relay.send(f"bob@{domain}")
    backup.wait_count(1, timeout=30)
    relay.wait_queue_empty()
    (line,) = [ln for ln in relay.log_lines(f"to=<bob@{domain}>") if "status=" in ln]
    assert "status=sent" in line and f"relay=mx2.two.test[127.0.0.6]:{port}" in line, line


# -- refusals at each stage ---------------------------------------------------------------

STAGES = ["mail", "rcpt", "data", "."]


@pytest.mark.parametrize("stage", STAGES)
def test_a_permanent_refusal_bounces_to_the_sender(stage: str, gannet: Callable[..., peers.GannetProcess],
                                                   dns: peers.DnsServer,
                                                   smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    smtp_sink(listen=f"{peers.SINK_HOST}:{port}", extra_args=["-f", stage])
    relay = Relay(gannet, dns, port)
    msg_id = relay.send("bob@sink.test", rcpt_options=("ORCPT=rfc822;Bob@sink.test",))
    (report,) = relay.wait_report()
    relay.wait_queue_empty()
    assert report["From"].addresses[0].username == "MAILER-DAEMON"
    assert report.get_param("report-type") == "delivery-status"
    (block,) = status_blocks(report)
    assert block["Final-Recipient"] == "rfc822; bob@sink.test"
    assert block["Original-Recipient"].replace(" ", "") == "rfc822;Bob@sink.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.3.0"  # smtp-sink's hard reply: "500 5.3.0 Error: command failed"
    assert block["Remote-MTA"] == "dns; mx.sink.test"
    command = {"mail": "MAIL FROM", "rcpt": "RCPT TO", "data": "DATA", ".": "end of data"}[stage]
    assert block["Diagnostic-Code"].startswith("smtp; 500 5.3.0"), block["Diagnostic-Code"]
    assert command.lower() in " ".join(block["Diagnostic-Code"].split()).lower(), block["Diagnostic-Code"]
    returned = ("message/rfc822", "text/rfc822-headers")
    original = [p for p in report.walk() if p.get_content_type() in returned]
    assert original and msg_id in original[0].as_string()
    bounced = relay.log_lines("status=bounced")
    assert len(bounced) == 1 and "dsn=5.3.0" in bounced[0], bounced


@pytest.mark.parametrize("stage", STAGES)
def test_a_temporary_refusal_is_retried(stage: str, gannet: Callable[..., peers.GannetProcess],
                                        dns: peers.DnsServer,
                                        smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    sink = smtp_sink(listen=f"{peers.SINK_HOST}:{port}", extra_args=["-r", stage])
    relay = Relay(gannet, dns, port, retry=["1s"])
    relay.send("bob@sink.test")
    peers.wait_for(lambda: len(relay.log_lines("status=deferred")) >= 2, 30, "two deferrals (a retry)")
    (queued,) = relay.queue()
    assert queued["recipients"][0]["last_error"].startswith("450 4.3.0"), queued
    assert relay.reports() == []  # no bounce for a temporary failure
    sink.stop()
    smtp_sink(listen=f"{peers.SINK_HOST}:{port}").wait_count(1, timeout=30)
    relay.wait_queue_empty()


# -- DNS answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("domain", "status"), [
    ("nullmx.test", "5.1.10"), ("nosuchdomain.test", "5.1.2"), ("loop.test", "5.4.6"),
])
def test_a_domain_that_takes_no_mail_bounces_at_once(domain: str, status: str,
                                                      gannet: Callable[..., peers.GannetProcess],
                                                      dns: peers.DnsServer) -> None:
    relay = Relay(gannet, dns, common_port())
    relay.send(f"bob@{domain}")
    (report,) = relay.wait_report()
    (block,) = status_blocks(report)
    assert block["Status"] == status and block["Action"] == "failed"
    relay.wait_queue_empty()


def test_a_dns_server_failure_defers(gannet: Callable[..., peers.GannetProcess],
                                     dns_server: Callable[..., peers.DnsServer]) -> None:
    dns = dns_server(records=records(), servfail=["broken.test"])
    relay = Relay(gannet, dns, common_port())
    relay.send("bob@broken.test")
    deferred = peers.wait_for(lambda: relay.log_lines("status=deferred") or None, 30, "a deferral")
    assert "dsn=4.4.3" in deferred[0], deferred[0]
    assert relay.reports() == []


# -- expiry, delay warnings, success reports ----------------------------------------------------


def test_mail_older_than_give_up_after_bounces_with_4_4_7(gannet: Callable[..., peers.GannetProcess],
                                                         dns: peers.DnsServer) -> None:
    relay = Relay(gannet, dns, common_port(), retry=["1h"], give_up_after="3s")
    relay.send("bob@dead.test")  # nothing listens on mx.dead.test: refused, next try in an hour
    peers.wait_for(lambda: relay.log_lines("status=deferred") or None, 20, "a deferral")
    (report,) = relay.wait_report(timeout=30)  # the sweep, not the (hour-long) retry, ends it
    (block,) = status_blocks(report)
    assert block["Status"] == "4.4.7" and block["Action"] == "failed"
    relay.wait_queue_empty()


def test_a_delay_warning_is_sent_once(gannet: Callable[..., peers.GannetProcess],
                                     dns: peers.DnsServer) -> None:
    relay = Relay(gannet, dns, common_port(), retry=["1s"], warn_after="1s")
    relay.send("bob@dead.test")
    (report,) = relay.wait_report(timeout=30)
    (block,) = status_blocks(report)
    assert block["Action"] == "delayed" and block["Status"].startswith("4.")
    assert block["Will-Retry-Until"]
    peers.wait_for(lambda: len(relay.log_lines("status=deferred")) >= 4, 30, "more deferrals")
    assert len(relay.reports()) == 1


def test_notify_success_to_a_next_hop_without_dsn_gets_a_relayed_report(
        gannet: Callable[..., peers.GannetProcess], dns: peers.DnsServer,
        smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    smtp_sink(listen=f"{peers.SINK_HOST}:{port}", extra_args=["-N"])  # no DSN extension
    relay = Relay(gannet, dns, port)
    relay.send("bob@sink.test", rcpt_options=("NOTIFY=SUCCESS",))
    (report,) = relay.wait_report()
    (block,) = status_blocks(report)
    assert block["Action"] == "relayed" and block["Status"].startswith("2.")


def test_notify_never_suppresses_the_bounce(gannet: Callable[..., peers.GannetProcess], dns: peers.DnsServer,
                                            smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    smtp_sink(listen=f"{peers.SINK_HOST}:{port}", extra_args=["-f", "rcpt"])
    relay = Relay(gannet, dns, port)
    relay.send("bob@sink.test", rcpt_options=("NOTIFY=NEVER",))
    peers.wait_for(lambda: relay.log_lines("status=bounced") or None, 30, "the bounce")
    relay.wait_queue_empty()
    time.sleep(1)  # a report would be enqueued with the outcome, in the same commit
    assert relay.reports() == [] and relay.queue() == []


def test_a_bounce_that_cannot_be_delivered_goes_to_postmaster_once(
        gannet: Callable[..., peers.GannetProcess], dns: peers.DnsServer,
        smtp_sink: Callable[..., peers.SmtpSink]) -> None:
    port = common_port()
    smtp_sink(listen=f"{peers.SINK_HOST}:{port}", extra_args=["-f", "rcpt"])
    relay = Relay(gannet, dns, port)
    relay.send("bob@sink.test", sender="someone@sink.test")  # its bounce goes to sink.test: refused too
    # postmaster@example.test is an alias of alice: she gets the double bounce, and nothing loops.
    (report,) = relay.wait_report(address=SENDER, timeout=30)
    (block,) = status_blocks(report)
    assert block["Final-Recipient"] == "rfc822; someone@sink.test"
    relay.wait_queue_empty()
    assert len(relay.log_lines("status=bounced")) == 2
