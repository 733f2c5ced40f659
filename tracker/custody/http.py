"""The packages' HTTP routes (the chain of custody's read and consign API).

    POST /v1/packages                  consign (dispatcher)
    GET  /v1/packages                  list (?state=&client=&driver=&after=&limit=)
    GET  /v1/packages/{id}             state, consignment, chain of custody, alerts
    GET  /v1/packages/{id}/verify      recompute the custody chain

Scope: a dispatcher sees every package of its org; a client admin only those consigned to its
client (another's is "not found", as if it did not exist); a driver sees nothing (403).
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import metrics
from ..auth import Principal
from ..clock import now_ms
from ..eta.service import EtaService
from ..protocol.events import PACKAGE_MAX, id_text
from ..transport.http import ApiError, OrjsonResponse, api, principal_of
from . import chain
from . import state as custody
from . import store as ps
from .live import PackageLayer
from .process import _f32, process

# Client ids end up inside live-frame stamps (JSON arrays matched by substring): no quotes, no escapes.
CLIENT_ID: Final = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
BODY_MAX: Final = 16_384
LIST_MAX: Final = 1_000
UNCHAINED_MAX: Final = 1_000  # unchained scans of a package whose seal /verify checks


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/packages", consign_package, methods=["POST"]),
        Route("/v1/packages", list_packages, methods=["GET"]),
        Route("/v1/packages/{package:path}/verify", verify_package, methods=["GET"]),
        Route("/v1/packages/{package:path}", get_package, methods=["GET"]),
    ]


def _layer(request: Request) -> PackageLayer:
    layer: PackageLayer = request.app.state.custody
    return layer


# -- representation ---------------------------------------------------------------------------


def _etas(request: Request) -> EtaService:
    service: EtaService = request.app.state.eta
    return service


def package_json(row: asyncpg.Record, principal: Principal, eta: dict[str, Any] | None = None) -> dict[str, Any]:
    consigned = row["consigned_at"] is not None
    out: dict[str, Any] = {
        "package": row["package_id"],
        "client": row["client"],
        "consigned": consigned,
        "consigned_at": row["consigned_at"],
        "state": row["state"],
        "driver": row["holder"],
        "ts": row["state_ts"] if row["state_ts"] is not None else row["consigned_at"],
        "destination": None,
        "window": None,
        "cold_chain": None,
        "notes": row["notes"],
        "chain_length": row["chain_len"],
        "eta": eta,
        "arrived_at": row["arrived_at"],
        "departed_at": row["departed_at"],
    }
    if row["dest_lat"] is not None:
        out["destination"] = {"name": row["dest_name"], "lat": row["dest_lat"], "lon": row["dest_lon"]}
    if row["window_from"] is not None or row["window_to"] is not None:
        out["window"] = {"from": row["window_from"], "to": row["window_to"]}
    if row["temp_min"] is not None or row["temp_max"] is not None:
        out["cold_chain"] = {"min_c": row["temp_min"], "max_c": row["temp_max"]}
    if principal.role == "dispatcher":
        out["consigned_by"] = row["consigned_by"]
    return out


def _in_scope(row: asyncpg.Record | None, p: Principal) -> asyncpg.Record:
    if row is None or (p.role == "client" and (row["consigned_at"] is None or row["client"] != p.client)):
        raise ApiError(404, "not_found", "no such package")
    return row


def _alert_visible(kind: str, p: Principal) -> bool:
    return p.role == "dispatcher" or kind not in (custody.SCAN_ANOMALY, chain.TAMPER)


# -- consign ----------------------------------------------------------------------------------


def _number(obj: dict[str, Any], key: str, lo: float, hi: float, *, where: str, required: bool = False) -> float | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int | float) or type(value) is bool or not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, "invalid", f"{where}{key}: must be a number between {lo:g} and {hi:g}")
    return float(value)


def _text(obj: dict[str, Any], key: str, limit: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str or len(value) > limit or "\x00" in value:
        raise ApiError(400, "invalid", f"{key}: must be a string of at most {limit} characters")
    return value


def _object(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and type(value) is not dict:
        raise ApiError(400, "invalid", f"{key}: must be an object")
    return value


def parse_consignment(body: Any, consigned_at: int) -> tuple[str, chain.Consignment]:
    if type(body) is not dict:
        raise ApiError(400, "invalid", "the body must be a JSON object")
    package = body.get("id", body.get("package"))
    if type(package) is not str or not 1 <= len(package) <= PACKAGE_MAX or not id_text(package):
        why = f"id: must be a string of 1 to {PACKAGE_MAX} characters without bidi or zero-width characters"
        raise ApiError(400, "invalid", why)
    client = body.get("client")
    if type(client) is not str or not CLIENT_ID.fullmatch(client):
        raise ApiError(400, "invalid", "client: 1 to 64 of A-Z a-z 0-9 . _ : @ -")
    dest = _object(body, "destination")
    if dest is None:
        raise ApiError(400, "invalid", "destination: required, {name, lat, lon}")
    lat = _number(dest, "lat", -90, 90, where="destination.", required=True)
    lon = _number(dest, "lon", -180, 180, where="destination.", required=True)
    window = _object(body, "window") or {}
    start, end = window.get("from"), window.get("to")
    for name, value in (("from", start), ("to", end)):
        if value is not None and type(value) is not int:
            raise ApiError(400, "invalid", f"window.{name}: must be an integer (ms since the Unix epoch)")
    if start is not None and end is not None and end <= start:
        raise ApiError(400, "invalid", "window: to must be after from")
    cold = _object(body, "cold_chain") or {}
    tmin = _number(cold, "min_c", -80, 80, where="cold_chain.")
    tmax = _number(cold, "max_c", -80, 80, where="cold_chain.")
    if tmin is not None and tmax is not None and tmin > tmax:
        raise ApiError(400, "invalid", "cold_chain: min_c must not exceed max_c")
    return package, chain.Consignment(
        client, consigned_at, _text(dest, "name", 200), lat, lon, start, end, tmin, tmax, _text(body, "notes", 1000)
    )


@api
async def consign_package(request: Request) -> Response:
    p = principal_of(request, "dispatcher")
    layer = _layer(request)
    body = await request.body()
    if len(body) > BODY_MAX:
        raise ApiError(413, "too_large", f"the body is limited to {BODY_MAX} bytes")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid", "the body is not JSON") from None
    package, terms = parse_consignment(obj, now_ms())
    node = layer.core
    async with node.pool.acquire() as conn, conn.transaction():
        row = await ps.consign(conn, p.org, package, terms, p.sub)
        if row is None:
            existing = await ps.get_package(conn, p.org, package)
            assert existing is not None
            same = ps.consignment(existing)
            if chain.Consignment(**{**_fields(terms), "consigned_at": same.consigned_at}) != same:
                raise ApiError(409, "conflict", "this package is already consigned, with other terms")
            return OrjsonResponse(package_json(existing, p), status_code=200)
        out = await process(
            conn, layer.key, [], max_delivery_m=layer.max_delivery_m, announce=[(p.org, package)], outbox=layer.outbox
        )
        row = await ps.get_package(conn, p.org, package)
    await layer.publish(out, [])
    if terms.client is not None:
        layer.stamps.consigned(p.org, package, terms.client)
    assert row is not None
    return OrjsonResponse(package_json(row, p), status_code=201)


def _fields(c: chain.Consignment) -> dict[str, Any]:
    return {name: getattr(c, name) for name in chain.Consignment.__dataclass_fields__}


# -- reads ------------------------------------------------------------------------------------


@api
async def list_packages(request: Request) -> Response:
    p = principal_of(request, "dispatcher", "client")
    q = request.query_params
    state = q.get("state") or None
    if state is not None and state not in custody.STATES:
        raise ApiError(400, "invalid", f"state: one of {', '.join(custody.STATES)}")
    client = q.get("client") or None
    if p.role == "client":
        if client is not None and client != p.client:
            return OrjsonResponse({"packages": [], "next": None})
        client = p.client
    try:
        limit = int(q.get("limit") or 100)
    except ValueError:
        raise ApiError(400, "invalid", "limit: must be an integer") from None
    limit = max(1, min(limit, LIST_MAX))
    node = _layer(request).core
    rows = await ps.list_packages(
        node.pool,
        p.org,
        client=client,
        state=state,
        driver=q.get("driver") or None,
        after=q.get("after") or "",
        limit=limit,
    )
    if p.role == "client":
        rows = [r for r in rows if r["consigned_at"] is not None]
    etas = await _etas(request).for_rows(p.org, rows)
    out = [package_json(r, p, etas.get(r["package_id"])) for r in rows]
    return OrjsonResponse({"packages": out, "next": out[-1]["package"] if len(rows) == limit else None})


def _record_json(rec: chain.Record, row: asyncpg.Record, alerts: dict[tuple[str, int], list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": rec.index,
        "driver": rec.driver,
        "seq": rec.seq,
        "chained_at": rec.chained_at,
        "recovered": rec.recovered,
        "alerts": alerts.get((rec.driver, rec.seq), []),
    }
    if rec.content is None:
        out["missing"] = True
        return out
    for key in ("event", "ts", "received_at", "lat", "lon", "note", "recipient", "pod"):
        out[key] = row[key]
    out["temp_c"] = _f32(row["temp_c"])
    return out


@api
async def get_package(request: Request) -> Response:
    p = principal_of(request, "dispatcher", "client")
    _, out = await detail(request, p, request.path_params["package"])
    return OrjsonResponse(out)


async def detail(request: Request, p: Principal, package: str) -> tuple[asyncpg.Record, dict[str, Any]]:
    """The package row and its representation with its chain of custody and its alerts (in scope)."""
    node = _layer(request).core
    row = _in_scope(await ps.get_package(node.pool, p.org, package), p)
    records = await ps.custody_records(node.pool, p.org, package)
    alerts = [a for a in await ps.package_alerts(node.pool, p.org, package) if _alert_visible(a["kind"], p)]
    by_scan: dict[tuple[str, int], list[str]] = {}
    for a in alerts:
        by_scan.setdefault((a["driver_id"], a["seq"]), []).append(a["id"])
    etas = await _etas(request).for_rows(p.org, [row])
    out = package_json(row, p, etas.get(package))
    out["custody"] = [_record_json(rec, r, by_scan) for rec, r in records]
    out["alerts"] = [
        {
            "id": a["id"],
            "kind": a["kind"],
            "state": a["state"],
            "ts": a["ts"],
            "opened_at": a["opened_at"],
            "driver": a["driver_id"],
            "seq": a["seq"],
            "message": a["message"],
            "details": orjson.loads(a["details"]) if a["details"] is not None else None,
        }
        for a in alerts
    ]
    return row, out


@api
async def verify_package(request: Request) -> Response:
    p = principal_of(request, "dispatcher", "client")
    layer = _layer(request)
    package = request.path_params["package"]
    row = _in_scope(await ps.get_package(layer.core.pool, p.org, package), p)
    out, _ = await verification(layer, p.org, package, row)
    return OrjsonResponse(out)


async def verification(
    layer: PackageLayer, org: str, package: str, row: asyncpg.Record
) -> tuple[dict[str, Any], tuple[int, bytes, int] | None]:
    """`/verify`'s answer, and the latest signed checkpoint it compared the chain with."""
    pool = layer.core.pool
    records = [rec for rec, _ in await ps.custody_records(pool, org, package)]
    head = bytes(row["chain_head"]) if row["chain_head"] is not None else None
    tag = bytes(row["head_tag"]) if row["head_tag"] is not None else None
    problems = chain.verify(layer.key, org, package, records, row["chain_len"], head, tag, ps.consignment(row))
    checkpoint = await layer.checkpoints.latest(org, package)
    problems += chain.against_checkpoint(records, row["chain_len"], checkpoint)
    for scan in await ps.unchained_of(pool, org, package, UNCHAINED_MAX):
        if not chain.sealed(layer.key, org, ps.content(scan), scan["seal"]):
            why = "this scan row was not written by the service (its seal does not verify): never chained"
            problems.append(chain.Problem(None, why, (scan["driver_id"], scan["seq"])))
    metrics.CUSTODY_VERIFY_FAILED.inc(1 if problems else 0)
    out = {
        "package": package,
        "ok": not problems,
        "length": len(records),
        "problems": [pr.as_dict() for pr in problems],
        "recovered": sum(r.recovered for r in records),
        "unchained": await ps.count_unchained(pool, org, package),
    }
    return out, checkpoint
