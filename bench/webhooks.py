"""Webhooks: what the outbox adds to a custody transaction, and how fast workers deliver.

1. Outbox write: `webhooks.store.Outbox.write` of --batch events (2,000: a custody transaction's
   most, TRACKER_CUSTODY_BATCH_MAX) in a transaction, --repeat times, for an org without an
   endpoint (the statement that writes nothing) and an org with one endpoint subscribed to every
   type (an event row and a delivery row per event). Reported: ms per batch, µs per event (wall),
   this process's CPU per event and the PostgreSQL backend's (from /proc).
2. Delivery: --events events for one endpoint, written to the outbox, then one delivery worker
   (`webhooks.worker.Deliverer`, default settings: 32 in flight, 4 per endpoint) posts them to a
   real HTTP receiver on 127.0.0.1 in this process; reported: deliveries/s and this process's CPU
   per delivery (worker, client and receiver together). Two shapes: every event on its own
   package (4 in flight, the endpoint's cap) and all on one package (one at a time: the order).

    .venv/bin/python bench/webhooks.py [--database-url URL] [--batch 2000] [--repeat 5] [--events 2000]

Uses TRACKER_TEST_DATABASE_URL when --database-url is not given; each run uses fresh org names.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import log

from harness.webhooks import Receiver
from tracker.app import migrate
from tracker.clock import now_ms
from tracker.config import Settings
from tracker.extension import OutboxEvent
from tracker.webhooks import store
from tracker.webhooks.client import Client
from tracker.webhooks.policy import AllowList
from tracker.webhooks.worker import Deliverer

TYPES = ["package.state_changed", "alert.opened", "alert.acknowledged", "alert.resolved", "custody.checkpoint"]


def events(org: str, n: int, *, packages: int) -> list[OutboxEvent]:
    now = now_ms()
    return [
        OutboxEvent(
            org,
            "custody.checkpoint",
            f"PKG-{i % packages}",
            now,
            {
                "package": f"PKG-{i % packages}",
                "index": i + 1,
                "driver": "d-1",
                "seq": i,
                "ts": now,
                "event": "pickup",
                "chained_at": now,
                "recovered": False,
                "lat": -1.2921,
                "lon": 36.8219,
                "temp_c": 5.5,
            },
        )
        for i in range(n)
    ]


async def backend_ticks(conn: asyncpg.Connection) -> int:
    return common.ticks(conn.get_server_pid())


async def outbox_write(pool: asyncpg.Pool, batch: int, repeat: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    outbox = store.Outbox(now_ms)
    for label, with_endpoint in (("no endpoint", False), ("one endpoint", True)):
        org = "bench-" + uuid.uuid4().hex[:8]
        if with_endpoint:
            await store.create(pool, org, "http://127.0.0.1:9/", TYPES, "bench", now_ms(), 20)
        walls, cpus, pg = [], [], []
        async with pool.acquire() as conn:
            for _ in range(repeat):
                evs = events(org, batch, packages=batch)
                me, be = common.ticks(os.getpid()), await backend_ticks(conn)
                t = time.perf_counter()
                async with conn.transaction():
                    await outbox.write(conn, evs)
                walls.append(time.perf_counter() - t)
                cpus.append((common.ticks(os.getpid()) - me) / common.CLK_TCK)
                pg.append((await backend_ticks(conn) - be) / common.CLK_TCK)
        w = statistics.median(walls)
        out[label] = {
            "ms_per_batch": round(w * 1000, 1),
            "us_per_event": round(w / batch * 1e6, 1),
            "cpu_us_per_event_service": round(statistics.median(cpus) / batch * 1e6, 1),
            "cpu_us_per_event_postgres": round(statistics.median(pg) / batch * 1e6, 1),
        }
        log(f"outbox write, {label}: {out[label]}")
    return out


async def deliver(pool: asyncpg.Pool, n: int, packages: int) -> dict[str, float]:
    receiver = await Receiver().start()
    settings = Settings(webhook_allow=("127.0.0.1",), webhook_poll_s=0.05)
    client = Client(AllowList.parse(settings.webhook_allow), connect_s=5, response_s=10)
    worker = Deliverer(pool, settings, client)
    org = "bench-" + uuid.uuid4().hex[:8]
    try:
        await store.create(pool, org, receiver.url, TYPES, "bench", now_ms(), 20)
        async with pool.acquire() as conn, conn.transaction():
            await store.Outbox(now_ms).write(conn, events(org, n, packages=packages))
        me = common.ticks(os.getpid())
        t = time.perf_counter()
        task = asyncio.create_task(worker.run())
        while len(receiver.got) < n:
            await asyncio.sleep(0.05)  # polled: the receiver's count is the effect
        wall = time.perf_counter() - t
        cpu = (common.ticks(os.getpid()) - me) / common.CLK_TCK
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await receiver.stop()
    dupes = len(receiver.got) - len(set(receiver.ids()))
    result = {
        "deliveries_per_s": round(n / wall, 1),
        "cpu_ms_per_delivery": round(cpu / n * 1000, 3),
        "duplicates": dupes,
    }
    log(f"delivery, {n} events on {packages} package(s): {result}")
    return result


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("TRACKER_TEST_DATABASE_URL"))
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--events", type=int, default=2000)
    args = p.parse_args()
    if not args.database_url:
        sys.exit("--database-url or TRACKER_TEST_DATABASE_URL is required")
    pool = await asyncpg.create_pool(args.database_url, min_size=2, max_size=8)
    try:
        await migrate(pool)
        payload = {
            "machine": common.machine(),
            "outbox_write": await outbox_write(pool, args.batch, args.repeat),
            "delivery_many_packages": await deliver(pool, args.events, packages=args.events),
            "delivery_one_package": await deliver(pool, max(1, args.events // 4), packages=1),
        }
        log("saved", common.save("webhooks", payload))
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
