"""A driver's trail as a file: GeoJSON, GPX 1.1 or CSV, streamed.

    GET /v1/drivers/{id}/trail.geojson?from=&to=
    GET /v1/drivers/{id}/trail.gpx?from=&to=
    GET /v1/drivers/{id}/trail.csv?from=&to=

The same token, roles and scope as `GET /v1/drivers/{id}/trail` (a client gets only the positions
inside its custody windows), but every stored position of the span, never downsampled: the rows
come from a server-side cursor (`prefetch` rows at a time) and leave as ~64 KB chunks, so memory
stays bounded whatever the number of points. Each export holds one pooled PostgreSQL connection
while it streams; at most `EXPORTS_MAX` run at once per instance (then 429, `retry_ms`).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final
from xml.sax.saxutils import escape, quoteattr

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..clock import now_ms
from ..node import Node
from .http import TRAIL_DEFAULT_SPAN_MS, ApiError, _int_param, api, principal_of

EXPORT_MAX_SPAN_MS: Final = 31 * 86_400_000
EXPORTS_MAX: Final = 2  # concurrent exports per instance: each holds a pooled connection
PREFETCH: Final = 2_000
CHUNK: Final = 65_536
ROWS: Final = """
SELECT seq, ts, lat, lon, acc, spd, hdg, alt, bat FROM position_rows
WHERE driver = (SELECT id FROM drivers WHERE org = $1 AND driver_id = $2) AND ts >= $3 AND ts < $4
ORDER BY ts, seq
"""
MEDIA: Final = {
    "geojson": "application/geo+json",
    "gpx": "application/gpx+xml",
    "csv": "text/csv; charset=utf-8",
}
CSV_HEADER: Final = "seq,ts,time,lat,lon,acc,spd,hdg,alt,bat\r\n"


def iso(ts: int) -> str:
    """ms since the Unix epoch as ISO 8601 UTC with milliseconds (what GPX and CSV readers expect)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1000)) + f".{ts % 1000:03d}Z"


def _real(v: float | None) -> float | None:
    # 32-bit columns: shown as the phone sent them (7 significant digits), not as their widening.
    return None if v is None else float(f"{v:.7g}")


def _dec(v: float, places: int) -> str:
    """An xsd:decimal (never an exponent)."""
    text = f"{v:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def geojson_row(r: Any) -> bytes:
    props = {"seq": r["seq"], "ts": r["ts"], "time": iso(r["ts"])}
    for key in ("acc", "spd", "hdg", "alt", "bat"):
        props[key] = _real(r[key])
    feature = {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]},
        "properties": props,
    }
    return orjson.dumps(feature)


def gpx_row(r: Any) -> bytes:
    lon = -180.0 if r["lon"] == 180.0 else r["lon"]  # GPX's longitude is [-180, 180)
    ele = "" if r["alt"] is None else f"<ele>{_dec(_real(r['alt']) or 0.0, 3)}</ele>"
    return f'<trkpt lat="{_dec(r["lat"], 9)}" lon="{_dec(lon, 9)}">{ele}<time>{iso(r["ts"])}</time></trkpt>\n'.encode()


def csv_row(r: Any) -> bytes:
    cells = [str(r["seq"]), str(r["ts"]), iso(r["ts"]), repr(r["lat"]), repr(r["lon"])]
    cells += ["" if (v := _real(r[k])) is None else repr(v) for k in ("acc", "spd", "hdg", "alt", "bat")]
    return (",".join(cells) + "\r\n").encode()


