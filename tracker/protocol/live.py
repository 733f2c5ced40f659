"""Encoders of the live frames a dashboard receives (docs/PROTOCOL.md, "Dashboard connection").

Pure. A live frame is encoded once, by the instance that publishes it, and its bytes travel
unchanged through the broker to every dashboard that wants it.
"""

from __future__ import annotations

from typing import Any, Final

from .events import Position, Scan
from .frames import encode

POS_OPTIONAL: Final = ("acc", "spd", "hdg", "alt", "bat")
SCAN_OPTIONAL: Final = ("lat", "lon", "temp_c", "note", "recipient", "pod")


def pos_frame(driver: str, ev: Position) -> bytes:
    frame: dict[str, Any] = {"type": "pos", "driver": driver, "seq": ev.seq, "ts": ev.ts, "lat": ev.lat, "lon": ev.lon}
    for key in POS_OPTIONAL:
        value = getattr(ev, key)
        if value is not None:
            frame[key] = value
    return encode(frame)


def scan_frame(driver: str, ev: Scan) -> bytes:
    frame: dict[str, Any] = {
        "type": "scan",
        "driver": driver,
        "seq": ev.seq,
        "ts": ev.ts,
        "package": ev.package,
        "event": ev.event,
    }
    for key in SCAN_OPTIONAL:
        value = getattr(ev, key)
        if value is not None:
            frame[key] = value
    return encode(frame)


def presence_frame(driver: str, online: bool, ts: int, name: str | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "presence", "driver": driver, "online": online, "ts": ts}
    if name:
        frame["name"] = name
    return encode(frame)


def status_frame(live: bool) -> bytes:
    return encode({"type": "status", "live": live, **({} if live else {"reason": "broker unavailable"})})
