"""Bit streams for `compact-2` (docs/PROTOCOL.md, "Compact batches, compact-2"). Pure: no I/O.

Bits go most significant first; a stream ends with 0 to 7 zero bits that fill its last byte.
Three codes on top of plain n-bit fields:

- `uvar`: an unsigned integer below 2^64 in groups of 8 bits, 7 value bits each, least
  significant group first, the group's top bit set when another follows (LEB128 without the byte
  alignment); minimal (no trailing zero group), at most 10 groups.
- `svar`: a signed integer as the `uvar` of its zigzag (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...).
- `rice(k)`: an unsigned u with parameter k: q = u >> k ones, a zero, then u's k low bits; when
  q >= ESCAPE: ESCAPE ones, then 6 bits holding L - 1 with L = u's bit length, then u in L bits.

`BitReader` raises only ProtocolError, and every read is bounded by the stream's length: nothing
it returns is larger than the input can describe.
"""

from __future__ import annotations

from typing import Final

from .frames import ProtocolError

ESCAPE: Final = 20  # rice: a quotient this large is written as a length and the raw value
UVAR_GROUPS: Final = 10
LIMIT: Final = 1 << 64


def zigzag(v: int) -> int:
    return (v << 1) if v >= 0 else ((-v << 1) - 1)


def unzigzag(u: int) -> int:
    return (u >> 1) ^ -(u & 1)


def rice_bits(u: int, k: int) -> int:
    """The length of `rice(k)` of u, in bits."""
    q = u >> k
    return q + 1 + k if q < ESCAPE else ESCAPE + 6 + u.bit_length()


class BitWriter:
    """Collects fields; `bytes()` pads the last byte with zero bits."""

    __slots__ = ("acc", "n")

    def __init__(self) -> None:
        self.acc = 0
        self.n = 0

    def bits(self, value: int, width: int) -> None:
        if not 0 <= value < (1 << width):
            raise ValueError(f"{value} does not fit in {width} bits")
        self.acc = (self.acc << width) | value
        self.n += width

    def uvar(self, u: int) -> None:
        if not 0 <= u < LIMIT:
            raise ValueError(f"value out of range: {u}")
        while u >= 0x80:
            self.bits((u & 0x7F) | 0x80, 8)
            u >>= 7
        self.bits(u, 8)

    def svar(self, v: int) -> None:
        self.uvar(zigzag(v))

    def rice(self, u: int, k: int) -> None:
        if not 0 <= u < LIMIT:
            raise ValueError(f"value out of range: {u}")
        q = u >> k
        if q < ESCAPE:
            self.bits(((1 << q) - 1) << 1, q + 1)
            if k:
                self.bits(u & ((1 << k) - 1), k)
        else:
            length = u.bit_length()
            self.bits((1 << ESCAPE) - 1, ESCAPE)
            self.bits(length - 1, 6)
            self.bits(u, length)

    def raw(self, data: bytes) -> None:
        if data:
            self.bits(int.from_bytes(data, "big"), 8 * len(data))

    def bytes(self) -> bytes:
        pad = -self.n % 8
        return (self.acc << pad).to_bytes((self.n + pad) // 8, "big")


class BitReader:
    """Reads fields from `data[start:]`; ProtocolError (message starting `compact: `) when the
    stream ends inside one or a code is not canonical. The stream is held as a string of '0' and
    '1' (one character a bit): a unary run is one `str.find`, a field one `int(..., 2)`, both in C."""

    __slots__ = ("end", "pos", "s")

    def __init__(self, data: bytes, start: int = 0) -> None:
        size = len(data) - start
        self.s = format(int.from_bytes(data[start:], "big"), f"0{8 * size}b") if size > 0 else ""
        self.pos = 0
        self.end = len(self.s)

    @property
    def left(self) -> int:
        """Bits not read yet."""
        return self.end - self.pos

    def bits(self, width: int, what: str) -> int:
        if width == 0:
            return 0
        pos = self.pos
        end = pos + width
        if end > self.end:
            raise ProtocolError(f"compact: frame ends inside {what}")
        self.pos = end
        return int(self.s[pos:end], 2)

    def uvar(self, what: str) -> int:
        u = shift = 0
        for _ in range(UVAR_GROUPS):
            b = self.bits(8, what)
            u |= (b & 0x7F) << shift
            if b < 0x80:
                if u >= LIMIT or (b == 0 and shift):
                    raise ProtocolError(f"compact: {what}: a varint too long or not minimal")
                return u
            shift += 7
        raise ProtocolError(f"compact: {what}: a varint over {UVAR_GROUPS} groups")

    def svar(self, what: str) -> int:
        return unzigzag(self.uvar(what))

    def rice(self, k: int, what: str) -> int:
        pos = self.pos
        zero = self.s.find("0", pos, pos + ESCAPE)
        if zero >= 0:
            self.pos = zero + 1
            q = zero - pos
            return (q << k) | self.bits(k, what) if k else q
        if pos + ESCAPE > self.end:
            raise ProtocolError(f"compact: frame ends inside {what}")
        self.pos = pos + ESCAPE
        length = self.bits(6, what) + 1
        u = self.bits(length, what)
        if u.bit_length() != length or (u >> k) < ESCAPE:
            raise ProtocolError(f"compact: {what}: an escaped value that is not canonical")
        return u

    def rices(self, count: int, k: int, what: str) -> list[int]:
        """`count` values of `rice(k)`: the loop of `rice` with its common case inlined (a column's
        residuals are most of a frame)."""
        out: list[int] = []
        s, end, pos = self.s, self.end, self.pos
        find, append = s.find, out.append
        for _ in range(count):
            start = pos
            zero = find("0", start, start + ESCAPE)
            if zero < 0:  # an escape, or the end of the stream: the general path
                self.pos = start
                append(self.rice(k, what))
                pos = self.pos
                continue
            pos = zero + 1 + k
            if pos > end:
                raise ProtocolError(f"compact: frame ends inside {what}")
            append(((zero - start) << k) | int(s[zero + 1 : pos], 2) if k else zero - start)
        self.pos = pos
        return out

    def raw(self, size: int, what: str) -> bytes:
        if size * 8 > self.left:
            raise ProtocolError(f"compact: frame ends inside {what}")
        return self.bits(size * 8, what).to_bytes(size, "big")

    def finish(self) -> None:
        """The stream must end here: fewer than 8 bits left, all zero."""
        left = self.left
        if left >= 8:
            raise ProtocolError(f"compact: {left // 8} bytes after the last field")
        if self.bits(left, "the padding"):
            raise ProtocolError("compact: padding bits must be 0")
