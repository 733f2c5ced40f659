"""Live fan-out: across instances, scoped by org, with snapshots and slow-consumer handling."""

from __future__ import annotations

import socket
from typing import Any

import asyncpg
from websockets.asyncio.client import connect

from harness.clients import Dash, Peer, Phone, now_ms, pos, scan
from harness.instances import Instance
from harness.tokens import token


async def test_dashboard_on_b_receives_in_order_what_a_driver_sends_to_a(start_instance: Any, org: str) -> None:
    a, b = await start_instance(), await start_instance()
    dash = await Dash.connect(b.url, token("dispatcher", "u-1", org), subscribe={})
    phone = await Phone.connect(a.url, token("driver", "d-17", org, name="Amina"))
    t = now_ms()
    for seq in range(1, 101):
        await phone.send(pos(seq, ts=t + seq, lat=-1.29 + seq * 1e-4))
    got = await dash.collect(lambda fs: sum(f["type"] == "pos" for f in fs) >= 100)
    positions = [f for f in got if f["type"] == "pos"]
    assert [f["seq"] for f in positions] == list(range(1, 101))
    assert all(f["driver"] == "d-17" for f in positions)
    assert positions[5]["lat"] == -1.29 + 6 * 1e-4
    presence = [f for f in got if f["type"] == "presence"]
    assert presence and presence[0]["online"] is True and presence[0]["name"] == "Amina"


