"""Compact batches end to end (docs/PROTOCOL.md, "Compact batches"): negotiated in `hello`, sent as
binary websocket frames, acked after the commit, stored in PostgreSQL, seen live; over both
transport paths (the fast path's own frame reader and the portable ASGI one)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest
from websockets.asyncio.client import connect

from harness.clients import Dash, Phone, now_ms, pos
from harness.tokens import token
from tracker.protocol import compact

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "portable"])


async def compact_phone(url: str, tok: str, encodings: list[str]) -> Phone:
    phone = Phone(await connect(url + "/v1/driver", compression=None))
    await phone.send({"type": "hello", "token": tok, "device": "test", "encodings": encodings})
    phone.welcome = await phone.recv()
    assert phone.welcome["type"] == "welcome", phone.welcome
    return phone


def fixes(first_seq: int, n: int, t0: int) -> list[dict[str, Any]]:
    """A driver heading north-east at about 14 m/s, one fix a second, every field present."""
    return [
        {
            "type": "pos",
            "seq": first_seq + i,
            "ts": t0 + 1000 * i + i % 7,
            "lat": -1.2920731 + i * 0.0000917,
            "lon": 36.8219462 + i * 0.0000853,
            "acc": 4.0 + (i % 5) * 0.5,
            "spd": 13.9 + (i % 3) * 0.1,
            "hdg": 43.0 + (i % 4),
            "alt": 1661.0 + i % 3,
            "bat": 0.81 - i * 0.0004,
        }
        for i in range(n)
    ]


@PATHS
async def test_a_phone_negotiates_compact_and_100_fixes_are_stored_acked_and_live(
    start_instance: Any, org: str, db: asyncpg.Connection, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast)
    dash = await Dash.connect(inst.url, token("dispatcher", "u-1", org), subscribe={})
    phone = await compact_phone(inst.url, token("driver", "d-c", org), ["compact-1", "json"])
    assert phone.welcome["encoding"] == "compact-1"
    t0 = now_ms() - 100_000
    sent = fixes(1, 100, t0)
    await phone.ws.send(compact.encode(sent))  # bytes: a binary frame
    async with asyncio.timeout(15):
        while len(phone.acked) < 100:
            frame = await phone.pump()
            if frame["type"] == "ack":  # acked only after the commit: every seq named is stored
                named = [s for a, b in frame["ranges"] for s in range(a, b + 1)]
                stored = await db.fetchval(
                    "SELECT count(*) FROM positions WHERE org=$1 AND driver_id='d-c' AND seq = ANY($2::bigint[])",
                    org,
                    named,
                )
                assert stored == len(named)
    assert phone.acked == set(range(1, 101)) and phone.errors == []
    rows = await db.fetch(
        "SELECT seq, ts, lat, lon, acc, spd, hdg, alt, bat FROM positions"
        " WHERE org=$1 AND driver_id='d-c' ORDER BY seq",
        org,
    )
    assert [r["seq"] for r in rows] == list(range(1, 101))
    for row, want in zip(rows, sent, strict=True):
        assert row["ts"] == want["ts"]
        assert abs(row["lat"] - want["lat"]) <= 0.5e-7 + 1e-12 and abs(row["lon"] - want["lon"]) <= 0.5e-7 + 1e-12
        # real (float32) columns: the stated precision plus float32's own rounding
        for key, precision in (("acc", 0.05), ("spd", 0.05), ("hdg", 0.5), ("alt", 0.5), ("bat", 0.005)):
            assert abs(row[key] - want[key]) <= precision + 1e-3, (row["seq"], key, row[key], want[key])
    got = await dash.collect(lambda fs: any(f["type"] == "pos" and f["seq"] == 100 for f in fs))
    newest = next(f for f in got if f["type"] == "pos" and f["seq"] == 100)
    assert newest["driver"] == "d-c" and abs(newest["lat"] - sent[-1]["lat"]) <= 0.5e-7 + 1e-12
    # JSON text frames keep working on a compact connection.
    await phone.send(pos(101, ts=now_ms()))
    await phone.until(lambda p: 101 in p.acked)


@PATHS
async def test_binary_frames_still_close_1003_without_compact(start_instance: Any, org: str, fast: bool) -> None:
    inst = await start_instance(ws_fast_path=fast)
    phone = await compact_phone(inst.url, token("driver", "d-j", org), ["json"])
    assert phone.welcome["encoding"] == "json"
    await phone.ws.send(compact.encode(fixes(1, 3, now_ms())))
    assert await phone.closed() == 1003
    v1 = await Phone.connect(inst.url, token("driver", "d-v1", org))
    assert "encoding" not in v1.welcome  # a v1 phone's welcome is unchanged
    await v1.ws.send(compact.encode(fixes(1, 3, now_ms())))
    assert await v1.closed() == 1003


@PATHS
async def test_a_malformed_compact_frame_is_a_protocol_error(start_instance: Any, org: str, fast: bool) -> None:
    inst = await start_instance(ws_fast_path=fast)
    phone = await compact_phone(inst.url, token("driver", "d-m", org), ["compact-1"])
    await phone.ws.send(b"\xc1\x03\x02")
    frame = await phone.recv()
    assert frame["type"] == "error" and frame["code"] == "protocol" and frame["message"].startswith("compact: ")
    assert await phone.closed() == 1008
    assert orjson.dumps(frame)  # an ordinary JSON error frame: the phone reads answers as JSON text
