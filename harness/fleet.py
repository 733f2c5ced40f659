"""Phones that never lose an event: `Driver` behaves as PROTOCOL.md asks of an app (numbers its
events, keeps every one not acknowledged, resends, reconnects with backoff and jitter, elsewhere
when told to), and `Fleet` runs many of them and sums up what they saw.

Unlike `clients.Phone`, which the test reads frame by frame, a `Driver` runs by itself in a task
of its own, so a test or a benchmark can break a server under it and count what was lost.
(`tracker.sim` is the simulator's own, sans-I/O phone: a product feature, kept apart.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .clients import now_ms
from .tokens import token
from .wait import wait_until


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
        # Every frame as text: a binary frame closes 1003 (PROTOCOL.md).
        await ws.send(
            orjson.dumps({"type": "hello", "token": self.token, "device": "fault", "app": "fault/1"}).decode()
        )
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
                    await ws.send(orjson.dumps(event).decode())
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
            await ws.send(orjson.dumps({"type": "batch", "items": items[start : start + 200]}).decode())

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
        self.org = org
        self.drivers = [
            Driver(
                urls,
                token("driver", f"{prefix}-{i}", org, secret=secret),
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
            lambda: all(not d.outbox for d in self.drivers),
            timeout,
            lambda: f"every event acknowledged ({self.unacked} left)",
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
