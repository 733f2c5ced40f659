"""POST /v1/driver/events with the body transistorsoft's background-geolocation plugin posts
(`batchSync`): its locations mapped to positions, its uuid and timestamp to a stable seq."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from harness.clients import Dash, now_ms
from harness.http import request
from harness.instances import Instance
from harness.tokens import token
from tracker.transport.plugin import plugin_seq

PATH = "/v1/driver/events"


def location(ts_ms: int, uuid: str, lat: float = -1.29207, lon: float = 36.82195, **coords: Any) -> dict[str, Any]:
    """A location as the plugin's default JSON has it."""
    iso = datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "event": "motionchange",
        "is_moving": True,
        "uuid": uuid,
        "timestamp": iso,
        "odometer": 1234.5,
        "coords": {
            "latitude": lat,
            "longitude": lon,
            "accuracy": 6.5,
            "speed": 11.2,
            "heading": 274.0,
            "altitude": 1661.0,
            "ellipsoidal_altitude": 1661.0,
            **coords,
        },
        "activity": {"type": "in_vehicle", "confidence": 90},
        "battery": {"is_charging": False, "level": 0.81},
        "extras": {},
    }


async def post(inst: Instance, org: str, body: Any) -> tuple[int, dict[str, str], Any]:
    tok = token("driver", "d-1", org)
    status, headers, payload = await request(
        inst, "POST", PATH, tok, orjson.dumps(body), {"Content-Type": "application/json"}, timeout=40
    )
    return status, headers, orjson.loads(payload)


async def rows(db: asyncpg.Connection, org: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT seq, ts, lat, lon, acc, spd, hdg, alt, bat FROM positions WHERE org=$1 AND driver_id='d-1' ORDER BY ts",
        org,
    )


async def test_a_batch_sync_body_is_stored_once_however_often_sent(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    t0 = now_ms() - 60_000
    locs = [location(t0 + i * 5000, f"uuid-{i}", lat=-1.29 - i / 1000) for i in range(3)]
    body = {"location": locs, "user_id": 1234}  # params are posted at the root
    status, _, answer = await post(instance, org, body)
    assert status == 200, answer
    assert answer["errors"] == []
    stored = await rows(db, org)
    assert [r["seq"] for r in stored] == [plugin_seq(t0 + i * 5000, f"uuid-{i}") for i in range(3)]
    assert seqs(answer["ranges"]) == {r["seq"] for r in stored}
    first = stored[0]
    assert (first["ts"], first["lat"], first["lon"]) == (t0, pytest.approx(-1.29), pytest.approx(36.82195))
    assert (first["acc"], first["spd"], first["hdg"], first["alt"], first["bat"]) == pytest.approx(
        (6.5, 11.2, 274.0, 1661.0, 0.81)
    )
    status, _, again = await post(instance, org, body)  # no 2xx seen: the plugin sends it all again
    assert (status, again["ranges"], again["errors"]) == (200, answer["ranges"], [])
    assert len(await rows(db, org)) == 3


def seqs(ranges: list[list[int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b + 1)}


async def test_one_location_without_batch_sync_and_unknown_values(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    t = now_ms() - 1000
    loc = location(t, "u-single", speed=-1, heading=-1)
    loc["battery"]["level"] = -1
    status, _, answer = await post(instance, org, {"location": loc})
    assert status == 200 and answer["errors"] == [], answer
    (row,) = await rows(db, org)
    assert (row["seq"], row["ts"], row["spd"], row["hdg"], row["bat"]) == (
        plugin_seq(t, "u-single"),
        t,
        None,
        None,
        None,
    )


async def test_a_location_without_a_timestamp_is_refused_alone(instance: Instance, org: str) -> None:
    good = location(now_ms() - 1000, "u-good")
    bad = location(now_ms() - 2000, "u-bad")
    del bad["timestamp"]
    status, _, answer = await post(instance, org, {"location": [good, bad]})
    assert status == 200
    assert [(e["seq"], e["code"]) for e in answer["errors"]] == [(None, "invalid")]
    assert seqs(answer["ranges"]) == {plugin_seq(good_ts(good), "u-good")}


def good_ts(loc: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(loc["timestamp"]).timestamp() * 1000)


async def test_a_batch_over_the_rate_is_refused_whole_with_retry_after(
    start_instance: Any, org: str, db: asyncpg.Connection
) -> None:
    inst = await start_instance(rate_per_s=0.1, rate_burst=2)
    t0 = now_ms() - 10_000
    body = {"location": [location(t0 + i, f"u-{i}") for i in range(3)]}
    status, headers, answer = await post(inst, org, body)
    # A 2xx would make the plugin delete all three: it must send the batch again.
    assert (status, answer["error"]["code"]) == (429, "rate_limited")
    assert int(headers["retry-after"]) >= 1
    assert len(await rows(db, org)) == 2  # stored; acknowledged again when the batch comes back


async def test_an_uploaded_location_goes_live(instance: Instance, org: str) -> None:
    dash = await Dash.connect(instance.url, token("dispatcher", "u-1", org), subscribe={})
    t = now_ms() - 500
    status, _, _ = await post(instance, org, {"location": [location(t, "u-live", lat=-1.5)]})
    assert status == 200
    got = await dash.collect(lambda fs: any(f["type"] == "pos" and f["ts"] == t for f in fs))
    assert [f for f in got if f["type"] == "pos"][-1]["lat"] == pytest.approx(-1.5)
