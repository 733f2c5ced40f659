"""Realistic movement and package scans for simulated drivers.

Pure and deterministic: a :class:`DriverModel` is advanced in simulated seconds and
returns event bodies (without ``seq`` and ``ts``, which the phone adds). For a given
seed and driver index the sequence of bodies is always the same, whatever the wall
clock does.

The roads are hand-drawn polylines that follow real arterial roads of five African
cities closely enough for a map (a few tens of metres), not surveyed geometry.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass
from enum import Enum
from typing import Any

EARTH_RADIUS_M = 6_371_008.8
Point = tuple[float, float]  # (lat, lon)


@dataclass(frozen=True, slots=True)
class City:
    name: str
    alt_m: float
    roads: dict[str, tuple[Point, ...]]


CITIES: tuple[City, ...] = (
    City(
        "Nairobi",
        1661,
        {
            "Uhuru Highway - Mombasa Road": (
                (-1.27075, 36.81062),
                (-1.27522, 36.81355),
                (-1.27905, 36.81611),
                (-1.28396, 36.81720),
                (-1.28822, 36.81803),
                (-1.29228, 36.81916),
                (-1.29652, 36.82066),
                (-1.30024, 36.82307),
                (-1.30391, 36.82612),
                (-1.30752, 36.83013),
                (-1.31130, 36.83541),
                (-1.31528, 36.84095),
                (-1.31904, 36.84733),
                (-1.32288, 36.85352),
                (-1.32649, 36.86007),
                (-1.33011, 36.86742),
                (-1.33408, 36.87538),
            ),
            "Thika Road": (
                (-1.27622, 36.82465),
                (-1.27131, 36.83087),
                (-1.26627, 36.83719),
                (-1.26125, 36.84201),
                (-1.25608, 36.84805),
                (-1.25154, 36.85318),
                (-1.24672, 36.85906),
                (-1.24118, 36.86491),
                (-1.23587, 36.87058),
                (-1.23024, 36.87617),
                (-1.22466, 36.88184),
                (-1.21905, 36.88766),
                (-1.21380, 36.89414),
                (-1.20873, 36.90079),
                (-1.20347, 36.90836),
            ),
            "Ngong Road": (
                (-1.29345, 36.81489),
                (-1.29643, 36.80957),
                (-1.29861, 36.80374),
                (-1.29994, 36.79741),
                (-1.30049, 36.79053),
                (-1.30081, 36.78314),
                (-1.30143, 36.77621),
                (-1.30322, 36.76918),
                (-1.30611, 36.76211),
                (-1.30954, 36.75507),
                (-1.31368, 36.74803),
                (-1.31786, 36.74117),
                (-1.32249, 36.73385),
                (-1.32753, 36.72678),
                (-1.33212, 36.71918),
            ),
            "Waiyaki Way": (
                (-1.27203, 36.81015),
                (-1.26857, 36.80567),
                (-1.26539, 36.80122),
                (-1.26318, 36.79491),
                (-1.26141, 36.78844),
                (-1.25968, 36.78192),
                (-1.25797, 36.77511),
                (-1.25655, 36.76827),
                (-1.25521, 36.76136),
                (-1.25386, 36.75427),
                (-1.25236, 36.74712),
            ),
        },
    ),
    City(
        "Lagos",
        38,
        {
            "Third Mainland Bridge": (
                (6.54811, 3.39022),
                (6.54102, 3.39477),
                (6.53288, 3.39851),
                (6.52402, 3.40132),
                (6.51455, 3.40297),
                (6.50511, 3.40341),
                (6.49602, 3.40218),
                (6.48761, 3.39992),
                (6.47988, 3.39731),
                (6.47252, 3.39488),
                (6.46588, 3.39232),
                (6.46011, 3.39002),
            ),
            "Ikorodu Road": (
                (6.52768, 3.36890),
                (6.53345, 3.36961),
                (6.53951, 3.37034),
                (6.54603, 3.37131),
                (6.55218, 3.37248),
                (6.55846, 3.37394),
                (6.56455, 3.37552),
                (6.57072, 3.37733),
                (6.57688, 3.37942),
                (6.58283, 3.38190),
                (6.58892, 3.38477),
                (6.59503, 3.38804),
            ),
            "Lekki-Epe Expressway": (
                (6.43251, 3.43059),
                (6.43581, 3.44032),
                (6.43884, 3.45008),
                (6.44163, 3.46021),
                (6.44372, 3.47055),
                (6.44504, 3.48117),
                (6.44551, 3.49183),
                (6.44567, 3.50262),
                (6.44623, 3.51351),
                (6.44781, 3.52437),
                (6.45044, 3.53486),
                (6.45402, 3.54495),
                (6.45841, 3.55468),
                (6.46335, 3.56384),
                (6.46852, 3.57195),
            ),
            "Apapa-Oshodi Expressway": (
                (6.44962, 3.36049),
                (6.45731, 3.35333),
                (6.46584, 3.34593),
                (6.47488, 3.33943),
                (6.48436, 3.33392),
                (6.49412, 3.32920),
                (6.50403, 3.32462),
                (6.51377, 3.32137),
                (6.52344, 3.32036),
                (6.53206, 3.32413),
                (6.54002, 3.33012),
                (6.54764, 3.33697),
                (6.55303, 3.34318),
            ),
        },
    ),
    City(
        "Johannesburg",
        1753,
        {
            "Jan Smuts Avenue": (
                (-26.19253, 28.03397),
                (-26.18702, 28.03281),
                (-26.18047, 28.03166),
                (-26.17403, 28.03049),
                (-26.16751, 28.02957),
                (-26.16092, 28.02832),
                (-26.15421, 28.02705),
                (-26.14766, 28.02598),
                (-26.14089, 28.02521),
                (-26.13402, 28.02497),
                (-26.12711, 28.02486),
                (-26.12035, 28.02393),
                (-26.11352, 28.02254),
                (-26.10666, 28.02039),
                (-26.09995, 28.01738),
            ),
            "Oxford Road - Rivonia Road": (
                (-26.18013, 28.04311),
                (-26.17325, 28.04417),
                (-26.16601, 28.04496),
                (-26.15879, 28.04475),
                (-26.15165, 28.04338),
                (-26.14528, 28.04177),
                (-26.13856, 28.04263),
                (-26.13155, 28.04462),
                (-26.12464, 28.04731),
                (-26.11783, 28.05028),
                (-26.11062, 28.05339),
                (-26.10326, 28.05598),
                (-26.09534, 28.05774),
                (-26.08713, 28.05888),
                (-26.07885, 28.05961),
                (-26.07051, 28.05983),
            ),
            "Louis Botha Avenue": (
                (-26.18795, 28.05996),
                (-26.18136, 28.06301),
                (-26.17459, 28.06609),
                (-26.16788, 28.06922),
                (-26.16124, 28.07247),
                (-26.15461, 28.07588),
                (-26.14809, 28.07935),
                (-26.14162, 28.08298),
                (-26.13519, 28.08663),
                (-26.12871, 28.09032),
                (-26.12219, 28.09402),
                (-26.11573, 28.09781),
            ),
        },
    ),
    City(
        "Kampala",
        1190,
        {
            "Jinja Road": (
                (0.31341, 32.58622),
                (0.31462, 32.59187),
                (0.31604, 32.59795),
                (0.31928, 32.60431),
                (0.32366, 32.61077),
                (0.32738, 32.61768),
                (0.33011, 32.62512),
                (0.33271, 32.63283),
                (0.33566, 32.64035),
                (0.33941, 32.64766),
                (0.34388, 32.65462),
                (0.34807, 32.66188),
                (0.35167, 32.66957),
                (0.35469, 32.67762),
                (0.35721, 32.68589),
            ),
            "Entebbe Road": (
                (0.30982, 32.58021),
                (0.30442, 32.58086),
                (0.29839, 32.58157),
                (0.29201, 32.58224),
                (0.28557, 32.58241),
                (0.27911, 32.58152),
                (0.27288, 32.57942),
                (0.26674, 32.57681),
                (0.26059, 32.57406),
                (0.25434, 32.57145),
                (0.24797, 32.56903),
                (0.24152, 32.56672),
                (0.23501, 32.56448),
                (0.22849, 32.56217),
                (0.22193, 32.55974),
            ),
            "Bombo Road": (
                (0.31862, 32.57716),
                (0.32409, 32.57671),
                (0.32978, 32.57585),
                (0.33539, 32.57463),
                (0.34094, 32.57328),
                (0.34655, 32.57202),
                (0.35227, 32.57101),
                (0.35794, 32.57022),
                (0.36367, 32.56951),
                (0.36939, 32.56872),
                (0.37504, 32.56781),
            ),
        },
    ),
    City(
        "Accra",
        61,
        {
            "Liberation Road": (
                (5.55912, -0.19803),
                (5.56418, -0.19375),
                (5.56947, -0.18941),
                (5.57493, -0.18527),
                (5.58059, -0.18189),
                (5.58624, -0.17935),
                (5.59202, -0.17741),
                (5.59788, -0.17611),
                (5.60362, -0.17524),
                (5.60942, -0.17451),
            ),
            "Ring Road": (
                (5.57084, -0.21712),
                (5.56816, -0.21073),
                (5.56578, -0.20403),
                (5.56395, -0.19716),
                (5.56284, -0.19012),
                (5.56196, -0.18309),
                (5.56021, -0.17625),
                (5.55734, -0.16979),
                (5.55389, -0.16363),
                (5.55046, -0.15761),
            ),
            "N1 George Bush Highway": (
                (5.59641, -0.25102),
                (5.60212, -0.24485),
                (5.60781, -0.23857),
                (5.61344, -0.23201),
                (5.61862, -0.22503),
                (5.62303, -0.21761),
                (5.62651, -0.20968),
                (5.62883, -0.20134),
                (5.62963, -0.19271),
                (5.62881, -0.18414),
                (5.62617, -0.17597),
                (5.62213, -0.16861),
            ),
            "Spintex Road": (
                (5.62358, -0.16742),
                (5.62512, -0.15916),
                (5.62704, -0.15087),
                (5.62921, -0.14271),
                (5.63158, -0.13459),
                (5.63402, -0.12643),
                (5.63639, -0.11819),
                (5.63851, -0.10987),
                (5.64043, -0.10148),
                (5.64221, -0.09302),
                (5.64388, -0.08453),
            ),
        },
    ),
)


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

FIRST = ("Amina", "Kwame", "Wanjiru", "Chinedu", "Thabo", "Nakato", "Kofi", "Achieng", "Tunde", "Lerato",
         "Musa", "Abena", "Otieno", "Ngozi", "Sipho", "Aisha", "Kato", "Efua", "Baraka", "Zanele")  # fmt: skip
LAST = ("Njoroge", "Mensah", "Okafor", "Dlamini", "Nansubuga", "Owusu", "Odhiambo", "Adeyemi", "Nkosi",
        "Mugisha", "Boateng", "Kamau", "Balogun", "Mokoena", "Ssempala", "Asante")  # fmt: skip
FAIL_NOTES = ("recipient absent", "clinic closed", "address not found", "refused: cold chain broken")


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
