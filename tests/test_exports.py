"""Trail exports (GET /v1/drivers/{id}/trail.{geojson,gpx,csv}): the files a user downloads, read
back with the readers they would use (GPX validated against the published XSD, tests/data), the
trail API's scope, and memory that stays flat however many points stream out."""

from __future__ import annotations

import asyncio
import csv
import io
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import xmlschema

from harness.clients import Phone, acked, now_ms, pos, scan
from harness.http import consign, request
from harness.instances import Instance
from harness.tokens import token

GPX_XSD = xmlschema.XMLSchema(Path(__file__).parent / "data" / "gpx-1.1.xsd")
NS = {"g": "http://www.topografix.com/GPX/1/1"}


def _disp(org: str) -> str:
    return token("dispatcher", "u", org)


async def _get(inst: Instance, path: str, tok: str) -> tuple[int, dict[str, str], bytes]:
    return await request(inst, "GET", path, tok)


async def _send_trail(inst: Instance, org: str, t0: int) -> list[dict[str, Any]]:
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    sent = [
        pos(1, ts=t0, lat=-1.29207, lon=36.82195, spd=11.2, alt=1661.5, acc=4.0),
        pos(2, ts=t0 + 1000, lat=0.00001, lon=-0.00002),  # tiny numbers: no exponent in GPX decimals
        pos(3, ts=t0 + 2000, lat=-89.5, lon=180.0, hdg=359.0, bat=0.5),  # lon 180: GPX says -180
        pos(4, ts=t0 + 3000, lat=1.5, lon=-180.0),
    ]
    await phone.send({"type": "batch", "items": sent})
    await acked(phone, 1, 2, 3, 4)
    return sent


async def test_the_three_formats_read_back(instance: Instance, org: str) -> None:
    t0 = now_ms() - 60_000
    sent = await _send_trail(instance, org, t0)
    q = f"?from={t0}&to={t0 + 60_000}"
    # GPX 1.1: valid against the schema; every point, in order, with its time and elevation.
    status, headers, body = await _get(instance, "/v1/drivers/d-1/trail.gpx" + q, _disp(org))
    assert status == 200 and headers["content-type"] == "application/gpx+xml", (status, body[:300])
    assert headers.get("transfer-encoding") == "chunked"  # streamed, not built in memory and sent at once
    assert headers["content-disposition"] == f'attachment; filename="trail-d-1-{t0}-{t0 + 60_000}.gpx"'
    GPX_XSD.validate(body.decode())
    points = ET.fromstring(body).findall(".//g:trkpt", NS)
    assert [(float(p.get("lat", "")), float(p.get("lon", ""))) for p in points] == [
        (-1.29207, 36.82195),
        (0.00001, -0.00002),
        (-89.5, -180.0),
        (1.5, -180.0),
    ]
    assert points[0].findtext("g:ele", namespaces=NS) == "1661.5"
    assert points[1].find("g:ele", NS) is None
    assert [p.findtext("g:time", namespaces=NS) for p in points][:1] == [_iso(t0)]
    # GeoJSON: a FeatureCollection of Points ([lon, lat]) with each fix's fields.
    status, headers, body = await _get(instance, "/v1/drivers/d-1/trail.geojson" + q, _disp(org))
    assert status == 200 and headers["content-type"] == "application/geo+json"
    doc = orjson.loads(body)
    assert doc["type"] == "FeatureCollection" and doc["driver"] == "d-1"
    assert [f["geometry"]["coordinates"] for f in doc["features"]] == [[s["lon"], s["lat"]] for s in sent]
    first = doc["features"][0]
    assert first["type"] == "Feature" and first["geometry"]["type"] == "Point"
    assert {k: first["properties"][k] for k in ("seq", "ts", "spd", "alt", "acc", "bat")} == {
        "seq": 1,
        "ts": t0,
        "spd": 11.2,
        "alt": 1661.5,
        "acc": 4.0,
        "bat": None,
    }
    # CSV: what a spreadsheet or pandas reads.
    status, headers, body = await _get(instance, "/v1/drivers/d-1/trail.csv" + q, _disp(org))
    assert status == 200 and headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [(int(r["seq"]), int(r["ts"]), float(r["lat"]), float(r["lon"])) for r in rows] == [
        (s["seq"], s["ts"], s["lat"], s["lon"]) for s in sent
    ]
    assert (rows[0]["time"], rows[0]["spd"], rows[0]["bat"], rows[2]["hdg"]) == (_iso(t0), "11.2", "", "359.0")
    # An empty span is still a valid file of each format.
    empty = f"?from={t0 - 10_000}&to={t0}"
    GPX_XSD.validate((await _get(instance, "/v1/drivers/d-1/trail.gpx" + empty, _disp(org)))[2].decode())
    assert (
        orjson.loads((await _get(instance, "/v1/drivers/d-1/trail.geojson" + empty, _disp(org)))[2])["features"] == []
    )
    assert (await _get(instance, "/v1/drivers/d-1/trail.csv" + empty, _disp(org)))[
        2
    ] == b"seq,ts,time,lat,lon,acc,spd,hdg,alt,bat\r\n"


