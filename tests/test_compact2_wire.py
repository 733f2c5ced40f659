"""compact-2 end to end (docs/PROTOCOL.md, "Compact batches (compact-2)"): negotiated in `hello`,
positions and scans in one binary frame over a real websocket (both transport paths) and as the
body of `POST /v1/driver/events`; acked after the commit, stored once in PostgreSQL, a resend acked
and not stored twice, a different event under a taken seq `conflict`, a malformed frame refused
with a clear error and nothing of it stored."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from harness.clients import now_ms, pos, scan
from harness.http import request
from harness.instances import Instance
from harness.tokens import token
from tests.schema_check import assert_frame_valid
from tracker.protocol import compact2

from .test_compact_ws import PATHS, compact_phone, fixes

UPLOAD = "/v1/driver/events"
HEADERS = {"Content-Type": compact2.CONTENT_TYPE}


def backlog(t0: int) -> list[dict[str, Any]]:
    """60 fixes a second apart with a pickup at seq 11 and a delivery at seq 41 among them."""
    events = fixes(1, 62, t0)
    events[10] = scan(11, "PKG-acme-100001", "pickup", ts=t0 + 10_500, lat=-1.2911, lon=36.823, note="2 boxes")
    events[40] = scan(
        41, "PKG-acme-100002", "deliver", ts=t0 + 40_500, recipient="A. Otieno", pod="pod-9f", temp_c=4.25
    )
    return events


async def _stored(db: asyncpg.Connection, org: str, driver: str) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    positions = await db.fetch(
        "SELECT seq, ts, lat, lon, hdg FROM positions WHERE org=$1 AND driver_id=$2 ORDER BY seq", org, driver
    )
    scans = await db.fetch(
        "SELECT seq, ts, package, event, lat, lon, temp_c, note, recipient, pod FROM scans"
        " WHERE org=$1 AND driver_id=$2 ORDER BY seq",
        org,
        driver,
    )
    return positions, scans


def _check_stored(positions: list[asyncpg.Record], scans: list[asyncpg.Record], sent: list[dict[str, Any]]) -> None:
    want_pos = [e for e in sent if e["type"] == "pos"]
    assert [r["seq"] for r in positions] == [e["seq"] for e in want_pos]
    for row, want in zip(positions, want_pos, strict=True):
        assert row["ts"] == want["ts"] and abs(row["lat"] - want["lat"]) <= 0.5e-7 + 1e-12
        assert abs(row["lon"] - want["lon"]) <= 0.5e-7 + 1e-12 and abs(row["hdg"] - want["hdg"]) <= 0.05 + 1e-4
    want_scans = [e for e in sent if e["type"] == "scan"]
    assert [(r["seq"], r["ts"], r["package"], r["event"]) for r in scans] == [
        (e["seq"], e["ts"], e["package"], e["event"]) for e in want_scans
    ]
    assert (scans[0]["note"], scans[1]["recipient"], scans[1]["pod"]) == ("2 boxes", "A. Otieno", "pod-9f")
    assert abs(scans[1]["temp_c"] - 4.25) < 1e-6 and scans[1]["note"] is None


@PATHS
async def test_positions_and_scans_in_one_compact_2_frame_are_stored_acked_resent_and_conflicting(
    start_instance: Any, org: str, db: asyncpg.Connection, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast)
    phone = await compact_phone(inst.url, token("driver", "d-c2", org), ["compact-2", "compact-1", "json"])
    assert phone.welcome["encoding"] == "compact-2"
    sent = backlog(now_ms() - 100_000)
    await phone.ws.send(compact2.encode(sent))
    await phone.until(lambda p: len(p.acked) == 62, timeout=15)
    assert phone.errors == []
    _check_stored(*await _stored(db, org, "d-c2"), sent)
    # The same frame again: acked again, stored once.
    phone.acked.clear()
    await phone.ws.send(compact2.encode(sent))
    await phone.until(lambda p: len(p.acked) == 62, timeout=15)
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1 AND driver_id='d-c2'", org) == 60
    assert await db.fetchval("SELECT count(*) FROM scans WHERE org=$1 AND driver_id='d-c2'", org) == 2
    # Another event under a taken seq: conflict, and the stored one stays.
    other = [dict(sent[40], package="PKG-other"), dict(sent[5], lat=10.0)]
    await phone.ws.send(compact2.encode(other))
    await phone.until(lambda p: len(p.errors) == 2, timeout=15)
    assert sorted((e["code"], e["seq"]) for e in phone.errors) == [("conflict", 6), ("conflict", 41)]
    assert await db.fetchval("SELECT package FROM scans WHERE org=$1 AND driver_id='d-c2' AND seq=41", org) == (
        "PKG-acme-100002"
    )


@PATHS
async def test_a_malformed_compact_2_frame_is_refused_clearly_and_nothing_of_it_is_stored(
    start_instance: Any, org: str, db: asyncpg.Connection, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast)
    phone = await compact_phone(inst.url, token("driver", "d-m2", org), ["compact-2"])
    frame = compact2.encode(backlog(now_ms() - 100_000))
    await phone.ws.send(frame[:-4])  # cut short
    error = await phone.recv()
    assert error["type"] == "error" and error["code"] == "protocol" and error["message"].startswith("compact: ")
    assert await phone.closed() == 1008
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1 AND driver_id='d-m2'", org) == 0
    # On a compact-1 connection a compact-2 frame is malformed too: nothing is mistaken for data.
    old = await compact_phone(inst.url, token("driver", "d-m1", org), ["compact-1"])
    await old.ws.send(frame)
    error = await old.recv()
    assert error["code"] == "protocol" and "0xC1" in error["message"]
    assert await old.closed() == 1008


async def test_a_compact_2_upload_is_stored_and_answered_like_a_json_one(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    sent = backlog(now_ms() - 100_000)
    sent[20]["lat"] = 91.0  # refused alone, as in a JSON upload
    tok = token("driver", "d-h2", org)
    status, _, payload = await request(instance, "POST", UPLOAD, tok, compact2.encode(sent), HEADERS, timeout=40)
    answer = orjson.loads(payload)
    assert status == 200, answer
    assert_frame_valid(answer, "upload-answer")
    assert answer["ranges"] == [[1, 20], [22, 62]] and [(e["seq"], e["code"]) for e in answer["errors"]] == [
        (21, "invalid")
    ]
    del sent[20]
    _check_stored(*await _stored(db, org, "d-h2"), sent)  # committed before the answer
    status, _, payload = await request(instance, "POST", UPLOAD, tok, compact2.encode(sent[:12]), HEADERS, timeout=40)
    assert status == 200 and orjson.loads(payload)["ranges"] == [[1, 12]]
    assert await db.fetchval("SELECT count(*) FROM scans WHERE org=$1 AND driver_id='d-h2'", org) == 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"\xc3\x04\x8a", 400, "invalid"),
        (b"\xc1\x03\x02", 400, "invalid"),
        (compact2.encode([pos(s, ts=1764240000000) for s in range(1, 302)]), 413, "too_large"),
    ],
    ids=["cut-short", "compact-1-bytes", "over-max-batch"],
)
async def test_a_malformed_or_oversized_compact_2_upload_is_refused(
    instance: Instance, org: str, db: asyncpg.Connection, body: bytes, status: int, code: str
) -> None:
    got, _, payload = await request(instance, "POST", UPLOAD, token("driver", "d-b2", org), body, HEADERS)
    error = orjson.loads(payload)["error"]
    assert (got, error["code"]) == (status, code)
    if status == 400:
        assert error["message"].startswith("body: compact: ")
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1 AND driver_id='d-b2'", org) == 0
