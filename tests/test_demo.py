"""`tracker demo` as a newcomer runs it: it prints a dashboard URL, and that URL opens on a live map
(the token in it is one the service accepts; headless Chromium goes live with moving markers); the
demo keeps to its own data folder, so a `tracker serve` beside it survives its exit."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from harness.clients import Phone, pos
from harness.http import request, wait_ready
from harness.ports import free_port
from harness.servers import popen, stop_process
from harness.wait import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
STATE = "() => window.trackerDebug ? window.trackerDebug.state() : null"
URL_LINE = re.compile(r"^dashboard: (http://127\.0\.0\.1:(\d+)/#token=([\w-]+\.[\w-]+\.[\w-]+))$", re.M)


def demo_env(database_url: str, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "TRACKER_JWT_SECRET": "demo-test-secret-" + "x" * 32,
        "TRACKER_CUSTODY_KEY": "demo-test-custody-" + "y" * 32,  # required with DATABASE_URL
        "PYTHONWARNINGS": "ignore",
    }


def read(path: Path) -> str:
    return path.read_text()


@asynccontextmanager
async def running_demo(env: dict[str, str], log: Path, *args: str) -> AsyncIterator[tuple[str, int, str]]:
    """A `tracker demo` subprocess; yields the printed (url, port, token) once it printed them."""
    proc = popen([sys.executable, "-m", "tracker", "demo", "--port", "0", *args], log=log, env=env)
    found: list[re.Match[str]] = []

    def printed() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited with {proc.returncode}:\n{log.read_text()}")
        match = URL_LINE.search(log.read_text())
        if match:
            found.append(match)
        return match is not None

    try:
        await wait_until(printed, 90, "the demo to print its dashboard URL", interval=0.1)
        url, port, token = found[0].groups()
        yield url, int(port), token
    finally:
        stop_process(proc, signal.SIGINT, grace=30)
    assert proc.returncode in (0, 130, -signal.SIGINT), read(log)


async def test_demo_runs_a_consigned_fleet_and_prints_the_dashboard_url(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    org = "demo-" + os.urandom(4).hex()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "tracker", "demo", "--duration", "5", "--drivers", "20", "--port", "0"),
            *("--org", org, "--data-dir", str(tmp_path)),
        ],
        env=demo_env(database_url, redis_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert URL_LINE.search(proc.stdout), proc.stdout
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


async def test_the_printed_url_and_its_token_are_accepted_over_http(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    org = "demo-" + os.urandom(4).hex()
    env = demo_env(database_url, redis_url)
    args = ("--drivers", "5", "--duration", "60", "--org", org, "--data-dir", str(tmp_path))
    async with running_demo(env, tmp_path / "demo.log", *args) as (url, port, token):
        status, _, body = await request(port, "GET", urlsplit(url).path)
        assert status == 200 and b"<html" in body.lower()
        status, _, body = await request(port, "GET", "/v1/drivers", token)
        assert status == 200, body  # never 401 "token lifetime exceeds 86400 s"


@pytest.mark.browser
async def test_the_printed_url_opens_on_a_live_map_with_moving_markers(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: install the dev extras (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does it)")
    org = "demo-" + os.urandom(4).hex()
    env = demo_env(database_url, redis_url)
    args = ("--drivers", "10", "--interval", "0.5", "--duration", "120", "--org", org, "--data-dir", str(tmp_path))
    async with running_demo(env, tmp_path / "demo.log", *args) as (url, _, _), async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            await page.goto(url)
            await page.wait_for_function(
                f"() => {{ const s = ({STATE})(); return s && s.connection === 'live' && s.markers.length > 0; }}",
                timeout=30_000,
            )
            first: dict[str, Any] = await page.evaluate(STATE)
            assert first["org"] == org and first["role"] == "dispatcher"
            seen = {m["driver"]: (m["lat"], m["lon"]) for m in first["markers"]}
            await page.wait_for_function(
                f"""(seen) => {{ const s = ({STATE})(); return s && s.connection === 'live' && s.markers.some(
                    (m) => seen[m.driver] && (seen[m.driver][0] !== m.lat || seen[m.driver][1] !== m.lon)); }}""",
                arg=seen,
                timeout=30_000,
            )
        finally:
            await browser.close()


async def test_demo_beside_serve_uses_its_own_folder_and_leaves_serve_running(tmp_path: Path) -> None:
    """The newcomer's sequence in one folder: `./dev serve`, then `./dev tracker demo` beside it, with
    no configuration (embedded servers both). The demo's exit must not take serve's Redis along."""
    home = Path(tempfile.mkdtemp(prefix="tracker-demo-"))  # outside pytest's 0700 folder (see test_serve)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["PYTHONWARNINGS"] = "ignore"
    port, log = free_port(), tmp_path / "serve.log"
    serve = popen([sys.executable, "-m", "tracker", "serve", "--port", str(port)], log=log, env=env, cwd=home)
    try:
        await wait_ready(port, proc=serve, log=log, timeout=90, interval=0.2)
        demo = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tracker", "demo", "--port", "0", "--drivers", "5", "--duration", "3"],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        await wait_ready(port, proc=serve, log=log, timeout=10)
        minted = subprocess.run(
            [sys.executable, "-m", "tracker", "token", "--role", "driver", "--sub", "d-1", "--org", "acme"],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            check=True,
        )
        phone = await Phone.connect(f"ws://127.0.0.1:{port}", minted.stdout.strip())
        try:
            await phone.send(pos(phone.welcome["last_seq"] + 1))
            await phone.until(lambda p: len(p.acked) == 1)
        finally:
            await phone.close()
        assert (home / ".tracker-demo" / "postgres").is_dir() and (home / ".tracker" / "postgres").is_dir()
    finally:
        stop_process(serve)
        shutil.rmtree(home, ignore_errors=True)
