"""The org's thresholds of the time-based alerts (custody/rules.py), over HTTP.

    GET /v1/alerts/thresholds          the org's thresholds (its overrides over the defaults)
    PUT /v1/alerts/thresholds          change some: {"data_gap_s": 600, ...}; null restores a default

Dispatchers only. Values are checked against `rules.LIMITS`; an unknown name is a 400.
"""

from __future__ import annotations

import math
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..clock import now_ms
from ..transport.http import ApiError, OrjsonResponse, api, json_object, principal_of
from . import rules
from .live import PackageLayer

BODY_MAX: Final = 4_096
GET: Final = "SELECT thresholds::text AS t FROM alert_thresholds WHERE org = $1"
GET_FOR_UPDATE: Final = "SELECT thresholds::text AS t FROM alert_thresholds WHERE org = $1 FOR UPDATE"
PUT: Final = """
INSERT INTO alert_thresholds (org, thresholds, updated_by, updated_at) VALUES ($1, $2::jsonb, $3, $4)
ON CONFLICT (org) DO UPDATE SET thresholds = EXCLUDED.thresholds, updated_by = EXCLUDED.updated_by,
    updated_at = EXCLUDED.updated_at
"""


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/alerts/thresholds", get_thresholds, methods=["GET"]),
        Route("/v1/alerts/thresholds", put_thresholds, methods=["PUT"]),
    ]


def _answer(layer: PackageLayer, overrides: dict[str, Any]) -> Response:
    defaults = layer.watch.defaults
    return OrjsonResponse(
        {"thresholds": defaults.merged(overrides).as_dict(), "defaults": defaults.as_dict(), "overrides": overrides}
    )


@api
async def get_thresholds(request: Request) -> Response:
    p = principal_of(request, "dispatcher")
    layer: PackageLayer = request.app.state.custody
    raw = await layer.core.pool.fetchval(GET, p.org)
    return _answer(layer, orjson.loads(raw) if raw else {})


@api
async def put_thresholds(request: Request) -> Response:
    p = principal_of(request, "dispatcher")
    layer: PackageLayer = request.app.state.custody
    changes = await json_object(request, BODY_MAX)
    for name, value in changes.items():
        if name not in rules.LIMITS:
            raise ApiError(400, "invalid", f"{name}: unknown; known: {', '.join(sorted(rules.LIMITS))}")
        lo, hi = rules.LIMITS[name]
        ok = isinstance(value, int | float) and type(value) is not bool and math.isfinite(value) and lo <= value <= hi
        if value is not None and not ok:
            raise ApiError(400, "invalid", f"{name}: a number from {lo:g} to {hi:g}, or null for the default")
    async with layer.core.pool.acquire() as conn, conn.transaction():
        raw = await conn.fetchval(GET_FOR_UPDATE, p.org)
        current: dict[str, Any] = orjson.loads(raw) if raw else {}
        for name, value in changes.items():
            if value is None:
                current.pop(name, None)
            else:
                current[name] = value
        await conn.execute(PUT, p.org, orjson.dumps(current).decode(), p.sub, now_ms())
    return _answer(layer, current)
