"""Flaky mobile links: the simulator's `--flaky` mode (drops, offline periods, slow links,
reordering) against a `tracker serve` subprocess ends with nothing lost and nothing stored twice.

The default run is 300 drivers for 30 s; bench/soak.py runs thousands for 10 minutes.
"""

from __future__ import annotations

import pytest

from harness.instances import Spawn
from harness.tokens import SECRET
from tracker.sim.run import SimOptions, simulate


@pytest.mark.parametrize(
    ("drivers", "duration"),
    [(300, 30.0), pytest.param(2000, 180.0, marks=[pytest.mark.slow, pytest.mark.timeout(600)])],
    ids=["short", "long"],
)
async def test_flaky_links_lose_nothing_and_store_nothing_twice(
    spawn: Spawn,
    database_url: str,
    redis_url: str,
    drivers: int,
    duration: float,
) -> None:
    inst = await spawn(database_url, redis_url)
    report = await simulate(
        SimOptions(
            url=inst.url,
            drivers=drivers,
            interval=1.0,
            dashboards=1,
            duration=duration,
            flaky=True,
            seed=6,
            secret=SECRET,
            dsn=database_url,
            drain_timeout=60.0,
            resend_after=10.0,
            connect_rate=200.0,
            progress=False,
        )
    )
    assert report.drained, report.format_table()
    assert report.lost == 0 and report.lost_unacked == 0 and report.lost_unstored == 0, report.format_table()
    assert report.stored_duplicates == 0, report.format_table()
    assert report.never_connected == 0, report.format_table()
    assert report.acked == report.generated > drivers * duration * 0.5, report.format_table()
    assert all(d.duplicates == 0 and d.missing_scans == 0 for d in report.dashboard_results), report.format_table()
    assert inst.proc is not None and inst.proc.poll() is None
