"""Ports on 127.0.0.1: a free one to listen on, and waiting until something listens on one."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from typing import Any


def free_port() -> int:
    """A port nobody listens on right now (bind to port 0, read it back, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until a TCP connect to 127.0.0.1:`port` succeeds (for scripts without an event loop);
    fail at once if `proc`, the process meant to listen there, has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)  # polled under the deadline: nothing to wait on but a refused connect
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
