"""RFC 6455 framing, shared by the server (reading drivers) and the simulator (reading the server).

Pure: no asyncio, no I/O, no clock. Bytes go in, frames come out through a callback, and a
violation raises :class:`WsProtocolError` carrying the close code to send (1002 protocol
error, 1009 message too big). No extension is supported: a frame with an RSV bit set is a
protocol error (so the server must not hand a connection that negotiated permessage-deflate to
this parser). UTF-8 validity of text payloads and close reasons is left to the consumer.

Encoding::

    encode_frame(OP_TEXT, payload, mask)     # a client's frame: masked with the 4-byte mask
    encode_frame(OP_TEXT, payload)           # a server's frame: unmasked
    encode_frame(OP_CLOSE, close_body(1009, "message too big"))

Parsing, sized for the server's hot path (a driver sends many small frames)::

    parser = FrameParser(on_frame, max_size=65_536, masked=True)   # masked: reading a client
    parser.feed(data)             # on_frame(opcode, fin, payload) for each frame, in order

Per frame, the parser allocates the payload and O(1) small objects, never a second copy of a
large payload, and never re-copies what it has buffered (a frame split over many reads costs
linear time). Unmasking uses python-websockets' C routine when it is installed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - the pure-Python fallback of python-websockets
    from websockets.utils import apply_mask as _apply_mask

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
OPCODES: Final = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_TOO_BIG: Final = 1009
MAX_CONTROL: Final = 125  # RFC 6455 5.5: a control frame's payload
# Close codes a peer may put in a close frame (RFC 6455 7.4, IANA registry); 3000-4999 too.
WIRE_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
# Payloads above this are unmasked through a memoryview rather than a temporary slice: measured
# on the development VM, a slice is faster below ~1 KB, a view avoids a second copy above.
_VIEW_MIN: Final = 1024

_H2 = struct.Struct("!BB")
_H4 = struct.Struct("!BBH")
_H10 = struct.Struct("!BBQ")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")

OnFrame = Callable[[int, bool, bytes], None]


class WsProtocolError(Exception):
    """The peer broke RFC 6455: close the connection with ``code`` (1002 or 1009) and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"


def apply_mask(data: bytes | memoryview, mask: bytes) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated (RFC 6455 5.3); masking and unmasking alike."""
    return _apply_mask(data, mask)


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None, *, fin: bool = True) -> bytes:
    """One frame. With a 4-byte ``mask``, a client's frame (masked); without, a server's frame.

    ``fin=False`` starts or continues a fragmented message (the next frames use ``OP_CONT``).
    Raises ValueError for an unknown opcode, a control frame over 125 bytes or fragmented, or a
    mask that is not 4 bytes long.
    """
    if opcode not in OPCODES:
        raise ValueError(f"unknown opcode {opcode}")
    n = len(payload)
    if opcode >= OP_CLOSE and (n > MAX_CONTROL or not fin):
        raise ValueError("a control frame must be final and carry at most 125 bytes")
    b0 = opcode | 0x80 if fin else opcode
    if mask is None:
        if n < 126:
            return _H2.pack(b0, n) + payload
        if n < 65536:
            return _H4.pack(b0, 126, n) + payload
        return _H10.pack(b0, 127, n) + payload
    if len(mask) != 4:
        raise ValueError("a mask is 4 bytes")
    if n < 126:
        head = _H2.pack(b0, 0x80 | n)
    elif n < 65536:
        head = _H4.pack(b0, 0xFE, n)
    else:
        head = _H10.pack(b0, 0xFF, n)
    return head + mask + _apply_mask(payload, mask)


def close_body(code: int, reason: str = "") -> bytes:
    """A close frame's payload: ``code`` and as much of ``reason`` as fits in 125 bytes (UTF-8)."""
    if not (code in WIRE_CLOSE_CODES or 3000 <= code < 5000):
        raise ValueError(f"close code {code} may not be sent")
    text = reason.encode()[: MAX_CONTROL - 2].decode("utf-8", "ignore")  # cut on a character boundary
    return _U16.pack(code) + text.encode()


