"""Fault injection for the fault tests and bench/faults.py: real servers we may kill, a TCP proxy
we may cut, slow or reset, a tracker subprocess, and phones that never lose an event.

Everything here talks to real processes over real sockets. Processes are `subprocess.Popen`s
(bound to no event loop, so a session-wide PostgreSQL outlives each test's loop); readiness is
always waited on as an effect with a deadline (`wait_until`), never guessed with a sleep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nobody listens on right now (bind to port 0, read it back, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.02
) -> float:
    """Poll `predicate` (sync, or returning an awaitable) until truthy; returns seconds waited."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        await asyncio.sleep(interval)


async def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """A bare HTTP/1.0 GET on 127.0.0.1 (no client library needed); (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def ready(port: int) -> dict[str, Any] | None:
    """/readyz's body, or None when the instance does not answer."""
    try:
        _, body = await http_get(port, "/readyz")
        parsed: dict[str, Any] = orjson.loads(body)
        return parsed
    except (OSError, TimeoutError, ValueError, IndexError):
        return None


async def is_ready(port: int) -> bool:
    body = await ready(port)
    return bool(body and body.get("ready"))


# -- a TCP proxy ------------------------------------------------------------------------------


class _Pipe:
    """One proxied connection: two pumps, and what the client has said so far (for `mute`)."""

    def __init__(
        self,
        proxy: Proxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client, self.server = client, server
        self.said = b""
        self.muted = False
        self.tasks = [
            asyncio.create_task(self._pump(client[0], server[1], up=True)),
            asyncio.create_task(self._pump(server[0], client[1], up=False)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while True:
                rate = self.proxy.rate_up if up else self.proxy.rate_down
                data = await reader.read(max(64, rate // 10) if rate else 65_536)
                if not data:
                    break
                if up and len(self.said) < 4096:
                    self.said += data[: 4096 - len(self.said)]
                if not up and self.muted:
                    continue  # green but deaf: the connection stays up, nothing gets through
                writer.write(data)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(data) / rate)  # holding the link to its rate (not a wait)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.abort(rst=False)

    def abort(self, *, rst: bool) -> None:
        for _, writer in (self.client, self.server):
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.transport.abort()
            else:
                writer.close()
        self.proxy.pipes.discard(self)


class Proxy:
    """A TCP proxy in front of one server, listening on a port of its own (bound to port 0).

    `cut()` resets every connection and refuses new ones until `restore()`; `reset()` resets the
    open connections once; `slow(bytes_per_s)` throttles (with backpressure: it reads no faster
    than it writes); `mute(marker)` silently drops what the server sends on open connections whose
    client sent `marker` (a subscriber that is connected but receives nothing)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, buffer: int = 65_536) -> None:
        self.target = (target_host, target_port)
        self.buffer = buffer
        self.pipes: set[_Pipe] = set()
        self.rate_up = 0
        self.rate_down = 0
        self.refusing = False
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=self.buffer)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up = await asyncio.open_connection(sock=await self._connect(), limit=self.buffer)
        except OSError:
            writer.transport.abort()
            return
        self.pipes.add(_Pipe(self, (reader, writer), up))

    async def _connect(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        if self.buffer < 65_536:
            # A small window upstream too, so the server feels the slow link; and a mobile link's
            # segment size: with loopback's 64 KB MSS a small window never reopens by a full
            # segment, and the sender falls back to zero-window probes seconds apart.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.buffer)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.target)
        except OSError:
            sock.close()
            raise
        return sock

    def cut(self) -> None:
        self.refusing = True
        self.reset()

    def restore(self) -> None:
        self.refusing = False
        self.rate_up = self.rate_down = 0

    def reset(self) -> None:
        for pipe in list(self.pipes):
            pipe.abort(rst=True)

    def slow(self, bytes_per_s: int, *, down: bool = True, up: bool = False) -> None:
        self.rate_down = bytes_per_s if down else 0
        self.rate_up = bytes_per_s if up else 0

    def mute(self, marker: bytes) -> int:
        n = 0
        for pipe in self.pipes:
            if marker in pipe.said:
                pipe.muted = True
                n += 1
        return n

    async def close(self) -> None:
        self.reset()
        tasks = [t for pipe in list(self.pipes) for t in pipe.tasks]
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- private servers --------------------------------------------------------------------------


def _open_log(path: Path) -> Any:
    """A log file for a child process (which keeps it open; we close our copy after the spawn)."""
    return open(path, "ab")


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A private redis-server (no persistence: a restart loses everything, as after a crash)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="tracker-fault-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
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
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await wait_until(self._pong, 10, "redis-server to answer PING")
        return self

    async def _pong(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
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
        _stop_process(self.proc, signal.SIGKILL)

    def close(self) -> None:
        _stop_process(self.proc)
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
    survives restarts: what was committed stays committed."""

    def __init__(self) -> None:
        self.user = _system_user()
        self.bin = pg_bin_dir(self.user)
        self.dir = Path(tempfile.mkdtemp(prefix="tracker-fault-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        os.chmod(self.dir, 0o755)
        if self.user is not None:
            shutil.chown(self.dir, self.user)
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
        log = _open_log(self.dir / "postgres.log")
        try:
            # fsync off is safe here: a killed *process* loses nothing written to the OS.
            self.proc = subprocess.Popen(
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
                user=self.user,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
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
        _stop_process(self.proc, signal.SIGINT)  # fast shutdown

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the service as a process -----------------------------------------------------------------


class TrackerProc:
    """`python -m tracker serve` as a subprocess (so it can be SIGKILLed or SIGTERMed)."""

    def __init__(
        self,
        *,
        database_url: str,
        redis_url: str,
        secret: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="tracker-fault-inst-")
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "TRACKER_JWT_SECRET": secret,
            "TRACKER_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.log_path = log_path or Path(self.data_dir) / "tracker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, *, timeout: float = 30.0) -> TrackerProc:
        log = _open_log(self.log_path)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tracker", "serve", "--port", str(self.port), "--data-dir", self.data_dir],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        await wait_until(self._ready, timeout, f"tracker on port {self.port} to be ready", interval=0.05)
        self._sampler = asyncio.create_task(self._sample_rss())
        return self

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"tracker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        body = await ready(self.port)
        return bool(body and body.get("ready"))

    async def _sample_rss(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error, AssertionError):
            assert self.proc is not None
            ps = psutil.Process(self.proc.pid)
            while self.proc.poll() is None:
                self.peak_rss = max(self.peak_rss, ps.memory_info().rss)
                await asyncio.sleep(0.1)  # a sampling period

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def exited(self, timeout: float) -> int:
        assert self.proc is not None
        await wait_until(lambda: self.proc is not None and self.proc.poll() is not None, timeout, "the tracker to exit")
        return self.proc.returncode

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        _stop_process(self.proc, signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


# -- phones that never lose an event ----------------------------------------------------------


@dataclass
class DriverStats:
    generated: int = 0
    acked_frames: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    retry_ms_missing: int = 0  # `unavailable`/`rate_limited` without retry_ms (a protocol breach)
    closes: Counter[int] = field(default_factory=Counter)
    connects: int = 0
    ack_latency_ms: list[float] = field(default_factory=list)


class Driver:
    """A phone as PROTOCOL.md describes it: it numbers events, keeps every one not acknowledged,
    resends after `retry_ms` (unavailable, rate limited), after reconnecting, or when unanswered
    for `resend_after` s; reconnects with backoff and full jitter, to the next URL when one fails."""

    def __init__(
        self, urls: list[str], token: str, name: str, *, interval: float = 0.1, resend_after: float = 10.0
    ) -> None:
        self.urls = urls
        self.token = token
        self.name = name
        self.interval = interval
        self.resend_after = resend_after
        self.outbox: dict[int, tuple[dict[str, Any], float]] = {}  # seq -> (event, when last sent)
        self.acked: set[int] = set()
        self.stats = DriverStats()
        self.seq = 0
        self.generating = True
        self.ws: ClientConnection | None = None
        self.url_index = 0
        self.born: dict[int, float] = {}  # seq -> monotonic time it was generated
        self.acked_at: dict[int, float] = {}  # seq -> monotonic time of its (first) ack
        self.close_times: list[tuple[float, int]] = []  # (monotonic time, close code)
        self.ack_times: list[float] = []  # monotonic time of every ack frame
        self._retry: asyncio.TimerHandle | None = None
        self._next_scan = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"driver-{self.name}")

    async def close(self) -> None:
        self._stop = True
        if self._retry is not None:
            self._retry.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 1)
            self.ws.transport.abort()

    @property
    def unacked(self) -> int:
        return len(self.outbox)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stop:
            url = self.urls[self.url_index % len(self.urls)]
            try:
                ws = await connect(
                    url + "/v1/driver", compression=None, open_timeout=5, max_queue=None, ping_interval=None
                )
            except (OSError, TimeoutError, InvalidHandshake, InvalidStatus):
                self.url_index += 1
                await asyncio.sleep(random.uniform(0, backoff))  # backoff with full jitter (PROTOCOL.md)
                backoff = min(backoff * 2, 1.0)
                continue
            self.ws = ws
            try:
                await self._session(ws)
                self._closed(ws.close_code or 1006)
                backoff = 0.05
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                self._closed(code)
                if code == 4001:
                    return
                if code in (1012, 1013, 1006):
                    self.url_index += 1  # "reconnect, elsewhere if you can"
            except (OSError, TimeoutError):
                self.url_index += 1
            finally:
                self.ws = None
                ws.transport.abort()
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 1.0)

    def _closed(self, code: int) -> None:
        self.stats.closes[code] += 1
        self.close_times.append((time.monotonic(), code))

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send(orjson.dumps({"type": "hello", "token": self.token, "device": "fault", "app": "fault/1"}))
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if welcome.get("type") != "welcome":
            raise OSError(f"no welcome: {welcome}")
        self.stats.connects += 1
        self.seq = max(self.seq, int(welcome.get("last_seq", 0)))
        if self.outbox:  # the newest first, then the backlog (PROTOCOL.md)
            await self._send(sorted(self.outbox, reverse=True))
        reader = asyncio.create_task(self._read(ws))
        try:
            while True:
                if self.generating:
                    self.seq += 1
                    event = {
                        "type": "pos",
                        "seq": self.seq,
                        "ts": now_ms(),
                        "lat": -1.29 + self.seq * 1e-5,
                        "lon": 36.82,
                        "spd": 9.5,
                    }
                    self.outbox[self.seq] = (event, time.monotonic())
                    self.born[self.seq] = time.monotonic()
                    self.stats.generated += 1
                    await ws.send(orjson.dumps(event))
                if time.monotonic() >= self._next_scan:  # unanswered for resend_after: send again
                    self._next_scan = time.monotonic() + self.resend_after / 4
                    limit = time.monotonic() - self.resend_after
                    stale = [s for s, (_, at) in self.outbox.items() if at < limit]
                    if stale:
                        await self._send(stale)
                done, _ = await asyncio.wait({reader}, timeout=self.interval)
                if done:
                    reader.result()
                    return
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _send(self, seqs: Iterable[int]) -> None:
        ws = self.ws
        if ws is None:
            return
        items = []
        for s in seqs:
            if s in self.outbox:
                event, _ = self.outbox[s]
                self.outbox[s] = (event, time.monotonic())
                items.append(event)
        for start in range(0, len(items), 200):
            await ws.send(orjson.dumps({"type": "batch", "items": items[start : start + 200]}))

    async def _read(self, ws: ClientConnection) -> None:
        async for data in ws:
            frame = orjson.loads(data)
            kind = frame.get("type")
            if kind == "ack":
                self.stats.acked_frames += 1
                t = time.monotonic()
                self.ack_times.append(t)
                for a, b in frame["ranges"]:
                    for s in range(a, b + 1):
                        item = self.outbox.pop(s, None)
                        if item is not None:
                            self.stats.ack_latency_ms.append((t - item[1]) * 1000)
                        if s not in self.acked:
                            self.acked.add(s)
                            self.acked_at[s] = t
            elif kind == "error":
                code = frame.get("code", "?")
                self.stats.errors[code] += 1
                ranges = frame.get("ranges", [])
                seqs = [frame["seq"]] if "seq" in frame else [s for a, b in ranges for s in range(a, b + 1)]
                if code in ("unavailable", "rate_limited"):
                    if "retry_ms" not in frame:
                        self.stats.retry_ms_missing += 1
                    delay = frame.get("retry_ms", 1000) / 1000
                    self._retry = asyncio.get_running_loop().call_later(
                        delay, lambda s=seqs: asyncio.ensure_future(self._resend(s))
                    )
                elif code in ("invalid", "forbidden"):
                    for s in seqs:
                        self.outbox.pop(s, None)

    async def _resend(self, seqs: list[int]) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            await self._send([s for s in seqs if s in self.outbox])


class Fleet:
    """Many `Driver`s of one org: start, stop generating, drain (everything acknowledged)."""

    def __init__(
        self,
        urls: list[str],
        secret: str,
        org: str,
        n: int,
        *,
        interval: float = 0.1,
        resend_after: float = 10.0,
        prefix: str = "d",
    ) -> None:
        from tracker.auth import mint_token

        self.org = org
        self.drivers = [
            Driver(
                urls,
                mint_token(secret, role="driver", sub=f"{prefix}-{i}", org=org),
                f"{prefix}-{i}",
                interval=interval,
                resend_after=resend_after,
            )
            for i in range(n)
        ]

    async def __aenter__(self) -> Fleet:
        for d in self.drivers:
            d.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(d.close() for d in self.drivers))

    def stop_generating(self) -> None:
        for d in self.drivers:
            d.generating = False

    async def drain(self, timeout: float) -> float:
        """Stop generating and wait until every event is acknowledged; returns the seconds it took."""
        self.stop_generating()
        return await wait_until(
            lambda: all(not d.outbox for d in self.drivers), timeout, f"every event acknowledged ({self.unacked} left)"
        )

    @property
    def unacked(self) -> int:
        return sum(d.unacked for d in self.drivers)

    @property
    def generated(self) -> int:
        return sum(d.stats.generated for d in self.drivers)

    def acked(self) -> dict[str, set[int]]:
        return {d.name: set(d.acked) for d in self.drivers}

    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self.drivers:
            total.update(d.stats.errors)
        return total

    def closes(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for d in self.drivers:
            total.update(d.stats.closes)
        return total

    def last_ack(self) -> float:
        return max((d.ack_times[-1] for d in self.drivers if d.ack_times), default=0.0)

    def acks_between(self, start: float, end: float) -> int:
        return sum(1 for d in self.drivers for t in d.ack_times if start <= t <= end)


@dataclass
class StoreCheck:
    acked: int
    stored: int
    lost: list[tuple[str, int]]
    duplicated: list[tuple[str, int]]

    def assert_exactly_once(self) -> None:
        assert not self.lost, f"{len(self.lost)} acknowledged events are not stored: {self.lost[:10]}"
        assert not self.duplicated, f"{len(self.duplicated)} events stored twice: {self.duplicated[:10]}"


async def check_stored(dsn: str, org: str, acked: dict[str, set[int]]) -> StoreCheck:
    """Every acknowledged (driver, seq) against PostgreSQL: stored, and stored once."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT driver_id, seq, count(*) AS n FROM (SELECT driver_id, seq FROM positions WHERE org = $1 "
            "UNION ALL SELECT driver_id, seq FROM scans WHERE org = $1) s GROUP BY driver_id, seq",
            org,
        )
    finally:
        await conn.close()
    stored = {(r["driver_id"], r["seq"]) for r in rows}
    dup = [(r["driver_id"], r["seq"]) for r in rows if r["n"] > 1]
    lost = sorted((d, s) for d, seqs in acked.items() for s in seqs if (d, s) not in stored)
    return StoreCheck(sum(len(v) for v in acked.values()), len(rows), lost, dup)


# -- a dashboard that records what it is told -------------------------------------------------


class Watcher:
    """A dispatcher dashboard that records status frames, snapshots and live positions."""

    def __init__(self, url: str, token: str, *, sock: socket.socket | None = None) -> None:
        self.url, self.token, self.sock = url, token, sock
        self.ws: ClientConnection | None = None
        self.statuses: list[tuple[float, bool]] = []
        self.snapshots: list[tuple[float, dict[str, Any]]] = []
        self.positions: dict[str, dict[str, Any]] = {}  # the newest per driver
        self.pos_times: list[float] = []
        self.latency_ms: list[float] = []  # receipt time minus the event's ts
        self.errors: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, subscribe: dict[str, Any] | None = None) -> Watcher:
        self.ws = await connect(self.url + "/v1/live", compression=None, sock=self.sock, max_queue=None)
        await self.ws.send(orjson.dumps({"type": "hello", "token": self.token}))
        await self.ws.send(orjson.dumps({"type": "subscribe", **(subscribe or {})}))
        self._task = asyncio.create_task(self._read(self.ws))
        await wait_until(lambda: self.snapshots, 10, "the first snapshot")
        return self

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                self._frame(orjson.loads(data))
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd else 1006
        else:
            self.close_code = ws.close_code

    def _frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        t = time.monotonic()
        if kind == "batch":
            for item in frame["items"]:
                self._frame(item)
        elif kind == "status":
            self.statuses.append((t, bool(frame["live"])))
        elif kind == "snapshot":
            self.snapshots.append((t, frame))
            for d in frame.get("drivers", []):
                if "seq" in d:
                    self.positions[d["driver"]] = d
        elif kind == "pos":
            self.pos_times.append(t)
            self.latency_ms.append(now_ms() - frame["ts"])
            old = self.positions.get(frame["driver"])
            if old is None or old.get("ts", 0) <= frame["ts"]:
                self.positions[frame["driver"]] = frame
        elif kind == "error":
            self.errors.append(frame)

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 1)
            self.ws.transport.abort()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# -- fixtures (imported by the test_faults_* modules) -----------------------------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One private cluster for the session (initdb once); tests may kill and restart it."""
    cluster = PgCluster()
    yield cluster
    cluster.close()


@pytest.fixture
async def private_pg(pg_cluster: PgCluster) -> AsyncIterator[str]:
    """The private cluster, running at the start of the test; yields the tracker database's DSN."""
    await pg_cluster.start()
    yield await pg_cluster.create_database("tracker")
    await pg_cluster.start()  # a test that left it down must not break the next one


Spawn = Callable[..., Awaitable[TrackerProc]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """`await spawn(database_url, redis_url, TRACKER_X="...")`: a `tracker serve` subprocess, ready."""
    from .conftest import SECRET

    procs: list[TrackerProc] = []

    async def start(database_url: str, redis_url: str, **env: str) -> TrackerProc:
        settings = {"TRACKER_PRESENCE_REFRESH_S": "1", "TRACKER_PRESENCE_TTL_S": "5", **env}
        proc = TrackerProc(database_url=database_url, redis_url=redis_url, secret=SECRET, env=settings)
        procs.append(proc)
        return await proc.start()

    yield start
    await asyncio.gather(*(p.close() for p in procs))


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = await RedisServer().start()
    yield server
    server.close()


# -- floods -----------------------------------------------------------------------------------


class Flood:
    """Many idle sockets against one port: `websockets` finish the upgrade and then say nothing
    (no hello), `raw` connect and never send a byte. Each records when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = 0
        self.upgraded = 0
        self.refused = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, n: int, *, upgrade: bool, path: str = "/v1/driver", concurrency: int = 200) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.refused += 1
                    return
                self.writers.append(writer)
                if upgrade:
                    key = base64.b64encode(os.urandom(16)).decode()
                    writer.write(
                        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
                    )
                    try:
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                    except (OSError, asyncio.IncompleteReadError, TimeoutError):
                        self.closed += 1
                        return
                    if b" 101 " in head.split(b"\r\n", 1)[0]:
                        self.upgraded += 1
            self._tasks.append(asyncio.create_task(self._until_closed(reader)))

        await asyncio.gather(*(one() for _ in range(n)))

    async def _until_closed(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65_536):
                pass
        self.closed += 1

    @property
    def open_count(self) -> int:
        return len(self.writers) - self.closed

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
