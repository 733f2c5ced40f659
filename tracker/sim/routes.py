"""The roads simulated drivers follow, and distances along them. Pure.

The roads are hand-drawn polylines that follow real arterial roads of five African cities
closely enough for a map (a few tens of metres), not surveyed geometry. They are data, in
``data/routes.json`` (``{"cities": [{"name", "alt_m", "roads": {name: [[lat, lon], ...]}}]}``),
read once at import.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

EARTH_RADIUS_M = 6_371_008.8
Point = tuple[float, float]  # (lat, lon)


@dataclass(frozen=True, slots=True)
class City:
    name: str
    alt_m: float
    roads: dict[str, tuple[Point, ...]]


def load_cities(data: bytes) -> tuple[City, ...]:
    """The cities of a ``routes.json`` document, roads in the file's order."""
    doc: dict[str, Any] = orjson.loads(data)
    return tuple(
        City(
            c["name"],
            c["alt_m"],
            {name: tuple((lat, lon) for lat, lon in points) for name, points in c["roads"].items()},
        )
        for c in doc["cities"]
    )


CITIES: tuple[City, ...] = load_cities(resources.files("tracker.sim").joinpath("data/routes.json").read_bytes())


def distance_m(a: Point, b: Point) -> float:
    """Great-circle distance in metres (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


def bearing_deg(a: Point, b: Point) -> float:
    """Initial bearing from a to b, degrees clockwise from north in [0, 360)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return math.degrees(math.atan2(y, x)) % 360.0


class Route:
    """A polyline with cumulative distances, for O(log n) interpolation by distance."""

    __slots__ = ("bearings", "cum", "length", "name", "points")

    def __init__(self, name: str, points: tuple[Point, ...]) -> None:
        if len(points) < 2:
            raise ValueError("a route needs at least two points")
        self.name = name
        self.points = points
        self.cum = [0.0]
        self.bearings = []
        for a, b in itertools.pairwise(points):
            self.cum.append(self.cum[-1] + distance_m(a, b))
            self.bearings.append(bearing_deg(a, b))
        self.length = self.cum[-1]

    def at(self, d: float, hint: int = 0) -> tuple[float, float, float]:
        """(lat, lon, bearing) at distance d metres from the start, clamped to the route.

        ``hint`` is a segment index to try first (a driver is usually where it last was).
        """
        cum = self.cum
        last = len(cum) - 2
        if d <= 0.0:
            d, i = 0.0, 0
        elif d >= self.length:
            d, i = self.length, last
        elif cum[hint] <= d < cum[hint + 1]:
            i = hint
        else:
            i = min(bisect.bisect_right(cum, d) - 1, last)
        span = cum[i + 1] - cum[i]
        f = (d - cum[i]) / span if span > 0 else 0.0
        (la, loa), (lb, lob) = self.points[i], self.points[i + 1]
        return la + (lb - la) * f, loa + (lob - loa) * f, self.bearings[i]

    def segment(self, d: float) -> int:
        """Index of the segment holding distance d (clamped)."""
        return min(max(bisect.bisect_right(self.cum, d) - 1, 0), len(self.cum) - 2)


ROUTES: tuple[tuple[City, Route], ...] = tuple(
    (city, Route(f"{city.name}: {name}", pts)) for city in CITIES for name, pts in city.roads.items()
)
