"""The webhooks' HTTP routes (a dispatcher of the org; another org's endpoint is "not found").

POST   /v1/webhooks                        register {url, events} -> {id, secret, ...}
GET    /v1/webhooks                        list
GET    /v1/webhooks/{id}                   one
DELETE /v1/webhooks/{id}                   delete (its pending deliveries with it)
POST   /v1/webhooks/{id}/rotate            a new secret; the old one signs too for a grace period
POST   /v1/webhooks/{id}/replay?since=     deliver again the events since (ms), same webhook-id
GET    /v1/webhooks/{id}/deliveries        the delivery log (?state=&after=&limit=)
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..clock import now_ms
from ..transport.http import ApiError, OrjsonResponse, api, json_object, principal_of
from . import policy, store
from .service import Webhooks

EVENTS: Final = ("package.state_changed", "alert.opened", "alert.acknowledged", "alert.resolved", "custody.checkpoint")
STATES: Final = ("pending", "sending", "delivered", "dead")
BODY_MAX: Final = 8_192
ENDPOINTS_MAX: Final = 20  # per org: each event is fanned out to every subscribed endpoint
LIST_MAX: Final = 1_000


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/webhooks", create, methods=["POST"]),
        Route("/v1/webhooks", list_all, methods=["GET"]),
        Route("/v1/webhooks/{id}/rotate", rotate, methods=["POST"]),
        Route("/v1/webhooks/{id}/replay", replay, methods=["POST"]),
        Route("/v1/webhooks/{id}/enable", enable, methods=["POST"]),
        Route("/v1/webhooks/{id}/deliveries", deliveries, methods=["GET"]),
        Route("/v1/webhooks/{id}", get_one, methods=["GET"]),
        Route("/v1/webhooks/{id}", delete, methods=["DELETE"]),
    ]


def _room(request: Request) -> Webhooks:
    room: Webhooks = request.app.state.webhooks
    return room


def endpoint_json(row: asyncpg.Record) -> dict[str, Any]:
    now = now_ms()
    return {
        "id": row["id"],
        "url": row["url"],
        "events": list(row["events"]),
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "created_at": row["created_at"],
        "created_by": row["created_by"],
        "old_secret_until": row["old_until"] if row["old_until"] and row["old_until"] > now else None,
    }


async def _body(request: Request) -> dict[str, Any]:
    return await json_object(request, BODY_MAX)


@api
async def create(request: Request) -> Response:
    p = principal_of(request, "dispatcher")
    room = _room(request)
    obj = await _body(request)
    url, events = obj.get("url"), obj.get("events")
    if type(events) is not list or not events or any(e not in EVENTS for e in events):
        raise ApiError(400, "invalid", f"events: a non-empty list of {', '.join(EVENTS)}")
    try:
        await room.client.resolve(policy.parse_url(url))  # type: ignore[arg-type]
    except policy.Refused as exc:
        raise ApiError(400, "invalid", str(exc)) from None
    now = now_ms()
    made = await store.create(room.pool, p.org, url, sorted(set(events)), p.sub, now, ENDPOINTS_MAX)  # type: ignore[arg-type]
    if made is None:
        raise ApiError(409, "conflict", f"an org has at most {ENDPOINTS_MAX} webhook endpoints")
    row = await store.get_endpoint(room.pool, p.org, made[0])
    assert row is not None
    return OrjsonResponse({**endpoint_json(row), "secret": made[1]}, status_code=201)


@api
async def list_all(request: Request) -> Response:
    p = principal_of(request, "dispatcher")
    rows = await store.list_endpoints(_room(request).pool, p.org)
    return OrjsonResponse({"webhooks": [endpoint_json(r) for r in rows]})


async def _endpoint(request: Request) -> tuple[str, asyncpg.Record]:
    p = principal_of(request, "dispatcher")
    row = await store.get_endpoint(_room(request).pool, p.org, request.path_params["id"])
    if row is None:
        raise ApiError(404, "not_found", "no such webhook")
    return p.org, row


@api
async def get_one(request: Request) -> Response:
    _, row = await _endpoint(request)
    return OrjsonResponse(endpoint_json(row))


@api
async def delete(request: Request) -> Response:
    org, row = await _endpoint(request)
    await store.delete(_room(request).pool, org, row["id"])
    return Response(status_code=204)


@api
async def rotate(request: Request) -> Response:
    org, row = await _endpoint(request)
    room = _room(request)
    grace_ms = int(room.settings.webhook_rotate_grace_s * 1000)
    secret = await store.rotate(room.pool, org, row["id"], now_ms(), grace_ms)
    if secret is None:
        raise ApiError(404, "not_found", "no such webhook")
    fresh = await store.get_endpoint(room.pool, org, row["id"])
    assert fresh is not None
    return OrjsonResponse({**endpoint_json(fresh), "secret": secret})


@api
async def enable(request: Request) -> Response:
    """An endpoint disabled by a 410 Gone takes deliveries again once its owner fixed it."""
    org, row = await _endpoint(request)
    room = _room(request)
    await store.enable(room.pool, org, row["id"])
    fresh = await store.get_endpoint(room.pool, org, row["id"])
    if fresh is None:  # deleted meanwhile
        raise ApiError(404, "not_found", "no such webhook")
    return OrjsonResponse(endpoint_json(fresh))


@api
async def replay(request: Request) -> Response:
    org, row = await _endpoint(request)
    try:
        since = int(request.query_params["since"])
    except (KeyError, ValueError):
        raise ApiError(400, "invalid", "since: required, ms since the Unix epoch") from None
    if not row["enabled"]:
        raise ApiError(409, "conflict", f"this webhook is disabled ({row['disabled_reason']})")
    room = _room(request)
    count = await store.replay(room.pool, org, row["id"], since, now_ms())
    room.deliverer.wake()
    return OrjsonResponse({"replayed": count}, status_code=202)


@api
async def deliveries(request: Request) -> Response:
    org, row = await _endpoint(request)
    q = request.query_params
    state = q.get("state") or None
    if state is not None and state not in STATES:
        raise ApiError(400, "invalid", f"state: one of {', '.join(STATES)}")
    try:
        limit = max(1, min(int(q.get("limit") or 100), LIST_MAX))
        after = int(q.get("after") or 0)
    except ValueError:
        raise ApiError(400, "invalid", "limit, after: integers") from None
    rows = await store.deliveries(_room(request).pool, org, row["id"], state=state, after=after, limit=limit)
    out = [
        {
            "n": r["n"],
            "webhook_id": r["msg_id"],
            "type": r["type"],
            "package": r["okey"] or None,
            "state": r["state"],
            "attempts": r["attempts"],
            "created_at": r["created_at"],
            "next_at": r["next_at"] if r["state"] == "pending" else None,
            "delivered_at": r["delivered_at"],
            "status": r["last_status"],
            "latency_ms": r["last_latency_ms"],
            "error": r["last_error"],
            "response": r["last_response"],
        }
        for r in rows
    ]
    return OrjsonResponse({"deliveries": out, "next": out[-1]["n"] if len(rows) == limit else None})
