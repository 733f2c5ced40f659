"""Simulated dispatcher dashboards: subscribe to the org's live feed and log what arrives.

:class:`View` is the sans-I/O part (frames in, counts and per-event receive times out);
:class:`Dashboard` connects it to ``/v1/live`` over a :class:`~tracker.sim.flaky.Link`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from array import array
from typing import Any

import orjson

from tracker.sim.link import WsError, open_link

LIVE_KINDS = ("pos", "scan", "presence", "package", "alert", "status")


class SeqLog:
    """Receive times of one driver's events by seq (float32 ms since the epoch, NaN = not seen)."""

    __slots__ = ("base", "early", "times")

    def __init__(self, base: int) -> None:
        self.base = base
        self.times = array("f")
        self.early: dict[int, float] = {}  # seqs below base (an older event arrived later)

    def put(self, seq: int, t: float) -> bool:
        """Log ``seq`` at ``t``; False if it was already there (a duplicate)."""
        i = seq - self.base
        if i < 0:
            if seq in self.early:
                return False
            self.early[seq] = t
            return True
        times = self.times
        if i >= len(times):
            times.extend([math.nan] * (i + 1 - len(times)))
        elif times[i] == times[i]:  # not NaN: seen before
            return False
        times[i] = t
        return True

    def items(self) -> list[tuple[int, float]]:
        out = sorted(self.early.items())
        b = self.base
        out.extend((b + i, t) for i, t in enumerate(self.times) if t == t)
        return out


class View:
    """What one dashboard saw. ``handle(msg, now)`` takes one decoded frame; never awaits."""

    def __init__(self, epoch_ms: float) -> None:
        self.epoch = epoch_ms
        self.frames = 0  # websocket messages
        self.counts: dict[str, int] = dict.fromkeys(("snapshot", "batch", "error", *LIVE_KINDS), 0)
        self.logs: dict[str, SeqLog] = {}
        self.duplicates = 0
        self.duplicate_sample: list[str] = []
        self.snapshot_done = False
        self.snapshot_drivers = 0
        self.errors: list[str] = []

    def handle(self, msg: dict[str, Any], now: float) -> None:
        self.frames += 1
        kind = msg.get("type")
        if kind == "batch":
            self.counts["batch"] += 1
            for item in msg.get("items") or ():
                self._item(item, now)
        elif kind == "snapshot":
            self.counts["snapshot"] += 1
            self.snapshot_drivers += len(msg.get("drivers") or ())
            if not msg.get("more"):
                self.snapshot_done = True
        elif kind == "error":
            self.counts["error"] += 1
            self.errors.append(str(msg.get("code")))
        else:
            self._item(msg, now)

    def _item(self, item: dict[str, Any], now: float) -> None:
        kind = item.get("type")
        if kind in self.counts:
            self.counts[kind] += 1
        if kind != "pos" and kind != "scan":
            return
        driver, seq = item.get("driver"), item.get("seq")
        if not isinstance(driver, str) or not isinstance(seq, int):
            return
        log = self.logs.get(driver)
        if log is None:
            log = self.logs[driver] = SeqLog(seq)
        if not log.put(seq, now - self.epoch):
            self.duplicates += 1
            if len(self.duplicate_sample) < 20:
                self.duplicate_sample.append(f"{driver}#{seq}({kind})")

    @property
    def events(self) -> int:
        return self.counts["pos"] + self.counts["scan"]


class Dashboard:
    """One dispatcher dashboard on ``/v1/live``: hello, subscribe to everything, keep counting.

    Reconnects (and resubscribes, getting a fresh snapshot) if the server closes it, e.g.
    1013 for a slow consumer; ``reconnects`` tells the report that gaps were possible.
    """

    def __init__(self, url: str, token: str, *, epoch_ms: float, index: int = 0) -> None:
        self.url, self.token, self.index = url, token, index
        self.view = View(epoch_ms)
        self.stopping = False
        self.connects = 0
        self.close_codes: list[int] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed: asyncio.Future[int] | None = None
        self._link: Any = None
        self._welcomed = False
        self.cpu_s = 0.0  # time spent decoding and counting frames (this process's share)

    async def run(self) -> None:
        attempt = 0
        while not self.stopping:
            self._closed = asyncio.get_running_loop().create_future()
            self._welcomed = False
            try:
                self._link = await open_link(
                    self.url, "/v1/live", self._on_message, self._on_close, connect_timeout=15.0
                )
            except (OSError, TimeoutError, WsError, ConnectionError) as exc:
                if not self.ready.done() and attempt >= 5:
                    self.ready.set_exception(exc)
                    return
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(10.0, 0.5 * 2**attempt)))
                continue
            self.connects += 1
            self._link.send(orjson.dumps({"type": "hello", "token": self.token}))
            code = await self._closed
            self.close_codes.append(code)
            if code == 4000 and not self.ready.done():
                self.ready.set_exception(ConnectionError("dashboard unauthorized (4000): check --secret"))
                return
            attempt += 1
            if not self.stopping:
                await asyncio.sleep(random.uniform(0, min(10.0, 0.5 * 2**attempt)))

    def stop(self) -> None:
        self.stopping = True
        if self._link is not None:
            self._link.close()

    def _on_message(self, payload: bytes) -> None:
        t0 = time.perf_counter()
        try:
            self._handle(orjson.loads(payload))
        finally:
            self.cpu_s += time.perf_counter() - t0

    def _handle(self, msg: dict[str, Any]) -> None:
        if not self._welcomed:
            if msg.get("type") == "welcome":
                self._welcomed = True
                self._link.send(b'{"type":"subscribe"}')
            else:
                self.view.handle(msg, time.time() * 1000.0)
            return
        self.view.handle(msg, time.time() * 1000.0)
        if self.view.snapshot_done and not self.ready.done():
            self.ready.set_result(None)

    def _on_close(self, code: int, reason: str) -> None:
        self._link = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(code)
