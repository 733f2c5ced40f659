"""Faults of PostgreSQL: killed mid-batch and down for a while; a primary that turns read-only.

Nothing is acknowledged while PostgreSQL is down; the writer's buffer is bounded and what does not
fit is answered `unavailable` with `retry_ms`; the map does not freeze; after recovery every event
is stored exactly once. The tests run against a private cluster (harness.servers.PgCluster) they may kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
import pytest

from harness.clients import Dash, Phone, pos
from harness.fleet import Fleet
from harness.loss import check_stored
from harness.servers import PgCluster
from harness.tokens import SECRET, token
from harness.wait import wait_until

BUFFER_MAX = 300


async def _sample_peak(get: Any, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], get())
        await asyncio.sleep(0.005)  # a sampling period


@pytest.mark.parametrize("outage_s", [8.0, pytest.param(60.0, marks=pytest.mark.slow)])
async def test_postgres_killed_mid_batch_then_down(
    start_instance: Any,
    org: str,
    pg_cluster: PgCluster,
    private_pg: str,
    outage_s: float,
) -> None:
    inst = await start_instance(database_url=private_pg, writer_buffer_max=BUFFER_MAX, answer_deadline_s=3.0)
    writer = inst.node.writer
    watcher = await Dash(inst.url, token("dispatcher", "u-1", org)).start()
    peak = [0]
    sampler = asyncio.create_task(_sample_peak(lambda: writer.buffered, peak))
    # 500 events/s; 100/s over the long outage, whose backlog the phones resend every retry_ms.
    interval = 0.02 if outage_s < 30 else 0.1
    try:
        async with Fleet([inst.url], SECRET, org, 10, interval=interval, resend_after=5.0) as fleet:
            await wait_until(lambda: sum(map(len, fleet.acked().values())) > 100, 10, "acks flowing")
            # Mid-batch: a flush has sent its transaction and waits for PostgreSQL's answer.
            await wait_until(lambda: writer.in_flight > 0, 5, "a batch in flight", interval=0)
            pg_cluster.kill()
            down_at = time.monotonic()
            # A driver connecting now is welcomed and its position goes live: the map does not freeze.
            late = await Phone.connect(inst.url, token("driver", "late", org))
            await late.send(pos(1, lat=3.0, lon=4.0))
            await wait_until(lambda: "late" in watcher.positions, 5, "a new driver live while PostgreSQL is down")
            await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))  # hold the outage
            up_at = time.monotonic()
            # Nothing is acknowledged while PostgreSQL is down (an ack of a commit that won the race
            # with the kill may still be on its way for a moment).
            assert fleet.acks_between(down_at + 0.5, up_at) == 0
            errors = fleet.errors()
            assert errors["unavailable"] > 0, errors
            assert all(d.stats.retry_ms_missing == 0 for d in fleet.drivers)
            assert peak[0] <= BUFFER_MAX, f"the writer held {peak[0]} events (max {BUFFER_MAX})"
            # The map did not freeze: positions kept reaching the dashboard all along.
            live = [t for t in watcher.pos_times if down_at + 1 <= t <= up_at]
            assert len(live) > 10 * outage_s, len(live)
            assert not any(not live_ for t, live_ in watcher.statuses if t >= down_at)

            await pg_cluster.start()
            recovered = await fleet.drain(30)
        check = await check_stored(private_pg, org, fleet.acked())
        check.assert_exactly_once()
        assert check.acked == fleet.generated
        assert recovered < 15, recovered
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await watcher.close()


async def test_primary_turning_read_only_drops_its_connections_and_reconnects(
    start_instance: Any,
    org: str,
    private_pg: str,
) -> None:
    inst = await start_instance(database_url=private_pg)
    admin = await asyncpg.connect(private_pg)
    try:
        async with Fleet([inst.url], SECRET, org, 5, interval=0.02, resend_after=5.0) as fleet:
            await wait_until(lambda: sum(map(len, fleet.acked().values())) > 100, 10, "acks flowing")
            before = {
                r["pid"]
                for r in await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = 'tracker' AND pid <> pg_backend_pid()"
                )
            }
            # A failover: the sessions the pool holds now reach a read-only server, while new
            # sessions reach a writable one (a database setting wins over the server's for sessions
            # that start after it; the server's reload reaches the sessions already open).
            await admin.execute("ALTER DATABASE tracker SET default_transaction_read_only = off")
            await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await admin.execute("SELECT pg_reload_conf()")
            failed_at = time.monotonic()
            await wait_until(lambda: not inst.node.writer.healthy, 10, "the writer to meet the read-only primary")
            await wait_until(lambda: fleet.last_ack() > failed_at and inst.node.writer.healthy, 10, "acks again")
            recovered = time.monotonic() - failed_at
            await fleet.drain(20)
            after = {
                r["pid"]
                for r in await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = 'tracker' AND pid <> pg_backend_pid()"
                )
            }
        check = await check_stored(private_pg, org, fleet.acked())
        check.assert_exactly_once()
        assert check.acked == fleet.generated
        assert after - before, "the pool never made a new connection"
        assert recovered < 5, recovered
    finally:
        with contextlib.suppress(Exception):
            await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
            await admin.execute("ALTER DATABASE tracker RESET default_transaction_read_only")
            await admin.execute("SELECT pg_reload_conf()")
        await admin.close()
