"""Driver events: decoding and validation of `pos` and `scan` (PROTOCOL.md, "Driver connection").

Pure code: no I/O, no asyncio. This runs once per event on the ingest hot path, so it is
hand-written (a generic JSON Schema walk costs ~10x more); `tests/test_schemas.py` proves it
agrees with `schemas/pos.json` and `schemas/scan.json`.

Rules:
- a bad *required* field refuses the event (`invalid`, naming its seq when the seq is usable);
- a bad *optional* field is stored as null, so a scan (a physical fact) is never lost over a bad
  battery reading;
- every accepted value is storable as is: bounded strings without NUL nor lone surrogates (a
  `"\\ud83d"` escape, half an emoji: PostgreSQL text and UTF-8 cannot hold it), finite numbers
  (`1e400` parses as infinity), seq and ts in range;
- an id (`package`) also holds no bidi control (U+202A-U+202E, U+2066-U+2069) nor zero-width
  character (U+200B-U+200D, U+2060, U+FEFF): it would show as another id on a screen.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

SEQ_MAX: Final = 2**53  # exclusive: JavaScript's safe integers
TS_MIN: Final = 1_577_836_800_000  # 2020-01-01T00:00:00Z
TS_FUTURE_MS: Final = 86_400_000  # ts may lie at most one day past the server's clock
LIVE_FUTURE_MS: Final = 120_000  # a ts further ahead of receipt counts as the receipt time

SCAN_EVENTS: Final = frozenset({"pickup", "handover", "deliver", "fail", "return"})
PACKAGE_MAX: Final = 64
NOTE_MAX: Final = 500
RECIPIENT_MAX: Final = 200
POD_MAX: Final = 500

# Characters no stored string may hold: NUL, and lone surrogates (the stdlib parser lets them through).
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
# ... nor an id: bidi controls and zero-width characters would make it look like another id.
_NOT_IN_ID: Final = re.compile("[\x00\ud800-\udfff\u200b-\u200d\u2060\ufeff\u202a-\u202e\u2066-\u2069]")


def storable_text(value: str) -> bool:
    """No NUL and no lone surrogate (PostgreSQL text and UTF-8 hold neither)."""
    return _UNSTORABLE.search(value) is None


def id_text(value: str) -> bool:
    """Storable, and shown as what it is: no bidi control nor zero-width character."""
    return _NOT_IN_ID.search(value) is None


# Optional numeric fields: (min, max), inclusive. Out of range or of the wrong type -> null.
POS_OPTIONAL: Final[dict[str, tuple[float, float]]] = {
    "acc": (0.0, 100_000.0),
    "spd": (0.0, 300.0),
    "hdg": (0.0, 360.0),
    "alt": (-1_000.0, 10_000.0),
    "bat": (0.0, 1.0),
}
TEMP_RANGE: Final = (-80.0, 80.0)


@dataclass(slots=True)
class Refusal:
    """An event the server will not store: answered with an `error` frame naming `seq`."""

    code: str
    seq: int | None
    message: str


@dataclass(slots=True)
class Position:
    seq: int
    ts: int
    lat: float
    lon: float
    acc: float | None = None
    spd: float | None = None
    hdg: float | None = None
    alt: float | None = None
    bat: float | None = None

    kind = "pos"


@dataclass(slots=True)
class Scan:
    seq: int
    ts: int
    package: str
    event: str
    lat: float | None = None
    lon: float | None = None
    temp_c: float | None = None
    note: str | None = None
    recipient: str | None = None
    pod: str | None = None

    kind = "scan"


Event = Position | Scan


def _int(value: Any) -> bool:
    return type(value) is int  # bool is a subclass of int and is not a number here


def _number(value: Any) -> bool:
    t = type(value)
    return (t is float and math.isfinite(value)) or t is int


def _opt_number(obj: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = obj.get(key)
    if value is None or not _number(value) or not lo <= value <= hi:
        return None
    return float(value)


def _opt_string(obj: dict[str, Any], key: str, limit: int) -> str | None:
    value = obj.get(key)
    if type(value) is not str or len(value) > limit or not storable_text(value):
        return None
    return value


def check_seq(obj: dict[str, Any]) -> int | None:
    """The event's seq if it is a valid one, else None."""
    seq: Any = obj.get("seq")
    if _int(seq) and 1 <= seq < SEQ_MAX:
        return seq  # type: ignore[no-any-return]
    return None


