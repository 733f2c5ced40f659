"""Every private name of uvicorn the service uses, in this one module, version-gated.

The standard ASGI path costs, per driver frame, an ASGI message dict, a queue put, a task wake-up
and a read pause; per outgoing frame, an awaited `send`. On a fleet of phones sending small frames
that is most of the server's CPU, so where the server is uvicorn's `websockets-sansio`
implementation, in the version range verified here, this module:

- writes whole unmasked text frames straight into the connection's transport (`FastPath.write`,
  like python-websockets' `broadcast()`): no task, no await, a slow reader never blocks the writer;
- installs `FrameReader` as the transport's protocol after the handshake: it parses RFC 6455
  frames itself and hands each data frame to a callback synchronously;
- shortens uvicorn's 10 s wait for the peer's closing frame to the caller's timeout;
- on a connection the FrameReader reads, swaps uvicorn's receive queue and `writable` event for
  slim ones (slim.py), and lets go of the upgrade once the driver is welcomed: an idle driver's
  connection costs ~13.5 KB, not 25 (BENCHMARKS.md, issue 13).

Anything else (another server, another uvicorn version, permessage-deflate negotiated, Starlette's
test client) gets `None` from `fast_path()`, and tracker/transport/channel.py uses the portable ASGI
path. `TRACKER_WS_FAST_PATH=false` forces the portable path (A/B measurement in BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from typing import Any, Final

from websockets.frames import Frame, Opcode

from ..protocol.wscodec import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    WsProtocolError,
    close_body,
    encode_frame,
    parse_close,
)
from .keepalive import Keepalive
from .slim import Flag, Inbox

# Verified on uvicorn 0.54.0 (pyproject.toml pins the same range): the attributes below are read
# and written by this module. Outside the range, the portable path is used.
VERIFIED: Final = ((0, 35), (0, 55))  # [low, high)
PROTOCOL_CLASS: Final = "WebSocketsSansIOProtocol"


def _version_ok() -> bool:
    try:
        import uvicorn

        major, minor = (int(part) for part in uvicorn.__version__.split(".")[:2])
    except (ImportError, ValueError, AttributeError):
        return False
    return VERIFIED[0] <= (major, minor) < VERIFIED[1]


VERSION_OK: Final = _version_ok()


class FastPath:
    """Direct access to one uvicorn websockets-sansio connection (its protocol object `proto`)."""

    __slots__ = ("proto",)

    def __init__(self, proto: Any) -> None:
        self.proto = proto

    def write(self, frame: bytes) -> bool:
        """Write one whole text frame (header included); False when the connection is closing."""
        proto = self.proto
        if proto.close_sent or proto.transport.is_closing():
            return False
        proto.transport.write(frame)
        return True

    def buffered(self) -> int:
        return int(self.proto.transport.get_write_buffer_size())

    async def wait_writable(self) -> None:
        await self.proto.writable.wait()

    def receive_directly(
        self, on_frame: Callable[[bytes], None], on_binary: Callable[[bytes], None] | None = None
    ) -> bool:
        """Hand every further text frame straight to `on_frame` from uvicorn's own parser (used
        where `FrameReader` could not take over), binary ones to `on_binary` (without it: close
        1003). False where this uvicorn does not allow it."""
        proto = self.proto
        if not hasattr(proto, "send_receive_event_to_app") or not hasattr(proto, "frames"):
            return False

        def deliver() -> None:
            data = proto.frames[0] if len(proto.frames) == 1 else b"".join(proto.frames)
            proto.frames = []
            if proto.close_sent:
                return
            if getattr(proto, "curr_msg_data_type", "text") != "text":  # a binary message
                if on_binary is not None:
                    on_binary(data)
                    return
                proto.transport.write(encode_frame(OP_CLOSE, close_body(1003, "binary frames are not accepted")))
                proto.close_sent = True
                proto.queue.put_nowait({"type": "websocket.disconnect", "code": 1003, "reason": ""})
                proto.transport.close()
                return
            on_frame(data)

        proto.send_receive_event_to_app = deliver
        return True

    def shorten_close_wait(self, timeout: float) -> None:
        """uvicorn keeps a socket 10 s for the peer's closing frame: a flood of sockets that never
        answer would outlive the hello deadline six times over. Wait `timeout` instead."""
        proto = self.proto
        timer = getattr(proto, "close_timer", None)
        if timer is not None and not proto.transport.is_closing():
            timer.cancel()
            proto.close_timer = proto.loop.call_later(timeout, proto.transport.close)

    def abort(self) -> None:
        self.proto.transport.abort()

    def release_handshake(self) -> None:
        """Let go of the upgrade's request and response (their header objects, ~2-3.5 KB a
        connection; a phone holds its connection for hours): uvicorn reads them only until the
        handshake completes. Where a FrameReader reads the connection, python-websockets' own
        parser is never fed again; it is closed, and with it the request its frame still holds."""
        proto = self.proto
        if not getattr(proto, "handshake_complete", False):
            return
        proto.request = None
        proto.response = None
        conn = getattr(proto, "conn", None)
        parser = getattr(conn, "parser", None)
        if isinstance(proto.transport.get_protocol(), FrameReader) and isinstance(parser, Generator):
            parser.close()

    def reader(self) -> FrameReader | None:
        """The FrameReader installed on this connection, if any."""
        protocol = self.proto.transport.get_protocol()
        return protocol if isinstance(protocol, FrameReader) else None

    def take_over(self, max_size: int, keepalive: Keepalive | None = None) -> FrameReader | None:
        """Install a FrameReader right after `accept`, when nothing is buffered in uvicorn's parser.
        With an enabled `keepalive`, it pings the connection only when silent, in place of uvicorn's
        per-connection pings (tracker/transport/keepalive.py)."""
        proto = self.proto
        conn = getattr(proto, "conn", None)
        reader = getattr(conn, "reader", None)
        if (
            not getattr(proto, "handshake_complete", False)
            or proto.close_sent
            or conn is None
            or conn.extensions
            or reader is None
            or len(getattr(reader, "buffer", b"x"))
            or type(getattr(proto, "queue", None)) is not asyncio.Queue
            or type(getattr(proto, "writable", None)) is not asyncio.Event
        ):
            return None
        frames = FrameReader(proto, max_size)
        proto.transport.set_protocol(frames)
        slim_down(proto)
        if keepalive is not None and keepalive.enabled and hasattr(proto, "stop_keepalive"):
            proto.stop_keepalive()
            frames.keepalive = keepalive
            keepalive.add(frames)
        return frames


def slim_down(proto: Any) -> None:
    """Swap uvicorn's receive queue and `writable` event for their slim equivalents (slim.py: ~3.8
    KB less a connection), keeping their contents. Only on a connection whose reading half is a
    FrameReader, right after `accept`, from the endpoint's own task: nothing awaits either yet."""
    queue: asyncio.Queue[Any] = proto.queue
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    proto.queue = Inbox(items)
    proto.writable = Flag(proto.writable.is_set())


