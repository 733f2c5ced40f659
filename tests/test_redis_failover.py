"""Redis failover with Sentinel (issue 17): `REDIS_URL=redis+sentinel://host:port/<service>`.

A master, a replica and one Sentinel on spare ports (harness/redis_ha.py); a tracker instance
finds the master through the Sentinel. The master is SIGKILLed while phones send and a dashboard
watches: acks never stop (they follow the PostgreSQL commit, not Redis), the dashboard is told
`live:false`, and once the replica is promoted live resumes by itself within seconds; nothing
acknowledged is lost or stored twice.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from harness.clients import Dash
from harness.fleet import Fleet
from harness.loss import check_stored
from harness.redis_ha import SentinelSet
from harness.tokens import SECRET, token
from harness.wait import wait_until


@pytest.fixture
async def sentinel_set() -> AsyncIterator[SentinelSet]:
    s = await SentinelSet().start()
    yield s
    s.close()


def _status_after(watcher: Dash, since: float, live: bool) -> float | None:
    return next((t for t, value in watcher.statuses if t >= since and value is live), None)


async def test_master_killed_live_resumes_after_the_failover(
    start_instance: Any, org: str, database_url: str, sentinel_set: SentinelSet
) -> None:
    inst = await start_instance(redis_url=sentinel_set.url, presence_refresh_s=0.5)
    watcher = await Dash(inst.url, token("dispatcher", "u-1", org)).start()
    try:
        async with Fleet([inst.url], SECRET, org, 4, interval=0.05) as fleet:
            await wait_until(lambda: len(watcher.positions) == 4, 10, "live positions through the master")
            sentinel_set.kill_master()
            killed = time.monotonic()
            await wait_until(lambda: _status_after(watcher, killed, False), 10, "live:false")
            await sentinel_set.promoted()
            await wait_until(lambda: _status_after(watcher, killed, True), 15, "live:true after the failover")
            back_at = _status_after(watcher, killed, True)
            assert back_at is not None
            frames = len(watcher.pos_times)
            await wait_until(lambda: len(watcher.pos_times) > frames + 20, 10, "live positions again")
            # From just after the kill to live:true (monotonic times): the phones were acked all along.
            assert fleet.acks_between(killed + 0.5, back_at) > 0, "acks stopped during the failover"
            await fleet.drain(20)
            check = await check_stored(database_url, org, fleet.acked())
        check.assert_exactly_once()
        assert check.acked >= 100
    finally:
        await watcher.close()
