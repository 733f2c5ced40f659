"""`tracker serve --workers N` (tracker/workers.py): N processes on one port, each an instance.
Observed from outside: the connections really land on both workers' sockets, every driver is
acknowledged, a dashboard on one worker sees drivers on the other, and SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.clients import Dash, Phone, pos
from harness.http import wait_ready
from harness.ports import free_port
from harness.servers import popen, stop_process
from harness.tokens import CUSTODY_KEY, SECRET, token
from harness.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = 24


def env(database_url: str, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "TRACKER_JWT_SECRET": SECRET,
        "TRACKER_CUSTODY_KEY": CUSTODY_KEY,
        "TRACKER_LOG_LEVEL": "warning",
    }


@pytest.fixture
async def two_workers(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Any, int]]:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = popen(
        [sys.executable, "-m", "tracker", "serve", "--workers", "2", "--port", str(port)],
        log=log,
        env=env(database_url, redis_url),
        cwd=ROOT,
    )
    try:
        await wait_ready(port, proc=proc, log=log, timeout=60)
        yield proc, port
    finally:
        stop_process(proc, signal.SIGTERM, grace=20)


def sockets_on(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` whose local port is `port`."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def listening(pid: int, port: int) -> bool:
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in psutil.Process(pid).net_connections(kind="tcp")
    )


async def test_two_workers_share_the_port_and_meet_in_redis(two_workers: tuple[Any, int], org: str) -> None:
    proc, port = two_workers
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2, workers
    # Each worker must be ready itself: readiness above may have come from one of them, and a worker
    # listens only once its own start-up is done (uvicorn binds after the lifespan start).
    await wait_until(lambda: all(listening(w.pid, port) for w in workers), 60, "both workers to listen")
    url = f"ws://127.0.0.1:{port}"
    dash = await Dash.connect(url, token("dispatcher", "u", org), subscribe={})
    phones = [await Phone.connect(url, token("driver", f"d-{i}", org)) for i in range(DRIVERS)]
    try:
        per_worker = [sockets_on(w.pid, port) for w in workers]
        assert sum(per_worker) == DRIVERS + 1, per_worker
        assert all(n > 0 for n in per_worker), f"connections per worker: {per_worker}"
        await asyncio.gather(*(p.send(pos(1)) for p in phones))
        await asyncio.gather(*(p.until(lambda p: 1 in p.acked) for p in phones))
        got = await dash.collect(lambda got: len({f["driver"] for f in got if f["type"] == "pos"}) == DRIVERS, 15)
        assert {f["driver"] for f in got if f["type"] == "pos"} == {f"d-{i}" for i in range(DRIVERS)}
    finally:
        for p in phones:
            await p.close()
        await dash.close()
    proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: proc.poll() is not None, 30, "the supervisor to exit")
    assert proc.returncode == 0
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_workers_need_external_servers() -> None:
    data = tempfile.mkdtemp(prefix="tracker-workers-")
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    out = subprocess.run(
        [sys.executable, "-m", "tracker", "serve", "--workers", "2", "--port", "0", "--data-dir", data],
        capture_output=True,
        text=True,
        env=clean,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert "DATABASE_URL and REDIS_URL" in out.stderr