async def test_other_org_sees_nothing_and_same_driver_id_is_separate(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    other = org + "-other"
    mine = await Dash.connect(instance.url, token("dispatcher", "u-1", org), subscribe={})
    theirs = await Dash.connect(instance.url, token("dispatcher", "u-2", other), subscribe={})
    p1 = await Phone.connect(instance.url, token("driver", "d-17", org))
    p2 = await Phone.connect(instance.url, token("driver", "d-17", other))  # same id, other org: no replacement
    t = now_ms()
    await p1.send(pos(1, ts=t, lat=-1.0))
    await p2.send(pos(1, ts=t, lat=6.5))
    await p2.send(pos(2, ts=t + 1, lat=6.6))
    await p1.until(lambda p: p.acked == {1})
    await p2.until(lambda p: p.acked == {1, 2})
    got_mine = await mine.collect(lambda fs: any(f["type"] == "pos" for f in fs))
    got_theirs = await theirs.collect(lambda fs: sum(f["type"] == "pos" for f in fs) == 2)
    assert [f["lat"] for f in got_mine if f["type"] == "pos"] == [-1.0]
    assert [f["lat"] for f in got_theirs if f["type"] == "pos"] == [6.5, 6.6]
    # Nothing more of the other org arrives later either.
    await p2.send(pos(3, ts=t + 2, lat=6.7))
    await p2.until(lambda p: 3 in p.acked)
    await p1.send(pos(2, ts=t + 3, lat=-1.1))
    await p1.until(lambda p: 2 in p.acked)
    more = await mine.collect(lambda fs: any(f["type"] == "pos" for f in fs))
    assert [f["lat"] for f in more if f["type"] == "pos"] == [-1.1]
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1", org) == 2
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1", other) == 3
    snap = await mine.subscribe({})
    assert [(d["driver"], d["lat"], d["online"]) for d in snap["drivers"]] == [("d-17", -1.1, True)]
    await p2.close()
    offline = await theirs.collect(lambda fs: any(f["type"] == "presence" for f in fs))
    assert [f["online"] for f in offline if f["type"] == "presence"] == [False]
    snap = await mine.subscribe({})
    assert snap["drivers"][0]["online"] is True  # the other org's d-17 going offline is not ours


async def test_snapshot_then_live_with_filters(instance: Instance, org: str) -> None:
    phones = {d: await Phone.connect(instance.url, token("driver", d, org)) for d in ("d-1", "d-2", "d-3")}
    t = now_ms() - 10_000
    await phones["d-1"].send(pos(1, ts=t, lat=-1.2, lon=36.8))  # Nairobi
    await phones["d-2"].send(pos(1, ts=t, lat=6.5, lon=3.4))  # Lagos
    await phones["d-3"].send(pos(1, ts=t, lat=-1.3, lon=36.9))  # Nairobi
    for p in phones.values():
        await p.until(lambda p: 1 in p.acked)
    nairobi = [36.6, -1.45, 37.1, -1.1]
    dash = await Dash.connect(instance.url, token("dispatcher", "u", org), subscribe={"bbox": nairobi})
    assert sorted(d["driver"] for d in dash.snapshot["drivers"]) == ["d-1", "d-3"]
    # d-1 leaves the box: one last position outside, then nothing until it returns.
    await phones["d-1"].send(pos(2, ts=t + 1, lat=-1.2, lon=36.8))
    await phones["d-1"].send(pos(3, ts=t + 2, lat=0.5, lon=36.8))
    await phones["d-1"].send(pos(4, ts=t + 3, lat=0.6, lon=36.8))
    await phones["d-2"].send(pos(2, ts=t + 1, lat=6.5, lon=3.4))
    await phones["d-1"].send(pos(5, ts=t + 4, lat=-1.25, lon=36.8))
    got = await dash.collect(lambda fs: any(f.get("seq") == 5 for f in fs))
    assert [(f["driver"], f["seq"]) for f in got if f["type"] == "pos"] == [("d-1", 2), ("d-1", 3), ("d-1", 5)]
    await phones["d-3"].send(scan(2, "PKG-7", ts=t + 1))  # d-3 picks up PKG-7
    await dash.collect(lambda fs: any(f["type"] == "package" and f["state"] == "picked_up" for f in fs))
    # drivers + packages name what to follow (their union); ids out of scope are ignored.
    snap = await dash.subscribe({"drivers": ["d-2", "nobody"], "packages": ["PKG-7"]})
    # d-3 carries PKG-7 (picked up above): following a package follows its carrier.
    assert sorted(d["driver"] for d in snap["drivers"]) == ["d-2", "d-3"]
    await phones["d-3"].send(pos(4, ts=t + 5, lat=-1.3, lon=36.9))  # the carrier moves: followed
    await phones["d-3"].send(scan(3, "PKG-7", "deliver", ts=t + 6))
    got = await dash.collect(lambda fs: any(f["type"] == "package" and f["state"] == "delivered" for f in fs))
    assert [(f["type"], f["driver"], f["seq"]) for f in got if f["type"] in ("pos", "scan")] == [
        ("pos", "d-3", 4),
        ("scan", "d-3", 3),
    ]
    await phones["d-3"].send(pos(5, ts=t + 7, lat=-1.3, lon=36.9))  # delivered: no longer followed
    await phones["d-1"].send(pos(6, ts=t + 8))
    await phones["d-2"].send(pos(3, ts=t + 9, lat=6.51, lon=3.4))
    got = await dash.collect(lambda fs: any(f.get("driver") == "d-2" and f.get("seq") == 3 for f in fs))
    assert [(f["type"], f["driver"], f["seq"]) for f in got if f["type"] in ("pos", "scan")] == [("pos", "d-2", 3)]


async def test_late_positions_are_stored_but_not_fanned_out(instance: Instance, org: str) -> None:
    dash = await Dash.connect(instance.url, token("dispatcher", "u", org), subscribe={})
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms()
    await phone.send(pos(10, ts=t - 1000))
    await phone.send({"type": "batch", "items": [pos(s, ts=t - 60_000 + s) for s in range(1, 10)]})
    await phone.send(pos(11, ts=t + 3_600_000))  # a clock far ahead counts as its receipt time...
    await phone.send(pos(12, ts=t + 1000))  # ...so this later fix still moves the marker
    await phone.until(lambda p: len(p.acked) == 12)
    got = await dash.collect(lambda fs: any(f.get("seq") == 12 for f in fs))
    assert [f["seq"] for f in got if f["type"] == "pos"] == [10, 11, 12]
    snap = await dash.subscribe({})
    assert snap["drivers"][0]["seq"] == 12


async def test_late_event_never_moves_snapshot_backwards(start_instance: Any, org: str) -> None:
    a, b = await start_instance(), await start_instance()
    t = now_ms()
    p = await Phone.connect(a.url, token("driver", "d-1", org))
    await p.send(pos(5, ts=t))
    await p.until(lambda p: 5 in p.acked)
    await p.close()
    # Reconnected elsewhere, the phone uploads an old backlog: the live position stays at seq 5.
    p = await Phone.connect(b.url, token("driver", "d-1", org))
    await p.send({"type": "batch", "items": [pos(s, ts=t - 1000 + s) for s in range(1, 5)]})
    await p.until(lambda p: p.acked == {1, 2, 3, 4})
    dash = await Dash.connect(a.url, token("dispatcher", "u", org), subscribe={})
    assert dash.snapshot["drivers"][0]["seq"] == 5


async def test_snapshot_falls_back_to_postgres_when_redis_lost_state(instance: Instance, org: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org, name="Kofi"))
    await phone.send(pos(1, lat=5.6, lon=-0.19))
    await phone.until(lambda p: p.acked == {1})
    await instance.node.broker.redis.delete(f"trk:lastpos:{org}")  # as after a Redis restart
    dash = await Dash.connect(instance.url, token("dispatcher", "u", org), subscribe={})
    [entry] = dash.snapshot["drivers"]
    assert (entry["driver"], entry["seq"], entry["lat"], entry["name"]) == ("d-1", 1, 5.6, "Kofi")
    assert await instance.node.broker.redis.hexists(f"trk:lastpos:{org}", "d-1")  # written back


