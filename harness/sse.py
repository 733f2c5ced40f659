"""Server-sent events from outside, over a bare asyncio stream (HTTP/1.1, chunked): what a
recipient's page reads from a tracking link's live feed (GET /v1/share/events)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson


class EventStream:
    """One open feed: `status` and `headers` of the answer, then `next()` event by event."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # the whole body of an answer that is not a stream (an error)
        self._buffer = b""
        self.ended = False

    @classmethod
    async def open(cls, port: int, path: str, bearer: str, *, timeout: float = 10.0) -> EventStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = cls(reader, writer)
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {bearer}\r\n\r\n"
        writer.write(head.encode())
        async with asyncio.timeout(timeout):
            raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        stream.status = int(lines[0].split(" ", 2)[1])
        stream.headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:] if ": " in ln)}
        if stream.status != 200:
            length = int(stream.headers.get("content-length", "0"))
            async with asyncio.timeout(timeout):
                stream.body = await reader.readexactly(length) if length else b""
            await stream.close()
        return stream

    async def _chunk(self) -> bytes:
        size_line = await self.reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        data = await self.reader.readexactly(size + 2)
        if size == 0:
            self.ended = True
        return data[:size]

    async def next(self, timeout: float = 10.0) -> tuple[str, Any] | None:
        """The next event as (name, decoded data), skipping comments; None at the end of the stream."""
        async with asyncio.timeout(timeout):
            while True:
                end = self._buffer.find(b"\n\n")
                if end >= 0:
                    block, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                    name, data = "message", []
                    for line in block.split(b"\n"):
                        if line.startswith(b"event: "):
                            name = line[7:].decode()
                        elif line.startswith(b"data: "):
                            data.append(line[6:])
                    if data:
                        return name, orjson.loads(b"\n".join(data))
                    continue
                if self.ended:
                    return None
                try:
                    self._buffer += await self._chunk()
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.ended = True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
