"""The command line as a person uses it: `tracker token` refuses what the service would refuse,
`tracker info` prints DSNs that connect, `tracker simulate` finds the data folder's secret, `--help`
reads well, `./dev` installs the dev extras only for test and lint; and two answers a newcomer
meets first: a websocket to a wrong path is 404, a `ts` in seconds says milliseconds are expected."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from harness.clients import Phone
from harness.http import request, wait_ready
from harness.instances import Instance
from harness.ports import free_port
from harness.servers import popen, stop_process
from harness.tokens import SECRET, token
from tracker.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def tracker(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracker", *args],
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- tracker token ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--role", "driver", "--ttl", "90000"), "86400"),
        (("--role", "dispatcher", "--ttl", "86401"), "86400"),
        (
            (
                "--role",
                "client",
            ),
            "--client",
        ),
        (("--role", "driver", "--ttl", "0"), "--ttl"),
    ],
    ids=["ttl-above-cap", "ttl-just-above-cap", "client-without-client", "ttl-zero"],
)
def test_token_refuses_what_the_service_would_refuse(args: tuple[str, ...], said: str) -> None:
    done = tracker("token", *args, "--sub", "u-1", "--org", "acme", env=clean_env(TRACKER_JWT_SECRET=SECRET))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""  # no token to paste
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracker token: ") and said in lines[0], done.stderr


async def test_tokens_it_mints_are_accepted(instance: Instance, org: str) -> None:
    env = clean_env(TRACKER_JWT_SECRET=SECRET)
    dispatcher = tracker("token", "--role", "dispatcher", "--sub", "u-1", "--org", org, "--ttl", "86400", env=env)
    assert dispatcher.returncode == 0, dispatcher.stderr
    status, _, body = await request(instance, "GET", "/v1/drivers", dispatcher.stdout.strip())
    assert status == 200, body
    client = tracker("token", "--role", "client", "--sub", "u-2", "--org", org, "--client", "c-1", env=env)
    assert client.returncode == 0, client.stderr
    status, _, body = await request(instance, "GET", "/v1/drivers", client.stdout.strip())
    assert status == 200, body


# -- tracker info and simulate, against a service with no configuration --------------------------


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Path]]:
    """`tracker serve` with no configuration on a fresh folder (outside pytest's 0700 base folder:
    PostgreSQL runs unprivileged under root); yields (port, data folder)."""
    home = Path(tempfile.mkdtemp(prefix="tracker-cli-"))
    data, port, log = home / "data", free_port(), home / "serve.log"
    proc = popen(
        [sys.executable, "-m", "tracker", "serve", "--port", str(port), "--data-dir", str(data)],
        log=log,
        env=clean_env(),
    )
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        yield port, data
    finally:
        stop_process(proc)
        shutil.rmtree(home, ignore_errors=True)


def signed_with(tok: str, secret: Path) -> bool:
    import jwt

    return bool(jwt.decode(tok, secret.read_text().strip(), algorithms=["HS256"], options={"verify_aud": False}))


def fields(text: str) -> dict[str, str]:
    return {line[:12].strip(): line[13:] for line in text.splitlines()}


async def test_info_prints_dsns_that_connect_and_where_the_secret_is(served: tuple[int, Path]) -> None:
    port, data = served
    done = tracker("info", "--data-dir", str(data), "--port", str(port))
    assert done.returncode == 0, done.stderr
    info = fields(done.stdout)
    assert info["dashboard"] == f"http://127.0.0.1:{port}/"
    assert "in use by pid" in info["data folder"]
    dsn = info["PostgreSQL"].split()[0]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM positions") >= 0  # the service's own database
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(info["Redis"].split()[0])
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    secret = Path(info["JWT secret"].split()[0])
    minted = tracker("token", "--role", "driver", "--sub", "d-1", "--org", "acme", "--data-dir", str(data))
    phone = await Phone.connect(f"ws://127.0.0.1:{port}", minted.stdout.strip())
    await phone.close()
    assert signed_with(minted.stdout.strip(), secret)  # the very secret `token` signs with


async def test_simulate_finds_the_data_folders_secret_like_token_does(served: tuple[int, Path]) -> None:
    port, data = served
    done = tracker(
        "simulate",
        "--url",
        f"ws://127.0.0.1:{port}",
        "--drivers",
        "3",
        "--duration",
        "3",
        "--no-progress",
        "--data-dir",
        str(data),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lost" in done.stdout


def test_simulate_without_a_secret_says_where_it_looked(tmp_path: Path) -> None:
    done = tracker("simulate", "--url", "ws://127.0.0.1:9", "--duration", "1", "--data-dir", str(tmp_path / "none"))
    assert done.returncode == 2
    assert str(tmp_path / "none" / "jwt-secret") in done.stderr and "--secret" in done.stderr


# -- --help ---------------------------------------------------------------------------------------


def test_every_option_is_explained_with_readable_defaults_and_examples() -> None:
    parser = build_parser()
    subparsers: dict[str, argparse.ArgumentParser] = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[assignment]
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"tracker {name} {action.option_strings}: no help"
        text = tracker(name, "--help").stdout
        assert "examples:" in text, f"tracker {name} --help has no examples"
        assert "PosixPath" not in text and "default: None" not in text and "(default None)" not in text, text
    top = tracker("--help").stdout
    assert "examples:" in top and "PosixPath" not in top
    assert "TRACKER_DATA_DIR                 default .tracker" in top


# -- the service's first answers ------------------------------------------------------------------


async def test_a_websocket_to_an_unknown_path_is_404(instance: Instance) -> None:
    status, _, body = await request(
        instance,
        "GET",
        "/v1/nope",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert status == 404, body
    assert b"not_found" in body


async def test_a_ts_in_seconds_is_refused_saying_milliseconds_are_expected(instance: Instance, org: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    try:
        seq = phone.welcome["last_seq"] + 1
        await phone.send({"type": "pos", "seq": seq, "ts": int(time.time()), "lat": -1.29, "lon": 36.82})
        await phone.until(lambda p: seq in p.refused("invalid"))
        message = next(e["message"] for e in phone.errors if e.get("seq") == seq)
        assert "milliseconds" in message and "seconds" in message, message
    finally:
        await phone.close()


# -- ./dev ----------------------------------------------------------------------------------------


FAKE_PYTHON = """#!/bin/sh
# A stand-in interpreter: `-m venv DIR` makes a venv whose python records pip's arguments.
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\necho "$*" >> "%s/pip.log"\\n' "$(cd "$3" && pwd)" > "$3/bin/python"
  printf '#!/bin/sh\\necho "tracker $*"\\n' > "$3/bin/tracker"
  printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/ruff"
  cp "$3/bin/ruff" "$3/bin/mypy"; cp "$3/bin/ruff" "$3/bin/lint-imports"
  chmod +x "$3/bin/"*
fi
"""


def test_dev_installs_runtime_dependencies_for_serve_and_dev_extras_for_test_and_lint(tmp_path: Path) -> None:
    shutil.copy(REPO / "dev", tmp_path / "dev")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**clean_env(), "PYTHON": str(fake)}

    def dev(*args: str) -> list[str]:
        done = subprocess.run([str(tmp_path / "dev"), *args], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        log = tmp_path / ".venv" / "pip.log"
        return [line for line in (log.read_text().splitlines() if log.exists() else []) if "install" in line]

    installs = dev("serve", "--port", "1")
    assert installs[-1].endswith("install -q -e .") and "[dev]" not in "".join(installs)
    assert dev("tracker", "info") == installs  # installed once
    installs = dev("lint")
    assert installs[-1].endswith("install -q -e .[dev]")
    assert dev("serve") == installs and dev("lint") == installs  # both stamps hold
    os.utime(tmp_path / "pyproject.toml", (time.time() + 5, time.time() + 5))
    assert dev("serve")[-1].endswith("install -q -e .")  # a changed pyproject.toml installs again
