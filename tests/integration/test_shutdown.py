"""Running Gannet: what test_process.py does not already show.

- SIGTERM under load loses nothing: senders keep sending while the signal
  arrives; every message that got "250" is delivered after a restart, counted
  by Message-ID, none twice.
- A bad config on SIGHUP leaves the old one *in force* (not merely running):
  a domain the refused file adds is still refused.
- `--log-format json`: every line is one JSON object, and every kind of mail
  event (connect, reject, auth_failed, queued, sent, deferred, bounced,
  disconnect) comes out with an "event" key and its fields.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import threading
from collections import Counter
from collections.abc import Callable

import peers

Gannet = Callable[..., peers.GannetProcess]


def test_sigterm_under_load_loses_nothing(gannet: Gannet) -> None:
    g = gannet()
    host, port = g.address("mx")
    acked: list[str] = []
    attempted: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            message_id = f"<load-{n}-{i}@test>"
            try:
                with smtplib.SMTP(host, port, timeout=30) as s:
                    s.ehlo("load.test")
                    s.mail("load@elsewhere.test")
                    s.rcpt("alice@example.test")
                    with lock:
                        attempted.append(message_id)
                    code, _ = s.data(f"Message-ID: {message_id}\r\nSubject: load\r\n\r\n{'x' * 2000}\r\n")
            except (OSError, smtplib.SMTPException):
                if not g.running:
                    return  # refused: the server is gone
                continue  # 421 while shutting down, or a reset
            if code == 250:
                with lock:
                    acked.append(message_id)
                    if len(acked) >= 200:
                        enough.set()

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    assert enough.wait(60), "load reached 200 messages"
    os.kill(g.pid, signal.SIGTERM)
    assert g.proc is not None and g.proc.wait(40) == 0, "a graceful stop exits 0"
    stop.set()
    for t in threads:
        t.join(30)
    with lock:
        acknowledged = set(acked)
    assert len(acknowledged) >= 200

    g.start()
    peers.wait_progress(
        lambda: len(acknowledged & set(peers.message_ids(g.delivered("alice@example.test")))),
        len(acknowledged),
        stall=20,
        what="acknowledged messages delivered after the restart",
    )
    ids = Counter(peers.message_ids(g.delivered("alice@example.test")))
    assert acknowledged <= set(ids), "every 250 was delivered"
    assert set(ids) <= set(attempted), "nothing delivered that was never sent"
    assert [m for m, n in ids.items() if n > 1] == [], "nothing delivered twice"
    assert "stopping: no new connections" in g.log_text()


def test_a_refused_reload_leaves_the_old_config_in_force(gannet: Gannet) -> None:
    g = gannet(relay={"trusted_networks": ["127.0.0.9/32"]})  # 127.0.0.1 may not relay
    good = g.config_path.read_text()
    bad = good.replace('local_domains = ["example.test"]', 'local_domains = ["example.test", "new.test"]')
    assert bad != good
    g.config_path.write_text(bad + "\n[smtp]\nmax_errors = -1\n")
    os.kill(g.pid, signal.SIGHUP)
    peers.wait_for(lambda: "reload refused" in g.log_text(), 10, "the refusal in the log")
    assert "smtp.max_errors" in g.log_text(), "the log says which key"
    host, port = g.address("mx")
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("x@elsewhere.test")
        code, _ = s.rcpt("postmaster@new.test")
        assert code >= 500, "new.test came with the refused file: not a local domain"
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data("Subject: old config\r\n\r\nhi\r\n")[0] == 250
    peers.wait_for(lambda: g.delivered("alice@example.test"), 15, "delivery under the old config")
    assert g.running


def test_json_logs_cover_every_mail_event(gannet: Gannet) -> None:
    dead = f"{peers.SINK_HOST}:{peers.free_port(peers.SINK_HOST)}"
    g = gannet(
        start=False,
        relay={"smarthost": dead},
        delivery={"retry": ["1h"], "give_up_after": "3s", "sweep_interval": "1s"},
    )
    g.serve_args = ["--log-format", "json"]
    g.start()
    host, port = g.address("mx")
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo("client.test")
        try:
            s.login("alice@example.test", "wrong-password")
        except smtplib.SMTPAuthenticationError:
            pass
        s.mail("alice@example.test")
        assert s.rcpt("nobody@example.test")[0] == 550
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.rcpt("someone@remote.test")[0] == 250
        assert s.data("Subject: json\r\n\r\nhi\r\n")[0] == 250

    def events() -> list[dict[str, object]]:
        lines = [line for line in g.log_text().splitlines() if line.strip()]
        return [json.loads(line) for line in lines]  # every line is one JSON object

    wanted = {"connect", "auth_failed", "reject", "queued", "sent", "deferred", "bounced", "disconnect"}
    peers.wait_for(lambda: wanted <= {e.get("event") for e in events()}, 30, f"events {sorted(wanted)}")
    by_kind = {str(e["event"]): e for e in events() if "event" in e}
    assert {"connect from", "listener", "session"} <= set(by_kind["connect"])
    assert {"auth failed", "mechanism", "client"} <= set(by_kind["auth_failed"])
    assert by_kind["reject"]["to"] == "<nobody@example.test>" and "550" in str(by_kind["reject"]["reply"])
    assert {"queue_id", "from", "size", "nrcpt", "to", "client"} <= set(by_kind["queued"])
    sent = by_kind["sent"]
    assert sent["status"] == "sent" and sent["relay"] == "maildir" and sent["dsn"] == "2.0.0"
    assert by_kind["deferred"]["to"] == "<someone@remote.test>" and str(
        by_kind["deferred"]["dsn"]
    ).startswith("4.")
    assert by_kind["bounced"]["to"] == "<someone@remote.test>" and by_kind["bounced"]["dsn"] == "4.4.7"
    assert {"commands", "duration"} <= set(by_kind["disconnect"])
    for e in events():
        assert {"ts", "level", "logger", "msg"} <= set(e)
