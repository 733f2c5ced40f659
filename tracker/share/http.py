"""The tracking links' routes and page.

POST   /v1/packages/{id}/share   make a link (a dispatcher, or the package's client admin)
DELETE /v1/packages/{id}/share   revoke the package's links
GET    /v1/share                 the view (Authorization: Bearer <link token>): polling
GET    /v1/share/events          the same as server-sent events: live
GET    /share                    the recipient's page (the token in the URL fragment)
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..clock import now_ms
from ..transport.http import ApiError, OrjsonResponse, api, principal_of
from . import store
from .service import STREAMS_PER_LINK, TOKEN_MAX, ShareService, digest

PAGE: Final = Path(__file__).parent.parent / "static" / "share.html"
# Stricter than the dashboard's: nothing but this origin's script, style and API; no images
# from anywhere but data: URIs, no forms, no frames, no base.
PAGE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
NO_STORE: Final = {"cache-control": "no-store"}


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/packages/{package:path}/share", create_link, methods=["POST"]),
        Route("/v1/packages/{package:path}/share", revoke_links, methods=["DELETE"]),
        Route("/v1/share", get_view, methods=["GET"]),
        Route("/v1/share/events", events, methods=["GET"]),
        Route("/share", page, methods=["GET"]),
    ]


def _service(request: Request) -> ShareService:
    service: ShareService = request.app.state.share
    return service


async def _scoped(request: Request) -> tuple[ShareService, str, str, str, str, int | None]:
    """(service, org, sub, package, state, state_ts) of a package the caller may share."""
    p = principal_of(request, "dispatcher", "client")
    service = _service(request)
    package = request.path_params["package"]
    row = await store.package(service.pool, p.org, package)
    if row is None or (p.role == "client" and (row["consigned_at"] is None or row["client"] != p.client)):
        raise ApiError(404, "not_found", "no such package")
    if row["consigned_at"] is None:
        raise ApiError(409, "conflict", "the package is not consigned: a link needs its destination")
    return service, p.org, p.sub, package, row["state"], row["state_ts"]


@api
async def create_link(request: Request) -> Response:
    service, org, sub, package, state, state_ts = await _scoped(request)
    now = now_ms()
    if state == "delivered" and state_ts is not None and state_ts + service.grace_ms <= now:
        raise ApiError(409, "conflict", "the package was delivered longer ago than a link lives")
    token, expires = await service.create(org, package, sub, now, state, state_ts)
    url = str(request.base_url) + "share#" + token
    return OrjsonResponse({"url": url, "expires_at": expires, "package": package}, status_code=201, headers=NO_STORE)


@api
async def revoke_links(request: Request) -> Response:
    service, org, _, package, _, _ = await _scoped(request)
    revoked = await service.revoke(org, package, now_ms())
    return OrjsonResponse({"package": package, "revoked": revoked})


def _link(request: Request, service: ShareService) -> bytes:
    """The link token's digest, after the rate limits (per address first, then per link)."""
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not 0 < len(token) <= TOKEN_MAX:
        raise ApiError(401, "unauthorized", "an Authorization: Bearer <link token> header is required")
    key = digest(token)
    address = request.client.host if request.client is not None else ""
    wait = service.limits.take(key.hex(), address, time.monotonic())
    if wait:
        raise ApiError(429, "rate_limited", f"too many requests: retry in {math.ceil(wait)} s")
    return key


@api
async def get_view(request: Request) -> Response:
    service = _service(request)
    view = await service.view(_link(request, service), now_ms())
    if view is None:
        raise ApiError(404, "not_found", "no such tracking link")
    if isinstance(view, str):
        raise ApiError(410, "gone", view)
    return OrjsonResponse(view, headers=NO_STORE)


@api
async def events(request: Request) -> Response:
    service = _service(request)
    key = _link(request, service)
    view = await service.view(key, now_ms())
    if view is None:
        raise ApiError(404, "not_found", "no such tracking link")
    if isinstance(view, str):
        raise ApiError(410, "gone", view)
    if service.streams[key] >= STREAMS_PER_LINK:
        raise ApiError(429, "rate_limited", f"at most {STREAMS_PER_LINK} live feeds of one link")
    headers = {**NO_STORE, "x-accel-buffering": "no"}  # nginx: pass each event at once
    return StreamingResponse(service.stream(key), media_type="text/event-stream", headers=headers)


async def page(request: Request) -> Response:
    return FileResponse(PAGE, media_type="text/html", headers={"content-security-policy": PAGE_CSP, **NO_STORE})
