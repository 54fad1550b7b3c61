"""The admin HTTP API over real HTTP (aiohttp's test server on loopback) and a
real SQLite store: every route, its error paths (400, 401, 403, 404), and every
answer checked against the OpenAPI description it claims to follow."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from prometheus_client.parser import text_string_to_metric_families

from gannet import metrics
from gannet.admin.http import build_app, openapi_document
from gannet.queue.model import Deferred, RecipientOutcome

from .conftest import TOKEN, AdminEnv, new_message

DOC = openapi_document()


def check(path: str, method: str, status: int, body: Any) -> None:
    """The body matches the schema the description gives for this answer."""
    responses = DOC["paths"][path][method]["responses"]  # type: ignore[index]
    response = responses[str(status)]
    if "$ref" in response:
        response = DOC["components"]["responses"][response["$ref"].rpartition("/")[2]]  # type: ignore[index]
    schema = response["content"]["application/json"]["schema"]
    Draft202012Validator({**DOC, **schema}).validate(body)


async def get(env: AdminEnv, url: str, path: str, status: int = 200, **kw: Any) -> Any:
    response = await env.client.get(url, **kw)
    assert response.status == status, await response.text()
    body = await response.json()
    check(path, "get", status, body)
    return body


async def act(env: AdminEnv, method: str, url: str, path: str, status: int = 200, **kw: Any) -> Any:
    response = await env.client.request(method, url, **kw)
    assert response.status == status, await response.text()
    body = await response.json()
    check(path, method.lower(), status, body)
    return body


# -- the description ----------------------------------------------------------------------


def test_the_description_is_valid_openapi() -> None:
    validate_spec(DOC)  # type: ignore[arg-type]


async def test_every_route_is_described_and_every_description_is_a_route(admin: AdminEnv) -> None:
    app = admin.client.server.app  # type: ignore[union-attr]
    served = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if route.method == "HEAD" or path in ("/", "/static"):
            continue  # the dashboard's files, not the API
        served.add((path, route.method.lower()))
    described = {(p, m) for p, ops in DOC["paths"].items() for m in ops}  # type: ignore[union-attr]
    assert served == described


# -- the queue ------------------------------------------------------------------------------


async def test_list_filters_and_search(admin: AdminEnv) -> None:
    now = time.time()
    old = new_message(
        "bob@far.test", sender="alice@example.test", received_at=now - 7200, message_id="<m1@x>"
    )
    mid = new_message("carol@near.test", "dave@far.test", received_at=now - 600, message_id="<m2@x>")
    new = new_message("erin@near.test", sender="", received_at=now - 5)
    for m in (old, mid, new):
        await admin.store.enqueue(m)

    body = await get(admin, "/api/messages", "/api/messages")
    assert [m["id"] for m in body["messages"]] == [old.queue_id, mid.queue_id, new.queue_id]
    assert body["truncated"] is False
    first = body["messages"][0]
    assert first["sender"] == "alice@example.test" and first["held"] is False
    assert first["recipients"] == [
        {
            "address": "bob@far.test",
            "state": "queued",
            "attempts": 0,
            "next_attempt": first["recipients"][0]["next_attempt"],
            "last_error": None,
        }
    ]

    async def ids(query: str) -> list[str]:
        return [m["id"] for m in (await get(admin, f"/api/messages?{query}", "/api/messages"))["messages"]]

    assert await ids("sender=alice@example.test") == [old.queue_id]
    assert await ids("recipient=carol@near.test") == [mid.queue_id]
    assert await ids("domain=far.test") == [old.queue_id, mid.queue_id]
    assert await ids("older_than=1h") == [old.queue_id]
    assert await ids("older_than=5m&domain=near.test") == [mid.queue_id]
    assert await ids("state=deferred") == []
    await admin.store.hold(mid.queue_id, now)
    assert await ids("state=held") == [mid.queue_id]
    assert await ids(f"q={new.queue_id}") == [new.queue_id]
    assert await ids(f"q={new.queue_id.lower()}") == [new.queue_id]
    assert await ids("q=alice@example.test") == [old.queue_id]  # as sender
    assert await ids("q=dave@far.test") == [mid.queue_id]  # as recipient
    assert await ids("q=near.test") == [mid.queue_id, new.queue_id]  # a domain
    assert await ids(f"q={quote('<m2@x>')}") == [mid.queue_id]  # a Message-ID
    assert await ids("q=m1@x") == [old.queue_id]  # without its brackets
    assert await ids("q=nobody@nowhere.test") == []
    limited = await get(admin, "/api/messages?limit=2", "/api/messages")
    assert len(limited["messages"]) == 2 and limited["truncated"] is True


@pytest.mark.parametrize(
    "query, complaint",
    [
        ("state=lost", "state"),
        ("older_than=soon", "older_than"),
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
    ],
)
async def test_bad_list_parameters_are_400(admin: AdminEnv, query: str, complaint: str) -> None:
    body = await get(admin, f"/api/messages?{query}", "/api/messages", 400)
    assert body["error"].startswith(complaint)


async def test_show_a_message_with_headers_and_history(admin: AdminEnv) -> None:
    m = new_message("bob@far.test", received_at=time.time() - 30, message_id="<show@x>")
    await admin.store.enqueue(m)
    body = await get(admin, f"/api/messages/{m.queue_id}", "/api/messages/{id}")
    assert body["id"] == m.queue_id
    assert body["message_id"] == "<show@x>"
    assert "Subject: hello" in body["headers"] and "body" not in body["headers"]
    assert [h["event"] for h in body["history"]] == ["queued"]
    missing = await get(admin, "/api/messages/0000000000NONE", "/api/messages/{id}", 404)
    assert "0000000000NONE" in missing["error"]


async def test_retry_hold_release_delete(admin: AdminEnv) -> None:
    now = time.time()
    m = new_message("bob@far.test", received_at=now - 60)
    await admin.store.enqueue(m)
    (claim,) = await admin.store.claim_due(now, limit=10, lease_seconds=60, owner="test")
    r = claim.recipients[0]

    await admin.store.record(
        [RecipientOutcome(r.recipient_id, r.lease_token, Deferred("451 4.3.0 later", now + 3600), now)]
    )
    shown = await get(admin, f"/api/messages/{m.queue_id}", "/api/messages/{id}")
    assert shown["recipients"][0]["state"] == "deferred"
    assert shown["recipients"][0]["attempts"] == 1

    one = f"/api/messages/{m.queue_id}"
    body = await act(admin, "POST", one + "/retry", "/api/messages/{id}/retry")
    assert body == {"id": m.queue_id, "recipients": 1}
    assert len(admin.wakes) == 1  # the delivery worker is told at once
    after = await get(admin, one, "/api/messages/{id}")
    assert after["recipients"][0]["next_attempt"] <= shown["recipients"][0]["next_attempt"]

    assert await act(admin, "POST", one + "/hold", "/api/messages/{id}/hold") == {
        "id": m.queue_id,
        "held": True,
    }
    held = await get(admin, one, "/api/messages/{id}")
    assert held["held"] is True and held["recipients"][0]["state"] == "held"
    assert await act(admin, "POST", one + "/release", "/api/messages/{id}/release") == {
        "id": m.queue_id,
        "held": False,
    }
    assert len(admin.wakes) == 2
    all_ = await act(admin, "POST", "/api/queue/retry", "/api/queue/retry")
    assert all_ == {"recipients": 1}
    assert await act(admin, "DELETE", one, "/api/messages/{id}") == {"id": m.queue_id, "deleted": True}
    await get(admin, one, "/api/messages/{id}", 404)
    events = [
        e["event"] for e in (await get(admin, f"/api/trace/{m.queue_id}", "/api/trace/{key}"))["events"]
    ]
    assert events[0] == "received" and {"deferred", "retry", "held", "released", "deleted"} <= set(events)


@pytest.mark.parametrize(
    "method, suffix, path",
    [
        ("POST", "/retry", "/api/messages/{id}/retry"),
        ("POST", "/hold", "/api/messages/{id}/hold"),
        ("POST", "/release", "/api/messages/{id}/release"),
        ("DELETE", "", "/api/messages/{id}"),
    ],
)
async def test_actions_on_an_unknown_message_are_404(
    admin: AdminEnv, method: str, suffix: str, path: str
) -> None:
    body = await act(admin, method, f"/api/messages/0000000000NONE{suffix}", path, 404)
    assert "no message 0000000000NONE" in body["error"]
    assert admin.wakes == []


async def test_trace_by_queue_id_and_message_id(admin: AdminEnv) -> None:
    m = new_message("bob@far.test", received_at=time.time(), message_id="<trace-me@x>")
    await admin.store.enqueue(m)
    by_id = await get(admin, f"/api/trace/{m.queue_id}", "/api/trace/{key}")
    by_mid = await get(admin, f"/api/trace/{quote('<trace-me@x>', safe='')}", "/api/trace/{key}")
    assert by_id["events"] == by_mid["events"]
    assert by_id["events"][0]["event"] == "received" and by_id["events"][0]["queue_id"] == m.queue_id
    body = await get(admin, "/api/trace/nothing-like-this", "/api/trace/{key}", 404)
    assert "nothing-like-this" in body["error"]


# -- what the dashboard shows --------------------------------------------------------------------


async def test_stats_deferrals_events_and_series(admin: AdminEnv) -> None:
    now = time.time()
    for i in range(3):
        await admin.store.enqueue(new_message("x@slow.test", received_at=now - 100 - i))
    await admin.store.enqueue(new_message("y@example.test", received_at=now - 50))
    claims = await admin.store.claim_due(
        now,
        limit=10,
        lease_seconds=60,
        owner="test",
    )

    await admin.store.record(
        [
            RecipientOutcome(
                c.recipients[0].recipient_id,
                c.recipients[0].lease_token,
                Deferred("421 4.7.0 slow down", now + 600),
                now,
            )
            for c in claims
            if c.recipients[0].domain == "slow.test"
        ]
    )
    metrics.received("127.0.0.1:25", ["slow.test"] * 3 + ["example.test"])
    metrics.delivery_outcome("x@slow.test", "deferred", 1.0)
    metrics.delivery_outcome("y@example.test", "delivered", 0.5)
    metrics.auth_failed("127.0.0.1:587", "[192.0.2.7]:5555", "mallory\r\nforged", "PLAIN")
    metrics.rejected("127.0.0.1:25", "[192.0.2.8]:6666", "RCPT", "554 5.7.1 Relay access denied", "<a@b>")
    metrics.session_opened("127.0.0.1:25")

    stats = await get(admin, "/api/stats", "/api/stats")
    assert stats["hostname"] == "mx.example.test"
    assert stats["totals"] == {
        "received": 4,
        "delivered": 1,
        "deferred": 1,
        "bounced": 0,
        "auth_failures": 1,
        "refused": 1,
        "sessions": 0,
    }
    assert stats["sessions"]["open"] == 1
    assert stats["queue"]["messages"] == 4
    assert stats["queue"]["states"]["deferred"]["recipients"] == 3
    assert stats["queue"]["states"]["delivering"]["recipients"] == 1  # y@example.test is still leased
    assert stats["queue"]["states"]["deferred"]["oldest_age_seconds"] >= 100

    deferrals = await get(admin, "/api/deferrals", "/api/deferrals")
    assert deferrals["deferrals"] == [
        {
            "domain": "slow.test",
            "reason": "421 4.7.0 slow down",
            "recipients": 3,
            "oldest_age_seconds": deferrals["deferrals"][0]["oldest_age_seconds"],
        }
    ]
    events = await get(admin, "/api/events", "/api/events")
    assert events["auth_failures"][0]["client"] == "[192.0.2.7]:5555"
    assert events["auth_failures"][0]["detail"] == "mallory??forged"  # no forged lines on the page
    assert events["refused"][0]["detail"] == "RCPT <a@b>: 554 5.7.1 Relay access denied"

    series = await get(admin, "/api/series?minutes=5", "/api/series")
    assert len(series["points"]) == 5
    assert series["points"][-1]["received"] == 4 and series["points"][-1]["delivered"] == 1
    await get(admin, "/api/series?minutes=0", "/api/series", 400)
    await get(admin, "/api/deferrals?limit=1000", "/api/deferrals", 400)
    await get(admin, "/api/events?limit=-1", "/api/events", 400)


async def test_metrics_route_is_prometheus_text(admin: AdminEnv) -> None:
    await admin.store.enqueue(new_message("a@far.test", "b@far.test", received_at=time.time() - 5))
    metrics.received("127.0.0.1:25", ["far.test", "far.test"])
    response = await admin.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    received = families["gannet_messages_received"].samples
    assert [(s.labels, s.value) for s in received if s.name.endswith("_total")] == [
        ({"listener": "127.0.0.1:25", "domain": "far.test"}, 2.0)
    ]
    queued = {s.labels["state"]: s.value for s in families["gannet_queue_recipients"].samples}
    assert queued == {"queued": 2, "delivering": 0, "deferred": 0, "held": 0, "quarantined": 0}
    assert families["gannet_queue_messages"].samples[0].value == 1


# -- access ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/api/stats", "/api/messages", "/metrics", "/api/trace/x"])
async def test_with_a_token_every_api_route_needs_it(make_admin: Any, url: str) -> None:
    env = await make_admin(token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = await env.client.get(url, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="gannet"'
        body = await response.json()
        check("/api/stats", "get", 401, body)
    ok = await env.client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status in (200, 404)  # /api/trace/x: authorised, and nothing is known about x


async def test_with_a_token_actions_need_it_too(make_admin: Any) -> None:
    env = await make_admin(token=TOKEN)
    assert (await env.client.post("/api/queue/retry")).status == 401
    ok = await env.client.post("/api/queue/retry", headers={"Authorization": f"bearer {TOKEN}"})
    assert ok.status == 200


async def test_the_dashboard_and_the_description_need_no_token(make_admin: Any) -> None:
    env = await make_admin(token=TOKEN)
    index = await env.client.get("/")
    assert index.status == 200 and "<title>Gannet</title>" in await index.text()
    assert "script-src 'self'" in index.headers["Content-Security-Policy"]
    assert index.headers["X-Frame-Options"] == "DENY"
    for asset in ("app.js", "charts.js", "style.css", "gannet.svg"):
        assert (await env.client.get(f"/static/{asset}")).status == 200
    assert (await env.client.get("/api/openapi.json")).status == 200


async def test_without_a_token_only_loopback_host_names_are_answered(admin: AdminEnv) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 still sends its own name."""
    for host in ("evil.example", "evil.example:8025", "192.0.2.1"):
        response = await admin.client.get("/api/stats", headers={"Host": host})
        assert response.status == 403, host
    for host in ("localhost:8025", "127.0.0.1", "[::1]:8025"):
        assert (await admin.client.get("/api/stats", headers={"Host": host})).status == 200, host


