"""Redis's CPU per position as a function of positions per live.lua call: what a time window buys.

A private redis-server with one subscriber on the org's channel; 20,000 positions of 10,000 drivers
sent through tracker/lua/live.lua at 1, 2, 10, 25 and 100 positions per call, one call at a time;
redis-server's CPU (user + system, /proc) per position for each. Before issue 17 a fleet-shaped
load (one or two positions per event-loop tick) made one call per tick; with TRACKER_LIVE_WINDOW_MS
a call carries every position of its window (2,000/s x 5 ms = 10).

    .venv/bin/python bench/redis_calls.py
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import redis.asyncio as aioredis
from common import CLK_TCK, log, machine, ticks2

from harness.servers import RedisServer
from tracker.protocol.events import Position
from tracker.protocol.live import pos_frame
from tracker.redis_broker import LIVE_LUA, Naming, live_calls

N = 20_000


def _cpu(pid: int) -> float:
    return sum(ticks2(pid)) / CLK_TCK


async def main() -> None:
    log(f"machine: {machine()}")
    server = await RedisServer().start()
    redis = aioredis.Redis.from_url(server.url)
    pubsub = aioredis.Redis.from_url(server.url).pubsub()
    await pubsub.subscribe("trk:live:o")

    async def drain() -> None:
        while True:
            await pubsub.get_message(timeout=1.0)

    drainer = asyncio.create_task(drain())
    await redis.script_load(LIVE_LUA.text)  # type: ignore[no-untyped-call]
    naming = Naming(cluster=False)
    print("| positions per call | Redis CPU us/pos |")
    print("|---|---|")
    seq = 0
    try:
        for per_call in (1, 2, 10, 25, 100):
            before = _cpu(server.pid)
            for _ in range(N // per_call):
                items = []
                for _ in range(per_call):
                    seq += 1
                    driver = f"d-{seq % 10_000}"
                    frame = pos_frame(driver, Position(seq, 10**9 + seq, -1.29, 36.8))
                    items.append(("p", driver, 10**12 + seq, b"", frame))
                [(keys, args)] = live_calls(naming, {"o": items})
                await redis.evalsha(LIVE_LUA.sha, len(keys), *keys, *args)  # type: ignore[misc]
            await asyncio.sleep(0.2)  # the subscriber's last messages
            print(f"| {per_call} | {(_cpu(server.pid) - before) / N * 1e6:.1f} |", flush=True)
    finally:
        drainer.cancel()
        await redis.aclose()
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
