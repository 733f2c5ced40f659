"""Writing websocket text frames without awaiting the peer.

Like python-websockets' `broadcast()`, a frame is written straight into the connection's
transport: an ack or a dashboard batch costs one `transport.write`, no task and no await, and a
slow reader never blocks the writer. The caller watches `buffered()` to apply its own cap.

This reaches into uvicorn's sans-I/O websockets protocol (the ASGI `send` is its bound method).
Compression is off on these connections and frames are never fragmented, so writing whole
unmasked text frames beside the protocol object is safe. Any other server (or Starlette's test
transport) gets the portable fallback: an ordered queue drained by one task through ASGI `send`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]


def frame_header(length: int) -> bytes:
    if length < 126:
        return bytes((0x81, length))
    if length < 65_536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


class Channel:
    """The sending half of one accepted websocket."""

    def __init__(self, send: Send) -> None:
        self._send = send
        proto = getattr(send, "__self__", None)
        fast = (proto is not None and type(proto).__name__ == "WebSocketsSansIOProtocol"
                and hasattr(proto, "transport") and hasattr(proto, "writable") and not proto.conn.extensions)
        self._proto: Any = proto if fast else None
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def fast(self) -> bool:
        return self._proto is not None

    def write(self, data: bytes) -> None:
        """Send one text frame (UTF-8 JSON bytes) now, without awaiting. Never raises."""
        if self.closed:
            return
        proto = self._proto
        if proto is not None:
            if proto.close_sent or proto.transport.is_closing():
                self.closed = True
                return
            proto.transport.write(frame_header(len(data)) + data)
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue and not self.closed:
            data = self._queue.popleft()
            self._queued_bytes -= len(data)
            try:
                await self._send({"type": "websocket.send", "text": data.decode()})
            except Exception:  # the peer is gone: nothing more will be sent
                self.closed = True
                self._queue.clear()

    def receive_directly(self, on_frame: Callable[[bytes], None]) -> bool:
        """Hand every further data frame straight to `on_frame`, from the transport's callback:
        no ASGI message, queue, task wake-up or read pause per frame. The ASGI `receive` then only
        reports the end of the connection. False where this server does not allow it."""
        proto = self._proto
        if proto is None or not hasattr(proto, "send_receive_event_to_app") or not hasattr(proto, "frames"):
            return False

        def deliver() -> None:
            data = proto.frames[0] if len(proto.frames) == 1 else b"".join(proto.frames)
            proto.frames = []
            if not proto.close_sent:
                on_frame(data)

        proto.send_receive_event_to_app = deliver
        return True

    def buffered(self) -> int:
        """Bytes written but not yet accepted by the peer's TCP window (or still queued)."""
        if self._proto is not None:
            return int(self._proto.transport.get_write_buffer_size())
        return self._queued_bytes

    async def wait_writable(self) -> None:
        """Until the transport's buffer is back under its low-water mark."""
        if self._proto is not None:
            await self._proto.writable.wait()
        elif self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self, code: int, reason: str = "", *, timeout: float = 2.0) -> None:
        """Close with `code`; a peer that does not read gets its connection aborted instead."""
        if self.closed:
            return
        if self._proto is None and self._task is not None and not self._task.done():
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
        # uvicorn keeps the socket open 10 s for the peer's closing frame: a flood of sockets that
        # never answer (closed at the hello deadline, say) would outlive that deadline six times
        # over. Wait `timeout` instead (tests/test_faults_overload.py).
        proto = self._proto
        timer = getattr(proto, "close_timer", None)
        if timer is not None and not proto.transport.is_closing():
            timer.cancel()
            proto.close_timer = proto.loop.call_later(timeout, proto.transport.close)

    def abort(self) -> None:
        self.closed = True
        if self._proto is not None:
            self._proto.transport.abort()