def frame_of(fmt: str, driver: str, start: int, end: int) -> tuple[bytes, bytes, bytes, Callable[[Any], bytes]]:
    """(head, separator between rows, tail, row encoder) of a format."""
    if fmt == "geojson":
        head = b'{"type":"FeatureCollection","driver":' + orjson.dumps(driver)
        head += f',"from":{start},"to":{end},"features":[\n'.encode()
        return head, b",\n", b"\n]}\n", geojson_row
    if fmt == "gpx":
        head = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<gpx xmlns="http://www.topografix.com/GPX/1/1" version="1.1" creator="tracker">\n'
            f"<metadata><name>{escape(driver)}</name><desc>{escape(f'{driver}, {iso(start)} to {iso(end)}')}</desc>"
            f"<time>{iso(now_ms())}</time></metadata>\n"
            f"<trk><name>{escape(driver)}</name><trkseg>\n"
        ).encode()
        return head, b"", b"</trkseg></trk>\n</gpx>\n", gpx_row
    return CSV_HEADER.encode(), b"", b"", csv_row


async def stream(
    conn: Any, org: str, driver: str, start: int, end: int, fmt: str, windows: list[tuple[int, int]] | None
) -> AsyncGenerator[bytes, None]:
    """The file, in chunks: rows read through a server-side cursor, never all at once."""
    head, sep, tail, encode = frame_of(fmt, driver, start, end)
    buf, size, first = [head], len(head), True
    async with conn.transaction(readonly=True):
        async for r in conn.cursor(ROWS, org, driver, start, end, prefetch=PREFETCH):
            if windows is not None and not any(a <= r["ts"] < b for a, b in windows):
                continue
            row = encode(r) if first else sep + encode(r)
            first = False
            buf.append(row)
            size += len(row)
            if size >= CHUNK:
                yield b"".join(buf)
                buf, size = [], 0
    buf.append(tail)
    yield b"".join(buf)


class Slots:
    """Exports running on this instance (each holds a pooled connection while it streams)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.running = limit, 0


class _Export(StreamingResponse):
    """Closes its stream, gives its connection back and frees its slot however the response ends:
    sent, failed, or the client gone."""

    def __init__(self, slots: Slots, pool: Any, conn: Any, body: AsyncGenerator[bytes, None], **kw: Any) -> None:
        super().__init__(body, **kw)
        self.slots, self.pool, self.conn, self.rows = slots, pool, conn, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.rows.aclose()
            finally:
                await self.pool.release(self.conn)
                self.slots.running -= 1


def _filename(driver: str, start: int, end: int, fmt: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", driver)[:64] or "driver"
    return f"trail-{safe}-{start}-{end}.{fmt}"


@api
async def driver_trail_file(request: Request) -> Response:
    node: Node = request.app.state.node
    p = principal_of(request, "dispatcher", "client")
    driver, fmt = request.path_params["driver"], request.path_params["fmt"]
    if fmt not in MEDIA:
        raise ApiError(404, "not_found", "no such resource (trail.geojson, trail.gpx or trail.csv)")
    end = _int_param(request, "to", now_ms())
    start = _int_param(request, "from", end - TRAIL_DEFAULT_SPAN_MS)
    if end <= start:
        raise ApiError(400, "invalid", "to must be after from")
    if end - start > EXPORT_MAX_SPAN_MS:
        raise ApiError(400, "invalid", "the span from..to is at most 31 days")
    windows: list[tuple[int, int]] | None = None
    if p.role == "client":
        windows = await node.extension.trail_windows(p, driver)
        if not windows:
            raise ApiError(404, "not_found", "no such driver in your scope")
    slots: Slots | None = getattr(request.app.state, "exports", None)
    if slots is None:
        slots = request.app.state.exports = Slots(EXPORTS_MAX)
    if slots.running >= slots.limit:
        raise ApiError(503, "unavailable", "too many exports in progress on this instance; retry in a few seconds")
    # The connection is taken before the answer starts: an unreachable PostgreSQL is a 503, not a 200 cut short.
    conn = await node.pool.acquire(timeout=5)
    slots.running += 1  # both freed by _Export when the response ends
    body = stream(conn, p.org, driver, start, end, fmt, windows)
    headers = {
        "content-disposition": f"attachment; filename={quoteattr(_filename(driver, start, end, fmt))}",
        "cache-control": "no-store",
    }
    return _Export(slots, node.pool, conn, body, media_type=MEDIA[fmt], headers=headers)
