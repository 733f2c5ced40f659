"""`tracker serve --workers N`: N worker processes sharing one port, each a whole instance.

One Python process uses one core. Here each worker is a `tracker serve` process of its own (its own
event loop, PostgreSQL pool, Redis connections and instance id), listening on the same port with
SO_REUSEPORT: the kernel spreads new connections over the workers' listening sockets, and the
workers meet in Redis and PostgreSQL exactly as instances on several machines do (a dashboard on
one sees drivers on another; a driver's newer connection on another worker replaces the older).

The supervisor (this module, the process `tracker serve --workers N` starts as) only starts,
watches and stops them: SIGTERM or SIGINT is passed on to every worker (each drains: commits, acks,
closes with 1012); a second one, too (they stop at once). A worker that dies unexpectedly is
started again after a second. Workers die with the supervisor (PR_SET_PDEATHSIG), so a SIGKILLed
supervisor leaves no worker behind.

Workers need an external PostgreSQL and Redis (DATABASE_URL, REDIS_URL): the embedded ones belong
to one process and its data folder. Each worker has its own /metrics (label your scrape targets
per worker, or scrape one process per port in a deployment that needs per-worker numbers).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from .config import Settings

log = logging.getLogger("tracker.workers")
RESTART_DELAY_S = 1.0
STARTUP_S = 5.0  # a worker that exits sooner after its start could not start: the supervisor stops
PR_SET_PDEATHSIG = 1

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (without listening) with SO_REUSEPORT: a port held by another program fails here, at
    once; port 0 picks one for every worker. Kept open until the end so the port stays ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


class Supervisor:
    """Starts N workers on one port, restarts a crashed one, passes stop signals on."""

    def __init__(self, settings: Settings, workers: int, *, log_format: str) -> None:
        self.settings = settings
        self.n = workers
        self.log_format = log_format
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.started = [0.0] * workers
        self.stopping = 0  # stop signals received
        self.sig = 0  # the last one
        self.port = settings.port

    def _command(self) -> list[str]:
        s = self.settings
        return [
            sys.executable,
            "-m",
            "tracker",
            "serve",
            "--host",
            s.host,
            "--port",
            str(self.port),
            "--log-format",
            self.log_format,
            "--reuse-port",
        ]

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["TRACKER_PORT"] = str(self.port)
        # Instances must differ (presence, kicks, the loop-back probe are per instance).
        base = self.settings.instance_id or f"{os.uname().nodename}:{os.getpid()}"
        env["TRACKER_INSTANCE_ID"] = f"{base}-w{index}"
        parent = os.getpid()

        def die_with_parent() -> None:  # in the child, before exec
            if _libc is not None:
                _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

        # A session of its own: a terminal's Ctrl-C reaches the supervisor once, which passes it on once.
        proc = subprocess.Popen(self._command(), env=env, preexec_fn=die_with_parent, start_new_session=True)
        self.started[index] = time.monotonic()
        log.info("worker %d started: pid %d", index, proc.pid)
        return proc

    def _signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping += 1
        self.sig = sig
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)

    def run(self) -> int:
        """Until every worker has exited after a stop signal; the exit code: 0 if all exited 0."""
        reserved, self.port = reserve_port(self.settings.host, self.settings.port)
        previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(self.n):
                self.procs[i] = self._spawn(i)
            log.info("tracker serving with %d workers on %s:%d", self.n, self.settings.host, self.port)
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            reserved.close()

    def _watch(self) -> int:
        codes: dict[int, int] = {}
        while True:
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                if self.stopping:
                    codes[i] = proc.returncode
                    self.procs[i] = None
                elif time.monotonic() - self.started[i] < STARTUP_S:  # cannot start (configuration, port): stop all
                    log.error("worker %d (pid %d) could not start (exit %s); stopping", i, proc.pid, proc.returncode)
                    self._signal(signal.SIGTERM, None)
                    codes[i] = proc.returncode or 1
                    self.procs[i] = None
                else:
                    log.error("worker %d (pid %d) exited with %s; starting it again", i, proc.pid, proc.returncode)
                    time.sleep(RESTART_DELAY_S)
                    if not self.stopping:
                        self.procs[i] = self._spawn(i)
            if self.stopping and all(p is None for p in self.procs):
                # A worker stopped by the signal passed on is a clean stop (uvicorn re-raises it on exit).
                clean = (0, -self.sig, 128 + self.sig)
                return next((c if c > 0 else 1 for c in codes.values() if c not in clean), 0)
            time.sleep(0.1)
