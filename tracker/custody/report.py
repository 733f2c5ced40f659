"""A package's custody report for auditors: its chain, `verify`'s result and the latest checkpoint,
signed by the service.

    GET /v1/packages/{id}/report       {"report": {...}, "signature": {...}} (dispatcher, client in scope)
    GET /v1/custody/report-key         the public key that verifies reports (dispatcher, client)

The signature is Ed25519 over the report's canonical JSON (`canonical`: keys sorted, no
whitespace, UTF-8, Python's `json.dumps(report, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)`). Its private key is derived from the custody key (HMAC-SHA256 of a fixed
label: `report_key`), so every instance signs alike and nothing new is to be kept secret; the
public key lets an auditor verify without being able to sign, nor to forge the chain's MACs.
The printable page (`/static/report.html`) renders this JSON in the browser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..clock import now_ms
from ..transport.http import OrjsonResponse, api, principal_of
from . import http as package_http
from .live import PackageLayer

LABEL: Final = b"trk-report-v1"
KIND: Final = "tracker.custody-report"


def routes() -> list[BaseRoute]:
    """Before the packages' routes: `/v1/packages/{id:path}` would take `/report` as part of the id."""
    return [
        Route("/v1/custody/report-key", report_key_endpoint, methods=["GET"]),
        Route("/v1/packages/{package:path}/report", package_report, methods=["GET"]),
    ]


def report_key(custody_key: bytes) -> Ed25519PrivateKey:
    """The reports' signing key: its 32-byte seed is HMAC-SHA256(custody key, "trk-report-v1")."""
    return Ed25519PrivateKey.from_private_bytes(hmac.new(custody_key, LABEL, hashlib.sha256).digest())


def public_key(custody_key: bytes) -> tuple[str, str]:
    """(key id, base64 of the raw 32-byte public key). The id: the first 16 hex of its SHA-256."""
    raw = report_key(custody_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16], base64.b64encode(raw).decode()


def canonical(report: dict[str, Any]) -> bytes:
    """The bytes that are signed (and that a verifier recomputes from the parsed report)."""
    return json.dumps(report, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign(custody_key: bytes, report: dict[str, Any]) -> dict[str, Any]:
    key_id, pub = public_key(custody_key)
    value = report_key(custody_key).sign(canonical(report))
    return {
        "alg": "Ed25519",
        "key_id": key_id,
        "public_key": pub,
        "canonical": "json.dumps(report, sort_keys=True, separators=(',', ':'), ensure_ascii=False), UTF-8",
        "value": base64.b64encode(value).decode(),
    }


@api
async def report_key_endpoint(request: Request) -> Response:
    principal_of(request, "dispatcher", "client")
    layer: PackageLayer = request.app.state.custody
    key_id, pub = public_key(layer.key)
    return OrjsonResponse({"alg": "Ed25519", "key_id": key_id, "public_key": pub})


@api
async def package_report(request: Request) -> Response:
    p = principal_of(request, "dispatcher", "client")
    layer: PackageLayer = request.app.state.custody
    package = request.path_params["package"]
    row, detail = await package_http.detail(request, p, package)
    verified, checkpoint = await package_http.verification(layer, p.org, package, row)
    custody = detail.pop("custody")
    alerts = detail.pop("alerts")
    detail.pop("eta", None)  # a forecast, not a record
    report = {
        "kind": KIND,
        "version": 1,
        "org": p.org,
        "generated_at": now_ms(),
        "generated_for": {"sub": p.sub, "role": p.role},
        "package": detail,
        "head": {
            "length": row["chain_len"],
            "head": bytes(row["chain_head"]).hex() if row["chain_head"] is not None else None,
        },
        "custody": custody,
        "alerts": alerts,
        "verify": verified,
        "checkpoint": None
        if checkpoint is None
        else {"length": checkpoint[0], "head": checkpoint[1].hex(), "at": checkpoint[2]},
    }
    body = {"report": report, "signature": sign(layer.key, report)}
    return Response(json.dumps(body, ensure_ascii=False).encode(), media_type="application/json")