def _check_common(obj: dict[str, Any], now_ms: int) -> Refusal | tuple[int, int]:
    seq = check_seq(obj)
    if seq is None:
        return Refusal("invalid", None, "seq: must be an integer, 1 <= seq < 2^53")
    ts: Any = obj.get("ts")
    if type(ts) in (int, float) and 1.5e9 <= ts <= 1e11:  # 2017..5138 in seconds; 1970 in ms
        return Refusal("invalid", seq, "ts: milliseconds since the Unix epoch are expected (this looks like seconds)")
    if not _int(ts):
        return Refusal("invalid", seq, "ts: must be an integer (ms since the Unix epoch)")
    if ts < TS_MIN or ts > now_ms + TS_FUTURE_MS:
        return Refusal("invalid", seq, "ts: must lie between 2020-01-01 and one day past the server's clock")
    return seq, ts


def check_position(obj: dict[str, Any], now_ms: int) -> Position | Refusal:
    common = _check_common(obj, now_ms)
    if type(common) is Refusal:
        return common
    seq, ts = common  # type: ignore[misc]
    lat: Any = obj.get("lat")
    if not _number(lat) or not -90 <= lat <= 90:
        return Refusal("invalid", seq, "lat: must be a number between -90 and 90")
    lon: Any = obj.get("lon")
    if not _number(lon) or not -180 <= lon <= 180:
        return Refusal("invalid", seq, "lon: must be a number between -180 and 180")
    pos = Position(seq, ts, float(lat), float(lon))
    # Fast path: most phones send all optional fields in range.
    for key, (lo, hi) in POS_OPTIONAL.items():
        if key in obj:
            setattr(pos, key, _opt_number(obj, key, lo, hi))
    return pos


def check_scan(obj: dict[str, Any], now_ms: int) -> Scan | Refusal:
    common = _check_common(obj, now_ms)
    if type(common) is Refusal:
        return common
    seq, ts = common  # type: ignore[misc]
    package = obj.get("package")
    if type(package) is not str or not 1 <= len(package) <= PACKAGE_MAX or not id_text(package):
        return Refusal(
            "invalid",
            seq,
            f"package: must be a string of 1 to {PACKAGE_MAX} characters without NUL, lone surrogates,"
            " bidi controls or zero-width characters",
        )
    event = obj.get("event")
    if type(event) is not str or event not in SCAN_EVENTS:
        return Refusal("invalid", seq, "event: must be one of pickup, handover, deliver, fail, return")
    scan = Scan(seq, ts, package, event)
    lat = _opt_number(obj, "lat", -90.0, 90.0)
    lon = _opt_number(obj, "lon", -180.0, 180.0)
    if lat is not None and lon is not None:  # a position is a pair or nothing
        scan.lat, scan.lon = lat, lon
    scan.temp_c = _opt_number(obj, "temp_c", *TEMP_RANGE)
    scan.note = _opt_string(obj, "note", NOTE_MAX)
    if event == "deliver":
        scan.recipient = _opt_string(obj, "recipient", RECIPIENT_MAX)
        scan.pod = _opt_string(obj, "pod", POD_MAX)
    return scan


def check_event(obj: object, now_ms: int) -> Event | Refusal:
    """Validate one event (a `pos` or `scan` object, alone or as a batch item).

    Never raises; `now_ms` is the server's clock at receipt.
    """
    if type(obj) is not dict:
        return Refusal("invalid", None, "event: must be a JSON object")
    kind = obj.get("type")
    if kind == "pos":
        return check_position(obj, now_ms)
    if kind == "scan":
        return check_scan(obj, now_ms)
    return Refusal("invalid", check_seq(obj), "type: an event must be pos or scan")


def live_ts(ts: int, received_ms: int) -> int:
    """The ts that ranks a position for the live view: a ts more than 2 minutes ahead of receipt
    counts as the receipt time, so a phone with a wrong clock cannot pin its marker."""
    return ts if ts <= received_ms + LIVE_FUTURE_MS else received_ms
