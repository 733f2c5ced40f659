"""A test phone and a test dashboard over real websockets (the `websockets` client)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


def now_ms() -> int:
    return int(time.time() * 1000)


def pos(seq: int, ts: int | None = None, lat: float = -1.29207, lon: float = 36.82195, **extra: Any) -> dict[str, Any]:
    return {"type": "pos", "seq": seq, "ts": ts if ts is not None else now_ms(), "lat": lat, "lon": lon, **extra}


def scan(seq: int, package: str, event: str = "pickup", ts: int | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "scan",
        "seq": seq,
        "ts": ts if ts is not None else now_ms(),
        "package": package,
        "event": event,
        **extra,
    }


OPEN: list[Peer] = []  # closed after each test by the autouse fixture in conftest


class Peer:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        OPEN.append(self)

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await self.ws.send(frame)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = orjson.loads(data)
        self.frames.append(frame)
        return frame

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; returns the close code."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        return None

    async def close(self) -> None:
        await self.ws.close()


class Phone(Peer):
    welcome: dict[str, Any]

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(ws)
        self.acked: set[int] = set()
        self.errors: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, base: str, token: str, **kw: Any) -> Phone:
        phone = cls(await connect(base + "/v1/driver", compression=None, **kw))
        await phone.send({"type": "hello", "token": token, "device": "test", "app": "test/1"})
        phone.welcome = await phone.recv()
        assert phone.welcome["type"] == "welcome", phone.welcome
        return phone

    async def pump(self, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.recv(timeout)
        if frame["type"] == "ack":
            for a, b in frame["ranges"]:
                self.acked.update(range(a, b + 1))
        elif frame["type"] == "error":
            self.errors.append(frame)
        return frame

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        """Read frames until `predicate(self)` holds, or fail after `timeout`."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self.pump(timeout)

    def refused(self, code: str | None = None) -> set[int]:
        return {e["seq"] for e in self.errors if "seq" in e and (code is None or e["code"] == code)}


class Dash(Peer):
    @classmethod
    async def connect(cls, base: str, token: str, subscribe: dict[str, Any] | None = None, **kw: Any) -> Dash:
        dash = cls(await connect(base + "/v1/live", compression=None, **kw))
        await dash.send({"type": "hello", "token": token})
        welcome = await dash.recv()
        assert welcome["type"] == "welcome", welcome
        if subscribe is not None:
            await dash.subscribe(subscribe)
        return dash

    async def subscribe(self, sub: dict[str, Any]) -> dict[str, Any]:
        await self.send({"type": "subscribe", **sub})
        snapshot: dict[str, Any] = {"drivers": [], "packages": [], "alerts": []}
        while True:
            frame = await self.recv()
            if frame["type"] == "status":
                continue
            assert frame["type"] == "snapshot", frame
            for key in snapshot:
                snapshot[key] += frame.get(key, [])
            if not frame.get("more"):
                self.snapshot = snapshot
                return snapshot

    async def live(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next live frames (a batch is unpacked)."""
        frame = await self.recv(timeout)
        return frame["items"] if frame["type"] == "batch" else [frame]

    async def collect(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Live frames until predicate(frames so far) holds."""
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while not predicate(got):
                got += await self.live(timeout)
        return got
