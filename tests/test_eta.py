"""ETA of packages in transit (tracker/eta; PROTOCOL.md "ETA").

The model is pure: its tests need no loop. End to end, a driver holding two packages drives
towards them; GET /v1/packages and /v1/packages/{id} give each an ETA from its straight-line
distance, the road factor (per org), the driver's moving speed and the stops before it, and none
before the pickup or after the delivery.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from harness.clients import Phone, acked, now_ms, pos, scan
from harness.http import consign, http, pkg_path
from harness.tokens import token
from tracker.config import ConfigError, Settings
from tracker.eta.model import Fix, Params, Query, Stop, distance_m, moving_speed, straight_line

P = Params()
M_PER_DEG = 111_195.0  # metres per degree of latitude (EARTH_RADIUS_M * pi / 180)


def line(speeds: list[float | None], *, step_s: int = 10, t0: int = 0) -> list[Fix]:
    """Fixes northwards along a meridian, `step_s` apart, moving at the given speeds (m/s)."""
    out, lat = [], 0.0
    for i, spd in enumerate(speeds):
        out.append(Fix(t0 + i * step_s * 1000, lat, 0.0, spd))
        lat += (spd or 0.0) * step_s / M_PER_DEG
    return out


def test_moving_speed_is_the_reported_speed_of_a_steady_driver() -> None:
    assert moving_speed(line([10.0] * 30), P) == pytest.approx(10.0)


def test_moving_speed_from_positions_when_the_phone_reports_none() -> None:
    fixes = [Fix(i * 10_000, i * 100 / M_PER_DEG, 0.0, None) for i in range(20)]  # 100 m every 10 s
    assert moving_speed(fixes, P) == pytest.approx(10.0, rel=0.01)


def test_stops_do_not_count_and_the_floor_holds() -> None:
    # Moving at 12 m/s, then stopped for 20 minutes (a delivery, traffic): the moving speed stays.
    fixes = line([12.0] * 30 + [0.0] * 120)
    assert moving_speed(fixes, P) == pytest.approx(12.0)
    assert moving_speed(line([0.0] * 50), P) == P.default_mps  # never moved: the default
    assert moving_speed(line([1.1] * 50), P) == P.floor_mps  # creeping: the floor
    assert moving_speed([], P) == P.default_mps


def test_recent_speed_weighs_more() -> None:
    fixes = line([5.0] * 60 + [15.0] * 60)  # 10 minutes at 5 m/s, then 10 at 15
    speed = moving_speed(fixes, P)
    assert 10.0 < speed < 15.0
    assert moving_speed(fixes, Params(half_life_s=30.0)) > speed  # a shorter memory: nearer 15


def test_straight_line_times_the_road_factor_plus_stops_nearest_first() -> None:
    near, far = Stop("near", 0.01, 0.0), Stop("far", 0.03, 0.0)
    q = Query("o", 1_000_000, 999_000, (0.0, 0.0), 10.0, (far, near), P)
    got = {e.package: e for e in straight_line(q)}
    d_near, d_far = distance_m((0, 0), (0.01, 0)), distance_m((0, 0), (0.03, 0))
    assert got["near"].stops_before == 0 and got["far"].stops_before == 1
    assert got["near"].ts == 1_000_000 + round(d_near * P.road_factor / 10.0 * 1000)
    assert got["far"].ts == 1_000_000 + round((d_far * P.road_factor / 10.0 + P.stop_s) * 1000)
    assert math.isclose(got["far"].distance_m, d_far)
    slow = {e.package: e for e in straight_line(Query("o", 0, 0, (0.0, 0.0), 0.0, (near,), P))}
    assert slow["near"].speed_mps == P.floor_mps  # a stopped driver is never infinitely late


def test_road_factors_per_org_are_checked() -> None:
    s = Settings(eta_road_factors=("acme=1.6", "b=c=1.2"))
    assert s.eta_road_factor_orgs() == [("acme", 1.6), ("b=c", 1.2)]
    for bad in (("acme",), ("acme=x",), ("acme=0.5",), ("=1.2",)):
        with pytest.raises(ConfigError):
            Settings(eta_road_factors=bad).check()


async def test_packages_in_transit_have_an_eta(start_instance: Any, org: str) -> None:
    inst = await start_instance(eta_road_factors=(f"{org}=1.5",))
    disp = token("dispatcher", "disp", org)
    lat0, lon0 = -1.30, 36.80
    near = {"name": "Clinic A", "lat": lat0 + 0.02, "lon": lon0}  # ~2.2 km north
    far = {"name": "Clinic B", "lat": lat0 + 0.05, "lon": lon0}  # ~5.6 km north
    await consign(inst, org, "P-NEAR", "c1", destination=near)
    await consign(inst, org, "P-FAR", "c1", destination=far)
    await consign(inst, org, "P-WAIT", "c1", destination=near)
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t0 = now_ms() - 300_000
    await phone.send(scan(1, "P-NEAR", ts=t0))
    await phone.send(scan(2, "P-FAR", ts=t0 + 1000))
    seq, lat = 2, lat0 - 0.03
    for i in range(30):  # 10 m/s northwards, a position every 10 s, ending at (lat0, lon0)
        seq += 1
        lat = lat0 - (29 - i) * 100 / M_PER_DEG
        await phone.send(pos(seq, ts=t0 + 2000 + i * 10_000, lat=lat, lon=lon0, spd=10.0))
    await acked(phone, *range(1, seq + 1))

    async def etas() -> dict[str, Any]:
        _, listed = await http(inst, "GET", "/v1/packages", disp)
        return {p["package"]: p for p in listed["packages"]}

    from harness.wait import eventually

    listed = await eventually(etas, lambda got: got["P-FAR"]["state"] == "picked_up" and got["P-NEAR"]["eta"])
    before = now_ms()
    status, one = await http(inst, "GET", pkg_path("P-NEAR"), disp)
    assert status == 200
    assert listed["P-WAIT"]["eta"] is None  # not picked up: no ETA
    for name, dest, stops in (("P-NEAR", near, 0), ("P-FAR", far, 1)):
        eta = listed[name]["eta"]
        dist = distance_m((lat, lon0), (dest["lat"], dest["lon"]))
        assert eta["stops_before"] == stops and eta["method"] == "straight_line"
        assert eta["speed_mps"] == pytest.approx(10.0, abs=0.1)
        assert eta["distance_m"] == pytest.approx(dist, abs=1)
        assert eta["position_ts"] == t0 + 2000 + 29 * 10_000
        expected = dist * 1.5 / 10.0 + stops * P.stop_s  # the org's road factor, 1.5
        assert before - 5_000 <= eta["ts"] - expected * 1000 <= now_ms() + 5_000
    assert one["eta"]["stops_before"] == 0 and one["eta"]["distance_m"] == listed["P-NEAR"]["eta"]["distance_m"]
    client = token("client", "adm", org, client="c1")
    _, seen = await http(inst, "GET", pkg_path("P-FAR"), client)
    assert seen["eta"]["stops_before"] == 1  # the client admin sees it too

    await phone.send(scan(seq + 1, "P-NEAR", "deliver", recipient="Dr K"))
    await acked(phone, seq + 1)
    after = await eventually(etas, lambda got: got["P-NEAR"]["state"] == "delivered")
    assert after["P-NEAR"]["eta"] is None  # delivered: no ETA
    assert after["P-FAR"]["eta"]["stops_before"] == 0  # one stop fewer before it
