"""The compact batch encoding `compact-2` (docs/PROTOCOL.md, "Compact batches, compact-2"). Pure.

A binary frame (first byte 0xC3) carrying positions *and* scans of one phone in seq order, column
by column, as one bit stream (tracker.protocol.bits). Every value is an integer (fixed point for
the fractional fields); a column stores its first value, then each next value's difference from a
prediction (order 1: the previous value; order 2: the previous value plus the previous step),
divided by the residuals' greatest common divisor (0: every residual is 0, nothing more is
stored: a run of consecutive seqs costs nothing), in a Rice code whose parameter the encoder picks
per column. Positions of one driver a second apart differ little and smoothly, so a fix costs
about 5 bytes where compact-1 (one varint byte at least per value) costs about 11.

`decode` gives the same `pos` and `scan` dicts a JSON `batch` carries, for `check_event`; it
raises only ProtocolError and TooLarge, and allocates nothing per item before the item count is
checked against `max_batch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from .bits import BitReader, BitWriter, rice_bits, zigzag
from .compact import TooLarge
from .frames import ProtocolError

NAME: Final = "compact-2"
MAGIC: Final = 0xC3
CONTENT_TYPE: Final = "application/vnd.tracker.compact-2"
VALUE_MAX: Final = 1 << 62  # |a decoded value| stays below this (in the column's units)
SEQS_MAX: Final = 65_536  # a too-large batch names its seqs only up to this many items
STRING_MAX: Final = 2_000  # bytes (UTF-8) of one scan string: the longest field is 500 characters

LATLON: Final = 10_000_000  # units per degree: 1e-7 degrees, about 1 cm
# Optional fields of positions (over the positions), then of scans (over the scans): (key, units per 1).
POS_FIELDS: Final = (("acc", 100), ("spd", 100), ("hdg", 10), ("alt", 10), ("bat", 1000))
SCAN_EVENTS: Final = ("pickup", "handover", "deliver", "fail", "return")  # 3 bits each, in this order
SCAN_STRINGS: Final = ("note", "recipient", "pod")
TEMP_SCALE: Final = 100

NONE, ALL, SOME = 0, 1, 2  # presence, 2 bits: no item, every item, a bitmap of one bit per item follows
ORDERS: Final = (1, 2)


# -- encoding (the phone's side: the simulator and the tests use it) ----------------------------


def _fixed(value: Any, scale: int, key: str) -> int:
    if type(value) is bool or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: not a finite number: {value!r}")
    v = value if scale == 1 and type(value) is int else round(value * scale)
    if abs(v) >= VALUE_MAX:
        raise ValueError(f"{key}: beyond 2^62 units")
    return int(v)


def _residuals(values: Sequence[int], order: int) -> list[int]:
    if order == 1:
        return [values[i] - values[i - 1] for i in range(1, len(values))]
    return [values[i] - 2 * values[i - 1] + values[i - 2] for i in range(2, len(values))]


def _best_k(us: list[int]) -> tuple[int, int]:
    """(k, bits) minimising the Rice code's length of `us`."""
    mean = sum(us) // len(us)
    guess = max(0, mean.bit_length() - 1)
    return min(
        ((k, sum(rice_bits(u, k) for u in us)) for k in range(max(0, guess - 2), min(63, guess + 3))),
        key=lambda kb: kb[1],
    )


