"""Cumulative, coalesced acks and compact live frames over real websockets (docs/PROTOCOL.md,
"Cumulative acks", "Compact live frames"): asked for in `hello`, announced in `welcome`, written
only after the commit, one frame per ack delay, gaps as ranges; resends and conflicts as in v1."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from websockets.asyncio.client import connect

from harness.clients import Phone, now_ms, pos
from harness.proxy import Proxy
from harness.tokens import token
from tracker.protocol import compact_live
from tracker.protocol.acks import decode_binary

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "portable"])


class CumulativePhone(Phone):
    """A phone that asked for cumulative acks: `through` and `ranges` both count as acked."""

    acks: list[tuple[float, dict[str, Any]]]
    binary: int

    @classmethod
    async def open(
        cls, base: str, tok: str, *, encodings: list[str] | None = None, acks: str = "cumulative"
    ) -> CumulativePhone:
        phone = cls(await connect(base + "/v1/driver", compression=None))
        phone.acks = []
        phone.binary = 0
        hello: dict[str, Any] = {"type": "hello", "token": tok, "device": "test", "acks": acks}
        if encodings:
            hello["encodings"] = encodings
        await phone.send(hello)
        phone.welcome = await phone.recv()
        assert phone.welcome["type"] == "welcome", phone.welcome
        return phone

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(data, bytes):  # a compact ack: the only binary frame a server sends
            self.binary += 1
            frame = decode_binary(data, self.welcome["last_seq"])
        else:
            frame = orjson.loads(data)
        self.frames.append(frame)
        return frame

    async def pump(self, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.recv(timeout)
        if frame["type"] == "ack":
            self.acks.append((time.monotonic(), frame))
            base = self.welcome["last_seq"]
            if "through" in frame:
                self.acked.update(range(base + 1, frame["through"] + 1))
            for a, b in frame.get("ranges", ()):
                self.acked.update(range(a, b + 1))
        elif frame["type"] == "error":
            self.errors.append(frame)
        return frame


async def stored_seqs(db: asyncpg.Connection, org: str, driver: str) -> set[int]:
    rows = await db.fetch("SELECT seq FROM positions WHERE org=$1 AND driver_id=$2", org, driver)
    return {r["seq"] for r in rows}


def fixes(first: int, n: int) -> list[dict[str, Any]]:
    t0 = now_ms() - 60_000
    return [
        pos(
            first + i, ts=t0 + 1000 * i + i % 5, lat=-1.2920731 + i * 9e-5, lon=36.8219462 + i * 8e-5, spd=13.9, bat=0.8
        )
        for i in range(n)
    ]


async def test_a_v1_phone_gets_todays_welcome_and_one_ack_per_commit(instance: Any, org: str) -> None:
    v1 = await Phone.connect(instance.url, token("driver", "d-v1", org))
    assert "acks" not in v1.welcome and "ack_delay_ms" not in v1.welcome
    await v1.send(pos(1))
    frame = await v1.pump()
    assert frame == {"type": "ack", "ranges": [[1, 1]]}


@PATHS
async def test_coalesced_acks_after_the_commit_with_compact_live_frames(
    start_instance: Any, org: str, db: asyncpg.Connection, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast, ack_delay_ms=400)
    phone = await CumulativePhone.open(inst.url, token("driver", "d-l", org), encodings=["compact-1"])
    assert phone.welcome["acks"] == "cumulative" and phone.welcome["ack_delay_ms"] == 400
    assert phone.welcome["encoding"] == "compact-1" and phone.welcome["last_seq"] == 0
    ctx = compact_live.LiveContext()
    sent = fixes(1, 40)
    for i, fix in enumerate(sent):
        data = ctx.encode(fix)
        assert len(data) <= 16 if i >= 2 else True  # a fix a second: a dozen bytes
        await phone.ws.send(data)
        await asyncio.sleep(0.02)  # 40 fixes over ~1 s: coalesced into a few frames
    async with asyncio.timeout(10):
        while len(phone.acked) < 40:
            frame = await phone.pump()
            if frame["type"] == "ack":  # every seq it speaks of is committed when it arrives
                named = set(range(1, frame.get("through", 0) + 1))
                named |= {s for a, b in frame.get("ranges", ()) for s in range(a, b + 1)}
                assert named <= await stored_seqs(db, org, "d-l")
                # Ranges only beyond a gap: two flushes in flight may commit out of order.
                assert all(a > frame.get("through", 0) + 1 for a, _ in frame.get("ranges", ())), frame
    assert phone.acked == set(range(1, 41)) and phone.errors == []
    assert len(phone.acks) <= 5, [f for _, f in phone.acks]  # 40 fixes, a handful of frames
    rows = await db.fetch("SELECT seq, lat, spd FROM positions WHERE org=$1 AND driver_id='d-l' ORDER BY seq", org)
    assert [r["seq"] for r in rows] == list(range(1, 41))
    assert all(abs(r["lat"] - f["lat"]) <= 0.5e-7 + 1e-12 for r, f in zip(rows, sent, strict=True))


@PATHS
async def test_gaps_are_ranges_then_through_jumps_and_resends_and_conflicts_are_answered(
    start_instance: Any, org: str, db: asyncpg.Connection, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast, ack_delay_ms=200)
    phone = await CumulativePhone.open(inst.url, token("driver", "d-g", org))
    assert "encoding" not in phone.welcome  # JSON frames, cumulative acks
    sent = fixes(1, 8)
    for seq in (1, 2, 4, 5, 8):
        await phone.send(sent[seq - 1])
    await phone.until(lambda p: {1, 2, 4, 5, 8} <= p.acked)
    frames = [f for _, f in phone.acks]  # (two flushes in flight may commit out of order: several frames)
    assert max(f.get("through", 0) for f in frames) == 2, frames  # never past the gap at 3
    ranged = {s for f in frames for a, b in f.get("ranges", ()) for s in range(a, b + 1)}
    assert {4, 5, 8} <= ranged <= {2, 4, 5, 8}, frames  # what lies beyond the gap, by ranges only
    # A bad event is refused at once (final): through may pass it; a conflict is answered per event.
    await phone.send({**sent[5], "lat": 91})  # seq 6
    await phone.send({**sent[0], "lat": 10.0})  # seq 1 again, another position: conflict
    await phone.send(sent[2])  # seq 3 fills the first gap
    await phone.send(sent[6])  # seq 7
    await phone.until(lambda p: {3, 7} <= p.acked)
    assert phone.refused("invalid") == {6} and phone.refused("conflict") == {1}
    assert phone.acks[-1][1] == {"type": "ack", "through": 8}
    # Resends of stored events are acknowledged again, stored once.
    before = len(phone.acks)
    for seq in (4, 5):
        await phone.send(sent[seq - 1])
    await phone.until(lambda p: len(p.acks) > before)
    assert phone.acks[-1][1] == {"type": "ack", "through": 8}
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1 AND driver_id='d-g'", org) == 7
    assert await stored_seqs(db, org, "d-g") == {1, 2, 3, 4, 5, 7, 8}


def via(database_url: str, port: int) -> str:
    parts = urlsplit(database_url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def test_no_ack_arrives_while_postgresql_is_away(
    start_instance: Any, org: str, database_url: str, db: asyncpg.Connection
) -> None:
    port = int(urlsplit(database_url).port or 5432)
    proxy = await Proxy(port, urlsplit(database_url).hostname or "127.0.0.1").start()
    try:
        inst = await start_instance(database_url=via(database_url, proxy.port), ack_delay_ms=100, answer_deadline_s=2.0)
        phone = await CumulativePhone.open(inst.url, token("driver", "d-p", org), encodings=["compact-1"])
        ctx = compact_live.LiveContext()
        sent = fixes(1, 6)
        await phone.ws.send(ctx.encode(sent[0]))
        await phone.until(lambda p: 1 in p.acked)
        proxy.cut()  # PostgreSQL unreachable: nothing can commit
        for fix in sent[1:4]:
            await phone.ws.send(ctx.encode(fix))
        async with asyncio.timeout(10):
            while not phone.errors:
                frame = await phone.pump()
                assert frame["type"] != "ack", frame  # never an ack for what was not committed
        assert phone.errors[0]["code"] == "unavailable" and phone.errors[0]["ranges"] == [[2, 4]]
        assert await stored_seqs(db, org, "d-p") == {1}
        proxy.restore()
        for fix in sent[1:]:  # the phone resends what was refused, then goes on
            await phone.send(fix)
        await phone.until(lambda p: p.acked >= set(range(1, 7)), timeout=20)
        assert phone.acks[-1][1]["through"] == 6
        assert await stored_seqs(db, org, "d-p") == set(range(1, 7))
    finally:
        await proxy.close()


async def test_a_malformed_live_frame_closes_1008_and_without_compact_1003(instance: Any, org: str) -> None:
    phone = await CumulativePhone.open(instance.url, token("driver", "d-m", org), encodings=["compact-1"])
    await phone.ws.send(b"\xc2\x02\x02")
    frame = await phone.recv()
    assert frame["code"] == "protocol" and frame["message"] == "compact: frame ends inside lat"
    assert await phone.closed() == 1008
    json_only = await CumulativePhone.open(instance.url, token("driver", "d-j", org))
    await json_only.ws.send(compact_live.LiveContext().encode(fixes(1, 1)[0]))
    assert await json_only.closed() == 1003
    assert orjson.dumps(frame)


@PATHS
async def test_compact_acks_are_binary_frames_saying_the_same(
    start_instance: Any, org: str, db: asyncpg.Connection, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast, ack_delay_ms=300)
    phone = await CumulativePhone.open(inst.url, token("driver", "d-b", org), encodings=["compact-1"], acks="compact")
    assert phone.welcome["acks"] == "compact" and phone.welcome["ack_delay_ms"] == 300
    ctx = compact_live.LiveContext()
    sent = fixes(1, 12)
    for fix in sent[:5] + sent[6:]:  # seq 6 held back: a gap
        await phone.ws.send(ctx.encode(fix))
    await phone.until(lambda p: p.acked >= {1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12})
    frames = [f for _, f in phone.acks]
    assert max(f.get("through", 0) for f in frames) == 5, frames  # never past the gap at 6
    assert {s for f in frames for a, b in f.get("ranges", ()) for s in range(a, b + 1)} >= {7, 8, 9, 10, 11, 12}
    assert phone.binary == len(phone.acks) <= 4  # binary frames only, coalesced
    assert await stored_seqs(db, org, "d-b") == {1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12}
    await phone.ws.send(ctx.encode(sent[5]))
    await phone.until(lambda p: 6 in p.acked)
    assert phone.acks[-1][1] == {"type": "ack", "through": 12}
    # Without compact-1, a phone asking for compact acks gets cumulative JSON ones.
    json_phone = await CumulativePhone.open(inst.url, token("driver", "d-c", org), acks="compact")
    assert json_phone.welcome["acks"] == "cumulative"
    await json_phone.send(sent[0])
    await json_phone.until(lambda p: 1 in p.acked)
    assert json_phone.binary == 0
