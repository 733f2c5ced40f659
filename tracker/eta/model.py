"""ETA of packages in transit, as a pure function of a driver's recent fixes. No I/O, no clock.

The straight-line estimate: the great-circle distance from the driver's newest fix to the
destination, times a road factor (roads are longer than the crow flies; ~1.3-1.4 in cities),
divided by the driver's recent *moving* speed, plus a stop time for every package the driver
delivers before this one (nearest destination first). `Estimator` is the interface: a routing
engine implements it with road distances and times, and the service does not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

EARTH_RADIUS_M = 6_371_008.8
Point = tuple[float, float]  # (lat, lon)
STRAIGHT_LINE = "straight_line"


def distance_m(a: Point, b: Point) -> float:
    """Great-circle distance in metres (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True, slots=True)
class Fix:
    """One position of the driver: phone time (ms), where, and the speed it reported (m/s) if any."""

    ts: int
    lat: float
    lon: float
    spd: float | None = None


@dataclass(frozen=True, slots=True)
class Params:
    """The estimate's knobs (tracker/config.py: `TRACKER_ETA_*`)."""

    road_factor: float = 1.35
    """Road distance over straight-line distance."""
    stop_s: float = 180.0
    """Time spent at each delivery made before this one."""
    half_life_s: float = 300.0
    """A fix's weight in the moving speed halves every `half_life_s` of age."""
    floor_mps: float = 1.5
    """The speed never counts as lower (a driver creeping, or stopped since its last moving fix)."""
    default_mps: float = 8.0
    """The speed of a driver with no moving fix in its recent positions (about 30 km/h)."""
    moving_mps: float = 1.0
    """Fixes at or above this speed count as moving; slower ones (lights, deliveries) do not."""
    gap_s: float = 60.0
    """A fix stands for at most this long (a phone that was off for an hour is not an hour's weight)."""


def moving_speed(fixes: Sequence[Fix], params: Params) -> float:
    """The driver's recent moving speed in m/s: an average of its moving fixes' speeds, each
    weighted by the time it stands for and decaying with its age (half-life `half_life_s`, counted
    from the newest fix), never below `floor_mps`; `default_mps` when no fix is moving.

    A fix's speed is the one the phone reported, else the distance from the previous fix over the
    time between them. `fixes` are in ts order.
    """
    if not fixes:
        return max(params.default_mps, params.floor_mps)
    newest = fixes[-1].ts
    num = den = 0.0
    prev: Fix | None = None
    for f in fixes:
        dt = (f.ts - prev.ts) / 1000 if prev is not None else 0.0
        speed = f.spd
        if speed is None or not math.isfinite(speed) or speed < 0:
            speed = distance_m((prev.lat, prev.lon), (f.lat, f.lon)) / dt if prev is not None and dt > 0 else None
        prev = f
        if speed is None or speed < params.moving_mps:
            continue
        weight = min(max(dt, 1.0), params.gap_s) * 0.5 ** ((newest - f.ts) / 1000 / params.half_life_s)
        num += weight * speed
        den += weight
    average = num / den if den > 0 else params.default_mps
    return max(average, params.floor_mps)


@dataclass(frozen=True, slots=True)
class Stop:
    """A package the driver holds, and where it goes."""

    package: str
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class Query:
    """What an estimator is asked: a driver at `origin` (its newest fix, at `fix_ts`) moving at
    `speed_mps`, holding the packages `stops`; `now` is the server's time (ms)."""

    org: str
    now: int
    fix_ts: int
    origin: Point
    speed_mps: float
    stops: tuple[Stop, ...]
    params: Params


@dataclass(frozen=True, slots=True)
class Estimate:
    package: str
    ts: int
    """When the driver should arrive at the destination (ms since the Unix epoch)."""
    distance_m: float
    """Straight-line distance from the driver's newest fix to the destination."""
    stops_before: int
    """Deliveries the driver is expected to make before this one."""
    speed_mps: float
    method: str

    def as_json(self, fix_ts: int) -> dict[str, object]:
        return {
            "ts": self.ts,
            "distance_m": round(self.distance_m),
            "stops_before": self.stops_before,
            "speed_mps": round(self.speed_mps, 1),
            "method": self.method,
            "position_ts": fix_ts,
        }


class Estimator(Protocol):
    """Estimates arrival times for every package a driver holds.

    The straight-line estimator is pure and instant; a routing engine (OSRM's `/trip` or
    `/table`, Valhalla's `optimized_route`) would answer the same query with road distances and
    its own order of stops. It must answer one `Estimate` per stop of the query and may raise
    `OSError` when unreachable (the caller then falls back to the straight line)."""

    name: str

    async def estimate(self, query: Query) -> list[Estimate]:
        """One estimate per stop of `query`, in any order."""


def straight_line(query: Query) -> list[Estimate]:
    """Nearest destination first: the i-th nearest is reached after i stops; travel is the
    straight-line distance times the road factor at the moving speed, from now (a fix from the
    past does not make the driver arrive in the past)."""
    p = query.params
    speed = max(query.speed_mps, p.floor_mps)
    legs = sorted((distance_m(query.origin, (s.lat, s.lon)), s.package) for s in query.stops)
    out = []
    for i, (dist, package) in enumerate(legs):
        seconds = dist * p.road_factor / speed + i * p.stop_s
        out.append(Estimate(package, query.now + round(seconds * 1000), dist, i, speed, STRAIGHT_LINE))
    return out


class StraightLine:
    """The `Estimator` with no engine behind it."""

    name = STRAIGHT_LINE

    async def estimate(self, query: Query) -> list[Estimate]:
        return straight_line(query)
