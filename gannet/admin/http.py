"""The admin HTTP server of `gannet serve` (aiohttp): the JSON API (api.py),
/metrics (prometheus.py), the OpenAPI description and the dashboard's files.

Access rules (README "Admin API, metrics and dashboard"):
- With `[admin] token_file`, every /api/ route (but /api/openapi.json) and
  /metrics need `Authorization: Bearer TOKEN`; without it: 401 and a JSON error.
  The config refuses a non-loopback address without a token file.
- Without a token (loopback only), a request must name a loopback host in its
  Host header: a web page elsewhere cannot reach the API through DNS rebinding.
- A POST or DELETE whose Origin is not this server is refused (403): a web page
  the postmaster visits cannot retry or delete mail through their browser.
- The dashboard's files (/, /static/…) need nothing: they hold no data; the
  page asks for the token when the API answers 401.

Runs on the server's event loop; does nothing blocking on it (store calls are
the store's; files are read once at start).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from gannet.admin import prometheus
from gannet.admin.api import AdminApi, ApiError, json_response
from gannet.admin.sampler import QueueStatsCache, Sampler
from gannet.clock import Clock
from gannet.config import AdminConfig, ConfigError
from gannet.queue.model import NoSuchMessage, QueueError
from gannet.queue.store import QueueStore

log = logging.getLogger("gannet.admin")

HERE = Path(__file__).parent
DASHBOARD = HERE / "dashboard"
OPENAPI = HERE / "openapi.json"
PUBLIC = ("/api/openapi.json",)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def split_address(address: str) -> tuple[str, int]:
    """ "127.0.0.1:8025" / "[::1]:8025" → (host, port); checked by the config already."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    return path.read_text(encoding="utf-8").splitlines()[0].strip()


def _request_host(request: web.Request) -> str:
    host = request.headers.get("Host", "")
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


def _needs_token(path: str) -> bool:
    return (path.startswith("/api/") and path not in PUBLIC) or path == "/metrics"


def guard(token: str | None) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None and not is_loopback_host(_request_host(request)):
            return _error(403, "this admin server answers only requests for a loopback host name")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return _error(403, f"cross-site request from {origin} refused")
        if token is not None and _needs_token(request.path):
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                response = _error(401, "a bearer token is required: Authorization: Bearer TOKEN")
                response.headers["WWW-Authenticate"] = 'Bearer realm="gannet"'
                return response
        return await handler(request)

    return middleware


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message)
    except NoSuchMessage as exc:
        return _error(404, f"no message {exc} in the queue (delivered, bounced or deleted?)")
    except QueueError as exc:
        log.error("admin API: %s %s: %s", request.method, request.path, exc)
        return _error(503, f"the queue cannot answer now: {exc}")
    except web.HTTPException as exc:
        if exc.status >= 400 and (request.path.startswith("/api/") or request.path == "/metrics"):
            return _error(exc.status, exc.reason)
        raise
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


def build_app(
    api: AdminApi, *, token: str | None, metrics_text: Callable[[], Awaitable[bytes]]
) -> web.Application:
    app = web.Application(middlewares=[errors, guard(token)])
    app.add_routes(api.routes())
    openapi = OPENAPI.read_bytes()
    index = (DASHBOARD / "index.html").read_bytes()

    async def get_metrics(request: web.Request) -> web.Response:
        body = await metrics_text()
        return web.Response(body=body, headers={"Content-Type": prometheus.CONTENT_TYPE})

    async def get_openapi(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    async def get_index(request: web.Request) -> web.Response:
        return web.Response(body=index, content_type="text/html", charset="utf-8")

    app.add_routes(
        [
            web.get("/metrics", get_metrics),
            web.get("/api/openapi.json", get_openapi),
            web.get("/", get_index),
            web.static("/static", DASHBOARD, append_version=False),
        ]
    )
    return app


class AdminServer:
    """Started and stopped by runtime.Server with the listeners."""

    def __init__(
        self,
        config: AdminConfig,
        store: QueueStore,
        clock: Clock,
        *,
        wake_delivery: Callable[[], None] = lambda: None,
        hostname: str = "",
        config_file: Path | str = "",
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.store = store
        self.clock = clock
        self.cache = QueueStatsCache(store, clock)
        self.sampler = Sampler(self.cache, clock)
        self.api = AdminApi(
            store,
            clock,
            self.cache,
            self.sampler,
            wake_delivery=wake_delivery,
            started_at=clock.now(),
            hostname=hostname,
        )
        self._runner: web.AppRunner | None = None
        self._sampling: asyncio.Task[None] | None = None

    async def metrics_text(self) -> bytes:
        try:
            cached = await self.cache.get()
        except QueueError as exc:
            log.error("/metrics: queue statistics unavailable: %s", exc)
            cached = None
        return prometheus.render(cached, self.clock.now())

    async def start(self) -> None:
        host, port = split_address(self.config.address)
        app = build_app(self.api, token=read_token(self.config.token_file), metrics_text=self.metrics_text)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:  # the port is taken, the address is not ours: a config problem
            await runner.cleanup()
            raise ConfigError(
                self.config_file, "admin.address", f"cannot listen on {self.config.address}: {exc.strerror}"
            ) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._sampling = asyncio.create_task(self.sampler.run(), name="admin-sampler")
        log.info(
            "admin: dashboard, API and /metrics on http://%s/%s",
            self.config.address,
            " (bearer token required)" if self.config.token_file else "",
        )

    async def stop(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
            await asyncio.gather(self._sampling, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def openapi_document() -> dict[str, object]:
    """The OpenAPI description as data (for tests and tools)."""
    doc: dict[str, object] = json.loads(OPENAPI.read_text(encoding="utf-8"))
    return doc
