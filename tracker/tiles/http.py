"""The dashboard's street tiles from a PMTiles archive (TRACKER_MAP_TILES=<file>.pmtiles), same-origin:

- `GET /tiles/{z}/{x}/{y}.{ext}`: one tile, decoded from the archive here (an XYZ template the page's
  Leaflet uses as it would any tile server's; the CSP needs no origin but 'self');
- `GET /tiles/archive.pmtiles`: the archive file itself with HTTP range requests (206, Accept-Ranges,
  ETag and If-Range, 416 for a range past its end), for PMTiles clients that read it directly.

Like the page's static files, tiles need no token: an <img> cannot send one. Without an archive
neither route exists (404).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from ..config import Settings
from ..transport.http import error_response
from .archive import Archive
from .pmtiles import FormatError

log = logging.getLogger("tracker.tiles")

TILE_PATH = "/tiles/{z}/{x}/{y}"
ARCHIVE_PATH = "/tiles/archive.pmtiles"
TILE_CACHE = "public, max-age=3600"  # an archive changes only with a restart; browsers keep tiles an hour
MAX_COORD_DIGITS = 10  # 2**30 - 1 has 10 digits: longer numbers are refused before int()


def routes(archive: Archive | None) -> list[BaseRoute]:
    if archive is None:
        return []
    return [
        Route(ARCHIVE_PATH, whole_archive, methods=["GET"]),
        Route("/tiles/{z}/{x}/{y}.{ext}", tile, methods=["GET"]),
    ]


def page_config(settings: Settings, archive: Archive | None) -> dict[str, Any]:
    """GET /v1/config's tile fields: the tile URL template the page uses, its credit and zoom range."""
    if archive is not None:
        h = archive.header
        body: dict[str, Any] = {
            "tile_url": f"{TILE_PATH}.{archive.ext}",
            "tile_attribution": settings.map_tiles_attribution,
            "tile_max_zoom": h.max_zoom,
            "tile_min_zoom": h.min_zoom,
        }
        west, south, east, north = h.bounds
        if -180 <= west < east <= 180 and -90 <= south < north <= 90:
            body["tile_bounds"] = [west, south, east, north]
        return body
    template = settings.tile_template
    if template is None:
        return {"tile_url": None}
    return {
        "tile_url": template,
        "tile_attribution": settings.map_tiles_attribution,
        "tile_max_zoom": settings.map_tiles_max_zoom,
    }


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.tiles
    return archive


def _coord(raw: str) -> int | None:
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= MAX_COORD_DIGITS else None


async def tile(request: Request) -> Response:
    archive = _archive(request)
    p = request.path_params
    z, x, y = _coord(p["z"]), _coord(p["x"]), _coord(p["y"])
    if z is None or x is None or y is None:
        return error_response(400, "invalid", "z, x and y must be non-negative integers")
    h = archive.header
    if p["ext"] != archive.ext or not h.min_zoom <= z <= h.max_zoom or x >= 1 << z or y >= 1 << z:
        return error_response(
            404,
            "not_found",
            f"no such tile: the archive has {archive.ext} tiles at zoom levels "
            f"{h.min_zoom}..{h.max_zoom}, x and y below 2**z",
        )
    try:
        data = await run_in_threadpool(archive.tile, z, x, y)
    except (FormatError, OSError) as exc:
        log.warning("tile %d/%d/%d from %s: %s", z, x, y, archive.path, exc)
        return error_response(500, "internal", "the tile archive is damaged or unreadable")
    if data is None:
        return error_response(404, "not_found", f"the archive has no tile {z}/{x}/{y}")
    headers = {"cache-control": TILE_CACHE}
    if archive.gzipped:
        headers["content-encoding"] = "gzip"
    return Response(data, media_type=archive.media_type, headers=headers)


async def whole_archive(request: Request) -> Response:
    """The archive file, ranges and all (Starlette's FileResponse: single and multiple ranges, If-Range
    against its ETag or Last-Modified, 416 with `Content-Range: bytes */size` past the end)."""
    archive = _archive(request)
    try:
        stat = await run_in_threadpool(os.stat, archive.path)
    except OSError as exc:
        log.warning("the tile archive %s: %s", archive.path, exc)
        return error_response(503, "unavailable", "the tile archive is unreadable")
    return FileResponse(
        archive.path,
        stat_result=stat,
        media_type="application/vnd.pmtiles",
        headers={"cache-control": "no-cache"},  # revalidated with its ETag: a replaced archive is seen
    )
