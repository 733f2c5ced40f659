"""`tracker serve` as a person runs it, in a subprocess: a busy port, Ctrl-C and SIGTERM, SIGKILL, and
a data folder two processes want. Each test reads the exit code, the time it took and what the
person sees, and checks that no embedded postgres or redis-server of the data folder outlives it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.clients import Phone, pos
from harness.http import request, wait_ready
from harness.ports import free_port
from harness.servers import pg_bin_dir, popen, stop_process
from harness.wait import wait_until

REPO = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["PYTHONWARNINGS"] = "ignore"
    return env


def serve(port: int, data: Path, log: Path) -> subprocess.Popen[bytes]:
    return popen(
        [sys.executable, "-m", "tracker", "serve", "--port", str(port), "--data-dir", str(data)],
        log=log,
        env=clean_env(),
    )


def servers_of(data: Path) -> list[psutil.Process]:
    """The postgres and redis-server processes working on `data` (their folder or command line)."""
    root = str(data.resolve())
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "cwd"]):
        name = proc.info["name"] or ""
        if not name.startswith(("postgres", "redis-server")):
            continue
        where = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if root in where:
            found.append(proc)
    return found


@pytest.fixture
def data() -> Iterator[Path]:
    """A data folder (outside pytest's 0700 base folder: PostgreSQL runs unprivileged under root);
    whatever server a failing test left on it is killed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="tracker-serve-")) / "data"
    yield folder
    for proc in servers_of(folder):
        proc.kill()
    shutil.rmtree(folder.parent, ignore_errors=True)


async def no_servers_left(data: Path, timeout: float = 20) -> None:
    await wait_until(lambda: not servers_of(data), timeout, lambda: f"no server on {data}: {servers_of(data)}")


