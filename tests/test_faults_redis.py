"""Faults of Redis: down for 10 s under steady ingest, and a subscriber that is green but deaf.

The rule: acknowledged events are never lost or stored twice; live fan-out pauses, dashboards
are told, and it heals by itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from harness.clients import Dash, Phone, pos
from harness.fleet import Fleet
from harness.http import is_ready, ready
from harness.loss import check_stored
from harness.proxy import Proxy
from harness.servers import RedisServer
from harness.tokens import SECRET, token
from harness.wait import wait_until

OUTAGE_S = 10.0


def _status_after(watcher: Dash, since: float, live: bool) -> float | None:
    for t, value in watcher.statuses:
        if t >= since and value is live:
            return t
    return None


async def test_redis_down_10s_ingest_goes_on_live_pauses_and_heals(
    start_instance: Any,
    org: str,
    database_url: str,
    private_redis: RedisServer,
) -> None:
    inst = await start_instance(redis_url=private_redis.url, presence_refresh_s=0.5)
    watcher = await Dash(inst.url, token("dispatcher", "u-1", org)).start()
    quiet = await Phone.connect(inst.url, token("driver", "q-1", org, name="Quiet"))
    try:
        async with Fleet([inst.url], SECRET, org, 5, interval=0.05) as fleet:
            await wait_until(lambda: len(watcher.positions) >= 5, 10, "live positions of the fleet")
            await quiet.send(pos(1, lat=1.0, lon=2.0))
            await quiet.until(lambda p: 1 in p.acked)

            private_redis.kill()
            down_at = time.monotonic()
            await wait_until(lambda: _status_after(watcher, down_at, False), 5, "status live:false")
            body = await ready(inst.port)
            assert body is not None and body["ready"] is False and body["checks"]["redis"] is False
            # PostgreSQL does not depend on Redis: this position is stored and acknowledged now,
            # and it is this driver's last: only PostgreSQL will ever know it.
            await quiet.send(pos(2, lat=1.5, lon=2.5))
            await quiet.until(lambda p: 2 in p.acked)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # hold the outage
            acked_while_down = fleet.acks_between(down_at + 0.5, time.monotonic())
            assert acked_while_down > 0, "acks stopped while Redis was down"

            await private_redis.start()  # same port, empty: the restarted Redis lost the latest positions
            up_at = time.monotonic()
            healed = await wait_until(lambda: _status_after(watcher, up_at, True), 5, "status live:true within 5 s")
            # The fresh snapshot after live:true has every driver's newest stored position, from
            # PostgreSQL where Redis lost it.
            await wait_until(lambda: any(t >= up_at for t, _ in watcher.snapshots), 5, "a fresh snapshot")
            snap = next(s for t, s in watcher.snapshots if t >= up_at)
            entries = {d["driver"]: d for d in snap["drivers"]}
            assert entries.get("q-1", {}).get("seq") == 2, entries.get("q-1")
            assert {f"d-{i}" for i in range(5)} <= entries.keys()
            # Live fan-out resumed by itself.
            frames_at_up = len(watcher.pos_times)
            await wait_until(lambda: len(watcher.pos_times) > frames_at_up + 20, 5, "live positions again")
            await wait_until(lambda: is_ready(inst.port), 10, "/readyz 200 again")
            await fleet.drain(20)
            check = await check_stored(database_url, org, {**fleet.acked(), "q-1": quiet.acked})
        check.assert_exactly_once()
        assert check.acked >= 100 and healed < 5
    finally:
        await watcher.close()


async def test_deaf_subscriber_is_detected_and_replaced(
    start_instance: Any,
    org: str,
    private_redis: RedisServer,
) -> None:
    proxy = await Proxy(private_redis.port).start()
    watcher: Dash | None = None
    try:
        inst = await start_instance(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        watcher = await Dash(inst.url, token("dispatcher", "u-1", org)).start()
        async with Fleet([inst.url], SECRET, org, 2, interval=0.05) as fleet:
            await wait_until(lambda: len(watcher.positions) == 2, 10, "live positions")
            # The subscriber's connection stays up, PING-able at the TCP level, but nothing reaches it.
            assert proxy.mute(b"SUBSCRIBE") == 1
            deaf_at = time.monotonic()
            await wait_until(lambda: _status_after(watcher, deaf_at, False), 12, "the probe to notice (live:false)")
            body = await ready(inst.port)
            assert body is not None and body["checks"]["subscriber"] is False and body["ready"] is False
            await wait_until(lambda: _status_after(watcher, deaf_at, True), 10, "a new subscriber (live:true)")
            frames = len(watcher.pos_times)
            await wait_until(lambda: len(watcher.pos_times) > frames + 10, 5, "live positions again")
            assert (await ready(inst.port) or {}).get("ready") is True
            await fleet.drain(10)
    finally:
        if watcher is not None:
            await watcher.close()
        await proxy.close()


async def test_redis_connection_reset_heals(start_instance: Any, org: str, private_redis: RedisServer) -> None:
    """Every Redis connection reset at once (a load balancer or NAT dropping them)."""
    proxy = await Proxy(private_redis.port).start()
    watcher: Dash | None = None
    try:
        inst = await start_instance(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        watcher = await Dash(inst.url, token("dispatcher", "u-1", org)).start()
        async with Fleet([inst.url], SECRET, org, 2, interval=0.05) as fleet:
            await wait_until(lambda: len(watcher.positions) == 2, 10, "live positions")
            proxy.reset()
            reset_at = time.monotonic()
            frames = len(watcher.pos_times)
            await wait_until(lambda: len(watcher.pos_times) > frames + 10, 5, "live positions after the reset")
            await wait_until(lambda: is_ready(inst.port), 5, "ready")
            assert time.monotonic() - reset_at < 5
            await fleet.drain(10)
    finally:
        if watcher is not None:
            await watcher.close()
        await proxy.close()


async def test_restarted_redis_server_is_a_new_process(private_redis: RedisServer) -> None:
    """The kit itself: a kill really loses Redis' state (otherwise the test above proves nothing)."""
    other = RedisServer(private_redis.port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", private_redis.port)
        writer.write(b"SET k v\r\n")
        assert (await reader.readline()).startswith(b"+OK")
        writer.close()
        await writer.wait_closed()
        private_redis.kill()
        await other.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", private_redis.port)
        writer.write(b"EXISTS k\r\n")
        assert await reader.readline() == b":0\r\n"
        writer.close()
        await writer.wait_closed()
    finally:
        other.close()


async def test_redis_partition_cut_and_restored(start_instance: Any, org: str, private_redis: RedisServer) -> None:
    """The network to Redis cut (connections reset, new ones refused) while Redis itself keeps its
    state: acks go on, the live feed pauses, and comes back by itself once the network does."""
    proxy = await Proxy(private_redis.port).start()
    watcher: Dash | None = None
    try:
        inst = await start_instance(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        watcher = await Dash(inst.url, token("dispatcher", "u-1", org)).start()
        async with Fleet([inst.url], SECRET, org, 3, interval=0.05) as fleet:
            await wait_until(lambda: len(watcher.positions) == 3, 10, "live positions")
            proxy.cut()
            cut_at = time.monotonic()
            await wait_until(lambda: _status_after(watcher, cut_at, False), 5, "status live:false")
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - cut_at)))  # hold the partition
            assert fleet.acks_between(cut_at + 0.5, time.monotonic()) > 0
            proxy.restore()
            up_at = time.monotonic()
            await wait_until(lambda: _status_after(watcher, up_at, True), 5, "status live:true within 5 s")
            frames = len(watcher.pos_times)
            await wait_until(lambda: len(watcher.pos_times) > frames + 10, 5, "live positions again")
            await fleet.drain(10)
    finally:
        if watcher is not None:
            await watcher.close()
        await proxy.close()
