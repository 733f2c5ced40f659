"""The body transistorsoft's background-geolocation plugin posts (docs/PLUGINS.md), as our events.

With `batchSync: true` the plugin posts `{"location": [<location>, ...]}` (`{"location": {...}}`
without it), each location its default JSON: `uuid`, ISO-8601 `timestamp`, `coords.latitude`,
`longitude`, `accuracy`, `speed` (m/s), `heading`, `altitude`, `battery.level` (0..1). It has no
seq: the seq is derived from the fix itself, so a resend of the same location (the plugin keeps
it in SQLite until a 2xx) names the same event:

    seq = ts_ms * 1000 + crc32(uuid) % 1000

Stable for a location; increasing with the fix's time (a new fix is above every stored one, so it
goes live at receipt, as on the websocket); below 2^53 until the year 2255. Two fixes taken in the
same millisecond get different seqs unless their uuids agree modulo 1000 (1 in 1000): then they
share seq and ts, so the second counts as a resend of the first (stored once) - never a
`conflict`. The plugin's -1 ("unknown") speed, heading and battery fall outside our ranges and
are stored as null, like any bad optional field.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

ROOT = "location"  # the plugin's default `httpRootProperty`
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def plugin_seq(ts_ms: int, uuid: str) -> int:
    return ts_ms * 1000 + zlib.crc32(uuid.encode("utf-8", "surrogatepass")) % 1000


def parse_timestamp(value: Any) -> int | None:
    """ISO-8601 (`2026-11-30T06:12:34.567Z`; without an offset: UTC) -> ms since the epoch."""
    if type(value) is not str or len(value) > 64:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return (dt - _EPOCH) // _MS
    except OverflowError:
        return None


def location_event(loc: Any) -> dict[str, Any]:
    """One plugin location as a `pos` item for `check_event` (which decides what is valid); an
    item without a usable `timestamp` gets no seq, so it is refused `invalid` without one."""
    if type(loc) is not dict:
        return {"type": "pos"}
    coords = loc.get("coords")
    coords = coords if type(coords) is dict else {}
    battery = loc.get("battery")
    battery = battery if type(battery) is dict else {}
    item: dict[str, Any] = {
        "type": "pos",
        "lat": coords.get("latitude"),
        "lon": coords.get("longitude"),
        "acc": coords.get("accuracy"),
        "spd": coords.get("speed"),
        "hdg": coords.get("heading"),
        "alt": coords.get("altitude"),
        "bat": battery.get("level"),
    }
    ts = parse_timestamp(loc.get("timestamp"))
    uuid = loc.get("uuid")
    if ts is not None and ts >= 0:
        item["ts"] = ts
        item["seq"] = plugin_seq(ts, uuid if type(uuid) is str else "")
    return item


def plugin_items(obj: dict[str, Any]) -> list[Any] | None:
    """The locations of a plugin body as `pos` items; None if `obj` is not one."""
    locations = obj.get(ROOT)
    if type(locations) is dict:
        locations = [locations]
    if type(locations) is not list:
        return None
    return [location_event(loc) for loc in locations]
