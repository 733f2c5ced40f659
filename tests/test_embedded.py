"""`tracker serve` with no configuration: embedded PostgreSQL and Redis, a generated secret."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.clients import Phone, pos
from harness.http import wait_ready
from harness.ports import free_port


def clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["PYTHONWARNINGS"] = "ignore"
    return env


async def test_serve_without_configuration_accepts_a_driver(tmp_path: Path) -> None:
    # Outside pytest's 0700 base folder, which another pytest session may reset at any time:
    # PostgreSQL runs as an unprivileged user under root and must reach its folder.
    home = Path(tempfile.mkdtemp(prefix="tracker-embedded-"))
    port, data = free_port(), home / "data"
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracker", "serve", "--port", str(port), "--data-dir", str(data)],
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_ready(port, proc=proc, timeout=90, interval=0.2)
        minted = subprocess.run(
            [
                sys.executable,
                "-m",
                "tracker",
                "token",
                "--role",
                "driver",
                "--sub",
                "d-1",
                "--org",
                "acme",
                "--data-dir",
                str(data),
            ],
            env=clean_env(),
            capture_output=True,
            check=True,
            text=True,
        )
        phone = await Phone.connect(f"ws://127.0.0.1:{port}", minted.stdout.strip())
        await phone.send(pos(phone.welcome["last_seq"] + 1))
        await phone.until(lambda p: len(p.acked) == 1)
        proc.send_signal(signal.SIGTERM)
        assert await phone.closed(timeout=20) == 1012  # a deploy: reconnect elsewhere
        # uvicorn re-raises the SIGTERM it handled once shut down cleanly: exit by that signal, in time.
        assert await asyncio.to_thread(proc.wait, 30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "embedded PostgreSQL" in text and "embedded Redis" in text
    assert "tracker token" in text  # it says how to mint tokens
    assert "Traceback" not in text
    assert (data / "jwt-secret").exists() and (data / "postgres").is_dir()
    shutil.rmtree(home, ignore_errors=True)


def test_help_explains_itself() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tracker", "--help"], capture_output=True, text=True, check=True, env=clean_env()
    ).stdout
    for word in ("serve", "token", "migrate", "DATABASE_URL", "REDIS_URL", "TRACKER_JWT_SECRET"):
        assert word in out
