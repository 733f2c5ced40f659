"""Slow dashboards: one on a 1 KB/s link (a throttling proxy), one that never reads.

Memory for each is capped (conflated positions, the transport's own high-water mark), the healthy
dashboard's latency does not change, and the slow one converges on every driver's newest position
once its link improves. (tests/test_live.py covers the slow_consumer 1013 close for scans.)
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from typing import Any

import orjson
from websockets.asyncio.client import connect

from harness.clients import Dash
from harness.fleet import Fleet
from harness.proxy import Proxy
from harness.tokens import SECRET, token
from harness.wait import wait_until

BACKLOG = 50
DRIVERS = 20


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values, default=0.0)


async def test_1kbps_and_never_reading_dashboards_are_capped_and_others_unaffected(
    start_instance: Any, org: str
) -> None:
    inst = await start_instance(dashboard_backlog=BACKLOG, dashboard_queue_max=300)
    fast = await Dash(inst.url, token("dispatcher", "fast", org)).start()
    proxy = await Proxy(inst.port, buffer=4096).start()
    slow = await Dash(f"ws://127.0.0.1:{proxy.port}", token("dispatcher", "slow", org)).start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", inst.port))
    never = await connect(inst.url + "/v1/live", sock=sock, max_queue=1, compression=None)
    await never.send(orjson.dumps({"type": "hello", "token": token("dispatcher", "never", org)}).decode())
    await never.send(orjson.dumps({"type": "subscribe"}).decode())
    try:
        await wait_until(lambda: len(list(inst.node.hub.dashboards())) == 3, 5, "three dashboards")
        dashes = {d.principal.sub: d for d in inst.node.hub.dashboards()}
        # Loopback buffers are megabytes: give the two slow connections a mobile link's buffers.
        for name in ("slow", "never"):
            server_sock = dashes[name].channel.fast.proto.transport.get_extra_info("socket")
            server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        async with Fleet([inst.url], SECRET, org, DRIVERS, interval=0.02) as fleet:
            await wait_until(lambda: len(fast.positions) == DRIVERS, 10, "every driver live")
            await asyncio.sleep(2)  # hold: the baseline, before the link slows down
            baseline = list(fast.latency_ms)
            proxy.slow(1024)
            peaks = {"slow": 0, "never": 0}
            buffered = {"slow": 0, "never": 0}
            started = time.monotonic()
            while time.monotonic() - started < 5:  # the load, held for 5 s, sampled
                for name in peaks:
                    d = dashes[name]
                    peaks[name] = max(peaks[name], len(d.queue) + len(d.latest))
                    buffered[name] = max(buffered[name], d.channel.buffered())
                await asyncio.sleep(0.01)
            loaded = fast.latency_ms[len(baseline) :]
            fleet.stop_generating()
            last = {d.name: d.seq for d in fleet.drivers}
            await fleet.drain(10)
        for name in peaks:
            assert peaks[name] >= DRIVERS, f"{name} never fell behind: the test proves nothing"
            assert peaks[name] <= BACKLOG + DRIVERS, peaks
            assert buffered[name] < 256 * 1024, buffered
        assert slow.close_code is None and not slow.errors
        # Healthy dashboards: same latency as before the slow links.
        assert p95(loaded) <= max(2 * p95(baseline), p95(baseline) + 100), (p95(baseline), p95(loaded))
        # The link improves: the slow dashboard converges on every driver's newest position.
        proxy.restore()
        caught = await wait_until(
            lambda: all(slow.positions.get(d, {}).get("seq") == s for d, s in last.items()),
            15,
            "the slow dashboard to catch up",
        )
        assert caught < 5, caught
    finally:
        never.transport.abort()
        await slow.close()
        await fast.close()
        await proxy.close()