def _slow_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_slow_dashboard_is_bounded_and_does_not_delay_others(start_instance: Any, org: str) -> None:
    inst: Instance = await start_instance(dashboard_backlog=50, dashboard_queue_max=300)
    slow = Peer(await connect(inst.url + "/v1/live", sock=_slow_socket(inst.port), max_queue=1, compression=None))
    await slow.send({"type": "hello", "token": token("dispatcher", "slow", org)})
    await slow.send({"type": "subscribe"})
    fast = await Dash.connect(inst.url, token("dispatcher", "fast", org), subscribe={})
    phones = [await Phone.connect(inst.url, token("driver", f"d-{i}", org)) for i in range(20)]
    slow_dash = next(d for d in inst.node.hub.dashboards() if d.principal.sub == "slow")
    # Loopback buffers are megabytes; shrink the server's send buffer on this one connection so that
    # it behaves like a congested mobile link within a few hundred frames.
    server_sock = slow_dash.channel.fast.proto.transport.get_extra_info("socket")
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t = now_ms()
    peak_waiting = 0
    for burst in range(30):
        for i, phone in enumerate(phones):
            await phone.send(
                {
                    "type": "batch",
                    "items": [
                        pos(burst * 10 + k + 1, ts=t + burst * 10 + k, note="n" * 200, acc=float(i)) for k in range(10)
                    ],
                }
            )
        sent_at = now_ms()
        # The healthy dashboard keeps up: the newest position of this burst arrives promptly.
        got = await fast.collect(
            lambda fs, b=burst: any(f.get("seq") == b * 10 + 10 and f.get("driver") == "d-19" for f in fs), timeout=5
        )
        assert got and now_ms() - sent_at < 2000
        peak_waiting = max(peak_waiting, len(slow_dash.queue) + len(slow_dash.latest))
        assert len(slow_dash.queue) + len(slow_dash.latest) <= 50 + 20
        assert slow_dash.channel.buffered() < 1_000_000
    assert peak_waiting >= 20, "the slow dashboard never fell behind: the test proves nothing"
    # Scans are never conflated: when they overflow the capped queue, the dashboard is closed (1013).
    for burst in range(40):
        for i, phone in enumerate(phones[:10]):
            await phone.send(
                {"type": "batch", "items": [scan(1000 + burst * 10 + k, f"PKG-{i}", note="n" * 200) for k in range(10)]}
            )
        got = await fast.collect(
            lambda fs, b=burst: any(f.get("seq") == 1000 + b * 10 + 9 and f.get("driver") == "d-9" for f in fs),
            timeout=5,
        )
        assert not [f for f in got if f["type"] == "status"], "the live feed must not break for the others"
        if slow_dash.closing:
            break
    assert slow_dash.closing and slow_dash not in set(inst.node.hub.dashboards())
    assert len(slow_dash.queue) == 0
    for phone in phones:
        await phone.until(lambda p: len(p.acked) >= 300)
