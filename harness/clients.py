"""The test phone and the test dashboard over real websockets (the `websockets` client), and the
frames a phone sends.

`Phone` and `Dash` are read by the test itself: it sends, then reads the frames it expects. A
`Dash` may instead be `start()`ed: a task of its own then reads every frame and records what the
dashboard was told (status, snapshots, the newest position per driver, latency), for tests and
benchmarks that watch while something else happens. Every connection is listed in `OPEN`, which
the test suite closes after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .wait import wait_until


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


OPEN: list[Peer] = []  # closed after each test by the autouse fixture in tests/conftest.py


class Peer:
    """One websocket: send a frame (a dict is JSON-encoded), receive one, wait for the close."""

    ws: ClientConnection

    def __init__(self, ws: ClientConnection) -> None:
        self._attach(ws)

    def _attach(self, ws: ClientConnection) -> None:
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
    """A driver's app, read by the test: `pump` records acks and errors as frames are read."""

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


async def acked(phone: Phone, *seqs: int) -> None:
    """Read until every one of `seqs` is acknowledged."""
    await phone.until(lambda p: set(seqs) <= p.acked)


class Dash(Peer):
    """A dispatcher's dashboard on /v1/live, either read by the test (`Dash.connect`, then
    `subscribe`, `live`, `collect`) or watched (`await Dash(url, token).start()`: a background
    task reads every frame into `statuses`, `snapshots`, `positions`, `pos_times`, `latency_ms`,
    `errors` and, once the server closes, `close_code`)."""

    def __init__(self, url: str, token: str, **connect_kw: Any) -> None:
        """Not connected yet; `connect_kw` go to `websockets.connect` (e.g. `sock=`)."""
        self.url, self.token, self.connect_kw = url, token, connect_kw
        self.snapshot: dict[str, Any] = {}
        self.statuses: list[tuple[float, bool]] = []
        self.snapshots: list[tuple[float, dict[str, Any]]] = []
        self.positions: dict[str, dict[str, Any]] = {}  # the newest per driver
        self.pos_times: list[float] = []
        self.latency_ms: list[float] = []  # receipt time minus the event's ts
        self.errors: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _open(self, **defaults: Any) -> None:
        self._attach(await connect(self.url + "/v1/live", **{"compression": None, **defaults, **self.connect_kw}))
        await self.send({"type": "hello", "token": self.token})

    @classmethod
    async def connect(cls, base: str, token: str, subscribe: dict[str, Any] | None = None, **kw: Any) -> Dash:
        """Connected and welcomed; subscribed (the whole snapshot read) if `subscribe` is given."""
        dash = cls(base, token, **kw)
        await dash._open()
        welcome = await dash.recv()
        assert welcome["type"] == "welcome", welcome
        if subscribe is not None:
            await dash.subscribe(subscribe)
        return dash

    async def subscribe(self, sub: dict[str, Any]) -> dict[str, Any]:
        # On a re-subscribe, live frames of the old subscription may still be on their way: a client
        # drops what precedes the new snapshot. On the first, nothing live may come before it.
        again = bool(self.snapshot)
        await self.send({"type": "subscribe", **sub})
        snapshot: dict[str, Any] = {"drivers": [], "packages": [], "alerts": []}
        while True:
            frame = await self.recv()
            if frame["type"] == "status" or (again and frame["type"] not in ("snapshot", "error")):
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

    async def start(self, subscribe: dict[str, Any] | None = None) -> Dash:
        """Watch: hello and subscribe, then record every frame in the background; returns once the
        first snapshot is in."""
        await self._open(max_queue=None)
        await self.send({"type": "subscribe", **(subscribe or {})})
        self._reader = asyncio.create_task(self._record(self.ws))
        await wait_until(lambda: self.snapshots, 10, "the first snapshot")
        return self

    async def _record(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                self._note(orjson.loads(data))
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd else 1006
        else:
            self.close_code = ws.close_code

    def _note(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        t = time.monotonic()
        if kind == "batch":
            for item in frame["items"]:
                self._note(item)
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
        if self._reader is None:
            await super().close()
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 1)
        self.ws.transport.abort()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def frames_of(frames: list[dict[str, Any]], ftype: str, /, **match: Any) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == ftype and all(f.get(k) == v for k, v in match.items())]


async def until_frame(
    dash: Dash, got: list[dict[str, Any]], ftype: str, /, timeout: float = 10.0, **match: Any
) -> dict[str, Any]:
    """Read live frames into `got` until one of type `ftype` matching `match` arrives; return it."""
    async with asyncio.timeout(timeout):
        while True:
            found = frames_of(got, ftype, **match)
            if found:
                return found[0]
            got += await dash.live(timeout)
