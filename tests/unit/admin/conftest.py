"""Fixtures for the admin unit tests: metrics in a registry of the test's own, a
real SQLite store in the test's directory, and the admin app served by aiohttp's
test server on loopback (a real HTTP client and server; nothing is faked but the
delivery worker's wake-up, which is counted)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gannet import metrics
from gannet.admin import prometheus
from gannet.admin.api import AdminApi
from gannet.admin.http import build_app
from gannet.admin.sampler import QueueStatsCache, Sampler
from gannet.clock import SystemClock
from gannet.queue.ids import new_queue_id
from gannet.queue.model import InlineBody, NewMessage, NewRecipient, Transport
from gannet.queue.sqlite import SqliteStore

TOKEN = "s3cret-token-for-the-tests-0123456789"


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    r = CollectorRegistry()
    metrics.configure(["example.test"], registry=r)
    yield r
    metrics.disable()


def new_message(
    *addresses: str, sender: str = "someone@elsewhere.test", received_at: float, message_id: str = ""
) -> NewMessage:
    recipients = tuple(
        NewRecipient(a, Transport.SMTP, a.rpartition("@")[2].lower()) for a in addresses or ("bob@far.test",)
    )
    body = f"Message-ID: {message_id or '<x@y>'}\r\nSubject: hello\r\n\r\nbody\r\n".encode()
    return NewMessage(
        new_queue_id(),
        sender,
        recipients,
        InlineBody(body),
        received_at,
        client="helo [127.0.0.1]:1234",
        message_id=message_id,
    )


@dataclass
class AdminEnv:
    store: SqliteStore
    api: AdminApi
    client: TestClient  # type: ignore[type-arg]
    wakes: list[int] = field(default_factory=list)


@pytest.fixture
async def make_admin(store: SqliteStore, registry: CollectorRegistry) -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient] = []  # type: ignore[type-arg]

    async def make(token: str | None = None) -> AdminEnv:
        clock = SystemClock()
        cache = QueueStatsCache(store, clock)
        sampler = Sampler(cache, clock)
        wakes: list[int] = []
        api = AdminApi(
            store,
            clock,
            cache,
            sampler,
            wake_delivery=lambda: wakes.append(1),
            started_at=clock.now(),
            hostname="mx.example.test",
        )

        async def text() -> bytes:
            return prometheus.render(await cache.get(), clock.now())

        app = build_app(api, token=token, metrics_text=text)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return AdminEnv(store, api, client, wakes)

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
async def admin(make_admin: Callable[..., Any]) -> AdminEnv:
    env: AdminEnv = await make_admin()
    return env
