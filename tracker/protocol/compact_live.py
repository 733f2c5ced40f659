"""The compact live form of `compact-1`: one position per binary frame, written relative to the
connection's previous live fixes (docs/PROTOCOL.md, "Compact live frames"). Pure: no I/O.

A live frame (first byte 0xC2) continues the columns of a compact batch across frames: both ends
keep a `LiveContext` per connection, the phone's encoder and the server's decoder advance it frame
by frame, in the order the frames travel (a websocket is ordered), so a fix a second costs about
12 bytes where a JSON `pos` costs about 130. The context starts empty (all zeros) on each
connection and only live frames move it (compact batches are self-contained).
"""

from __future__ import annotations

from typing import Any, Final

from .compact import OPTIONAL, REQUIRED, _Reader, _varint, _zigzag, fixed
from .frames import ProtocolError

MAGIC: Final = 0xC2  # the first byte of a live frame
VALUE_MAX: Final = 1 << 62  # |decoded value| bound: keeps the context's integers small forever
PRESENCE_BITS: Final = (1 << len(OPTIONAL)) - 1


class LiveContext:
    """What one end of a connection remembers of its live frames: per required field the previous
    value and the step that led to it (order 2), per optional field its last present value."""

    __slots__ = ("count", "last", "prev", "step")

    def __init__(self) -> None:
        self.count = 0  # live frames so far on this connection
        self.prev = [0] * len(REQUIRED)
        self.step = [0] * len(REQUIRED)
        self.last = [0] * len(OPTIONAL)

    def _advance(self, values: list[int], present: list[tuple[int, int]]) -> None:
        if self.count:
            self.step = [v - p for v, p in zip(values, self.prev, strict=True)]
        self.prev = values
        for k, v in present:
            self.last[k] = v
        self.count += 1

    def encode(self, item: dict[str, Any]) -> bytes:
        """The live frame for one `pos` dict (seq, ts, lat, lon required; acc, spd, hdg, alt, bat
        optional, None or absent meaning absent); advances the context. ValueError for what the
        format cannot carry (then the context is unchanged)."""
        out = bytearray((MAGIC,))
        values = [fixed(item[key], scale) for key, scale in REQUIRED]
        present = [(k, fixed(item[key], scale)) for k, (key, scale) in enumerate(OPTIONAL) if item.get(key) is not None]
        if any(abs(v) >= VALUE_MAX for v in values) or any(abs(v) >= VALUE_MAX for _, v in present):
            raise ValueError("a value beyond 2^62 units")
        for v, p, s in zip(values, self.prev, self.step, strict=True):
            _varint(out, _zigzag(v - p - s))
        bits = 0
        for k, _ in present:
            bits |= 1 << k
        out.append(bits)
        for k, v in present:
            _varint(out, _zigzag(v - self.last[k]))
        self._advance(values, present)
        return bytes(out)

    def decode(self, data: bytes) -> dict[str, Any]:
        """The `pos` dict of one live frame, for `check_event`; advances the context only when the
        whole frame is well formed. ProtocolError otherwise (the connection closes 1008)."""
        r = _Reader(data)
        if r.byte("the format byte") != MAGIC:
            raise ProtocolError(f"compact: the first byte of a live frame must be 0x{MAGIC:X}")
        values = []
        for (key, _), p, s in zip(REQUIRED, self.prev, self.step, strict=True):
            u = r.varint(key)
            values.append(_bounded(p + s + ((u >> 1) ^ -(u & 1)), key))
        bits = r.byte("the presence byte")
        if bits & ~PRESENCE_BITS:
            raise ProtocolError(f"compact: presence bits set beyond the {len(OPTIONAL)} optional fields")
        present = []
        for k, (key, _) in enumerate(OPTIONAL):
            if bits >> k & 1:
                u = r.varint(key)
                present.append((k, _bounded(self.last[k] + ((u >> 1) ^ -(u & 1)), key)))
        if r.at != len(data):
            raise ProtocolError(f"compact: {len(data) - r.at} bytes after the last field")
        self._advance(values, present)
        item: dict[str, Any] = {"type": "pos"}
        for (key, scale), v in zip(REQUIRED, values, strict=True):
            item[key] = v if scale == 1 else v / scale
        for k, v in present:
            key, scale = OPTIONAL[k]
            item[key] = v if scale == 1 else v / scale
        return item


def _bounded(v: int, key: str) -> int:
    if not -VALUE_MAX < v < VALUE_MAX:
        raise ProtocolError(f"compact: {key}: a value beyond 2^62 units")
    return v
