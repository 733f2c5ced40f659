"""Street tiles from a PMTiles archive, served by tracker over real HTTP (tracker/tiles/http.py):
`GET /tiles/{z}/{x}/{y}.png` answers the archive's tile bytes (404 for a tile it lacks or outside the
grid, 400 for a malformed coordinate), `GET /tiles/archive.pmtiles` answers byte ranges (206 with
the right bytes, If-Range, 416 past the end), `/v1/config` gives the page the same-origin template,
and the page's CSP names no origin but its own.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson

from harness.browser import solid_png, tile_colour
from harness.http import request
from harness.instances import Instance
from harness.pmtiles import write_archive
from harness.tokens import token
from tracker.tiles.pmtiles import parse_header


def archive_tiles(max_zoom: int = 4) -> dict[tuple[int, int, int], bytes]:
    """Small PNGs of a colour per (x, y), all zoom levels up to `max_zoom`, but one hole at 3/2/5."""
    tiles = {
        (z, x, y): solid_png(tile_colour(z, x, y), 4)
        for z in range(max_zoom + 1)
        for x in range(1 << z)
        for y in range(1 << z)
    }
    tiles.pop((3, 2, 5), None)
    return tiles


async def test_tiles_come_from_the_archive_by_z_x_y(start_instance: Any, tmp_path: Path, org: str) -> None:
    tiles = archive_tiles()
    (tmp_path / "maps").mkdir()
    write_archive(tmp_path / "maps" / "test.pmtiles", tiles, leaf_size=16, bounds=(33.9, -4.7, 41.9, 5.0))
    (tmp_path / "jwt-secret").write_text("do not serve me")  # the data folder's secrets stay in it
    inst: Instance = await start_instance(map_tiles="maps/test.pmtiles", map_tiles_attribution="© Test Archive")

    for (z, x, y), png in [((0, 0, 0), tiles[(0, 0, 0)]), ((4, 9, 7), tiles[(4, 9, 7)]), ((3, 7, 0), tiles[(3, 7, 0)])]:
        status, headers, body = await request(inst, "GET", f"/tiles/{z}/{x}/{y}.png")
        assert status == 200 and body == png, (z, x, y, status, body[:80])
        assert headers["content-type"] == "image/png" and "max-age" in headers["cache-control"]
    status, headers, body = await request(inst, "HEAD", "/tiles/4/9/7.png")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(tiles[(4, 9, 7)]))

    for path, want in [
        ("/tiles/3/2/5.png", 404),  # a hole in the archive
        ("/tiles/5/0/0.png", 404),  # deeper than the archive
        ("/tiles/3/8/0.png", 404),  # x outside zoom 3's 8x8 grid
        ("/tiles/3/0/8.png", 404),
        ("/tiles/31/0/0.png", 404),
        ("/tiles/3/0/0.jpg", 404),  # the archive holds png
        ("/tiles/3/-1/0.png", 400),
        ("/tiles/3/1e2/0.png", 400),
        ("/tiles/99999999999999999999/0/0.png", 400),
        ("/tiles/3/0/0.png.png", 400),
        ("/tiles/../../jwt-secret", 404),
        ("/tiles/%2e%2e/%2e%2e/jwt-secret", 404),
        ("/tiles/archive.pmtiles/../../jwt-secret", 404),
        ("/tiles/maps/test.pmtiles", 404),
    ]:
        status, headers, body = await request(inst, "GET", path)
        assert status == want, (path, status, body[:200])
        assert headers["content-type"] == "application/json", (path, headers)
        assert b"do not serve me" not in body, path

    # The page's settings: tracker's own tiles, with the archive's zoom range and area.
    status, _, body = await request(inst, "GET", "/v1/config", token("dispatcher", "u-1", org))
    assert status == 200
    assert orjson.loads(body) == {
        "tile_url": "/tiles/{z}/{x}/{y}.png",
        "tile_attribution": "© Test Archive",
        "tile_max_zoom": 4,
        "tile_min_zoom": 0,
        "tile_bounds": [33.9, -4.7, 41.9, 5.0],
    }
    # The CSP: tiles from the page's own origin, and no other origin named anywhere.
    _, headers, _ = await request(inst, "GET", "/")
    csp = headers["content-security-policy"]
    assert "img-src 'self' data:;" in csp and "http" not in csp, csp


async def test_the_archive_is_served_with_range_requests(start_instance: Any, tmp_path: Path) -> None:
    path = write_archive(tmp_path / "test.pmtiles", archive_tiles())
    whole = path.read_bytes()
    size = len(whole)
    inst: Instance = await start_instance(map_tiles=str(path))  # an absolute path works too

    status, headers, body = await request(inst, "GET", "/tiles/archive.pmtiles")
    assert status == 200 and body == whole and headers["accept-ranges"] == "bytes"
    etag = headers["etag"]

    # The header, as a PMTiles client reads it first: the first 127 bytes.
    status, headers, body = await request(inst, "GET", "/tiles/archive.pmtiles", headers={"Range": "bytes=0-126"})
    assert status == 206 and body == whole[:127] and body.startswith(b"PMTiles\x03")
    assert headers["content-range"] == f"bytes 0-126/{size}" and headers["content-length"] == "127"
    for spec, want in [
        (f"bytes=100-{size + 5000}", whole[100:]),  # an end past the file: clamped
        ("bytes=-10", whole[-10:]),  # the last 10 bytes
        (f"bytes={size - 1}-", whole[-1:]),
    ]:
        status, headers, body = await request(inst, "GET", "/tiles/archive.pmtiles", headers={"Range": spec})
        assert status == 206 and body == want, (spec, status, headers)

    # If-Range: the range only while the file is the one the client knows, else the whole file.
    status, _, body = await request(
        inst, "GET", "/tiles/archive.pmtiles", headers={"Range": "bytes=0-9", "If-Range": etag}
    )
    assert status == 206 and body == whole[:10]
    status, _, body = await request(
        inst, "GET", "/tiles/archive.pmtiles", headers={"Range": "bytes=0-9", "If-Range": '"another-version"'}
    )
    assert status == 200 and body == whole

    # Out of range: 416 saying the size; a range that is not one: 400.
    for spec in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        status, headers, _ = await request(inst, "GET", "/tiles/archive.pmtiles", headers={"Range": spec})
        assert status == 416 and headers["content-range"] == f"bytes */{size}", (spec, status, headers)
    for spec in ("bytes=9-3", "lines=0-3", "bytes=x-y"):
        status, _, _ = await request(inst, "GET", "/tiles/archive.pmtiles", headers={"Range": spec})
        assert status == 400, (spec, status)
    status, _, _ = await request(inst, "POST", "/tiles/archive.pmtiles")
    assert status == 405


async def test_without_an_archive_there_are_no_tile_routes(start_instance: Any, org: str) -> None:
    inst: Instance = await start_instance(map_tiles="https://tiles.example.org/{z}/{x}/{y}.png")
    for path in ("/tiles/0/0/0.png", "/tiles/archive.pmtiles"):
        status, _, _ = await request(inst, "GET", path)
        assert status == 404, path
    status, _, body = await request(inst, "GET", "/v1/config", token("dispatcher", "u-1", org))
    assert orjson.loads(body) == {
        "tile_url": "https://tiles.example.org/{z}/{x}/{y}.png",
        "tile_attribution": "© OpenStreetMap contributors",
        "tile_max_zoom": 19,
    }


async def test_gzipped_tiles_are_served_as_stored_with_their_content_encoding(
    start_instance: Any, tmp_path: Path
) -> None:
    """An archive storing its tiles gzipped (a header field): tracker sends the stored bytes with
    `Content-Encoding: gzip`, and the browser's unpacking gives the PNG."""
    tiles = archive_tiles(2)
    path = write_archive(tmp_path / "gz.pmtiles", tiles, tile_compression="gzip")
    inst: Instance = await start_instance(map_tiles=str(path))
    status, headers, body = await request(inst, "GET", "/tiles/2/1/3.png")
    assert status == 200 and headers["content-encoding"] == "gzip" and headers["content-type"] == "image/png"
    assert gzip.decompress(body) == tiles[(2, 1, 3)]


async def test_a_leaf_damaged_after_start_is_a_json_500_naming_no_file(start_instance: Any, tmp_path: Path) -> None:
    tiles = archive_tiles()
    path = write_archive(tmp_path / "test.pmtiles", tiles, leaf_size=16)
    inst: Instance = await start_instance(map_tiles=str(path))
    status, _, _ = await request(inst, "GET", "/tiles/4/9/7.png")
    assert status == 200
    raw = bytearray(path.read_bytes())
    h = parse_header(bytes(raw[:127]))
    raw[h.leaf_offset : h.leaf_offset + h.leaf_length] = b"\xff" * h.leaf_length  # every leaf garbage
    path.write_bytes(bytes(raw))  # the same file (inode), rewritten in place
    status, headers, body = await request(inst, "GET", "/tiles/4/3/12.png")  # a leaf not yet cached
    assert status == 500 and headers["content-type"] == "application/json", (status, body)
    assert str(tmp_path) not in body.decode() and "pmtiles" not in body.decode(), body
    status, _, body = await request(inst, "GET", "/tiles/4/9/7.png")  # its leaf cached: still served
    assert status == 200 and body == tiles[(4, 9, 7)]
