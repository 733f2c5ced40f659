"""POST /v1/driver/events: an HTTP upload behaves like a websocket `batch` (real HTTP, PostgreSQL, Redis)."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from typing import Any

import asyncpg
import orjson

from harness.clients import Dash, Phone, now_ms, pos, scan
from harness.http import request
from harness.instances import Instance
from harness.tokens import token
from tests.schema_check import assert_frame_valid

PATH = "/v1/driver/events"


async def upload(
    target: Instance, tok: str | None, events: list[Any], *, gz: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps({"events": events})
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if gz:
        body = gzip.compress(body)
        hdrs["Content-Encoding"] = "gzip"
    status, _, payload = await request(target, "POST", PATH, tok, body, hdrs, timeout=40)
    answer: dict[str, Any] = orjson.loads(payload)
    return status, answer


async def stored(db: asyncpg.Connection, org: str, driver: str) -> list[int]:
    rows = await db.fetch(
        "SELECT seq FROM positions WHERE org=$1 AND driver_id=$2 "
        "UNION ALL SELECT seq FROM scans WHERE org=$1 AND driver_id=$2 ORDER BY 1",
        org,
        driver,
    )
    return [r["seq"] for r in rows]


def seqs_of(ranges: list[list[int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b + 1)}


async def test_upload_is_answered_after_the_commit(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    t0 = now_ms() - 60_000
    events = [pos(s, ts=t0 + s * 1000) for s in range(1, 51)] + [scan(51, "PKG-U1", ts=t0 + 51_000)]
    status, answer = await upload(instance, token("driver", "d-1", org), events)
    assert status == 200, answer
    assert_frame_valid(answer, "upload-answer")
    assert answer["ranges"] == [[1, 51]] and answer["errors"] == []
    # Answered after the commit: every acknowledged seq is a row already.
    assert await stored(db, org, "d-1") == list(range(1, 52))
    assert answer["last_seq"] == 51


async def test_resending_the_same_body_stores_once_and_answers_the_same(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    tok = token("driver", "d-1", org)
    events = [pos(s, ts=now_ms() - 10_000 + s) for s in range(1, 21)]
    first = await upload(instance, tok, events)
    again = await upload(instance, tok, events)
    assert first[0] == again[0] == 200
    assert first[1]["ranges"] == again[1]["ranges"] == [[1, 20]]
    assert again[1]["errors"] == []
    assert await stored(db, org, "d-1") == list(range(1, 21))


async def test_a_different_event_under_a_taken_seq_is_a_conflict(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    tok = token("driver", "d-1", org)
    t = now_ms() - 5000
    await upload(instance, tok, [pos(1, ts=t), pos(2, ts=t + 1)])
    status, answer = await upload(instance, tok, [pos(2, ts=t + 999), pos(3, ts=t + 2)])
    assert status == 200
    assert answer["ranges"] == [[3, 3]]
    assert [(e["seq"], e["code"]) for e in answer["errors"]] == [(2, "conflict")]
    row = await db.fetchrow("SELECT ts FROM positions WHERE org=$1 AND driver_id='d-1' AND seq=2", org)
    assert row["ts"] == t + 1


async def test_invalid_items_are_refused_alone(instance: Instance, org: str) -> None:
    status, answer = await upload(instance, token("driver", "d-1", org), [pos(1), {"type": "pos", "seq": 2}, pos(3)])
    assert status == 200
    assert answer["ranges"] == [[1, 1], [3, 3]]
    assert [(e["seq"], e["code"]) for e in answer["errors"]] == [(2, "invalid")]


async def test_gzip_body_is_accepted(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    events = [pos(s, ts=now_ms() - 1000 + s) for s in range(1, 101)]
    status, answer = await upload(instance, token("driver", "d-1", org), events, gz=True)
    assert status == 200, answer
    assert answer["ranges"] == [[1, 100]]
    assert await stored(db, org, "d-1") == list(range(1, 101))


async def test_a_gzip_bomb_gets_413_fast_without_inflating_it(instance: Instance, org: str) -> None:
    # 64 MiB of zeros deflate to ~64 KiB: under the limit on the wire, 1000 times over it inflated.
    inflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = inflater.compress(b'{"events": [' + b" " * (64 << 20)) + inflater.flush()
    assert len(bomb) < 65_536
    tok = token("driver", "d-1", org)
    start = time.monotonic()
    tracemalloc.start()  # the instance runs in this process: its allocations are traced too
    try:
        status, _, payload = await request(instance, "POST", PATH, tok, bomb, {"Content-Encoding": "gzip"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (status, orjson.loads(payload)["error"]["code"]) == (413, "too_large")
    assert time.monotonic() - start < 2.0
    assert peak < 8 << 20, f"{peak} bytes allocated: the bomb was inflated"
    # Two gzip members (valid gzip) are one body; together over the limit, 413 as well.
    half = gzip.compress(b" " * 40_000)
    status, _, payload = await request(instance, "POST", PATH, tok, half + half, {"Content-Encoding": "gzip"})
    assert (status, orjson.loads(payload)["error"]["code"]) == (413, "too_large")
    body = orjson.dumps({"events": [pos(1)]})
    status, _, payload = await request(
        instance, "POST", PATH, tok, gzip.compress(body[:9]) + gzip.compress(body[9:]), {"Content-Encoding": "gzip"}
    )
    assert (status, orjson.loads(payload)["ranges"]) == (200, [[1, 1]])


async def test_limits(instance: Instance, org: str) -> None:
    tok = token("driver", "d-1", org)
    status, answer = await upload(instance, tok, [pos(s) for s in range(1, 302)])
    assert (status, answer["error"]["code"]) == (413, "too_large")
    big = [pos(1, note="x" * 70_000)]
    status, answer = await upload(instance, tok, big)
    assert (status, answer["error"]["code"]) == (413, "too_large")
    status, answer = await upload(instance, tok, big, gz=True)  # small on the wire, too large inflated
    assert (status, answer["error"]["code"]) == (413, "too_large")


async def test_malformed_bodies_get_400(instance: Instance, org: str) -> None:
    tok = token("driver", "d-1", org)
    for body in (b"{not json", b"[1, 2]", b'{"events": 3}', b"\xff\xfe", b"", gzip.compress(b"{}")[:10]):
        headers = {"Content-Encoding": "gzip"} if body.startswith(b"\x1f\x8b") else {}
        status, _, payload = await request(instance, "POST", PATH, tok, body, headers)
        answer = orjson.loads(payload)
        assert (status, answer["error"]["code"]) == (400, "invalid"), (body, answer)
        assert answer["error"]["message"].startswith("body")


async def test_auth(instance: Instance, org: str) -> None:
    body = orjson.dumps({"events": [pos(1)]})
    status, _, payload = await request(instance, "POST", PATH, None, body)
    assert (status, orjson.loads(payload)["error"]["code"]) == (401, "unauthorized")
    status, _, payload = await request(instance, "POST", PATH, "not-a-jwt", body)
    assert (status, orjson.loads(payload)["error"]["code"]) == (401, "unauthorized")
    status, _, payload = await request(instance, "POST", PATH, token("dispatcher", "u-1", org), body)
    assert (status, orjson.loads(payload)["error"]["code"]) == (403, "forbidden")
    status, _, payload = await request(instance, "GET", PATH, token("driver", "d-1", org))
    assert status == 405


async def test_a_dashboard_sees_the_newest_uploaded_position_live(instance: Instance, org: str) -> None:
    dash = await Dash.connect(instance.url, token("dispatcher", "u-1", org), subscribe={})
    t0 = now_ms() - 30_000
    events = [pos(s, ts=t0 + s * 1000, lat=-1.0 - s / 1000) for s in range(1, 11)]
    status, _ = await upload(instance, token("driver", "d-1", org), events)
    assert status == 200
    got = await dash.collect(lambda fs: any(f["type"] == "pos" and f.get("seq") == 10 for f in fs))
    newest = [f for f in got if f["type"] == "pos"][-1]
    assert newest["driver"] == "d-1" and newest["seq"] == 10
    assert not any(f["type"] == "presence" and f.get("online") for f in got), "an upload is not presence"


async def test_the_rate_budget_is_shared_with_the_websocket(start_instance: Any, org: str) -> None:
    inst = await start_instance(rate_per_s=0.1, rate_burst=5)
    tok = token("driver", "d-1", org)
    status, answer = await upload(inst, tok, [pos(s) for s in range(1, 5)])
    assert (status, answer["ranges"]) == (200, [[1, 4]])
    status, answer = await upload(inst, tok, [pos(s) for s in range(5, 9)])
    assert (status, answer["ranges"]) == (200, [[5, 5]])
    assert [(e["seq"], e["code"]) for e in answer["errors"]] == [
        (6, "rate_limited"),
        (7, "rate_limited"),
        (8, "rate_limited"),
    ]
    assert all(e["retry_ms"] > 0 for e in answer["errors"])
    phone = await Phone.connect(inst.url, tok)  # the same driver's websocket: the same empty budget
    await phone.send(pos(9))
    await phone.until(lambda p: p.errors or p.acked)
    assert phone.refused("rate_limited") == {9}


async def test_last_seq_is_the_highest_stored(instance: Instance, org: str) -> None:
    tok = token("driver", "d-1", org)
    phone = await Phone.connect(instance.url, tok)
    await phone.send({"type": "batch", "items": [pos(s) for s in range(40, 51)]})
    await phone.until(lambda p: len(p.acked) == 11)
    status, answer = await upload(instance, tok, [pos(3)])
    assert status == 200 and answer["ranges"] == [[3, 3]] and answer["last_seq"] == 50
    status, answer = await upload(instance, tok, [pos(60)])
    assert answer["last_seq"] == 60
    assert_frame_valid({"events": [pos(61), scan(62, "PKG-1")]}, "upload")
