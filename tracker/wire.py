"""Reading a driver's websocket frames without a general-purpose parser in the way.

A driver connection carries small, unfragmented, masked text frames at a high rate. Once
uvicorn's websockets-sansio protocol has completed the handshake, `FrameReader` becomes the
transport's protocol: it parses RFC 6455 frames itself (unmasking in C, via python-websockets'
speedups), hands each data frame to a callback synchronously, answers pings, forwards pongs to
uvicorn's keepalive, and completes or starts the closing handshake. Everything else (writing,
keepalive pings, shutdown, connection loss) stays with uvicorn's protocol object.

Where the server is not uvicorn's websockets-sansio, nothing is taken over and the endpoint reads
through ASGI as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from websockets.frames import Frame, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the pure-Python fallback of python-websockets
    from websockets.utils import apply_mask

OnFrame = Callable[[bytes], None]


class FrameReader(asyncio.Protocol):
    """The reading half of one driver connection, in place of uvicorn's protocol."""

    def __init__(self, proto: Any, max_size: int) -> None:
        self.proto = proto
        self.max_size = max_size
        self.on_frame: OnFrame = self._to_queue
        self.rest = b""
        self.parts: list[bytes] = []
        self.parts_size = 0
        self.closed = False

    # -- the transport's callbacks: data is ours, the rest stays with uvicorn -------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proto.connection_lost(exc)

    def pause_writing(self) -> None:
        self.proto.pause_writing()

    def resume_writing(self) -> None:
        self.proto.resume_writing()

    def eof_received(self) -> bool | None:
        result: bool | None = self.proto.eof_received()
        return result

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
            self.rest = b""
        pos, n = 0, len(data)
        while n - pos >= 2 and not self.closed:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if n - head < 2:
                    break
                length = int.from_bytes(data[head:head + 2], "big")
                head += 2
            elif length == 127:
                if n - head < 8:
                    break
                length = int.from_bytes(data[head:head + 8], "big")
                head += 8
            if not b1 & 0x80 or b0 & 0x70:
                self.fail(1002, "frames from a client must be masked, without extensions")
                return
            if length > self.max_size:
                self.fail(1009, "frame too large")
                return
            end = head + 4 + length
            if end > n:
                break
            payload = apply_mask(data[head + 4:end], data[head:head + 4])
            pos = end
            self._frame(b0 & 0x0F, bool(b0 & 0x80), payload)
        if pos < n and not self.closed:
            self.rest = data[pos:]

    # -- frames ---------------------------------------------------------------------------------

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (1, 2):
            if self.parts:
                self.fail(1002, "a new message began inside a fragmented one")
            elif fin:
                self.on_frame(payload)
            else:
                self.parts, self.parts_size = [payload], len(payload)
        elif opcode == 0:
            if not self.parts:
                self.fail(1002, "continuation without a message")
                return
            self.parts.append(payload)
            self.parts_size += len(payload)
            if self.parts_size > self.max_size:
                self.fail(1009, "message too large")
            elif fin:
                message, self.parts = b"".join(self.parts), []
                self.on_frame(message)
        elif opcode == 9:
            if len(payload) <= 125:
                self.proto.transport.write(bytes((0x8A, len(payload))) + payload)
        elif opcode == 10:
            self.proto.handle_pong(Frame(Opcode.PONG, payload))
        elif opcode == 8:
            self._close_received(payload)
        else:
            self.fail(1002, "unknown opcode")

    def _close_received(self, payload: bytes) -> None:
        proto = self.proto
        self.closed = True
        if proto.close_sent:  # the peer answered our close: the handshake is complete
            if proto.close_timer is not None:
                proto.close_timer.cancel()
                proto.close_timer = None
            proto.transport.close()
            return
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        reason = payload[2:].decode("utf-8", "replace")
        proto.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        echo = payload[:2]
        proto.transport.write(bytes((0x88, len(echo))) + echo)
        proto.close_sent = True
        proto.transport.close()

    def fail(self, code: int, reason: str) -> None:
        """Close for a protocol violation: a close frame with `code`, then the connection."""
        proto = self.proto
        self.closed = True
        if not proto.close_sent:
            body = code.to_bytes(2, "big") + reason.encode()[:100]
            proto.transport.write(bytes((0x88, len(body))) + body)
            proto.close_sent = True
            proto.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        proto.transport.close()

    # -- delivery -------------------------------------------------------------------------------

    def _to_queue(self, payload: bytes) -> None:
        """Until the endpoint is ready (hello): frames go through ASGI `receive` as usual."""
        self.proto.queue.put_nowait({"type": "websocket.receive", "bytes": payload})

    def deliver_to(self, on_frame: OnFrame) -> None:
        """From now on, hand frames to `on_frame` directly; frames still queued go first."""
        queue = self.proto.queue
        later = []
        while not queue.empty():
            message = queue.get_nowait()
            if message["type"] == "websocket.receive":
                on_frame(message.get("bytes") or message.get("text", "").encode())
            else:
                later.append(message)
        for message in later:
            queue.put_nowait(message)
        self.on_frame = on_frame


def take_over(send: Any, max_size: int) -> FrameReader | None:
    """Install a FrameReader on the connection behind an ASGI `send`, right after `accept`."""
    proto = getattr(send, "__self__", None)
    if proto is None or type(proto).__name__ != "WebSocketsSansIOProtocol":
        return None
    conn = getattr(proto, "conn", None)
    reader = getattr(conn, "reader", None)
    if (not getattr(proto, "handshake_complete", False) or proto.close_sent or conn is None or conn.extensions
            or reader is None or len(getattr(reader, "buffer", b"x")) or not hasattr(proto, "queue")):
        return None
    frames = FrameReader(proto, max_size)
    proto.transport.set_protocol(frames)
    return frames
