"""`POST /v1/driver/events` with a compact-1 body (`Content-Type: application/vnd.tracker.compact-1`,
docs/PROTOCOL.md): the same answers as a JSON upload, after the commit; malformed 400, too many 413."""

from __future__ import annotations

import asyncpg
import orjson

from harness.clients import now_ms, pos
from harness.http import request
from harness.instances import Instance
from harness.tokens import token
from tests.schema_check import assert_frame_valid
from tracker.protocol import compact

PATH = "/v1/driver/events"
HEADERS = {"Content-Type": compact.CONTENT_TYPE}


async def test_a_compact_upload_is_stored_and_answered_like_a_json_one(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    t0 = now_ms() - 60_000
    fixes = [
        pos(s, ts=t0 + 1000 * s, lat=-1.29 + s * 1e-4, lon=36.82 + s * 1e-4, spd=12.5, bat=0.7) for s in range(1, 61)
    ]
    fixes[9]["lat"] = 91.0  # refused alone, as in a JSON upload
    tok = token("driver", "d-1", org)
    status, _, payload = await request(instance, "POST", PATH, tok, compact.encode(fixes), HEADERS, timeout=40)
    answer = orjson.loads(payload)
    assert status == 200, answer
    assert_frame_valid(answer, "upload-answer")
    assert answer["ranges"] == [[1, 9], [11, 60]] and [(e["seq"], e["code"]) for e in answer["errors"]] == [
        (10, "invalid")
    ]
    rows = await db.fetch("SELECT seq, lat, spd FROM positions WHERE org=$1 AND driver_id='d-1' ORDER BY seq", org)
    assert [r["seq"] for r in rows] == [s for s in range(1, 61) if s != 10]  # committed before the answer
    assert abs(rows[0]["lat"] - fixes[0]["lat"]) <= 0.5e-7 + 1e-12 and abs(rows[0]["spd"] - 12.5) < 1e-6
    # A resend is acknowledged again, stored once.
    status, _, payload = await request(instance, "POST", PATH, tok, compact.encode(fixes[:5]), HEADERS, timeout=40)
    assert status == 200 and orjson.loads(payload)["ranges"] == [[1, 5]]
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1 AND driver_id='d-1'", org) == 59


async def test_a_malformed_or_oversized_compact_upload_is_refused(instance: Instance, org: str) -> None:
    tok = token("driver", "d-2", org)
    status, _, payload = await request(instance, "POST", PATH, tok, b"\xc1\x03\x02", HEADERS)
    assert status == 400 and orjson.loads(payload)["error"]["message"].startswith("body: compact: ")
    many = compact.encode([pos(s, ts=now_ms()) for s in range(1, 302)])  # max_batch is 300
    status, _, payload = await request(instance, "POST", PATH, tok, many, HEADERS)
    assert (status, orjson.loads(payload)["error"]["code"]) == (413, "too_large")
