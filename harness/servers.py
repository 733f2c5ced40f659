"""Private servers a test or a benchmark may kill: a redis-server and a PostgreSQL cluster on spare
ports, each in a temporary folder of its own, and stopping any child process.

Processes are `subprocess.Popen`s, bound to no event loop, so a session-wide cluster outlives each
test's loop; readiness is waited on as an effect with a deadline (`wait_until`), never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from .ports import free_port
from .wait import wait_until


def popen(cmd: list[str], *, log: Path | None = None, **kw: Any) -> subprocess.Popen[bytes]:
    """Start `cmd` and return at once (readiness is the caller's to wait on), its stdout and stderr
    appended to `log`, or discarded without one."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # the child keeps its own copy
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=out, **kw)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Send `sig` and wait up to `grace` s for the exit, then SIGKILL; reaps a process already gone."""
    if proc is None:
        return
    if proc.poll() is not None:
        proc.wait()
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A private redis-server (no persistence: a restart loses everything, as after a crash)."""

    def __init__(self, port: int | None = None, *, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args  # more redis-server options (a replica's --replicaof, a cluster node's)
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="tracker-fault-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's pid (whose CPU a benchmark reads); started servers only."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    async def start(self) -> RedisServer:
        self.proc = popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
                *self.args,
            ],
            log=Path(self.dir) / "redis.log",
        )
        await wait_until(self._pong, 10, "redis-server to answer PING")
        return self

    async def _pong(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            said = (Path(self.dir) / "redis.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {said}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return (await asyncio.wait_for(reader.readline(), 1)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def kill(self) -> None:
        """SIGKILL: the server and everything it held are gone."""
        stop_process(self.proc, signal.SIGKILL)

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def pg_bin_dir(user: str | None = None) -> Path:
    """The PostgreSQL binaries the `pgserver` package ships, else Debian's: the first that `user`
    (who runs the server) can execute: a checkout under a private folder hides pgserver's."""
    candidates: list[Path] = []
    with contextlib.suppress(ImportError):
        import importlib.util

        spec = importlib.util.find_spec("pgserver")
        if spec is not None and spec.origin is not None:
            candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    candidates += [Path(c) for c in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for candidate in candidates:
        if not (candidate / "postgres").exists():
            continue
        probe = subprocess.run([str(candidate / "postgres"), "--version"], user=user, capture_output=True, check=False)
        if probe.returncode == 0:
            return candidate
    raise RuntimeError("no usable PostgreSQL binaries: install the pgserver package or postgresql")


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: then run it as an unprivileged system user."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "pgserver"], check=True)
    return "pgserver"


class PgCluster:
    """A private PostgreSQL cluster: initdb once, then start, kill (SIGKILL, the whole process
    group: crash recovery at the next start) and stop as often as a test needs. The data folder
    survives restarts: what was committed stays committed.

    `standby_of` (a running cluster) makes a streaming standby of it instead (`pg_basebackup -R`),
    which `promote` turns into a primary."""

    def __init__(self, *, standby_of: PgCluster | None = None) -> None:
        self.user = _system_user()
        self.bin = pg_bin_dir(self.user)
        self.dir = Path(tempfile.mkdtemp(prefix="tracker-fault-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        os.chmod(self.dir, 0o755)
        if self.user is not None:
            shutil.chown(self.dir, self.user)
        if standby_of is not None:
            subprocess.run(
                [
                    str(self.bin / "pg_basebackup"),
                    *("-h", "127.0.0.1", "-p", str(standby_of.port), "-U", "postgres", "-D", str(self.data)),
                    *("-R", "-X", "stream", "-c", "fast", "--no-sync"),
                ],
                check=True,
                user=self.user,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            return
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def url(self, db: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{db}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> PgCluster:
        if self.running:
            return self
        # fsync off is safe here: a killed *process* loses nothing written to the OS.
        self.proc = popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.dir}",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "log_min_messages=fatal",
            ],
            log=self.dir / "postgres.log",
            user=self.user,
            start_new_session=True,
        )
        await wait_until(self._accepts, 30, "PostgreSQL to accept connections", interval=0.05)
        return self

    async def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.proc.returncode}: see {self.dir / 'postgres.log'}")
        try:
            conn = await asyncpg.connect(self.url(), timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError):
            return False
        await conn.close()
        return True

    async def create_database(self, name: str) -> str:
        conn = await asyncpg.connect(self.url())
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    async def promote(self) -> None:
        """A standby becomes a primary (returns once it accepts writes)."""
        conn = await asyncpg.connect(self.url(), timeout=5)
        try:
            assert await conn.fetchval("SELECT pg_promote(true, 30)"), "the standby was not promoted"
        finally:
            await conn.close()

    async def standbys(self) -> list[str]:
        """The `sync_state` of each standby streaming from this primary now ('async', 'sync')."""
        conn = await asyncpg.connect(self.url(), timeout=5)
        try:
            rows = await conn.fetch("SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'")
            return [row["sync_state"] for row in rows]
        finally:
            await conn.close()

    def kill(self) -> None:
        """SIGKILL to the postmaster and every backend at once: a crash mid-transaction."""
        if not self.running:
            return
        assert self.proc is not None
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # backends die with the group; wait for the last one
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)  # fast shutdown

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
