"""The alerts' HTTP routes: the workflow a dispatcher follows (acknowledge, then resolve).

    GET  /v1/alerts                    list (?state=&kind=&package=&driver=&after=&limit=)
    GET  /v1/alerts/{id}               the alert and its history
    POST /v1/alerts/{id}/ack           acknowledge {comment?} (dispatcher)
    POST /v1/alerts/{id}/resolve       resolve {reason} (dispatcher)

Scope: a dispatcher sees every alert of its org; a client admin those about the packages consigned
to its client, except the dispatcher-only kinds (`alerts_store.DISPATCHER_ONLY`); another's alert is
"not found", as if it did not exist. Every change is published as a live `alert` frame, stamped
like the alert's other frames (custody/process.py `alert_stamp`), after its commit.
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..auth import Principal
from ..clock import now_ms
from ..protocol import frames
from ..transport.http import ApiError, OrjsonResponse, api, json_object, principal_of
from . import alerts_store as als
from . import store as ps
from .live import PackageLayer
from .process import alert_frame, alert_stamp, event_of, stamp_of

BODY_MAX: Final = 4_096
TEXT_MAX: Final = 1_000
LIST_MAX: Final = 1_000


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/alerts", list_alerts, methods=["GET"]),
        Route("/v1/alerts/{alert}/ack", ack_alert, methods=["POST"]),
        Route("/v1/alerts/{alert}/resolve", resolve_alert, methods=["POST"]),
        Route("/v1/alerts/{alert}", get_alert, methods=["GET"]),
    ]


def _layer(request: Request) -> PackageLayer:
    layer: PackageLayer = request.app.state.custody
    return layer


def alert_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "state": row["state"],
        "ts": row["ts"],
        "opened_at": row["opened_at"],
        "driver": row["driver_id"],
        "package": row["package_id"],
        "seq": row["seq"],
        "message": row["message"],
        "acknowledged_by": row["acknowledged_by"],
        "acknowledged_at": row["acknowledged_at"],
        "ack_comment": row["ack_comment"],
        "resolved_by": row["resolved_by"],
        "resolved_reason": row["resolved_reason"],
        "details": orjson.loads(row["details"]) if row["details"] is not None else None,
    }


def _in_scope(row: asyncpg.Record | None, p: Principal) -> asyncpg.Record:
    if row is None or (
        p.role == "client"
        and (row["consigned_at"] is None or row["client"] != p.client or row["kind"] in als.DISPATCHER_ONLY)
    ):
        raise ApiError(404, "not_found", "no such alert")
    return row


@api
async def list_alerts(request: Request) -> Response:
    p = principal_of(request, "dispatcher", "client")
    q = request.query_params
    state = q.get("state") or None
    if state is not None and state not in als.STATES:
        raise ApiError(400, "invalid", f"state: one of {', '.join(als.STATES)}")
    try:
        limit = max(1, min(int(q.get("limit") or 100), LIST_MAX))
    except ValueError:
        raise ApiError(400, "invalid", "limit: must be an integer") from None
    rows = await als.list_alerts(
        _layer(request).core.pool,
        p.org,
        client=p.client if p.role == "client" else None,
        state=state,
        kind=q.get("kind") or None,
        package=q.get("package") or None,
        driver=q.get("driver") or None,
        after=q.get("after") or "",
        limit=limit,
    )
    if p.role == "client" and p.client is None:  # a client token without a client sees nothing
        rows = []
    out = [alert_json(r) for r in rows]
    return OrjsonResponse({"alerts": out, "next": out[-1]["id"] if len(rows) == limit else None})


async def _detail(conn: ps.Conn, org: str, row: asyncpg.Record) -> dict[str, Any]:
    out = alert_json(row)
    out["history"] = await als.history(conn, org, row["id"])
    return out


@api
async def get_alert(request: Request) -> Response:
    p = principal_of(request, "dispatcher", "client")
    pool = _layer(request).core.pool
    row = _in_scope(await als.get_alert(pool, p.org, request.path_params["alert"]), p)
    return OrjsonResponse(await _detail(pool, p.org, row))


async def _body_text(request: Request, key: str, *, required: bool) -> str | None:
    obj = await json_object(request, BODY_MAX, empty_ok=True)
    value = obj.get(key)
    if value is None and not required:
        return None
    if type(value) is not str or not value.strip() or len(value) > TEXT_MAX or "\x00" in value:
        raise ApiError(400, "invalid", f"{key}: {'required, ' if required else ''}1 to {TEXT_MAX} characters")
    return value


async def _change(request: Request, p: Principal, action: str, text: str | None) -> Response:
    """Lock the alert's package, then the alert (the order custody/process.py locks in), apply
    `action`, commit, publish the alert's frame."""
    layer = _layer(request)
    alert = request.path_params["alert"]
    async with layer.core.pool.acquire() as conn:
        async with conn.transaction():
            row = _in_scope(await als.get_alert(conn, p.org, alert), p)
            if row["package_id"] is not None:
                await ps.lock_packages(conn, [(p.org, row["package_id"])])
            await als.lock_alert(conn, p.org, alert)
            row = _in_scope(await als.get_alert(conn, p.org, alert), p)  # as it is now, locked
            now = now_ms()
            if row["state"] == "resolved":
                raise ApiError(409, "conflict", f"this alert is already resolved ({row['resolved_reason']})")
            if action == "ack":
                if row["acknowledged_by"] == p.sub:  # a retry: the acknowledgement stands as it was
                    return OrjsonResponse(await _detail(conn, p.org, row))
                if row["acknowledged_by"] is not None:
                    raise ApiError(409, "conflict", f"this alert is already acknowledged by {row['acknowledged_by']}")
                await als.acknowledge(conn, p.org, alert, by=p.sub, at=now, comment=text)
            else:
                assert text is not None
                await als.resolve(conn, p.org, alert, by=p.sub, at=now, reason=text)
            row = _in_scope(await als.get_alert(conn, p.org, alert), p)
            out = await _detail(conn, p.org, row)
            kind = "alert.acknowledged" if action == "ack" else "alert.resolved"
            await layer.outbox.write(conn, [event_of(p.org, kind, _frame(row, now))])
    layer.core.publish(p.org, _live_item(row, now))
    return OrjsonResponse(out)


def _live_item(row: asyncpg.Record, now: int) -> tuple[str, str, int, bytes, bytes]:
    stamp = stamp_of(row["client"] if row["consigned_at"] is not None else None)
    return ("a", row["driver_id"] or "", now, alert_stamp(row["kind"], stamp), frames.encode(_frame(row, now)))


def _frame(row: asyncpg.Record, now: int) -> dict[str, Any]:
    acked = (row["acknowledged_by"], row["acknowledged_at"]) if row["acknowledged_at"] is not None else None
    frame = alert_frame(
        row["id"],
        row["kind"],
        row["state"],
        now,
        row["driver_id"],
        row["package_id"],
        row["message"],
        acked=acked,
        resolved=(row["resolved_by"], row["resolved_reason"]),
    )
    if row["details"] is not None:
        frame["details"] = orjson.loads(row["details"])
    return frame


@api
async def ack_alert(request: Request) -> Response:
    p = principal_of(request, "dispatcher")
    return await _change(request, p, "ack", await _body_text(request, "comment", required=False))


@api
async def resolve_alert(request: Request) -> Response:
    p = principal_of(request, "dispatcher")
    return await _change(request, p, "resolve", await _body_text(request, "reason", required=True))
