"""The compact batch encoding `compact-1` (docs/PROTOCOL.md, "Compact batches"). Pure: no I/O.

A binary websocket frame carrying positions column by column: every value is an integer (fixed
point for the fractional fields), stored as the zigzag varint of its difference from a prediction:
the previous value of its column (optional fields, "order 1"), or the previous value plus the
previous step (seq, ts, lat, lon, "order 2": one fix a second makes ts's second difference 0).

`decode` turns a frame back into the same `pos` dicts a JSON `batch` carries, so the one validator
(`check_event`) judges both; it never raises anything but ProtocolError and TooLarge, and allocates
nothing per item before the item count in the header is checked against the frame's length. Scans
are not carried here: they go as JSON frames (a few per stop, against one position a second).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from .frames import ProtocolError

NAME: Final = "compact-1"
MAGIC: Final = 0xC1  # the first byte of a compact-1 frame
CONTENT_TYPE: Final = "application/vnd.tracker.compact-1"  # a compact batch as a POST /v1/driver/events body
VARINT_MAX: Final = 10  # bytes: values below 2^64 (after zigzag)
ZIGZAG_MAX: Final = 1 << 64
MIN_ITEM_BYTES: Final = 4  # seq, ts, lat, lon: at least one byte each

# Required columns, then optional ones, in frame order: (field, units per 1 of the field).
REQUIRED: Final = (("seq", 1), ("ts", 1), ("lat", 10_000_000), ("lon", 10_000_000))
OPTIONAL: Final = (("acc", 10), ("spd", 10), ("hdg", 1), ("alt", 1), ("bat", 100))

NONE: Final = 0  # presence byte of an optional column: no item has the field
ALL: Final = 1  # every item has it
SOME: Final = 2  # a bitmap of ceil(n / 8) bytes follows, bit i (least significant first) = item i


class TooLarge(Exception):
    """More items than `max_batch`: answered `too_large` naming `seqs`, like a JSON batch."""

    def __init__(self, count: int, seqs: list[int]) -> None:
        super().__init__(count)
        self.count = count
        self.seqs = seqs


# -- encoding (the phone's side; the tests and the simulator use it) -----------------------------


def _zigzag(v: int) -> int:
    return (v << 1) if v >= 0 else ((-v << 1) - 1)


def _varint(out: bytearray, u: int) -> None:
    if not 0 <= u < ZIGZAG_MAX:
        raise ValueError(f"value out of range: {u}")
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)


def _column(out: bytearray, values: Sequence[int], order: int) -> None:
    prev = step = 0  # the previous value, and the step that led to it (order 2, from the second value)
    for i, v in enumerate(values):
        _varint(out, _zigzag(v - prev - step))
        if order == 2 and i:
            step = v - prev
        prev = v


def fixed(value: float | int, scale: int) -> int:
    """A field's value in the frame's integer units (the nearest one)."""
    return value if scale == 1 and type(value) is int else round(value * scale)


def encode(items: Sequence[dict[str, Any]]) -> bytes:
    """Encode `pos` dicts (seq, ts, lat, lon required; acc, spd, hdg, alt, bat optional, None or
    absent meaning absent). ValueError for what the format cannot carry."""
    if not items:
        raise ValueError("a compact batch carries at least one position")
    out = bytearray((MAGIC,))
    n = len(items)
    _varint(out, n)
    for key, scale in REQUIRED:
        _column(out, [fixed(it[key], scale) for it in items], 2)
    for key, scale in OPTIONAL:
        present = [i for i, it in enumerate(items) if it.get(key) is not None]
        if not present:
            out.append(NONE)
            continue
        if len(present) == n:
            out.append(ALL)
        else:
            out.append(SOME)
            bitmap = bytearray((n + 7) // 8)
            for i in present:
                bitmap[i >> 3] |= 1 << (i & 7)
            out += bitmap
        _column(out, [fixed(items[i][key], scale) for i in present], 1)
    return bytes(out)


# -- decoding (the server's side) -----------------------------------------------------------------


class _Reader:
    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self, what: str) -> int:
        if self.at >= len(self.data):
            raise ProtocolError(f"compact: frame ends inside {what}")
        b = self.data[self.at]
        self.at += 1
        return b

    def varint(self, what: str) -> int:
        u = shift = 0
        for _ in range(VARINT_MAX):
            b = self.byte(what)
            u |= (b & 0x7F) << shift
            if b < 0x80:
                if u >= ZIGZAG_MAX or (b == 0 and shift):
                    raise ProtocolError(f"compact: {what}: a varint too long or not minimal")
                return u
            shift += 7
        raise ProtocolError(f"compact: {what}: a varint over {VARINT_MAX} bytes")

    def column(self, count: int, what: str, order: int) -> list[int]:
        values, prev, step = [], 0, 0
        for i in range(count):
            u = self.varint(what)
            v = prev + step + ((u >> 1) ^ -(u & 1))
            if order == 2 and i:
                step = v - prev
            values.append(v)
            prev = v
        return values


def decode(data: bytes, max_batch: int) -> list[dict[str, Any]]:
    """The `pos` dicts of a compact-1 frame, in frame order, for `check_event`. ProtocolError for a
    malformed frame (nothing of it is stored: its items cannot be told apart), TooLarge for one of
    more than `max_batch` items. Never raises anything else; work is linear in len(data)."""
    r = _Reader(data)
    if r.byte("the format byte") != MAGIC:
        raise ProtocolError(f"compact: the first byte must be 0x{MAGIC:X} ({NAME})")
    n = r.varint("the item count")
    if n == 0:
        raise ProtocolError("compact: a batch carries at least one position")
    if n * MIN_ITEM_BYTES > len(data) - r.at:  # checked before anything is allocated per item
        raise ProtocolError(f"compact: {n} items cannot fit in {len(data)} bytes")
    if n > max_batch:
        raise TooLarge(n, r.column(n, "seq", 2))
    columns: dict[str, list[Any]] = {}
    for key, scale in REQUIRED:
        values = r.column(n, key, 2)
        columns[key] = values if scale == 1 else [v / scale for v in values]
    items: list[dict[str, Any]] = [
        {"type": "pos", "seq": s, "ts": t, "lat": la, "lon": lo}
        for s, t, la, lo in zip(columns["seq"], columns["ts"], columns["lat"], columns["lon"], strict=True)
    ]
    for key, scale in OPTIONAL:
        mode = r.byte(f"the presence of {key}")
        present: Sequence[int]
        if mode == NONE:
            continue
        if mode == ALL:
            present = range(n)
        elif mode == SOME:
            present = _bitmap(r, n, key)
        else:
            raise ProtocolError(f"compact: {key}: presence must be 0, 1 or 2, not {mode}")
        for i, v in zip(present, r.column(len(present), key, 1), strict=True):
            items[i][key] = v / scale if scale != 1 else v
    if r.at != len(data):
        raise ProtocolError(f"compact: {len(data) - r.at} bytes after the last column")
    return items


def _bitmap(r: _Reader, n: int, key: str) -> list[int]:
    size = (n + 7) // 8
    if r.at + size > len(r.data):
        raise ProtocolError(f"compact: frame ends inside the bitmap of {key}")
    bits = int.from_bytes(r.data[r.at : r.at + size], "little")
    r.at += size
    if bits >> n:
        raise ProtocolError(f"compact: {key}: bitmap bits set beyond the last item")
    return [i for i in range(n) if bits >> i & 1]
