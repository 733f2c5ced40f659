"""Many idle sockets against one port (the overload tests and benchmark): connections that
upgrade to a websocket and then say nothing, or connect and never send a byte."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os


class Flood:
    """Many idle sockets against one port: `websockets` finish the upgrade and then say nothing
    (no hello), `raw` connect and never send a byte. Each records when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = 0
        self.upgraded = 0
        self.refused = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, n: int, *, upgrade: bool, path: str = "/v1/driver", concurrency: int = 200) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.refused += 1
                    return
                self.writers.append(writer)
                if upgrade:
                    key = base64.b64encode(os.urandom(16)).decode()
                    writer.write(
                        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
                    )
                    try:
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                    except (OSError, asyncio.IncompleteReadError, TimeoutError):
                        self.closed += 1
                        return
                    if b" 101 " in head.split(b"\r\n", 1)[0]:
                        self.upgraded += 1
            self._tasks.append(asyncio.create_task(self._until_closed(reader)))

        await asyncio.gather(*(one() for _ in range(n)))

    async def _until_closed(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65_536):
                pass
        self.closed += 1

    @property
    def open_count(self) -> int:
        return len(self.writers) - self.closed

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
