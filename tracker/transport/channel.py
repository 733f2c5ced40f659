"""Writing websocket text frames without awaiting the peer.

Like python-websockets' `broadcast()`, a frame is written straight into the connection's transport
where `uvicorn_fast` allows it: an ack or a dashboard batch costs one `transport.write`, no task and
no await, and a slow reader never blocks the writer. Elsewhere (another server, compression on,
the fast path disabled) the portable path: an ordered queue drained by one task through ASGI
`send`. The caller watches `buffered()` to apply its own cap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .uvicorn_fast import FastPath, fast_path

Send = Callable[[dict[str, Any]], Awaitable[None]]


def frame_header(length: int, opcode: int = 0x81) -> bytes:
    """An unmasked, final text frame's header (RFC 6455, server to client); 0x82: binary."""
    if length < 126:
        return bytes((opcode, length))
    if length < 65_536:
        return bytes((opcode, 0x7E)) + length.to_bytes(2, "big")
    return bytes((opcode, 0x7F)) + length.to_bytes(8, "big")


BINARY = (b"\xa1", b"\xa4")  # first bytes of the server's binary frames: compact ack, binary welcome


class Channel:
    """The sending half of one accepted websocket (implements `tracker.types.Channel`)."""

    __slots__ = ("_queue", "_queued_bytes", "_send", "_task", "closed", "fast")

    def __init__(self, send: Send, *, fast: bool = True) -> None:
        self._send = send
        self.fast: FastPath | None = fast_path(send, enabled=fast)
        # The portable path's queue, made on its first frame: an empty deque is 760 bytes, and a
        # fast-path connection (most drivers, for hours) never queues (BENCHMARKS.md, issue 13).
        self._queue: deque[bytes] | None = None
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def write(self, data: bytes) -> None:
        """Send one text frame (UTF-8 JSON bytes) now, without awaiting. Never raises. A compact ack
        or a binary welcome (first byte 0xA1, 0xA4: never the start of UTF-8 text) goes as a binary frame."""
        if self.closed:
            return
        fast = self.fast
        if fast is not None:
            opcode = 0x82 if data[:1] in BINARY else 0x81
            if not fast.write(frame_header(len(data), opcode) + data):
                self.closed = True
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.append(data)
        self._queued_bytes += len(data)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        queue = self._queue
        assert queue is not None
        while queue and not self.closed:
            data = queue.popleft()
            self._queued_bytes -= len(data)
            try:
                if data[:1] in BINARY:
                    await self._send({"type": "websocket.send", "bytes": data})
                else:
                    await self._send({"type": "websocket.send", "text": data.decode()})
            except Exception:  # the peer is gone: nothing more will be sent
                self.closed = True
                queue.clear()

    def buffered(self) -> int:
        """Bytes written but not yet accepted by the peer's TCP window (or still queued)."""
        if self.fast is not None:
            return self.fast.buffered()
        return self._queued_bytes

    async def wait_writable(self) -> None:
        """Until the transport's buffer is back under its low-water mark."""
        if self.fast is not None:
            await self.fast.wait_writable()
        elif self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self, code: int, reason: str = "", *, timeout: float = 2.0) -> None:
        """Close with `code`; a peer that does not read gets its connection aborted instead."""
        if self.closed:
            return
        if self.fast is None and self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        self.closed = True
        # A close frame carries at most 123 bytes of reason (RFC 6455); a longer one (a peer's frame type
        # quoted in it, in emoji) made the close fail, and the connection was dropped without a code.
        reason = reason.encode()[:123].decode("utf-8", "ignore")
        try:
            await asyncio.wait_for(self._send({"type": "websocket.close", "code": code, "reason": reason}), timeout)
        except (TimeoutError, Exception):
            self.abort()
            return
        if self.fast is not None:
            self.fast.shorten_close_wait(timeout)

    def abort(self) -> None:
        self.closed = True
        if self.fast is not None:
            self.fast.abort()
