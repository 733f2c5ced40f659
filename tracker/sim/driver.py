"""A simulated driver's day: realistic movement along a road and package scans. Pure.

Deterministic: a :class:`DriverModel` is advanced in simulated seconds and returns event
bodies (without ``seq`` and ``ts``, which the phone adds). For a given seed and driver index
the sequence of bodies is always the same, whatever the wall clock does. The words drivers
use (names, notes of failed deliveries) are data, in ``data/drivers.json``.
"""

from __future__ import annotations

import math
import random
from enum import Enum
from importlib import resources
from typing import Any

import orjson

from tracker.sim.routes import ROUTES

_WORDS: dict[str, Any] = orjson.loads(resources.files("tracker.sim").joinpath("data/drivers.json").read_bytes())
FIRST: tuple[str, ...] = tuple(_WORDS["first_names"])
LAST: tuple[str, ...] = tuple(_WORDS["last_names"])
FAIL_NOTES: tuple[str, ...] = tuple(_WORDS["fail_notes"])


def driver_name(index: int, seed: int) -> str:
    """A deterministic display name for driver ``index``."""
    rng = random.Random(f"name:{seed}:{index}")
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


class Phase(Enum):
    LOADING = "loading"
    DRIVING = "driving"
    STOPPED = "stopped"


_noise_rng = random.Random(6455)
NOISE_MASK = (1 << 16) - 1
# Standard normal deviates, shared by all drivers (each reads its own walk through the table):
# rng.gauss() per field was half the cost of a position.
NORMALS: tuple[float, ...] = tuple(_noise_rng.gauss(0.0, 1.0) for _ in range(NOISE_MASK + 8))
ACCEL = 1.2  # m/s^2, gentle urban acceleration
BRAKE = 2.0  # m/s^2


