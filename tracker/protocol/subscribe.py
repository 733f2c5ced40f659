"""A dashboard's subscription: what it follows, and the bounding box (docs/PROTOCOL.md, "subscribe").

Pure. `parse_subscribe` turns a `subscribe` frame into a `Filter`; `in_bbox` is the box test the
hub and the snapshot share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .events import storable_text
from .frames import ProtocolError

BBox = tuple[float, float, float, float]
ID_MAX_LEN: Final = 64
IDS_MAX: Final = 10_000


@dataclass(slots=True)
class Filter:
    """What a dashboard follows. None means "no filter" (everything in scope)."""

    drivers: frozenset[str] | None = None
    packages: frozenset[str] | None = None
    bbox: BBox | None = None

    @property
    def follows_all(self) -> bool:
        return self.drivers is None and self.packages is None


def in_bbox(bbox: BBox, lat: float, lon: float) -> bool:
    west, south, east, north = bbox
    if not south <= lat <= north:
        return False
    if west <= east:
        return west <= lon <= east
    return lon >= west or lon <= east  # the box crosses the antimeridian


def parse_subscribe(obj: dict[str, Any], *, max_ids: int = IDS_MAX) -> Filter:
    """A subscription's filters; malformed values are a protocol error, ids are just strings (one
    that cannot be stored names nothing and is dropped).
    `drivers` and `packages` together name at most `max_ids` ids."""

    def ids(key: str) -> frozenset[str] | None:
        value = obj.get(key)
        if value is None:
            return None
        if (
            type(value) is not list
            or len(value) > IDS_MAX
            or not all(type(v) is str and len(v) <= ID_MAX_LEN for v in value)
        ):
            raise ProtocolError(f"subscribe: {key} must be an array of ids")
        # An id no table can hold (NUL, a lone surrogate) names nothing: dropped, so that it costs
        # nothing else (handed to PostgreSQL, it made the whole snapshot go without packages).
        return frozenset(v for v in value if storable_text(v))

    named = sum(len(v) for v in (obj.get("drivers"), obj.get("packages")) if type(v) is list)
    if named > max_ids:
        raise ProtocolError(f"subscribe: at most {max_ids} drivers and packages")

    bbox = obj.get("bbox")
    if bbox is not None:
        if (
            type(bbox) is not list
            or len(bbox) != 4
            or not all(type(v) in (int, float) for v in bbox)
            or not (-180 <= bbox[0] <= 180 and -180 <= bbox[2] <= 180 and -90 <= bbox[1] <= bbox[3] <= 90)
        ):
            raise ProtocolError("subscribe: bbox must be [west, south, east, north] in degrees")
        bbox = tuple(float(v) for v in bbox)
    return Filter(drivers=ids("drivers"), packages=ids("packages"), bbox=bbox)
