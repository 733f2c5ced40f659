"""Pure tests of the simulator's movement and scans: no network, no event loop, no sleeps."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from tracker.sim.driver import DriverModel, driver_name
from tracker.sim.faults import FaultPlan
from tracker.sim.routes import CITIES, ROUTES, Route, bearing_deg, distance_m

REQUIRED_CITIES = {"Nairobi", "Lagos", "Johannesburg", "Kampala", "Accra"}
CITY_CENTRES = {  # (lat, lon) of each city centre, roads must stay within 30 km of it
    "Nairobi": (-1.2864, 36.8172),
    "Lagos": (6.5244, 3.3792),
    "Johannesburg": (-26.2041, 28.0473),
    "Kampala": (0.3476, 32.5825),
    "Accra": (5.6037, -0.1870),
}


def run(model: DriverModel, steps: int, dt: float = 1.0) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    for _ in range(steps):
        events.extend(model.step(dt))
    return events


def test_every_required_city_has_several_roads_near_its_centre() -> None:
    assert {c.name for c in CITIES} >= REQUIRED_CITIES
    for city in CITIES:
        assert len(city.roads) >= 3, city.name
        for name, points in city.roads.items():
            assert 10 <= len(points) <= 30, name
            for p in points:
                assert distance_m(p, CITY_CENTRES[city.name]) < 30_000, (city.name, name, p)
            for a, b in itertools.pairwise(points):
                assert 100 < distance_m(a, b) < 2_500, (name, a, b)  # no typo'd vertex far away


def test_distance_and_bearing_known_values() -> None:
    # One degree of longitude at the equator, and one of latitude.
    assert distance_m((0.0, 0.0), (0.0, 1.0)) == pytest.approx(111_195, rel=1e-3)
    assert distance_m((0.0, 0.0), (1.0, 0.0)) == pytest.approx(111_195, rel=1e-3)
    assert bearing_deg((0.0, 0.0), (1.0, 0.0)) == pytest.approx(0.0)
    assert bearing_deg((0.0, 0.0), (0.0, 1.0)) == pytest.approx(90.0)
    assert bearing_deg((0.0, 0.0), (-1.0, 0.0)) == pytest.approx(180.0)
    assert bearing_deg((0.0, 0.0), (0.0, -1.0)) == pytest.approx(270.0)


def test_route_interpolates_linearly_and_clamps() -> None:
    route = Route("test", ((0.0, 0.0), (0.0, 0.01), (0.01, 0.01)))
    half = route.cum[1] / 2
    lat, lon, hdg = route.at(half)
    assert lat == pytest.approx(0.0) and lon == pytest.approx(0.005)
    assert hdg == pytest.approx(90.0)
    assert route.at(-5.0)[:2] == (0.0, 0.0)
    assert route.at(route.length + 100)[:2] == pytest.approx((0.01, 0.01))
    lat, lon, hdg = route.at(route.cum[1] + 1.0)  # just into the second (northbound) segment
    assert hdg == pytest.approx(0.0, abs=1e-6) and lon == pytest.approx(0.01)
    with pytest.raises(ValueError):
        Route("bad", ((0.0, 0.0),))


def test_same_seed_same_events_other_seed_other_events() -> None:
    a = run(DriverModel(7, org="acme", seed=42, dwell_scale=0.1), 600)
    b = run(DriverModel(7, org="acme", seed=42, dwell_scale=0.1), 600)
    c = run(DriverModel(7, org="acme", seed=43, dwell_scale=0.1), 600)
    assert a == b
    assert a != c
    assert driver_name(7, 42) == driver_name(7, 42)


def test_positions_are_valid_and_stay_near_the_road() -> None:
    model = DriverModel(3, org="acme", seed=1, dwell_scale=0.1)
    route = model.route
    for event in run(model, 1500, dt=0.5):
        if event["type"] != "pos":
            continue
        lat, lon = float(event["lat"]), float(event["lon"])  # type: ignore[arg-type]
        assert -90 <= lat <= 90 and -180 <= lon <= 180
        assert 0 < float(event["acc"]) <= 25  # type: ignore[arg-type]
        assert 0 <= float(event["spd"]) < 20  # type: ignore[arg-type]
        assert 0 <= int(event["hdg"]) < 360  # type: ignore[call-overload]
        assert 0 < float(event["bat"]) <= 1  # type: ignore[arg-type]
        nearest = min(distance_m((lat, lon), route.at(d)[:2]) for d in range(0, int(route.length) + 1, 25))
        assert nearest < 120  # GPS noise of a few metres (acc <= 25 m), plus the sampling step


def test_speeds_are_urban_and_the_driver_stops() -> None:
    model = DriverModel(0, org="acme", seed=5, dwell_scale=0.2)
    speeds = []
    for _ in range(3000):
        model.step(1.0)
        speeds.append(model.speed)
    assert max(speeds) <= 15.0 + 1e-9
    moving = [s for s in speeds if s > 0.5]
    assert 5.0 <= sum(moving) / len(moving) <= 15.0
    assert sum(1 for s in speeds if s == 0.0) > 30  # lights, deliveries, loading


def test_battery_drains_slowly() -> None:
    model = DriverModel(1, org="acme", seed=9)
    start = model.bat
    run(model, 3600)
    assert start - 0.3 < model.bat < start  # under 30 % in an hour of driving


def test_scans_pick_up_then_deliver_each_package_once() -> None:
    model = DriverModel(11, org="acme", seed=3, dwell_scale=0.05)
    scans = [e for e in run(model, 8000) if e["type"] == "scan"]
    picked = [e["package"] for e in scans if e["event"] == "pickup"]
    done = [e for e in scans if e["event"] in ("deliver", "fail")]
    assert len(picked) >= 4 and len(done) >= 2
    assert len(set(picked)) == len(picked)
    for e in scans:
        assert str(e["package"]).startswith("PKG-acme-")
        if e["event"] == "deliver":
            assert e["recipient"] and str(e["pod"]).startswith("pod-")
        if "temp_c" in e:
            assert 0.0 < float(e["temp_c"]) < 10.0  # type: ignore[arg-type]
    for e in done:  # delivered only what was picked up, before
        assert e["package"] in picked
    returned = [e["package"] for e in scans if e["event"] == "return"]
    failed = [e["package"] for e in scans if e["event"] == "fail"]
    assert set(returned) <= set(failed)


def test_some_deliveries_fail_across_a_fleet() -> None:
    events = []
    for i in range(40):
        events += run(DriverModel(i, org="o", seed=8, dwell_scale=0.05), 3000)
    kinds = [e["event"] for e in events if e["type"] == "scan"]
    assert kinds.count("fail") >= 1
    assert kinds.count("deliver") > 10 * kinds.count("fail")


def test_fleet_spreads_over_every_route() -> None:
    routes = {DriverModel(i, org="o", seed=1).route.name for i in range(len(ROUTES))}
    assert len(routes) == len(ROUTES)


def test_fault_plan_is_deterministic_bounded_and_scaled() -> None:
    plan = FaultPlan(random.Random(1), 600.0)
    again = FaultPlan(random.Random(1), 600.0)
    assert plan.faults == again.faults and plan.faults
    for f in plan.faults:
        assert 0 <= f.at < 600.0 and f.kind in ("drop", "offline", "slow")
        if f.kind == "offline":
            assert 1.0 <= f.length <= 180.0 and f.at + f.length <= 600.0
    short = FaultPlan(random.Random(1), 60.0)
    longest = max((f.length for f in short.faults if f.kind == "offline"), default=0.0)
    assert longest <= 18.0 + 1e-9  # scaled down ten times for a 60 s run
    starts = [f.at for f in plan.faults]
    assert starts == sorted(starts)
    assert not math.isnan(sum(starts))
