"""Faults of a tracker instance: SIGKILL under load, and SIGTERM (a rolling deploy).

Instances run as `python -m tracker serve` subprocesses so that they can be killed for real; the
phones (harness.fleet.Driver) reconnect elsewhere and resend what was not acknowledged.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from harness.fleet import Fleet
from harness.instances import Spawn
from harness.loss import check_stored
from harness.servers import PgCluster
from harness.tokens import SECRET
from harness.wait import wait_until

GRACE_S = 4.0


async def test_sigkill_under_load_drivers_reconnect_elsewhere_nothing_lost(
    spawn: Spawn,
    org: str,
    database_url: str,
    redis_url: str,
) -> None:
    a, b = await asyncio.gather(spawn(database_url, redis_url), spawn(database_url, redis_url))
    async with Fleet([a.url, b.url], SECRET, org, 20, interval=0.02, resend_after=5.0) as fleet:
        await wait_until(lambda: all(len(d.acked) > 20 for d in fleet.drivers), 15, "every driver acked on A")
        a.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Every driver is back, on B, with fresh acks.
        await wait_until(
            lambda: all(d.ack_times and d.ack_times[-1] > killed_at + 0.1 for d in fleet.drivers),
            15,
            "every driver acknowledged again on B",
        )
        recovered = time.monotonic() - killed_at
        assert await a.exited(5) == -signal.SIGKILL
        await fleet.drain(20)
    check = await check_stored(database_url, org, fleet.acked())
    check.assert_exactly_once()
    assert check.acked == fleet.generated > 300
    assert recovered < 10, recovered


async def test_sigterm_commits_acks_and_closes_1012_within_grace(
    spawn: Spawn,
    org: str,
    database_url: str,
    redis_url: str,
) -> None:
    env = {"TRACKER_SHUTDOWN_GRACE_S": str(GRACE_S)}
    a, b = await asyncio.gather(spawn(database_url, redis_url, **env), spawn(database_url, redis_url, **env))
    async with Fleet([a.url, b.url], SECRET, org, 20, interval=0.02, resend_after=5.0) as fleet:
        await wait_until(lambda: all(len(d.acked) > 20 for d in fleet.drivers), 15, "every driver acked on A")
        a.signal(signal.SIGTERM)
        term_at = time.monotonic()
        # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done.
        assert await a.exited(GRACE_S + 10) in (0, -signal.SIGTERM)
        took = time.monotonic() - term_at
        await wait_until(lambda: all(d.close_times for d in fleet.drivers), 5, "every driver closed")
        for d in fleet.drivers:
            closed_at, code = d.close_times[0]
            assert code == 1012, d.close_times
            # What A received before the SIGTERM was committed and acknowledged before the close.
            before = [s for s, born in d.born.items() if born < term_at - 0.2]
            late = [s for s in before if d.acked_at.get(s, float("inf")) > closed_at]
            assert not late, f"{d.name}: {late[:5]} were not acknowledged before the 1012 close"
        await fleet.drain(20)
    check = await check_stored(database_url, org, fleet.acked())
    check.assert_exactly_once()
    assert check.acked == fleet.generated
    assert took < GRACE_S, took


async def test_sigterm_finishes_within_grace_even_when_postgres_is_down(
    spawn: Spawn,
    org: str,
    pg_cluster: PgCluster,
    private_pg: str,
    redis_url: str,
) -> None:
    env: dict[str, Any] = {"TRACKER_SHUTDOWN_GRACE_S": str(GRACE_S)}
    a = await spawn(private_pg, redis_url, **env)
    async with Fleet([a.url], SECRET, org, 5, interval=0.02, resend_after=5.0) as fleet:
        await wait_until(lambda: all(len(d.acked) > 10 for d in fleet.drivers), 15, "acks flowing")
        pg_cluster.kill()
        await wait_until(lambda: fleet.errors()["unavailable"] > 0 or fleet.unacked > 50, 10, "events waiting")
        a.signal(signal.SIGTERM)
        term_at = time.monotonic()
        await a.exited(GRACE_S + 10)
        took = time.monotonic() - term_at
        # The phones keep what was not acknowledged; another instance stores it once PostgreSQL is back.
        await pg_cluster.start()
        b = await spawn(private_pg, redis_url)
        fleet.drivers[0].urls.append(b.url)
        for d in fleet.drivers[1:]:
            d.urls.append(b.url)
        await fleet.drain(20)
    check = await check_stored(private_pg, org, fleet.acked())
    check.assert_exactly_once()
    assert check.acked == fleet.generated
    assert took < GRACE_S + 0.5, f"the shutdown took {took:.1f} s (grace {GRACE_S} s)"