class DriverModel:
    """One driver's day: load at the depot, drive the road, deliver, come back, repeat.

    ``dwell_scale`` shrinks stops (lights, deliveries, loading) so short runs still see
    every phase. Never reads the clock; ``step(dt)`` advances simulated time.
    """

    def __init__(
        self, index: int, *, org: str, seed: int, dwell_scale: float = 1.0, record_plans: bool = False
    ) -> None:
        self.index = index
        self.org = org
        self.rng = random.Random(f"driver:{seed}:{index}")
        self.city, self.route = ROUTES[index % len(ROUTES)]
        self.dwell_scale = dwell_scale
        self.d = 0.0  # distance along the route, the depot is at 0
        self.direction = 1
        self.speed = 0.0
        self.target = self.rng.uniform(5.0, 15.0)
        self.bat = self.rng.uniform(0.55, 1.0)
        self.acc = self.rng.uniform(3.0, 10.0)
        self.m_per_deg_lon = 111_320.0 * math.cos(math.radians(self.route.points[0][0]))
        self._noise = self.rng.randrange(NOISE_MASK + 1)
        self._seg = 0
        self.packages: list[tuple[str, bool]] = []  # (id, cold chain) on board
        self.stops: list[float] = []  # delivery distances ahead, in driving order
        self.to_pick: list[tuple[str, bool]] = []
        self.returns: list[tuple[str, bool]] = []
        self.pkg_counter = 0
        # With ``record_plans``, every load's packages as planned: (id, cold chain, destination lat,
        # lon), for a dispatcher to consign before the pickup scans (``tracker simulate --consign``);
        # the caller drains it. None otherwise.
        self.planned: list[tuple[str, bool, float, float]] | None = [] if record_plans else None
        self.next_light = self.rng.uniform(200.0, 800.0)
        # Drivers start at the depot at staggered points of their loading, so a fleet spreads out.
        self.phase = Phase.LOADING
        self.wait = self.rng.uniform(0.0, 120.0) * dwell_scale
        self._plan_load()

    # --- events -----------------------------------------------------------------------
    def step(self, dt: float) -> list[dict[str, Any]]:
        """Advance ``dt`` seconds; return the events that happened: scans, then one position."""
        events: list[dict[str, Any]] = []
        remaining = dt
        while remaining > 1e-9:
            h = remaining if remaining <= 2.0 else 2.0
            self._advance(h, events)
            remaining -= h
        self.bat -= dt * 4e-5 * (0.5 + self.rng.random())
        if self.bat < 0.02:
            self.bat = 0.02
        events.append(self._position())
        return events

    def _position(self) -> dict[str, Any]:
        # Hot path (one call per position): table noise instead of rng.gauss, few round() calls.
        route = self.route
        seg = self._seg
        if not route.cum[seg] <= self.d < route.cum[seg + 1]:
            self._seg = seg = route.segment(self.d)
        lat, lon, hdg = route.at(self.d, seg)
        k = self._noise
        self._noise = (k + 5) & NOISE_MASK
        n = NORMALS
        acc = self.acc + n[k] * 0.5
        self.acc = acc = 25.0 if acc > 25.0 else 2.5 if acc < 2.5 else acc
        lat += n[k + 1] * acc * 0.5 / 111_320.0
        lon += n[k + 2] * acc * 0.5 / self.m_per_deg_lon
        if self.speed > 0.3:
            spd = self.speed + n[k + 3] * 0.3
            hdg += n[k + 4] * 4.0 + (180.0 if self.direction < 0 else 0.0)
        else:
            spd = 0.0
            hdg += 180.0 if self.direction < 0 else 0.0
        return {
            "type": "pos",
            "lat": round(lat * 1e6) / 1e6,  # round(x, 6) costs 3x more and this prints the same
            "lon": round(lon * 1e6) / 1e6,
            "acc": round(acc * 10.0) / 10.0,
            "spd": round(spd * 10.0) / 10.0 if spd > 0.0 else 0.0,
            "hdg": int(hdg % 360.0),
            "alt": round(self.city.alt_m + n[k + 4] * 3.0),
            "bat": round(self.bat * 1000.0) / 1000.0,
        }

    def _scan(self, event: str, package: str, cold: bool) -> dict[str, Any]:
        lat, lon, _ = self.route.at(self.d)
        scan: dict[str, Any] = {
            "type": "scan",
            "package": package,
            "event": event,
            "lat": round(lat, 6),
            "lon": round(lon, 6),
        }
        if cold:
            scan["temp_c"] = round(self.rng.gauss(5.0, 0.8), 1)
        if event == "pickup":
            scan["note"] = f"{self.rng.randint(1, 4)} boxes" + (", cold chain" if cold else "")
        elif event == "deliver":
            scan["recipient"] = f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"
            scan["pod"] = f"pod-{self.rng.getrandbits(64):016x}"
        elif event == "fail":
            scan["note"] = self.rng.choice(FAIL_NOTES)
        return scan

    # --- movement -----------------------------------------------------------------------
    def _advance(self, h: float, events: list[dict[str, Any]]) -> None:
        if self.phase is not Phase.DRIVING:
            if self.phase is Phase.LOADING and self.to_pick:
                pkg, cold = self.to_pick.pop(0)  # one pickup scan per step of loading
                self.packages.append((pkg, cold))
                events.append(self._scan("pickup", pkg, cold))
            self.wait -= h
            if self.wait <= 0 and not self.to_pick:
                self._depart()
            return
        goal = self._next_goal()
        gap = abs(goal - self.d)
        v_cap = math.sqrt(2 * BRAKE * gap)
        want = min(self.target, v_cap)
        if self.speed < want:
            self.speed = min(want, self.speed + ACCEL * h)
        else:
            self.speed = max(want, self.speed - BRAKE * h)
        move = max(self.speed * h, 0.5 * h if gap > 0 else 0.0)  # creep the last metres
        if move >= gap:
            self.d = goal
            self.speed = 0.0
            self._arrive(goal, events)
        else:
            self.d += self.direction * move

    def _next_goal(self) -> float:
        """The nearest of: the road's end, the next delivery, the next light (in driving order)."""
        light = self.next_light
        if self.direction > 0:
            goal = self.route.length
            if self.stops and self.stops[0] < goal:
                goal = self.stops[0]
            return light if light < goal else goal
        return light if light > 0.0 else 0.0

    def _arrive(self, at: float, events: list[dict[str, Any]]) -> None:
        if self.stops and at == self.stops[0]:
            self.stops.pop(0)
            pkg, cold = self.packages.pop(0)
            failed = self.rng.random() < 0.05
            events.append(self._scan("fail" if failed else "deliver", pkg, cold))
            if failed:
                self.returns.append((pkg, cold))
            if not self.stops:  # last delivery: head back to the depot
                self._turn_back(at)
            self._stop(self.rng.uniform(60.0, 240.0))
        elif at == self.next_light:
            self.next_light = at + self.direction * self.rng.uniform(300.0, 900.0)
            if self.rng.random() < 0.5:  # red light
                self._stop(self.rng.uniform(10.0, 60.0))
        elif self.direction < 0 and at <= 0.0:
            for pkg, cold in self.returns:  # failed deliveries go back to the depot
                events.append(self._scan("return", pkg, cold))
            self.returns.clear()
            self.phase = Phase.LOADING
            self.wait = self.rng.uniform(120.0, 480.0) * self.dwell_scale
            self._plan_load()
        else:  # end of the road: turn around towards the depot
            self._turn_back(at)

    def _turn_back(self, at: float) -> None:
        self.direction = -1
        self.stops.clear()
        self.next_light = at - self.rng.uniform(300.0, 900.0)

    def _stop(self, seconds: float) -> None:
        self.phase = Phase.STOPPED
        self.wait = seconds * self.dwell_scale

    def _depart(self) -> None:
        self.phase = Phase.DRIVING
        self.target = self.rng.uniform(5.0, 15.0)

    def _plan_load(self) -> None:
        """Consign 2-6 packages to this driver, and the delivery points along the road."""
        n = self.rng.randint(2, 6)
        self.to_pick = []
        for _ in range(n):
            self.pkg_counter += 1
            self.to_pick.append((f"PKG-{self.org}-{self.index * 100_000 + self.pkg_counter}", self.rng.random() < 0.7))
        self.stops = sorted(self.rng.uniform(300.0, self.route.length - 50.0) for _ in range(n))
        if self.planned is not None:
            for (pkg, cold), stop in zip(self.to_pick, self.stops, strict=True):  # delivered in this order
                lat, lon, _ = self.route.at(stop)
                self.planned.append((pkg, cold, round(lat, 6), round(lon, 6)))
        self.direction = 1
        self.next_light = self.rng.uniform(200.0, 800.0)