async def test_cross_site_actions_are_refused(admin: AdminEnv) -> None:
    m = new_message("bob@far.test", received_at=time.time())
    await admin.store.enqueue(m)
    url = f"/api/messages/{m.queue_id}"
    refused = await admin.client.delete(url, headers={"Origin": "http://evil.example"})
    assert refused.status == 403
    assert "evil.example" in (await refused.json())["error"]
    await get(admin, url, "/api/messages/{id}")  # still there
    origin = f"http://{admin.client.host}:{admin.client.port}"
    assert (await admin.client.delete(url, headers={"Origin": origin})).status == 200


async def test_unknown_api_paths_are_json_404(admin: AdminEnv) -> None:
    response = await admin.client.get("/api/nothing")
    assert response.status == 404
    assert "error" in await response.json()
    wrong_method = await admin.client.put("/api/stats")
    assert wrong_method.status == 405 and "error" in await wrong_method.json()


def test_build_app_reads_its_files_once() -> None:
    """The description and the index page are package data, present in the installed package."""
    from gannet.admin.http import DASHBOARD, OPENAPI

    assert OPENAPI.is_file() and (DASHBOARD / "index.html").is_file()
    assert callable(build_app)


def test_the_schema_check_catches_a_wrong_answer() -> None:
    """`check` above is not vacuous: a body missing a required key, or with a wrong type, fails."""
    from jsonschema import ValidationError

    with pytest.raises(ValidationError):
        check("/api/messages", "get", 200, {"messages": []})
    with pytest.raises(ValidationError):
        check("/api/messages", "get", 200, {"messages": [{"id": 1}], "truncated": False})
    with pytest.raises(ValidationError):
        check("/api/stats", "get", 401, {"message": "no"})
