"""Cumulative, coalesced acks (docs/PROTOCOL.md, "Cumulative acks"). Pure: no I/O, no clock.

A phone that asks for them in `hello` (`"acks":"cumulative"`) gets at most one `ack` frame per
`ack_delay_ms`: `through: N` says every seq of the driver from the welcome's `last_seq` + 1 to N
is answered (stored, or refused with a final error sent before), and `ranges` name only the stored
seqs that `through` does not cover (beyond a gap, or at or below `last_seq`). Seqs are marked here
only after their commit (or their final refusal), so `through` is a fact about the database, true
whatever the phone sent on which connection.
"""

from __future__ import annotations

from typing import Final

import orjson

from .compact import _Reader, _varint
from .frames import ProtocolError, seq_ranges

MAGIC: Final = 0xA1  # the first byte of a compact ack (a binary frame, server to phone)
MAX_SPANS: Final = 64  # answered spans above `through` kept to advance it; beyond, the highest go


class CumulativeAcks:
    """One driver connection's ack ledger. `stored` and `refused` mark seqs; `frame()` gives the
    next `ack` frame (None when nothing was stored since the last one)."""

    __slots__ = ("base", "binary", "delay_ms", "pending", "spans", "through")

    def __init__(self, base: int, delay_ms: int, *, binary: bool = False) -> None:
        self.binary = binary  # compact acks: `frame()` gives binary frames (PROTOCOL.md, "Compact acks")
        self.base = base  # the welcome's last_seq: `through` only speaks of seqs above it
        self.delay_ms = delay_ms  # the welcome's ack_delay_ms: a frame at most this long after a commit
        self.through = base
        self.spans: list[list[int]] = []  # answered seqs above through + 1: sorted, disjoint, not adjacent
        self.pending: list[int] = []  # stored since the last frame

    def stored(self, seq: int) -> None:
        """`seq` is committed (after the commit, never before)."""
        self.pending.append(seq)
        self._mark(seq)

    def refused(self, seq: int) -> None:
        """`seq` was refused with a final error (`invalid`, `conflict`), already written."""
        self._mark(seq)

    def _mark(self, seq: int) -> None:
        if seq <= self.through:
            return
        spans = self.spans
        lo, hi = 0, len(spans)
        while lo < hi:  # the first span ending at or after seq - 1
            mid = (lo + hi) // 2
            if spans[mid][1] < seq - 1:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(spans) and spans[lo][0] <= seq + 1:  # touches or holds span lo
            span = spans[lo]
            span[0], span[1] = min(span[0], seq), max(span[1], seq)
            if lo + 1 < len(spans) and spans[lo + 1][0] <= span[1] + 1:
                span[1] = spans.pop(lo + 1)[1]
        else:
            spans.insert(lo, [seq, seq])
            if len(spans) > MAX_SPANS:
                spans.pop()  # those seqs were acked by ranges already; `through` stops short of them
        if spans and spans[0][0] == self.through + 1:
            self.through = spans.pop(0)[1]

    def frame(self) -> bytes | None:
        """The `ack` frame for what was stored since the last frame, or None."""
        if not self.pending:
            return None
        base, through = self.base, self.through
        outside = [s for s in self.pending if not base < s <= through]
        self.pending = []
        if self.binary:
            return encode_binary(through - base, seq_ranges(outside))
        frame: dict[str, object] = {"type": "ack"}
        if through > base:
            frame["through"] = through
        if outside:
            frame["ranges"] = seq_ranges(outside)
        return orjson.dumps(frame)


def encode_binary(through: int, ranges: list[list[int]]) -> bytes:
    """A compact ack: 0xA1, `through` - last_seq (0: none), the number of ranges, then per range
    its start minus the previous range's end (0 before the first) and its length - 1; varints."""
    out = bytearray((MAGIC,))
    _varint(out, through)
    _varint(out, len(ranges))
    end = 0
    for a, b in ranges:
        _varint(out, a - end)
        _varint(out, b - a)
        end = b
    return bytes(out)


def decode_binary(data: bytes, base: int) -> dict[str, object]:
    """A compact ack as the JSON `ack` it stands for, given the welcome's `last_seq` (the phone's
    side). ProtocolError for a malformed one."""
    r = _Reader(data)
    if r.byte("the format byte") != MAGIC:
        raise ProtocolError(f"compact: the first byte of a compact ack must be 0x{MAGIC:X}")
    through = r.varint("through")
    count = r.varint("the range count")
    if count * 2 > len(data) - r.at:
        raise ProtocolError(f"compact: {count} ranges cannot fit in {len(data)} bytes")
    ranges, end = [], 0
    for _ in range(count):
        a = end + r.varint("a range's start")
        end = a + r.varint("a range's length")
        ranges.append([a, end])
    if r.at != len(data):
        raise ProtocolError(f"compact: {len(data) - r.at} bytes after the last range")
    frame: dict[str, object] = {"type": "ack"}
    if through:
        frame["through"] = base + through
    if ranges:
        frame["ranges"] = ranges
    return frame
