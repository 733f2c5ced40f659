"""HTTP endpoints: health, metrics, drivers and trails, the dashboard page.

Every `/v1` call takes `Authorization: Bearer <jwt>` and applies the same scope as the live feed.
Errors are JSON: `{"error": {"code": ..., "message": ...}}`; no stack trace reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .. import store
from ..auth import AuthError, Principal, TokenVerifier
from ..clock import now_ms
from ..node import Node
from ..protocol.subscribe import Filter

log = logging.getLogger("tracker.http")

STATIC = Path(__file__).parent.parent / "static"
TRAIL_MAX_SPAN_MS = 7 * 86_400_000
TRAIL_DEFAULT_SPAN_MS = 4 * 3_600_000
TRAIL_MAX_POINTS = 5_000


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def json_object(request: Request, limit: int, *, empty_ok: bool = False) -> dict[str, Any]:
    """The request's body as a JSON object: 413 above `limit` bytes, 400 if it is not JSON or not
    an object (an empty body is `{}` when `empty_ok`)."""
    body = await request.body()
    if len(body) > limit:
        raise ApiError(413, "too_large", f"the body is limited to {limit} bytes")
    if empty_ok and not body.strip():
        return {}
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid", "the body is not JSON") from None
    if type(obj) is not dict:
        raise ApiError(400, "invalid", "the body must be a JSON object")
    return obj


def error_response(status: int, code: str, message: str) -> Response:
    return OrjsonResponse({"error": {"code": code, "message": message}}, status_code=status)


def principal_of(request: Request, *roles: str) -> Principal:
    verifier: TokenVerifier = request.app.state.verifier
    header = request.headers.get("authorization", "")
    if header[:7].lower() != "bearer ":
        raise ApiError(401, "unauthorized", "an Authorization: Bearer token is required")
    try:
        principal = verifier.verify(header[7:].strip())
    except AuthError as exc:
        raise ApiError(401, "unauthorized", str(exc)) from None
    if roles and principal.role not in roles:
        raise ApiError(403, "forbidden", f"role {principal.role} may not do this")
    return principal


Handler = Callable[[Request], Awaitable[Response]]


def api(handler: Handler) -> Handler:
    """Map ApiError and storage outages to JSON errors."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except asyncpg.DataError as exc:  # a value PostgreSQL cannot take (NUL in text, out of bigint range)
            log.info("%s %s: refused by PostgreSQL: %s", request.method, request.url.path, exc)
            return error_response(400, "invalid", "a value in the request is out of range or not storable")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError) as exc:
            log.warning("%s %s: storage unavailable: %s", request.method, request.url.path, exc)
            return error_response(503, "unavailable", "storage is unavailable; retry later")

    wrapped.__name__ = handler.__name__
    return wrapped


async def healthz(request: Request) -> Response:
    return OrjsonResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    node: Node = request.app.state.node
    checks: dict[str, bool] = {}
    try:
        async with node.pool.acquire(timeout=2) as conn:
            checks["postgres"] = await conn.fetchval("SELECT 1", timeout=2) == 1
    except Exception:
        checks["postgres"] = False
    checks["redis"] = await node.broker.ping()
    checks["subscriber"] = node.broker.receiving
    checks["writer"] = node.writer.healthy
    ok = all(checks.values()) and not node.draining
    return OrjsonResponse({"ready": ok, "checks": checks, "draining": node.draining}, status_code=200 if ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def config_endpoint(request: Request) -> Response:
    """The page's tile settings (tracker/tiles/http.py `page_config`, made once by create_app)."""
    return OrjsonResponse(request.app.state.tile_config)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@api
async def list_drivers(request: Request) -> Response:
    node: Node = request.app.state.node
    p = principal_of(request, "dispatcher", "client")
    visible, _, _ = await node.extension.snapshot_scope(_Scope(p))  # type: ignore[arg-type]
    names = await store.driver_names(node.pool, p.org)
    try:
        positions, live_names, online = await node.broker.live_state(p.org)
    except OSError:
        positions, live_names, online = {}, {}, set()
    if not positions:
        for row in await store.last_positions(node.pool, p.org):
            positions[row["driver_id"]] = (
                row["ts"],
                orjson.dumps(
                    {
                        "ts": row["ts"],
                        "lat": row["lat"],
                        "lon": row["lon"],
                        "spd": row["spd"],
                        "bat": row["bat"],
                        "seq": row["seq"],
                    }
                ),
            )
    out = []
    for driver in sorted(names.keys() | positions.keys()):
        if visible is not None and driver not in visible:
            continue
        entry: dict[str, Any] = {
            "driver": driver,
            "name": names.get(driver) or live_names.get(driver),
            "online": driver in online,
        }
        if driver in positions:
            last = orjson.loads(positions[driver][1])
            last.pop("type", None)
            last.pop("driver", None)
            entry["last"] = last
        out.append(entry)
    return OrjsonResponse({"drivers": out})


class _Scope:
    """Stand-in dashboard for scope checks made over HTTP (no filters, no carriers)."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.flt = Filter()
        self.carriers: set[str] = set()


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "invalid", f"{name}: must be an integer (ms since the Unix epoch)") from None


@api
async def driver_trail(request: Request) -> Response:
    node: Node = request.app.state.node
    p = principal_of(request, "dispatcher", "client")
    driver = request.path_params["driver"]
    now = now_ms()
    end = _int_param(request, "to", now)
    start = _int_param(request, "from", end - TRAIL_DEFAULT_SPAN_MS)
    if end <= start:
        raise ApiError(400, "invalid", "to must be after from")
    if end - start > TRAIL_MAX_SPAN_MS:
        raise ApiError(400, "invalid", "the span from..to is at most 7 days")
    windows: list[tuple[int, int]] | None = None
    if p.role == "client":
        windows = await node.extension.trail_windows(p, driver)
        if not windows:
            raise ApiError(404, "not_found", "no such driver in your scope")
    rows = await store.trail(node.pool, p.org, driver, start, end, TRAIL_MAX_POINTS * 20)
    if windows is not None:
        rows = [r for r in rows if any(a <= r["ts"] < b for a, b in windows)]
    downsampled = len(rows) > TRAIL_MAX_POINTS
    if downsampled:
        step = len(rows) / TRAIL_MAX_POINTS
        keep = [rows[int(i * step)] for i in range(TRAIL_MAX_POINTS - 1)] + [rows[-1]]
        rows = keep
    coords = [[r["lon"], r["lat"]] for r in rows]
    feature = {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": coords},
        "properties": {
            "driver": driver,
            "from": start,
            "to": end,
            "count": len(rows),
            "downsampled": downsampled,
            "ts": [r["ts"] for r in rows],
            "seq": [r["seq"] for r in rows],
            "spd": [r["spd"] for r in rows],
        },
    }
    return OrjsonResponse(feature, media_type="application/geo+json")