async def exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The exit code within `timeout` s; a process still running then is a failure (and killed)."""
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc, signal.SIGKILL)
        pytest.fail(f"{proc.args!r} still running after {timeout} s")


def driver_token(data: Path) -> str:
    """`tracker token` for a driver, signed with the data folder's generated secret."""
    minted = subprocess.run(
        [
            *(sys.executable, "-m", "tracker", "token", "--role", "driver", "--sub", "d-1", "--org", "acme"),
            *("--data-dir", str(data)),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return minted.stdout.strip()


async def driver_acked(port: int, data: Path) -> None:
    phone = await Phone.connect(f"ws://127.0.0.1:{port}", driver_token(data))
    try:
        await phone.send(pos(phone.welcome["last_seq"] + 1))
        await phone.until(lambda p: len(p.acked) == 1)
    finally:
        await phone.close()


async def test_busy_port_is_one_clear_line_and_a_quick_nonzero_exit(data: Path, tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port, log = busy.getsockname()[1], tmp_path / "serve.log"
    try:
        started = time.monotonic()
        proc = serve(port, data, log)
        code = await exit_code(proc, 20)
        took = time.monotonic() - started
    finally:
        busy.close()
    text = log.read_text()
    assert code != 0, text
    assert took < 10, f"{took:.1f} s"
    said = [line for line in text.splitlines() if "already in use" in line.lower()]
    assert len(said) == 1 and f":{port}" in said[0] and "--port" in said[0], text
    assert "Traceback" not in text and "Waiting for application shutdown" not in text
    await no_servers_left(data, timeout=5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_ctrl_c_and_sigterm_stop_it_and_its_servers(sig: signal.Signals, data: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, data, log)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        await driver_acked(port, data)
        assert len(servers_of(data)) >= 2  # the test sees the embedded servers it then expects gone
        started = time.monotonic()
        proc.send_signal(sig)
        code = await exit_code(proc, 40)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert code in (0, -sig, 128 + sig), log.read_text()
    assert time.monotonic() - started < 30
    await no_servers_left(data, timeout=5)
    assert "Traceback" not in log.read_text()


async def test_sigkill_leaves_no_server_and_the_next_start_recovers(data: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, data, log)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        await driver_acked(port, data)
        proc.kill()
        proc.wait()
        await no_servers_left(data)  # they follow their parent, even one killed without a word
    finally:
        stop_process(proc, signal.SIGKILL)

    # A crash of everything at once: a stale postmaster.pid and socket files stay behind.
    proc = serve(port, data, log)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        for server in servers_of(data):
            server.kill()
        proc.kill()
        proc.wait()
        await no_servers_left(data)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert (data / "postgres" / "postmaster.pid").exists()  # stale, as after a power cut

    proc = serve(port, data, log)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        await driver_acked(port, data)
        proc.send_signal(signal.SIGTERM)
        await exit_code(proc, 40)
    finally:
        stop_process(proc, signal.SIGKILL)
    await no_servers_left(data, timeout=5)


async def test_a_data_folder_serves_one_process_and_says_who_holds_it(data: Path, tmp_path: Path) -> None:
    port, log, where = free_port(), tmp_path / "first.log", str(data.parent.resolve() / "data")
    first = serve(port, data, log)
    try:
        await wait_ready(port, proc=first, log=log, timeout=90, interval=0.2)
        second_log = tmp_path / "second.log"
        started = time.monotonic()
        second = serve(free_port(), data, second_log)
        code = await exit_code(second, 20)
        text = second_log.read_text()
        assert code != 0 and time.monotonic() - started < 10, text
        assert f"pid {first.pid}" in text and "serve" in text and where in text, text
        assert "Traceback" not in text
        await wait_ready(port, proc=first, log=log, timeout=5)  # the first one never noticed
        await driver_acked(port, data)
    finally:
        stop_process(first)
    await no_servers_left(data, timeout=5)


def read(path: Path) -> str:
    return path.read_text()


async def test_start_is_a_short_banner_whose_token_command_works(data: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, data, log)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        await wait_until(lambda: "live feed" in read(log), 10, "the broker's first status line")
        text = read(log)
        lines = text.splitlines()
        assert len(lines) <= 25, text  # not initdb's whole log
        assert "Success. You can now start the database server" not in text and "pgserver" not in text, text
        assert "live feed restored" not in text, text  # nothing was interrupted
        assert f"http://127.0.0.1:{port}/" in text
        command = next(line.split("a token", 1)[1].strip() for line in lines if line.strip().startswith("a token"))
        minted = subprocess.run(shlex.split(command), env=clean_env(), capture_output=True, text=True, timeout=60)
        assert minted.returncode == 0, (command, minted.stderr)
        status, _, body = await request(port, "GET", "/v1/drivers", minted.stdout.strip())
        assert status == 200, body  # the printed command mints a token this service accepts
        where = next(line for line in lines if line.strip().startswith("data "))
        assert str(data.parent.resolve() / "data") in where
        for name in ("initdb.log", "postgres.log", "redis.log"):
            assert (data / name).stat().st_size > 0, name  # the embedded servers' logs are files
    finally:
        stop_process(proc)
    await no_servers_left(data, timeout=5)


async def test_log_format_json_is_one_object_per_line(database_url: str, redis_url: str, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    env = {
        **clean_env(),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "TRACKER_JWT_SECRET": "json-test-secret-" + "x" * 32,
        "TRACKER_CUSTODY_KEY": "json-test-custody-" + "y" * 32,
    }
    command = [sys.executable, "-m", "tracker", "serve", "--port", str(port), "--log-format", "json"]
    proc = popen([*command, "--data-dir", str(tmp_path / "data")], log=log, env=env)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=60, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        await exit_code(proc, 40)
    finally:
        stop_process(proc, signal.SIGKILL)
    records = [json.loads(line) for line in read(log).splitlines()]  # every line, or this fails
    assert records and all(isinstance(r, dict) and {"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert any(f"http://127.0.0.1:{port}/" in r["msg"] for r in records)


async def test_a_second_ctrl_c_ends_a_stuck_shutdown_at_once(data: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, data, log)
    frozen: list[psutil.Process] = []
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        phone = await Phone.connect(f"ws://127.0.0.1:{port}", driver_token(data))
        # PostgreSQL hangs (SIGSTOP): the event below cannot commit, so the drain Ctrl-C starts is stuck.
        frozen = [p for p in servers_of(data) if p.name().startswith("postgres")]
        for p in frozen:
            p.suspend()
        await phone.send(pos(phone.welcome["last_seq"] + 1))
        proc.send_signal(signal.SIGINT)
        await wait_until(lambda: "draining" in read(log), 10, "the drain to start")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = await exit_code(proc, 20)
        assert time.monotonic() - started < 10
        assert code == 130, read(log)
    finally:
        stop_process(proc, signal.SIGKILL)
        for p in frozen:
            with contextlib.suppress(psutil.Error):
                p.resume()
    await no_servers_left(data)


def postgres_ready(pgdata: Path) -> bool:
    lines = (pgdata / "postmaster.pid").read_text().splitlines() if (pgdata / "postmaster.pid").exists() else []
    return len(lines) >= 8 and lines[7].strip() == "ready"


async def test_a_postgres_left_running_on_the_folder_is_stopped_and_replaced(data: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(port, data, log)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
    finally:
        stop_process(proc)
    await no_servers_left(data, timeout=5)
    # An earlier version (pgserver's pg_ctl) left its PostgreSQL running on the folder, detached.
    pgdata = data / "postgres"
    user = "pgserver" if os.geteuid() == 0 else None
    as_user: dict[str, Any] = (
        {} if user is None else {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
    )
    stale = subprocess.Popen(
        [str(pg_bin_dir(user) / "postgres"), "-D", str(pgdata), "-k", str(pgdata), "-h", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **as_user,
    )
    try:
        await wait_until(lambda: postgres_ready(pgdata), 30, "the stale PostgreSQL to run")
        proc = serve(port, data, log)
        try:
            await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
            await wait_until(lambda: stale.poll() is not None, 5, "the stale PostgreSQL to be stopped")
            await driver_acked(port, data)
        finally:
            stop_process(proc)
    finally:
        stop_process(stale, signal.SIGKILL)
    await no_servers_left(data, timeout=5)


async def test_dev_serve_banner_names_the_dev_command_and_it_works(data: Path, tmp_path: Path) -> None:
    """From a checkout, `./dev serve` says `./dev tracker token ...` (`tracker` is not on PATH)."""
    repo, port, log = REPO, free_port(), tmp_path / "serve.log"
    proc = popen(["./dev", "serve", "--port", str(port), "--data-dir", str(data)], log=log, env=clean_env(), cwd=repo)
    try:
        await wait_ready(port, proc=proc, log=log, timeout=90, interval=0.2)
        line = next(line for line in read(log).splitlines() if line.strip().startswith("a token"))
        command = line.split("a token", 1)[1].strip()
        assert command.startswith("./dev tracker token "), command
        minted = subprocess.run(command, shell=True, cwd=repo, env=clean_env(), capture_output=True, text=True)
        assert minted.returncode == 0, minted.stderr
        status, _, body = await request(port, "GET", "/v1/drivers", minted.stdout.strip())
        assert status == 200, body
    finally:
        stop_process(proc)
    await no_servers_left(data, timeout=5)