def _column_plan(values: Sequence[int], order: int) -> tuple[int, int, int, list[int]]:
    """(bits, g, k, zigzagged residuals / g) of one order's coding of `values` (len >= 2)."""
    res = _residuals(values, order)
    if not res:
        return 0, 0, 0, []
    g = 0
    for r in res:
        g = math.gcd(g, r)
    if g == 0:
        return 8, 0, 0, []
    us = [zigzag(r // g) for r in res]
    k, size = _best_k(us)
    return size + 6 + 8 * max(1, (g.bit_length() + 6) // 7), g, k, us


def _column(w: BitWriter, values: Sequence[int]) -> None:
    w.svar(values[0])
    if len(values) == 1:
        return
    plans = {order: _column_plan(values, order) for order in ORDERS}
    plans[2] = (plans[2][0] + 8 * max(1, (zigzag(values[1] - values[0]).bit_length() + 6) // 7), *plans[2][1:])
    order = min(ORDERS, key=lambda o: plans[o][0])
    _, g, k, us = plans[order]
    w.bits(order, 2)
    if order == 2:
        w.svar(values[1] - values[0])
    if len(values) - order == 0:
        return
    w.uvar(g)
    if g:
        w.bits(k, 6)
        for u in us:
            w.rice(u, k)


def _presence(w: BitWriter, present: list[int], count: int) -> None:
    if not present:
        w.bits(NONE, 2)
    elif len(present) == count:
        w.bits(ALL, 2)
    else:
        w.bits(SOME, 2)
        bitmap = 0
        for i in present:
            bitmap |= 1 << (count - 1 - i)
        w.bits(bitmap, count)


def _utf8(value: Any, key: str) -> bytes:
    if type(value) is not str:
        raise ValueError(f"{key}: not a string")
    data = value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    if len(data) > STRING_MAX:
        raise ValueError(f"{key}: over {STRING_MAX} bytes")
    return data


def _text(w: BitWriter, data: bytes, shared: int = 0) -> None:
    """`data[shared:]`, length first (the first `shared` bytes are known to the reader)."""
    w.uvar(len(data) - shared)
    w.raw(data[shared:])


def _shared(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode(items: Sequence[dict[str, Any]]) -> bytes:
    """Encode `pos` and `scan` dicts (seq, ts; lat, lon for a position; package, event for a scan;
    the optional fields None or absent meaning absent), in the order given. ValueError for what the
    format cannot carry (fields it does not know are dropped, as they would be from a JSON batch)."""
    if not items:
        raise ValueError("a compact batch carries at least one event")
    n = len(items)
    w = BitWriter()
    w.uvar(n)
    scans = [i for i, it in enumerate(items) if it.get("type") == "scan"]
    if any(it.get("type") not in ("pos", "scan") for it in items):
        raise ValueError("an event must be pos or scan")
    _presence(w, scans, n)
    _column(w, [_fixed(it["seq"], 1, "seq") for it in items])
    _column(w, [_fixed(it["ts"], 1, "ts") for it in items])
    where = [i for i, it in enumerate(items) if it.get("lat") is not None and it.get("lon") is not None]
    _presence(w, where, n)
    if where:
        _column(w, [_fixed(items[i]["lat"], LATLON, "lat") for i in where])
        _column(w, [_fixed(items[i]["lon"], LATLON, "lon") for i in where])
    _optional(w, [it for it in items if it["type"] == "pos"], POS_FIELDS)
    if scans:
        _scans(w, [items[i] for i in scans])
    return bytes((MAGIC,)) + w.bytes()


def _optional(w: BitWriter, group: list[dict[str, Any]], fields: Sequence[tuple[str, int]]) -> None:
    if not group:  # no position: no presence fields for theirs
        return
    for key, scale in fields:
        present = [i for i, it in enumerate(group) if it.get(key) is not None]
        _presence(w, present, len(group))
        if present:
            _column(w, [_fixed(group[i][key], scale, key) for i in present])


def _scans(w: BitWriter, scans: list[dict[str, Any]]) -> None:
    for it in scans:
        if it.get("event") not in SCAN_EVENTS:
            raise ValueError(f"event: not one of {', '.join(SCAN_EVENTS)}")
        w.bits(SCAN_EVENTS.index(it["event"]), 3)
    prev = b""
    for it in scans:  # package ids share prefixes: each is written after what it shares with the last
        data = _utf8(it.get("package"), "package")
        shared = _shared(prev, data)
        w.uvar(shared)
        _text(w, data, shared)
        prev = data
    _optional(w, scans, (("temp_c", TEMP_SCALE),))
    for key in SCAN_STRINGS:
        present = [i for i, it in enumerate(scans) if it.get(key) is not None]
        _presence(w, present, len(scans))
        for i in present:
            _text(w, _utf8(scans[i][key], key))


# -- decoding (the server's side) ---------------------------------------------------------------


def _read_presence(r: BitReader, count: int, what: str) -> list[int]:
    mode = r.bits(2, f"the presence of {what}")
    if mode == NONE:
        return []
    if mode == ALL:
        return list(range(count))
    if mode != SOME:
        raise ProtocolError(f"compact: {what}: presence must be 0, 1 or 2, not {mode}")
    bitmap = r.bits(count, f"the bitmap of {what}")
    return [i for i in range(count) if bitmap >> (count - 1 - i) & 1]


def _read_column(r: BitReader, count: int, what: str) -> list[int]:
    values = [_bounded(r.svar(what), what)]
    if count == 1:
        return values
    order = r.bits(2, what)
    if order not in ORDERS:
        raise ProtocolError(f"compact: {what}: order must be 1 or 2, not {order}")
    step = 0
    if order == 2:
        step = r.svar(what)
        values.append(_bounded(values[0] + step, what))
    rest = count - len(values)
    if rest == 0:
        return values
    g = r.uvar(what)
    prev = values[-1]
    if g == 0:  # every residual 0: constant steps (order 2) or a constant (order 1)
        values.extend(prev + step * i for i in range(1, rest + 1))
        _bounded(values[-1], what)  # linear: the last is the farthest
        return values
    k = r.bits(6, what)
    for u in r.rices(rest, k, what):
        delta = g * ((u >> 1) ^ -(u & 1))
        if order == 2:
            step += delta
            prev += step
        else:
            prev += delta
        if not -VALUE_MAX < prev < VALUE_MAX:
            raise ProtocolError(f"compact: {what}: a value beyond 2^62 units")
        values.append(prev)
    return values


def _bounded(v: int, what: str) -> int:
    if not -VALUE_MAX < v < VALUE_MAX:
        raise ProtocolError(f"compact: {what}: a value beyond 2^62 units")
    return v


def _read_text(r: BitReader, what: str, known: bytes = b"") -> bytes:
    size = r.uvar(what)
    if size + len(known) > STRING_MAX:
        raise ProtocolError(f"compact: {what}: a string over {STRING_MAX} bytes")
    return known + r.raw(size, what)


def _str(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"compact: {what}: not UTF-8") from None


def decode(data: bytes, max_batch: int) -> list[dict[str, Any]]:
    """The events of a compact-2 frame in frame order, as dicts for `check_event`. ProtocolError
    for a malformed frame (none of it is stored), TooLarge for more than `max_batch` events. Never
    raises anything else; work is linear in len(data) and `max_batch`."""
    if data[:1] != bytes((MAGIC,)):
        raise ProtocolError(f"compact: the first byte must be 0x{MAGIC:X} ({NAME})")
    r = BitReader(data, 1)
    n = r.uvar("the item count")
    if n == 0:
        raise ProtocolError("compact: a batch carries at least one event")
    if n > max_batch:
        if n > SEQS_MAX:
            raise ProtocolError(f"compact: {n} events: more than any batch may carry")
        _read_presence(r, n, "scans")
        raise TooLarge(n, _read_column(r, n, "seq"))
    scans = set(_read_presence(r, n, "scans"))
    seqs = _read_column(r, n, "seq")
    tss = _read_column(r, n, "ts")
    items: list[dict[str, Any]] = [
        {"type": "scan" if i in scans else "pos", "seq": s, "ts": t}
        for i, (s, t) in enumerate(zip(seqs, tss, strict=True))
    ]
    where = _read_presence(r, n, "lat/lon")
    if where:
        lats = _read_column(r, len(where), "lat")
        lons = _read_column(r, len(where), "lon")
        for i, la, lo in zip(where, lats, lons, strict=True):
            items[i]["lat"], items[i]["lon"] = la / LATLON, lo / LATLON
    _read_optional(r, [it for it in items if it["type"] == "pos"], POS_FIELDS)
    group = [it for it in items if it["type"] == "scan"]
    if group:
        _read_scans(r, group)
    r.finish()
    return items


def _read_optional(r: BitReader, group: list[dict[str, Any]], fields: Sequence[tuple[str, int]]) -> None:
    if not group:
        return
    for key, scale in fields:
        present = _read_presence(r, len(group), key)
        if present:
            for i, v in zip(present, _read_column(r, len(present), key), strict=True):
                group[i][key] = v / scale


def _read_scans(r: BitReader, group: list[dict[str, Any]]) -> None:
    for it in group:
        code = r.bits(3, "event")
        if code >= len(SCAN_EVENTS):
            raise ProtocolError(f"compact: event: {code} is not an event's number (0 to {len(SCAN_EVENTS) - 1})")
        it["event"] = SCAN_EVENTS[code]
    prev = b""
    for it in group:
        shared = r.uvar("package")
        if shared > len(prev):
            raise ProtocolError(f"compact: package: shares {shared} bytes with a previous one of {len(prev)}")
        prev = _read_text(r, "package", prev[:shared])
        it["package"] = _str(prev, "package")
    _read_optional(r, group, (("temp_c", TEMP_SCALE),))
    for key in SCAN_STRINGS:
        for i in _read_presence(r, len(group), key):
            group[i][key] = _str(_read_text(r, key), key)
