"""The admin server of a real `gannet serve`: /metrics parsed with prometheus_client's
parser matches what smtplib sent (counted across the server and its delivery
worker), the JSON API acts on a really deferred message, and a token file
really locks the API."""

from __future__ import annotations

import json
import smtplib
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import peers
import pytest
from prometheus_client.parser import text_string_to_metric_families

N = 5


def admin_url(g: peers.GannetProcess) -> str:
    host, port = peers.split_address(g.config["admin"]["address"])
    peers.wait_port(host, port, 15)
    return f"http://{host}:{port}"


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        body, status, kind = exc.read().decode(), exc.code, exc.headers.get("Content-Type", "")
    return status, json.loads(body) if kind.startswith("application/json") else body


def scrape(base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, text = http(base + "/metrics")
    assert status == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


Scrape = dict[str, list[tuple[dict[str, str], float]]]


def scrape_until(base: str, ready: Callable[[Scrape], bool], what: str) -> Scrape:
    def attempt() -> Scrape | None:
        found = scrape(base)
        return found if ready(found) else None

    result: Scrape = peers.wait_for(attempt, 15, f"{what} in /metrics")
    return result


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lb, v in found.get(name, []) if all(lb.get(k) == want for k, want in labels.items()))


def mail(sender: str, to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content("hello\n")
    return msg


def test_metrics_count_what_was_sent(gannet: Callable[..., peers.GannetProcess]) -> None:
    g = gannet()
    base = admin_url(g)
    host, port = g.address("mx")
    listener = g.target("mx")
    before = scrape(base)  # GannetProcess's readiness probe was a session already
    for i in range(N):
        with smtplib.SMTP(host, port) as s:
            s.send_message(mail("someone@elsewhere.test", "alice@example.test", f"m{i}"))
    with smtplib.SMTP(host, port) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.send_message(mail("someone@elsewhere.test", "nobody@example.test", "refused"))
        s.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.auth("PLAIN", lambda challenge=None: "\0alice@example.test\0wrong")
    peers.wait_for(
        lambda: len(g.delivered("alice@example.test")) == N, 30, f"{N} messages in alice's Maildir"
    )
    # the worker counts a delivery just after writing the file: wait for the count, not a time
    found = scrape_until(
        base, lambda m: total(m, "gannet_messages_delivered_total") == N, "the worker's counts"
    )
    assert total(found, "gannet_messages_received_total", listener=listener, domain="example.test") == N
    assert total(found, "gannet_messages_delivered_total", domain="example.test") == N
    assert total(found, "gannet_messages_deferred_total") == 0
    assert total(found, "gannet_messages_bounced_total") == 0
    assert total(found, "gannet_delivery_latency_seconds_count") == N
    assert total(found, "gannet_smtp_rejections_total", listener=listener, stage="rcpt") == 1
    assert total(found, "gannet_auth_failures_total", listener=listener, mechanism="PLAIN") == 1
    sessions = total(found, "gannet_sessions_total", listener=listener, tls="no")
    assert sessions - total(before, "gannet_sessions_total", listener=listener, tls="no") == N + 1
    assert total(found, "gannet_sessions_open") == 0
    # All-local mail goes into the Maildir before the 250 ([delivery] local_direct):
    # the queue commits only its traces, without fsync, up to 0.2 s later.
    commits = "gannet_store_commit_seconds_count"
    scrape_until(base, lambda m: total(m, commits, sync="nosync") >= 1, "the traces' commit")
    queue = scrape_until(base, lambda m: total(m, "gannet_queue_messages") == 0, "an empty queue")
    assert {lb["state"]: v for lb, v in queue["gannet_queue_recipients"]} == dict.fromkeys(
        ("queued", "delivering", "deferred", "held", "quarantined"), 0.0
    )
    status, stats = http(base + "/api/stats")
    assert status == 200
    assert stats["totals"]["received"] == N and stats["totals"]["delivered"] == N
    status, events = http(base + "/api/events")
    assert events["auth_failures"][0]["detail"] == "alice@example.test"
    assert "nobody@example.test" in events["refused"][0]["detail"]


def test_the_api_retries_holds_and_deletes_a_deferred_message(
    gannet: Callable[..., peers.GannetProcess],
) -> None:
    closed = peers.free_port("127.0.0.1")  # nothing listens there: every attempt is refused
    g = gannet(relay={"smarthost": f"127.0.0.1:{closed}"})
    base = admin_url(g)
    host, port = g.address("mx")
    with smtplib.SMTP(host, port) as s:  # 127.0.0.1 is a trusted network in the base config
        s.send_message(mail("alice@example.test", "carol@far.test", "to a dead smarthost"))

    def deferred() -> dict[str, Any] | None:
        _, body = http(base + "/api/messages?state=deferred")
        return body["messages"][0] if body["messages"] else None

    message = peers.wait_for(deferred, 30, "a deferred message")
    queue_id = message["id"]
    first = message["recipients"][0]
    assert first["attempts"] >= 1 and first["last_error"]
    _, reasons = http(base + "/api/deferrals")
    assert reasons["deferrals"][0]["domain"] == "far.test"

    status, body = http(f"{base}/api/messages/{queue_id}/retry", "POST")
    assert status == 200 and body["recipients"] == 1

    def tried_again() -> dict[str, Any] | None:
        _, shown = http(f"{base}/api/messages/{queue_id}")
        r = shown["recipients"][0]
        changed = r["state"] == "deferred" and (r["attempts"], r["next_attempt"]) != (
            first["attempts"],
            first["next_attempt"],
        )
        return shown if changed else None

    shown = peers.wait_for(tried_again, 30, "the retried recipient deferred again")
    assert [e["event"] for e in shown["history"]].count("retry") == 1
    _, trace = http(f"{base}/api/trace/{queue_id}")
    assert trace["events"][0]["event"] == "received"

    assert http(f"{base}/api/messages/{queue_id}/hold", "POST")[0] == 200
    assert http(f"{base}/api/messages?state=held")[1]["messages"][0]["id"] == queue_id
    assert http(f"{base}/api/messages/{queue_id}/release", "POST")[0] == 200
    assert http(f"{base}/api/messages/{queue_id}", "DELETE") == (200, {"id": queue_id, "deleted": True})
    status, gone = http(f"{base}/api/messages/{queue_id}")
    assert status == 404 and queue_id in gone["error"]
    assert http(f"{base}/api/messages/{queue_id}/retry", "POST")[0] == 404


def test_a_token_file_locks_the_api(gannet: Callable[..., peers.GannetProcess], tmp_path: Any) -> None:
    token = "a-long-enough-admin-token-1234"
    (tmp_path / "admin-token").write_text(token + "\n")
    g = gannet(admin={"token_file": str(tmp_path / "admin-token")})
    base = admin_url(g)
    for path in ("/api/stats", "/api/messages", "/metrics"):
        status, body = http(base + path)
        assert status == 401 and "bearer token" in body["error"], path
        assert http(base + path, token="wrong-token")[0] == 401
        assert http(base + path, token=token)[0] == 200
    assert http(base + "/api/openapi.json")[0] == 200
    assert "Gannet" in http(base + "/")[1]
