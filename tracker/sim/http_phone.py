"""A simulated phone that uploads over HTTP (``tracker simulate --transport http``): the way a
suspended app's background plugin does, ``POST /v1/driver/events`` when the OS wakes it, one
TCP connection per upload (a minute apart, a server's keep-alive has long closed the last one).

Bytes are counted at the socket, both ways, request and response heads included, like
:class:`~tracker.sim.link.Link` counts a websocket's. The fleet sees the same surface as a
websocket phone (``tick``, ``life``, ``link`` with ``bytes_out``/``bytes_in``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from tracker.sim.driver import DriverModel
from tracker.sim.phone import Phone


class Counter:
    """What the fleet reads of a phone's link: bytes written and read at the socket."""

    open = True
    closed = False

    def __init__(self) -> None:
        self.bytes_out = 0
        self.bytes_in = 0

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


class HttpSimPhone:
    """One simulated phone whose events go as HTTP uploads (no websocket, never online)."""

    def __init__(self, fleet: Any, index: int, name: str, token: str, model: DriverModel, phone: Phone) -> None:
        self.fleet, self.index, self.name, self.token = fleet, index, name, token
        self.model, self.phone = model, phone
        parts = urlsplit(fleet.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.link = Counter()
        self.started = False
        self.stopped = ""
        self.offline_until = 0.0
        self.last_poll = 0.0
        self.posting: asyncio.Task[None] | None = None

    def tick(self, now: float, generate: bool) -> int:
        n = 0
        if generate and self.started:
            for body in self.model.step(self.fleet.interval):
                self.phone.record(body, now)
                n += 1
        if not self.started or (self.posting is not None and not self.posting.done()):
            return n
        if self.fleet.batch_window and now - self.last_poll < self.fleet.batch_window and generate:
            return n
        self.last_poll = now
        uploads = self.phone.uploads(now)
        if uploads:
            self.posting = asyncio.get_running_loop().create_task(self._post_all(uploads))
        return n

    async def _post_all(self, uploads: list[tuple[bytes, str]]) -> None:
        for body, content_type in uploads:  # one after the other, as one wake of the app
            await self._post(body, content_type)

    async def life(self) -> None:
        """No connection to hold: the phone starts at once (its numbering from 0, as a new app)."""
        self.phone.connected({"last_seq": 0}, time.time() * 1000.0)
        self.started = True
        self.fleet.started += 1
        self.fleet.connects += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        if self.posting is not None:
            self.posting.cancel()

    async def _post(self, body: bytes, content_type: str) -> None:
        head = (
            f"POST {self.prefix}/v1/driver/events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            self.fleet.count("connect_failed:" + type(exc).__name__)
            self.phone.disconnected()
            self.phone.connected({"last_seq": 0}, time.time() * 1000.0)  # everything unacked is due again
            return
        try:
            writer.write(head + body)
            self.link.bytes_out += len(head) + len(body)
            data = await asyncio.wait_for(reader.read(), 60)  # Connection: close: read to the end
            self.link.bytes_in += len(data)
        except (OSError, TimeoutError) as exc:
            self.fleet.count("upload_failed:" + type(exc).__name__)
            data = b""
        finally:
            writer.close()
        status, _, payload = data.partition(b"\r\n\r\n")
        code = status.split(b" ", 2)[1] if status.count(b" ") >= 1 else b"0"
        self.fleet.count(f"http:{code.decode(errors='replace')}")
        now = time.time() * 1000.0
        if code == b"200":
            self.phone.answered(orjson.loads(payload), now)
        else:  # not answered: everything sent is due again on the next wake
            self.phone.disconnected()
            self.phone.connected({"last_seq": 0}, now)

    def fault(self, fault: Any, loop: asyncio.AbstractEventLoop) -> None:
        return None  # flaky networks are simulated on websockets only

    def _set_delay(self, delay: float) -> None:
        return None