def parse_close(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a close frame's payload; ``(1005, "")`` when it carries no code."""
    if len(payload) >= 2:
        return _U16.unpack_from(payload)[0], payload[2:].decode("utf-8", "replace")
    return 1005, ""


class FrameParser:
    """Incremental parser of one direction of a WebSocket connection.

    ``masked=True`` reads a client's stream (every frame must be masked), ``masked=False`` a
    server's (no frame may be). ``feed(data)`` calls ``on_frame(opcode, fin, payload)``
    synchronously for each complete frame, in order; ``payload`` is unmasked ``bytes``.

    With ``assemble=True`` (the default), a fragmented message is delivered once, whole, with
    its first frame's opcode and ``fin=True``; control frames (ping, pong, close) are delivered
    as they come, between fragments too. With ``assemble=False`` every frame is delivered as it
    is (continuations with ``OP_CONT``, ``fin`` as sent), checked by the same rules.

    ``max_size`` caps a message (all its fragments). Violations raise :class:`WsProtocolError`
    from ``feed``, before the offending payload is buffered: 1009 for a message over
    ``max_size``; 1002 for a frame masked the wrong way, an RSV bit, a reserved opcode, a 64-bit
    length with its top bit set, a continuation outside a message, a new message inside a
    fragmented one, a control frame over 125 bytes or fragmented, a close payload of one byte
    or with a code that may not be sent. Nothing else is raised, whatever the bytes.

    The parser stops after a close frame (what follows is ignored, RFC 6455 5.5.1), after a
    violation, after ``stop()``, or when ``on_frame`` raises (the exception propagates); a
    stopped parser ignores ``feed``.
    """

    __slots__ = ("_assemble", "_buf", "_done", "_frag_op", "_mask_bit", "_max", "_need", "_parts", "_size", "on_frame")

    def __init__(self, on_frame: OnFrame, *, max_size: int, masked: bool, assemble: bool = True) -> None:
        self.on_frame = on_frame
        self._max = max_size
        self._mask_bit = 0x80 if masked else 0
        self._assemble = assemble
        self._buf = bytearray()  # the start of a frame split over reads
        self._need = 0  # bytes _buf must hold before parsing can progress
        self._done = False
        self._frag_op = 0  # the opcode of the fragmented message in progress, 0 when none
        self._parts: list[bytes] = []
        self._size = 0  # bytes of the fragmented message so far

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    @property
    def stopped(self) -> bool:
        return self._done

    def stop(self) -> None:
        """Parse nothing more, from the frame after the current one on (e.g. once a close is sent)."""
        self._done = True
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse ``data``, the next bytes of the stream; never blocks, never awaits.

        Calls ``on_frame`` for each frame completed; raises :class:`WsProtocolError` on a
        violation (and stops).
        """
        if self._done:
            return
        if type(data) is not bytes:
            data = bytes(data)
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        try:
            pos = self._parse(data)
        except BaseException:
            self.stop()
            raise
        if pos < len(data) and not self._done:
            buf += memoryview(data)[pos:]

    def _fail(self, code: int, reason: str) -> WsProtocolError:
        self.stop()
        return WsProtocolError(code, reason)

    def _parse(self, data: bytes) -> int:
        """Deliver the complete frames of ``data``; return where the first incomplete one starts."""
        pos, end = 0, len(data)
        mask_bit, max_size = self._mask_bit, self._max
        mask_len = 4 if mask_bit else 0
        view: memoryview | None = None
        while not self._done:
            if end - pos < 2:
                self._need = 2
                return pos
            b0, b1 = data[pos], data[pos + 1]
            if b1 & 0x80 != mask_bit:
                raise self._fail(1002, "a client's frames must be masked" if mask_bit else "a server's must not be")
            if b0 & 0x70:
                raise self._fail(1002, "reserved bits set: no extension was negotiated")
            n = b1 & 0x7F
            head = pos + 2
            if n == 126:
                if end - head < 2:
                    self._need = 4 + mask_len
                    return pos
                n = _U16.unpack_from(data, head)[0]
                head += 2
            elif n == 127:
                if end - head < 8:
                    self._need = 10 + mask_len
                    return pos
                n = _U64.unpack_from(data, head)[0]
                head += 8
                if n >> 63:
                    raise self._fail(1002, "payload length with its most significant bit set")
            opcode = b0 & 0x0F
            if opcode >= OP_CLOSE:
                if opcode > OP_PONG:
                    raise self._fail(1002, f"reserved opcode {opcode}")
                if n > MAX_CONTROL or not b0 & 0x80:
                    raise self._fail(1002, "control frames must be final and carry at most 125 bytes")
            elif opcode == OP_CONT:
                if not self._frag_op:
                    raise self._fail(1002, "continuation frame outside a fragmented message")
                if self._size + n > max_size:
                    raise self._fail(1009, f"message over {max_size} bytes")
            elif opcode > OP_BINARY:
                raise self._fail(1002, f"reserved opcode {opcode}")
            elif self._frag_op:
                raise self._fail(1002, "a new message began inside a fragmented one")
            elif n > max_size:
                raise self._fail(1009, f"message over {max_size} bytes")
            start = head + mask_len
            stop = start + n
            if stop > end:
                self._need = stop - pos
                return pos
            if not mask_len:
                payload = data[start:stop]
            elif n <= _VIEW_MIN:
                payload = _apply_mask(data[start:stop], data[head:start])
            else:
                if view is None:
                    view = memoryview(data)
                payload = _apply_mask(view[start:stop], data[head:start])
            pos = stop
            if opcode >= OP_CLOSE:  # between fragments too
                if opcode == OP_CLOSE:
                    self._closed(payload)
                self.on_frame(opcode, True, payload)
            elif opcode and b0 & 0x80:  # the hot path: a whole message (no fragmented one is open: see above)
                self.on_frame(opcode, True, payload)
            else:
                self._fragment(opcode, bool(b0 & 0x80), payload)
        return pos

    def _closed(self, payload: bytes) -> None:
        """A close frame: check its payload, and stop after delivering it."""
        if len(payload) == 1:
            raise self._fail(1002, "close frame with a 1-byte payload")
        if len(payload) >= 2:
            code = _U16.unpack_from(payload)[0]
            if not (code in WIRE_CLOSE_CODES or 3000 <= code < 5000):
                raise self._fail(1002, f"close code {code} may not be sent")
        self._done = True

    def _fragment(self, opcode: int, fin: bool, payload: bytes) -> None:
        """A frame of a fragmented message (its first, a continuation, or its last)."""
        if opcode:
            self._frag_op, self._size = opcode, len(payload)
        else:
            self._size += len(payload)
            opcode = OP_CONT
        if not self._assemble:
            if fin:
                self._frag_op = 0
            self.on_frame(opcode, fin, payload)
            return
        self._parts.append(payload)
        if fin:
            message, first = b"".join(self._parts), self._frag_op
            self._parts, self._frag_op = [], 0
            self.on_frame(first, True, message)


class FrameCollector:
    """A :class:`FrameParser` that collects: ``feed(data)`` returns the ``(opcode, payload)``
    completed by ``data`` (messages whole, control frames included), in order.

    For tests and tools; the hot paths use the parser's callback. The default reads a
    server's stream (unmasked frames), as a client does.
    """

    __slots__ = ("_out", "parser")

    def __init__(self, *, masked: bool = False, max_size: int = 1 << 26) -> None:
        self._out: list[tuple[int, bytes]] = []
        self.parser = FrameParser(self._collect, max_size=max_size, masked=masked)

    def _collect(self, opcode: int, fin: bool, payload: bytes) -> None:
        self._out.append((opcode, payload))

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """The frames completed by ``data``; raises :class:`WsProtocolError` as the parser does."""
        self.parser.feed(data)
        out, self._out = self._out, []
        return out
