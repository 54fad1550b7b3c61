"""The JSON API's handlers: the queue (list, show, trace, retry, hold, release,
delete) and what the dashboard shows (stats, throughput series, deferral
reasons, recent auth failures and refusals). Routes and their shapes are in
openapi.json beside this file; http.py mounts them behind the token check.

Reads and acts on the queue only through QueueStore. After an action that
makes mail due (retry, release) it wakes the delivery worker, as an enqueue
does. Bad parameters are 400, an unknown message 404, a store that cannot
answer 503, each with a JSON body {"error": "..."}; never a traceback.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from gannet import metrics
from gannet.admin import json_views as jv
from gannet.admin.sampler import KEEP_MINUTES, QueueStatsCache, Sampler, waiting
from gannet.clock import Clock
from gannet.queue.ids import is_queue_id
from gannet.queue.model import NoSuchMessage, QueuedMessageView, QueueFilter, RecipientState
from gannet.queue.store import QueueStore

MAX_LIST = 1000
DEFAULT_LIST = 100
HEADER_LIMIT = 64 * 1024  # of a message's header block shown by `show`
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SHOWN_STATES = ("queued", "deferred", "delivering", "held", "quarantined")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def parse_duration(text: str, name: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ApiError(400, f'{name}: {text!r} is not a duration ("90s", "30m", "4h", "2d")')
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_int(query: Any, name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: {raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}: {value} is not between {lo} and {hi}")
    return value


class AdminApi:
    def __init__(
        self,
        store: QueueStore,
        clock: Clock,
        cache: QueueStatsCache,
        sampler: Sampler,
        *,
        wake_delivery: Callable[[], None] = lambda: None,
        started_at: float = 0.0,
        hostname: str = "",
    ) -> None:
        self.hostname = hostname
        self.store = store
        self.clock = clock
        self.cache = cache
        self.sampler = sampler
        self.wake_delivery = wake_delivery
        self.started_at = started_at

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/stats", self.stats),
            web.get("/api/series", self.series),
            web.get("/api/deferrals", self.deferrals),
            web.get("/api/events", self.events),
            web.get("/api/messages", self.list_messages),
            web.get("/api/messages/{id}", self.show),
            web.delete("/api/messages/{id}", self.delete),
            web.post("/api/messages/{id}/retry", self.retry),
            web.post("/api/messages/{id}/hold", self.hold),
            web.post("/api/messages/{id}/release", self.release),
            web.post("/api/queue/retry", self.retry_all),
            web.get("/api/trace/{key}", self.trace),
        ]

    # -- the dashboard's views ---------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        now = self.clock.now()
        totals = metrics.totals()
        sessions = metrics.labelled("gannet_sessions_total")
        tls = sum(v for labels, v in sessions if labels.get("tls") == "yes")
        plain = sum(v for labels, v in sessions if labels.get("tls") == "no")
        return json_response(
            {
                "hostname": self.hostname,
                "now": jv.iso(now),
                "started_at": jv.iso(self.started_at),
                "queue": jv.queue_stats(await self.cache.get(), now),
                "totals": {name: int(totals.get(sample, 0)) for name, sample in _TOTALS.items()},
                "sessions": {
                    "open": int(totals.get("gannet_sessions_open", 0)),
                    "ended_with_tls": int(tls),
                    "ended_without_tls": int(plain),
                },
            }
        )

    async def series(self, request: web.Request) -> web.Response:
        minutes = parse_int(request.query, "minutes", 60, 1, KEEP_MINUTES)
        # the current minute as of now, not as of the last tick (the queue scan is cached)
        self.sampler.sample_counters(waiting((await self.cache.get()).stats))
        points = self.sampler.throughput.series(self.clock.now(), minutes)
        return json_response({"minutes": minutes, "points": [jv.minute(at, m) for at, m in points]})

    async def deferrals(self, request: web.Request) -> web.Response:
        limit = parse_int(request.query, "limit", 10, 1, 100)
        now = self.clock.now()
        reasons = await self.store.deferral_reasons(limit)
        return json_response({"deferrals": [jv.deferral(r, now) for r in reasons]})

    async def events(self, request: web.Request) -> web.Response:
        limit = parse_int(request.query, "limit", 20, 1, metrics.RECENT)
        return json_response(
            {
                "auth_failures": [
                    jv.recent_event(e) for e in metrics.recent(metrics.EventKind.AUTH_FAILURE, limit)
                ],
                "refused": [jv.recent_event(e) for e in metrics.recent(metrics.EventKind.REFUSED, limit)],
            }
        )

    # -- the queue ----------------------------------------------------------------------------

    async def list_messages(self, request: web.Request) -> web.Response:
        q = request.query
        limit = parse_int(q, "limit", DEFAULT_LIST, 1, MAX_LIST)
        base = self._filter(q, limit + 1)
        search = q.get("q", "").strip()
        if search:
            views = await self._search(search, base)
        else:
            views = await self.store.list_messages(base)
        return json_response(
            {"messages": [jv.message(v) for v in views[:limit]], "truncated": len(views) > limit}
        )

    def _filter(self, q: Any, limit: int) -> QueueFilter:
        state = q.get("state") or None
        if state is not None and state not in SHOWN_STATES:
            raise ApiError(400, f"state: {state!r} is not one of {', '.join(SHOWN_STATES)}")
        older = q.get("older_than") or None
        return QueueFilter(
            sender=q.get("sender") or None,
            recipient=q.get("recipient") or None,
            domain=q.get("domain") or None,
            state=RecipientState(state) if state in ("queued", "deferred", "delivering") else None,
            held=True if state == "held" else None,
            quarantined=True if state == "quarantined" else None,
            older_than=self.clock.now() - parse_duration(older, "older_than") if older else None,
            limit=limit,
        )

    async def _search(self, text: str, base: QueueFilter) -> list[QueuedMessageView]:
        """One box for everything a postmaster pastes: a queue ID, an address (as
        sender or recipient), a Message-ID, or a domain."""
        found: dict[str, QueuedMessageView] = {}
        if is_queue_id(text.upper()):
            try:
                view = await self.store.get_message(text.upper())
                found[view.queue_id] = view
            except NoSuchMessage:
                pass
        if "@" in text and not text.startswith("<"):
            for f in (_with(base, sender=text), _with(base, recipient=text)):
                found.update((v.queue_id, v) for v in await self.store.list_messages(f))
        elif "@" not in text and "." in text:
            found.update((v.queue_id, v) for v in await self.store.list_messages(_with(base, domain=text)))
        if "@" in text:  # a Message-ID, with or without its angle brackets
            for queue_id in {e["queue_id"] for e in await self._trace_events(text)} - set(found):
                try:
                    found[queue_id] = await self.store.get_message(queue_id)
                except NoSuchMessage:
                    pass  # delivered and gone: the trace page still shows it
        return sorted(found.values(), key=lambda v: (v.received_at, v.queue_id))

    async def show(self, request: web.Request) -> web.Response:
        queue_id = request.match_info["id"]
        view = await self.store.get_message(queue_id)
        headers = await self._headers(queue_id)
        return json_response(jv.message_detail(view, headers))

    async def _headers(self, queue_id: str) -> str:
        path = await self.store.body_file(queue_id)
        if path is not None:
            head = await asyncio.get_running_loop().run_in_executor(None, _read_head, path)
        else:
            head = (await self.store.read_body(queue_id))[:HEADER_LIMIT]
        return head.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")

    async def trace(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        events = await self._trace_events(key)
        if not events:
            raise ApiError(404, f"no message {key} in the queue or its history")
        return json_response({"key": key, "events": events})

    async def _trace_events(self, key: str) -> list[dict[str, Any]]:
        trace = getattr(self.store, "trace", None)
        if trace is not None:
            return jv.trace_json(await trace(key))
        # A store without trace(): the message's own history while it is queued.
        try:
            view = await self.store.get_message(key)
        except NoSuchMessage:
            return []
        return [jv.history_entry(view.queue_id, h) for h in view.history]

    async def retry(self, request: web.Request) -> web.Response:
        queue_id = request.match_info["id"]
        n = await self.store.retry(queue_id, self.clock.now())
        self.wake_delivery()
        return json_response({"id": queue_id, "recipients": n})

    async def retry_all(self, request: web.Request) -> web.Response:
        n = await self.store.retry(None, self.clock.now())
        self.wake_delivery()
        return json_response({"recipients": n})

    async def hold(self, request: web.Request) -> web.Response:
        queue_id = request.match_info["id"]
        await self.store.hold(queue_id, self.clock.now())
        return json_response({"id": queue_id, "held": True})

    async def release(self, request: web.Request) -> web.Response:
        queue_id = request.match_info["id"]
        await self.store.release(queue_id, self.clock.now())
        self.wake_delivery()
        return json_response({"id": queue_id, "held": False})

    async def delete(self, request: web.Request) -> web.Response:
        queue_id = request.match_info["id"]
        await self.store.delete(queue_id, self.clock.now())
        return json_response({"id": queue_id, "deleted": True})


_TOTALS = {
    "received": "gannet_messages_received_total",
    "delivered": "gannet_messages_delivered_total",
    "deferred": "gannet_messages_deferred_total",
    "bounced": "gannet_messages_bounced_total",
    "auth_failures": "gannet_auth_failures_total",
    "refused": "gannet_smtp_rejections_total",
    "sessions": "gannet_sessions_total",
}


def _with(base: QueueFilter, **changes: Any) -> QueueFilter:
    return replace(base, **changes)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_LIMIT)
