"""A dispatcher consigning the simulated drivers' packages (``tracker simulate --consign``).

Each :class:`~tracker.sim.routes.DriverModel` plans its loads ahead (package ids, cold chain,
delivery points); with ``--consign`` the fleet posts each planned package to ``POST
/v1/packages`` before its pickup scan, so scans find a consigned package (not an
``unknown_package`` anomaly) and deliveries land at the destination. A minimal HTTP/1.1 client
on asyncio streams (keep-alive, a few connections in parallel): no dependency beyond the stdlib.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson

CLIENTS = ("pharmacy-amani", "clinic-uzima", "hospital-kenyatta", "pharmacy-tunza", "clinic-afya")
Planned = tuple[str, bool, float, float]  # (package id, cold chain, destination lat, lon)


def consignment(planned: Planned, index: int, now_ms: int) -> dict[str, Any]:
    """The ``POST /v1/packages`` body for one planned package (see tracker/custody/http.py)."""
    package, cold, lat, lon = planned
    client = CLIENTS[index % len(CLIENTS)]
    body: dict[str, Any] = {
        "id": package,
        "client": client,
        "destination": {"name": client.replace("-", " ").title(), "lat": lat, "lon": lon},
        "window": {"from": now_ms - 3_600_000, "to": now_ms + 12 * 3_600_000},
    }
    if cold:
        body["cold_chain"] = {"min_c": 2.0, "max_c": 8.0}
    return body


class ConsignError(Exception):
    """The service refused a consignment (not a conflict with itself: a re-post is fine)."""


class Consigner:
    """Posts consignments as a dispatcher over ``parallel`` keep-alive connections."""

    def __init__(self, url: str, token: str, *, parallel: int = 4) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
        self.tls = parts.scheme in ("wss", "https")
        self.token = token
        self.parallel = parallel
        self.posted = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def post_all(self, items: Iterable[tuple[int, Planned]]) -> None:
        """Consign every ``(driver index, planned package)``; returns when all are answered."""
        queue: asyncio.Queue[tuple[int, Planned]] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        if queue.empty():
            return
        await asyncio.gather(*(self._worker(queue) for _ in range(min(self.parallel, queue.qsize()))))

    def post_later(self, items: list[tuple[int, Planned]]) -> None:
        """Consign in the background (a load planned mid-run: its pickups come a step later)."""
        task = asyncio.ensure_future(self.post_all(items))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _worker(self, queue: asyncio.Queue[tuple[int, Planned]]) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while not queue.empty():
                index, planned = queue.get_nowait()
                body = orjson.dumps(consignment(planned, index, int(time.time() * 1000)))
                for attempt in range(3):
                    try:
                        if writer is None or writer.is_closing():
                            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls or None)
                        assert reader is not None
                        status = await self._post(reader, writer, body)
                        break
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        if writer is not None:
                            writer.close()
                        writer = None
                        if attempt == 2:
                            status = 0
                            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                        await asyncio.sleep(0.2 * (attempt + 1))
                if status in (200, 201):
                    self.posted += 1
                else:
                    self.failed += 1
                    self.errors[str(status)] = self.errors.get(str(status), 0) + 1
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _post(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
        head = (
            f"POST /v1/packages HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        if not status_line:
            raise ValueError("connection closed")
        status = int(status_line.split()[1])
        length = 0
        close = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                close = True
        if length:
            await reader.readexactly(length)
        if close:
            writer.close()
        return status
