"""`tracker demo`: starts the service, consigns and drives a small fleet, prints the dashboard URL, exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg


async def test_demo_runs_a_consigned_fleet_and_prints_the_dashboard_url(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    org = "demo-" + os.urandom(4).hex()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "TRACKER_JWT_SECRET": "demo-test-secret-" + "x" * 32,
        "TRACKER_DATA_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tracker", "demo", "--duration", "5", "--drivers", "20", "--port", "0", "--org", org],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/#token=[\w-]+\.[\w-]+\.[\w-]+$", proc.stdout, re.M), (
        proc.stdout
    )
    assert " 0 lost" in proc.stdout
    conn = await asyncpg.connect(database_url)
    try:
        consigned = await conn.fetchval(
            "SELECT count(*) FROM packages WHERE org = $1 AND consigned_at IS NOT NULL", org
        )
        unknown = await conn.fetchval("SELECT count(*) FROM packages WHERE org = $1 AND consigned_at IS NULL", org)
        positions = await conn.fetchval("SELECT count(*) FROM positions WHERE org = $1", org)
    finally:
        await conn.close()
    assert consigned > 0 and unknown == 0  # every scanned package was consigned first
    assert positions > 0