def _iso(ts: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1000)) + f".{ts % 1000:03d}Z"


async def test_exports_follow_the_trail_scope(instance: Instance, org: str) -> None:
    await consign(instance, org, "PKG-1", "st-marys")
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms() - 60_000
    await phone.send(
        {
            "type": "batch",
            "items": [
                pos(1, ts=t),  # before the pickup: not the client's
                scan(2, "PKG-1", "pickup", ts=t + 1000),
                pos(3, ts=t + 2000),
                scan(4, "PKG-1", "deliver", ts=t + 3000),
                pos(5, ts=t + 4000),  # after the delivery: not the client's
            ],
        }
    )
    await acked(phone, 1, 2, 3, 4, 5)
    q = f"?from={t - 1000}&to={t + 10_000}"
    client = token("client", "c", org, client="st-marys")

    async def seqs(tok: str) -> list[int]:
        for _ in range(50):  # the custody windows exist once the scans are chained (tens of ms)
            status, _, body = await _get(instance, "/v1/drivers/d-1/trail.csv" + q, tok)
            if status == 200:
                return [int(r["seq"]) for r in csv.DictReader(io.StringIO(body.decode()))]
            await asyncio.sleep(0.05)
        raise AssertionError(status)

    assert await seqs(_disp(org)) == [1, 3, 5]
    assert await seqs(client) == [3]
    other = token("client", "c", org, client="westside")
    assert (await _get(instance, "/v1/drivers/d-1/trail.gpx" + q, other))[0] == 404
    assert (await _get(instance, "/v1/drivers/d-1/trail.gpx" + q, token("driver", "d-1", org)))[0] == 403
    assert (await _get(instance, "/v1/drivers/d-1/trail.gpx" + q, _disp(org + "-b")))[0] == 200  # empty: other org
    assert (await _get(instance, "/v1/drivers/d-1/trail.gpx" + q, None))[0] == 401  # type: ignore[arg-type]
    assert (await _get(instance, "/v1/drivers/d-1/trail.kml" + q, _disp(org)))[0] == 404
    assert (await _get(instance, f"/v1/drivers/d-1/trail.csv?from={t}&to={t}", _disp(org)))[0] == 400
    assert (await _get(instance, f"/v1/drivers/d-1/trail.csv?from=0&to={40 * 86_400_000}", _disp(org)))[0] == 400


async def _insert_points(db: asyncpg.Connection, org: str, driver: str, n: int, t0: int) -> None:
    """Straight into the partitioned table (COPY), as a bulk import would: the writer's path is not under test."""
    await db.execute("INSERT INTO drivers (org, driver_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", org, driver)
    did = await db.fetchval("SELECT id FROM drivers WHERE org = $1 AND driver_id = $2", org, driver)
    rows = ((did, i + 1, t0 + i * 1000, t0 + i * 1000, -1.3 + i * 1e-6, 36.8 + i * 1e-6) for i in range(n))
    await db.copy_records_to_table(
        "position_rows", records=rows, columns=["driver", "seq", "ts", "received_at", "lat", "lon"]
    )


async def _download(inst: Instance, path: str, tok: str) -> tuple[int, int]:
    """GET `path` reading the body in chunks and dropping them, as a browser saving a file would:
    (bytes, points) with points counted as `<trkpt` across chunk boundaries."""
    reader, writer = await asyncio.open_connection("127.0.0.1", inst.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n".encode())
    total, points, tail = 0, 0, b""
    while chunk := await reader.read(65_536):
        total += len(chunk)
        points += (tail + chunk).count(b"<trkpt ")
        tail = chunk[-6:]
    writer.close()
    return total, points


async def test_memory_stays_flat_however_long_the_trail(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    t0 = now_ms() - 30 * 86_400_000
    small, large = 4_000, 32_000
    await _insert_points(db, org, "d-s", small, t0)
    await _insert_points(db, org, "d-l", large, t0)
    q = f"?from={t0}&to={t0 + 30 * 86_400_000}"
    peaks = {}
    tracemalloc.start()
    try:
        for driver, n in (("d-s", small), ("d-l", large)):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            size, points = await _download(instance, f"/v1/drivers/{driver}/trail.gpx{q}", _disp(org))
            assert points == n
            peaks[n] = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # The large file is 8x the small one (some 3 MB); what the process held at its peak is not
    # (bench/export_trail.py streams a million points from a server process and reads its RSS).
    assert size > 2_500_000
    assert peaks[large] < 2_500_000, peaks
    assert peaks[large] < 1.5 * peaks[small] + 1_000_000, peaks
