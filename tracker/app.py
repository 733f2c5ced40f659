"""create_app(settings): Starlette routes and the lifespan that owns every resource.

The only module that names the concrete pieces: RedisBroker, the custody extension, the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from . import store
from .auth import TokenVerifier, new_secret
from .config import Settings
from .custody import alerts_http, report, thresholds
from .custody import http as custody_http
from .custody.extension import CustodyExtension, custody_key, migrations
from .embedded import Embedded
from .eta.service import EtaService
from .hub import Hub
from .looplag import LoopLag
from .node import Node
from .protocol.resume import ResumeTokens
from .protocol.resume import derive_key as derive_resume_key
from .redis_broker import RedisBroker, default_instance_id
from .share import http as share_http
from .share.service import ShareService
from .share.store import migrations as share_migrations
from .tiles import http as tiles_http
from .tiles.archive import open_archive
from .transport import http as http_api
from .transport.admission import Admission
from .transport.endpoints import driver_endpoint, live_endpoint
from .transport.exports import driver_trail_file
from .transport.keepalive import Keepalive
from .transport.upload import driver_events
from .webhooks import http as webhooks_http
from .webhooks.service import Webhooks
from .webhooks.store import migrations as webhook_migrations

log = logging.getLogger("tracker")

HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:{tiles}; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class SecurityHeaders:
    """Security headers on every HTTP response (the dashboard page above all)."""

    def __init__(self, app: ASGIApp, tile_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        tiles = "".join(f" {origin}" for origin in tile_origins)  # exactly the configured tile origin(s)
        self.headers = [
            (b"content-security-policy", CSP.format(tiles=tiles).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                own = {name.lower() for name, _ in headers}  # a page with a stricter policy keeps its own
                message["headers"] = headers + [h for h in self.headers if h[0] not in own]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def jwt_secret(settings: Settings) -> str:
    """The configured HS256 secret, or one generated once for the data folder: development only (no
    DATABASE_URL); a deployment without TRACKER_JWT_SECRET is a ConfigError (Settings.check)."""
    if settings.jwt_secret:
        return settings.jwt_secret
    settings.check()  # with DATABASE_URL (a deployment) the secret is required: never a file
    path = settings.data_dir.expanduser() / "jwt-secret"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    path.write_text(secret + "\n")
    path.chmod(0o600)
    log.info("no TRACKER_JWT_SECRET: generated one in %s (the start banner says how to mint tokens)", path)
    return secret


def make_resume_tokens(settings: Settings) -> ResumeTokens | None:
    """Resume tokens' signer, or None (resumption off): TRACKER_RESUME_KEY, else with HS256 a key
    derived from the JWT secret; with RS256/ES256 and no key, off (instances share no secret)."""
    if settings.resume_ttl_s <= 0:
        return None
    if settings.resume_key:
        return ResumeTokens(settings.resume_key.encode(), settings.resume_ttl_s)
    if settings.jwt_alg == "HS256":
        return ResumeTokens(derive_resume_key(jwt_secret(settings)), settings.resume_ttl_s)
    return None


def make_verifier(settings: Settings) -> TokenVerifier:
    if settings.jwt_alg == "HS256":
        return TokenVerifier(
            alg="HS256", secret=jwt_secret(settings), leeway_s=settings.jwt_leeway_s, max_ttl_s=settings.jwt_max_ttl_s
        )
    return TokenVerifier(
        alg=settings.jwt_alg,
        public_key=settings.jwt_public_key,
        leeway_s=settings.jwt_leeway_s,
        max_ttl_s=settings.jwt_max_ttl_s,
    )


async def connect_postgres(url: str, settings: Settings, *, wait_s: float = 60.0) -> asyncpg.Pool:
    """A pool, waiting up to `wait_s` for PostgreSQL to come up (containers start in any order)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            return await asyncpg.create_pool(
                url, min_size=2, max_size=settings.pg_pool_size, command_timeout=15, timeout=5, reset=_reset
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("waiting for PostgreSQL: %s", exc)
            await asyncio.sleep(1.0)


async def _reset(conn: asyncpg.Connection) -> None:
    """Pool release hook. asyncpg's default costs a round trip per release (RESET ALL, UNLISTEN,
    advisory unlock...); we use none of those session features, only transactions."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def extension_migrations() -> list[store.Migration]:
    """The migrations beside the core's: the custody extension's, the share room's, the webhooks'."""
    return [*migrations(), *share_migrations(), *webhook_migrations()]


async def migrate(pool: asyncpg.Pool) -> int:
    """The core's schema and the extensions', in version order (tracker migrate, startup)."""
    return await store.migrate(pool, extension_migrations())


def create_app(settings: Settings) -> Starlette:
    verifier = make_verifier(settings)
    archive_path = settings.tiles_archive()
    tiles = open_archive(archive_path) if archive_path else None  # ConfigError: which file, and why not

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        embedded = Embedded(settings.data_dir)
        try:
            db_url = settings.database_url or embedded.postgres_url()
            redis_url = settings.redis_url or embedded.redis_url()
            pool = await connect_postgres(db_url, settings)
            try:
                await migrate(pool)
                broker = RedisBroker(
                    redis_url,
                    instance_id=settings.instance_id or default_instance_id(),
                    presence_ttl_s=settings.presence_ttl_s,
                    window_ms=settings.live_window_ms,
                )
                hub = Hub(
                    flush_ms=settings.live_flush_ms,
                    backlog=settings.dashboard_backlog,
                    queue_max=settings.dashboard_queue_max,
                )
                node = Node(settings, pool, broker, hub)
                webhooks = Webhooks(pool, settings)
                custody = CustodyExtension(node, custody_key(settings), outbox=webhooks.outbox)
                node.register(custody)
                node.start()
                webhooks.start()
                loop_lag = LoopLag(node, probe_every_s=settings.ready_probe_s).start()
                app.state.node = node
                app.state.custody = custody.layer
                app.state.eta = EtaService(pool, settings)
                app.state.share = ShareService(
                    pool, broker, custody.layer.stamps, app.state.eta, settings, draining=lambda: node.draining
                )
                app.state.webhooks = webhooks
                log.info(
                    "tracker ready: instance %s, PostgreSQL %s, Redis %s",
                    broker.instance_id,
                    "embedded" if not settings.database_url else "external",
                    "embedded" if not settings.redis_url else "external",
                )
                try:
                    yield {}
                finally:
                    if not node.draining:
                        await node.drain()
                    await loop_lag.stop()
                    await webhooks.close()
                    await node.close()
            finally:
                await pool.close()
        finally:
            embedded.close()
            if tiles is not None:
                tiles.close()

    routes = [
        Route("/", http_api.index),
        Route("/healthz", http_api.healthz),
        Route("/readyz", http_api.readyz),
        Route("/metrics", http_api.metrics_endpoint),
        Route("/v1/config", http_api.config_endpoint),
        Route("/v1/drivers", http_api.list_drivers),
        Route("/v1/drivers/{driver}/trail", http_api.driver_trail),
        Route("/v1/drivers/{driver}/trail.{fmt}", driver_trail_file),
        *share_http.routes(),
        *report.routes(),
        *custody_http.routes(),
        *thresholds.routes(),
        *alerts_http.routes(),
        *webhooks_http.routes(),
        *tiles_http.routes(tiles),
        Route("/v1/driver/events", driver_events, methods=["POST"]),
        WebSocketRoute("/v1/driver", driver_endpoint),
        WebSocketRoute("/v1/live", live_endpoint),
        Mount("/static", StaticFiles(directory=Path(__file__).parent / "static", check_dir=False), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return http_api.error_response(404, "not_found", "no such resource")

    async def http_error(request: Request, exc: Exception) -> Response:
        # Any other HTTPException Starlette raises (405 above all) is JSON too, never plain text.
        status = getattr(exc, "status_code", 400)
        response = http_api.error_response(status, HTTP_CODES.get(status, "invalid"), str(getattr(exc, "detail", "")))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return http_api.error_response(500, "internal", "internal error")

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(SecurityHeaders, tile_origins=settings.tile_origins())],
        exception_handlers={HTTPException: http_error, 404: not_found, 500: server_error},
    )
    app.state.verifier = verifier
    app.state.resume_tokens = make_resume_tokens(settings)
    app.state.admission = Admission(settings)
    app.state.keepalive = Keepalive(settings.ping_interval_s, settings.ping_timeout_s)
    app.state.settings = settings
    app.state.tiles = tiles
    app.state.tile_config = tiles_http.page_config(settings, tiles)
    return app


def asgi(app: Starlette) -> ASGIApp:
    """The ASGI entry point: the two websocket endpoints get the server's own `send` (no middleware
    wraps it), so wsio can write frames straight into the connection; all else goes to Starlette."""
    sockets = {"/v1/driver": driver_endpoint, "/v1/live": live_endpoint}

    async def entry(scope: Scope, receive: Receive, send: Send) -> None:
        handler = sockets.get(scope["path"]) if scope["type"] == "websocket" else None
        if handler is None:
            if scope["type"] == "websocket":
                await _no_such_socket(scope, send)
                return
            await app(scope, receive, send)
            return
        scope["app"] = app
        await handler(WebSocket(scope, receive, send))

    return entry


async def _no_such_socket(scope: Scope, send: Send) -> None:
    """A websocket handshake to a path that has none: 404 with the JSON error body where the server
    can answer the handshake with a response (uvicorn can), else a plain refusal."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1000})
        return
    body = http_api.error_response(404, "not_found", "no websocket at this path").body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": 404, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": bytes(body)})
