"""A tracker under test: in this test's event loop (`Instance`: uvicorn on a real port, its node
at hand), or as a `tracker serve` subprocess (`TrackerProc`: a process that can be SIGKILLed or
SIGTERMed, whose peak RSS is sampled)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from tracker.app import create_app
from tracker.config import Settings
from tracker.node import Node
from tracker.server import Server, uvicorn_config

from .http import wait_ready
from .ports import free_port
from .servers import popen, stop_process
from .tokens import CUSTODY_KEY
from .wait import wait_until

ROOT = Path(__file__).resolve().parent.parent


async def serve(settings: Settings) -> tuple[Server, asyncio.Task[None]]:
    """Serve `create_app(settings)` in this loop; returns as soon as it listens (no waiting for its
    broker). Raises what the server raised if it could not start."""
    app = create_app(settings)
    server = Server(uvicorn_config(app, settings), app)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), 10, "the instance to listen", interval=0.005)
    if task.done():
        task.result()
    assert server.started, "the instance did not start"
    return server, task


class Instance:
    """One running tracker (uvicorn on a real port) in this test's event loop."""

    def __init__(self, server: Server, task: asyncio.Task[None]) -> None:
        self.server = server
        self.task = task

    @classmethod
    async def start(cls, settings: Settings) -> Instance:
        """Serve `create_app(settings)`; returns once it listens and its broker's subscriber is
        proven to receive (the loop-back probe /readyz uses), or after 5 s without that proof."""
        server, task = await serve(settings)
        inst = cls(server, task)
        broker = inst.node.broker
        with contextlib.suppress(AssertionError):  # not a failure here: a test may be about a broken broker
            await wait_until(lambda: broker.receiving and broker.live, 5, "the subscriber", interval=0.01)
        return inst

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def node(self) -> Node:
        node: Node = self.server.app.state.node
        return node

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)


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
            "TRACKER_CUSTODY_KEY": CUSTODY_KEY,
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
        self.proc = popen(
            [sys.executable, "-m", "tracker", "serve", "--port", str(self.port), "--data-dir", self.data_dir],
            log=self.log_path,
            env=self.env,
            cwd=ROOT,
        )
        await wait_ready(self.port, proc=self.proc, log=self.log_path, timeout=timeout)
        self._sampler = asyncio.create_task(self._sample_rss())
        return self

    async def _sample_rss(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error, AssertionError):
            assert self.proc is not None
            ps = psutil.Process(self.proc.pid)
            while self.proc.poll() is None:
                self.peak_rss = max(self.peak_rss, ps.memory_info().rss)
                await asyncio.sleep(0.1)  # a sampling period

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
        stop_process(self.proc, signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


Spawn = Callable[..., Awaitable[TrackerProc]]  # the `spawn` fixture: (database_url, redis_url, **env)
