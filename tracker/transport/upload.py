"""`POST /v1/driver/events`: a batch of a driver's events over HTTP (docs/PROTOCOL.md, "POST
/v1/driver/events").

Phones suspended in the background upload their buffered fixes when woken, as an HTTP request
rather than a websocket. An upload behaves exactly like a websocket `batch`: the items are
validated by the driver session's own event path against the driver's rate budget (shared with
its websocket), then go through `Ingest.submit` like any frame, and the request is answered once
every submitted seq is answered by `Ingest.answered` (after the commit) or refused. The request
is the "owner" of its events: an `Upload` (a DriverConn) whose channel collects the ack and error
frames the ingest writes. An upload does not make the driver online.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .. import metrics, store
from ..auth import Principal
from ..clock import now_ms
from ..conn import DriverConn
from ..node import Node
from ..protocol import compact, compact2, frames
from ..protocol.driver import DriverSession
from ..protocol.frames import ProtocolError
from .http import ApiError, OrjsonResponse, api, error_response, principal_of
from .plugin import ROOT, plugin_items

ANSWER_TIMEOUT_S = 30.0  # every event is answered within 30 s (the writer answers `unavailable` at 25 s)


class Collector:
    """The channel of one upload: the ack and error frames written for its events, until every
    seq it waits for is answered (`done`)."""

    def __init__(self) -> None:
        self.closed = False
        self.expected = False  # until `expect`, nothing is awaited yet
        self.waiting: set[int] = set()
        self.acked: set[int] = set()
        self.errors: list[dict[str, Any]] = []
        self.done = asyncio.get_running_loop().create_future()

    def expect(self, seqs: set[int]) -> None:
        self.waiting = seqs - self.acked - {e["seq"] for e in self.errors}
        self.expected = True
        self._check()

    def write(self, data: bytes) -> None:
        frame = orjson.loads(data)
        if frame["type"] == "ack":
            for a, b in frame["ranges"]:
                seqs = range(a, b + 1)
                self.acked.update(seqs)
                self.waiting.difference_update(seqs)
        elif frame["type"] == "error":
            entry = {"code": frame["code"], "message": frame.get("message", "")}
            if "retry_ms" in frame:
                entry["retry_ms"] = frame["retry_ms"]
            if "ranges" in frame:
                named = [s for a, b in frame["ranges"] for s in range(a, b + 1)]
            else:
                named = [frame.get("seq")]
            for seq in named:
                self.errors.append({"seq": seq, **entry})
                self.waiting.discard(seq)
        self._check()

    def _check(self) -> None:
        if self.expected and not self.waiting and not self.done.done():
            self.done.set_result(None)

    def buffered(self) -> int:
        return 0

    async def wait_writable(self) -> None:
        return None

    async def close(self, code: int, reason: str = "", *, timeout: float = 2.0) -> None:
        self.closed = True


async def read_body(request: Request, limit: int) -> bytes:
    """The body, gunzipped if `Content-Encoding: gzip`; over `limit` bytes (on the wire or once
    inflated) 413 as soon as that is known: a gzip bomb is never inflated past `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"a body carries at most {limit} bytes")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise ApiError(400, "invalid", "Content-Encoding: only gzip (or none) is accepted")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    raw = 0
    out = bytearray()
    async for chunk in request.stream():
        raw += len(chunk)
        if raw > limit:
            raise ApiError(413, "too_large", f"a body carries at most {limit} bytes")
        if inflate is None:
            out += chunk
            continue
        try:
            while chunk:
                # At most one byte past the limit is ever inflated.
                out += inflate.decompress(chunk, limit + 1 - len(out))
                if len(out) > limit:
                    raise ApiError(413, "too_large", f"a body carries at most {limit} bytes once decompressed")
                chunk = inflate.unused_data  # the next member of a multi-member gzip body
                if chunk:
                    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        except zlib.error:
            raise ApiError(400, "invalid", "body: not valid gzip") from None
    if inflate is not None and not inflate.eof:
        raise ApiError(400, "invalid", "body: not valid gzip (truncated)")
    return bytes(out)


def parse_events(body: bytes, max_batch: int) -> tuple[list[Any], bool]:
    """The events of an upload body, and whether it is the plugin's (`location`, plugin.py);
    400 if malformed, 413 over `max_batch` items."""
    try:
        obj = _decode(body)
    except ProtocolError as exc:
        raise ApiError(400, "invalid", "body: " + str(exc).replace("frame", "body")) from None
    if type(obj) is not dict:
        raise ApiError(400, "invalid", "body: must be a JSON object")
    events = obj.get("events")
    from_plugin = events is None and ROOT in obj
    if from_plugin:
        events = plugin_items(obj)
        if events is None:
            raise ApiError(400, "invalid", "body: location must be an object or an array")
    elif type(events) is not list:
        raise ApiError(400, "invalid", "body: events must be an array")
    if len(events) > max_batch:
        raise ApiError(413, "too_large", f"an upload carries at most {max_batch} events")
    return events, from_plugin


COMPACT_TYPES = {compact.CONTENT_TYPE: compact.decode, compact2.CONTENT_TYPE: compact2.decode}


def compact_events(body: bytes, max_batch: int, content_type: str = compact.CONTENT_TYPE) -> list[Any]:
    """The events of a compact body (`application/vnd.tracker.compact-1`: positions; `...compact-2`:
    positions and scans): 400 if malformed, 413 over `max_batch` events, as a JSON body."""
    try:
        return COMPACT_TYPES[content_type](body, max_batch)
    except ProtocolError as exc:
        raise ApiError(400, "invalid", "body: " + str(exc)) from None
    except compact.TooLarge:
        raise ApiError(413, "too_large", f"an upload carries at most {max_batch} events") from None


def _decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return frames._decode_slowly(body)  # the websocket's own fallback and its own words


def plugin_refusal(errors: list[dict[str, Any]]) -> Response | None:
    """The plugin deletes every location of a batch answered 2xx: while one must be sent again
    (`rate_limited`, `unavailable`), the whole batch is refused (429 or 503, `Retry-After`); it
    comes back whole, and what was stored is acknowledged again (docs/PLUGINS.md)."""
    retry = [e for e in errors if e["code"] in ("rate_limited", "unavailable")]
    if not retry:
        return None
    after = str(max(1, -(-max(e.get("retry_ms", 1000) for e in retry) // 1000)))
    if any(e["code"] == "unavailable" for e in retry):
        response = error_response(503, "unavailable", f"{len(retry)} locations not stored; send the batch again")
    else:
        response = error_response(429, "rate_limited", f"{len(retry)} locations over the driver's event rate")
    response.headers["retry-after"] = after
    return response


@api
async def driver_events(request: Request) -> Response:
    node: Node = request.app.state.node
    settings = node.settings
    principal: Principal = principal_of(request, "driver")
    body = await read_body(request, settings.max_frame)
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type in COMPACT_TYPES:
        items, from_plugin = compact_events(body, settings.max_batch, content_type), False
    else:
        items, from_plugin = parse_events(body, settings.max_batch)
    received = now_ms()
    last_seq = (await store.drivers_hello(node.pool, [(principal.org, principal.sub, principal.name)]))[0]
    collector = Collector()
    owner = DriverConn(principal, collector)
    owner.bucket = node.drivers.bucket(principal.key)
    owner.seq_high = last_seq  # above it, an event cannot name a stored one: it may go live at receipt
    owner.welcomed = True
    ws = node.drivers.get(principal.key)
    if ws is not None:  # the driver's live ts and stamp are its websocket's
        owner.live_ts, owner.stamp = ws.live_ts, ws.stamp
    session = DriverSession(
        request.app.state.verifier,
        max_frame=settings.max_frame,
        max_batch=settings.max_batch,
        leeway_s=settings.jwt_leeway_s,
    )
    session.bucket = owner.bucket
    events = session._events(items, received, time.monotonic())  # the websocket's event path
    for code in session.refused:
        metrics.EVENTS_REFUSED.labels(code).inc()
    for frame in session.data_to_send():
        collector.write(frame)
    if events:
        node.ingest.submit(owner, events, received)
    collector.expect({ev.seq for ev in events})
    try:
        await asyncio.wait_for(asyncio.shield(collector.done), ANSWER_TIMEOUT_S)
    except TimeoutError:
        for seq in sorted(collector.waiting):
            collector.errors.append(
                {"seq": seq, "code": "unavailable", "message": "not stored in time; resend later", "retry_ms": 2000}
            )
    finally:
        owner.closed = True  # a late answer goes to the driver's websocket, if any
        collector.closed = True
        ws = node.drivers.get(principal.key)
        if ws is not None and owner.live_ts > ws.live_ts:
            ws.live_ts = owner.live_ts
    acked = collector.acked
    if from_plugin:
        refused = plugin_refusal(collector.errors)
        if refused is not None:
            return refused
    return OrjsonResponse(
        {
            "ranges": frames.seq_ranges(acked),
            "errors": collector.errors,
            "last_seq": max(last_seq, max(acked, default=0)),
        }
    )
