"""Fakes at the transport boundary for the core's unit tests (no socket, no server): a channel
that records what the core writes, and loop helpers that wait on effects, never on time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from .wait import wait_until


async def until(predicate: Callable[[], Any], what: str, timeout: float = 2.0) -> None:
    await wait_until(predicate, timeout, what, interval=0.001)


async def next_iteration() -> None:
    """Returns once every callback already scheduled with `call_soon` has run (they run in order)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


class FakeChannel:
    """`tracker.types.Channel` that records what was written (a `batch` is recorded whole, and
    its items are also flattened into `items`). `writable` cleared = a peer that stopped reading."""

    def __init__(self) -> None:
        self.closed = False
        self.raw: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.writable = asyncio.Event()
        self.writable.set()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.raw.append(data)

    def buffered(self) -> int:
        return 0

    async def wait_writable(self) -> None:
        await self.writable.wait()

    async def close(self, code: int, reason: str = "", *, timeout: float = 2.0) -> None:
        self.closes.append((code, reason))
        self.closed = True

    @property
    def frames(self) -> list[dict[str, Any]]:
        return [orjson.loads(raw) for raw in self.raw]

    @property
    def items(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for frame in self.frames:
            out.extend(frame["items"] if frame["type"] == "batch" else [frame])
        return out

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.items if f["type"] == kind]