def fast_path(send: Any, *, enabled: bool = True) -> FastPath | None:
    """The fast path behind an ASGI `send`, or None where only the portable one is safe."""
    if not enabled or not VERSION_OK:
        return None
    proto = getattr(send, "__self__", None)
    if proto is None or type(proto).__name__ != PROTOCOL_CLASS:
        return None
    if not (hasattr(proto, "transport") and hasattr(proto, "writable") and hasattr(proto, "conn")):
        return None
    if proto.conn.extensions:  # compressed frames cannot be written beside the protocol object
        return None
    return FastPath(proto)


OnFrame = Callable[[bytes], None]
PING: Final = encode_frame(OP_PING, b"")
_monotonic = time.monotonic


class FrameReader(asyncio.Protocol):
    """The reading half of one driver connection, in place of uvicorn's protocol."""

    __slots__ = ("closed", "heard", "keepalive", "on_binary", "on_frame", "parser", "proto")

    def __init__(self, proto: Any, max_size: int) -> None:
        self.proto = proto
        self.on_frame: OnFrame = self._to_queue
        self.on_binary: OnFrame | None = None  # None: binary messages close 1003
        self.parser = FrameParser(self._frame, max_size=max_size, masked=True)
        self.closed = False
        self.heard = 0.0  # time.monotonic() of the last bytes read (keepalive.py)
        self.keepalive: Keepalive | None = None  # None: uvicorn's own pings

    # -- the transport's callbacks: data is ours, the rest stays with uvicorn -------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.keepalive is not None:
            self.keepalive.discard(self)
        self.proto.connection_lost(exc)

    def pause_writing(self) -> None:
        self.proto.pause_writing()

    def resume_writing(self) -> None:
        self.proto.resume_writing()

    def eof_received(self) -> bool | None:
        result: bool | None = self.proto.eof_received()
        return result

    def data_received(self, data: bytes) -> None:
        self.heard = _monotonic()
        try:
            self.parser.feed(data)
        except WsProtocolError as exc:
            self.fail(exc.code, exc.reason)

    # -- frames ---------------------------------------------------------------------------------

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        """One whole message or control frame from the codec (fragments arrive assembled). Binary
        messages go to `on_binary` once the endpoint gave one (the session decides: a negotiated
        encoding, or 1003), before that they close 1003 (PROTOCOL.md)."""
        if opcode == OP_TEXT:
            self.on_frame(payload)
        elif opcode == OP_BINARY:
            if self.on_binary is not None:
                self.on_binary(payload)
            elif self.on_frame == self._to_queue:  # before hello is done: the endpoint decides, as on ASGI
                self.proto.queue.put_nowait({"type": "websocket.receive", "bytes": payload})
            else:
                self.fail(1003, "binary frames are not accepted")
        elif opcode == OP_PING:
            self.proto.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            if self.keepalive is None:  # uvicorn's ping; ours needs nothing: every read stamps `heard`
                self.proto.handle_pong(Frame(Opcode.PONG, payload))
        elif opcode == OP_CLOSE:
            self._close_received(payload)

    def _close_received(self, payload: bytes) -> None:
        proto = self.proto
        self.closed = True
        if proto.close_sent:  # the peer answered our close: the handshake is complete
            if proto.close_timer is not None:
                proto.close_timer.cancel()
                proto.close_timer = None
            proto.transport.close()
            return
        code, reason = parse_close(payload)
        proto.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        proto.transport.write(encode_frame(OP_CLOSE, payload[:2]))
        proto.close_sent = True
        proto.transport.close()

    def fail(self, code: int, reason: str) -> None:
        """Close for a protocol violation: a close frame with `code`, then the connection."""
        proto = self.proto
        self.closed = True
        self.parser.stop()
        if not proto.close_sent:
            proto.transport.write(encode_frame(OP_CLOSE, close_body(code, reason)))
            proto.close_sent = True
            proto.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        proto.transport.close()

    # -- keepalive (keepalive.py) ---------------------------------------------------------------

    def ping(self) -> None:
        if not (self.closed or self.proto.close_sent or self.proto.transport.is_closing()):
            self.proto.transport.write(PING)

    def expire(self) -> None:
        """No answer to a ping: close 1011 like uvicorn; a peer that cannot take the close frame
        (its window shut: it is gone) is aborted, not waited for."""
        transport = self.proto.transport
        self.fail(1011, "keepalive ping timeout")
        if transport.get_write_buffer_size():
            transport.abort()

    # -- delivery -------------------------------------------------------------------------------

    def _to_queue(self, payload: bytes) -> None:
        """Until the endpoint is ready (hello): frames go through ASGI `receive` as usual, as the
        text frames they are (binary ones as ASGI `bytes` messages: see `_frame`)."""
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            self.fail(1007, "text frame is not UTF-8")
            return
        self.proto.queue.put_nowait({"type": "websocket.receive", "text": text})

    def disconnected(self) -> asyncio.Future[None]:
        """Done when uvicorn's queue holds the connection's end (after `deliver_to`, nothing else
        is queued: frames go to the callbacks). A plain future: the endpoint that awaits it keeps
        no receive coroutines alive for the connection's life."""
        inbox: Inbox = self.proto.queue  # take_over put it there
        return inbox.ready()

    def deliver_to(self, on_frame: OnFrame, on_binary: OnFrame | None = None) -> None:
        """From now on, hand text frames to `on_frame` and binary ones to `on_binary` directly;
        frames still queued go first."""
        queue = self.proto.queue
        later = []
        while not queue.empty():
            message = queue.get_nowait()
            if message["type"] == "websocket.receive" and message.get("bytes") is not None:
                if on_binary is None:
                    self.fail(1003, "binary frames are not accepted")
                    return
                on_binary(message["bytes"])
            elif message["type"] == "websocket.receive":
                on_frame(message.get("text", "").encode())
            else:
                later.append(message)
        for message in later:
            queue.put_nowait(message)
        self.on_frame = on_frame
        self.on_binary = on_binary
