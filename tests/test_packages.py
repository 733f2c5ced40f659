"""Packages over HTTP and live: consignments, scans, state changes, alerts, late scans, recovery."""

from __future__ import annotations

from typing import Any

import asyncpg

from harness.clients import Dash, Phone, acked, frames_of, now_ms, pos, scan, until_frame
from harness.http import DEST, consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token
from harness.wait import eventually

from .schema_check import assert_frame_valid


async def test_consign_list_get_and_scope(instance: Instance, org: str) -> None:
    disp = token("dispatcher", "u-1", org)
    body = {
        "id": "PKG-1",
        "client": "st-marys",
        "destination": DEST,
        "window": {"from": 1, "to": 2},
        "cold_chain": {"min_c": 2, "max_c": 8},
        "notes": "insulin, 2 boxes",
    }
    status, out = await http(instance, "POST", "/v1/packages", disp, body)
    assert status == 201, out
    assert out["package"] == "PKG-1" and out["state"] == "created" and out["driver"] is None
    assert out["client"] == "st-marys" and out["consigned"] is True and out["consigned_by"] == "u-1"
    assert out["destination"] == DEST and out["cold_chain"] == {"min_c": 2, "max_c": 8}
    assert out["window"] == {"from": 1, "to": 2} and out["notes"] == "insulin, 2 boxes"
    # The same consignment again is harmless; other terms under the same id are a conflict.
    assert (await http(instance, "POST", "/v1/packages", disp, body))[0] == 200
    status, out = await http(instance, "POST", "/v1/packages", disp, {**body, "client": "other"})
    assert (status, out["error"]["code"]) == (409, "conflict")
    for bad in (
        {**body, "id": ""},
        {**body, "client": 'a"b'},
        {**body, "destination": {"lat": 91, "lon": 0}},
        {**body, "cold_chain": {"min_c": 9, "max_c": 8}},
        {**body, "window": {"from": 5, "to": 1}},
        [1],
    ):
        status, out = await http(instance, "POST", "/v1/packages", disp, bad)
        assert (status, out["error"]["code"]) == (400, "invalid"), bad
    assert (await http(instance, "POST", "/v1/packages", disp, b"{not json"))[0] == 400
    await consign(instance, org, "PKG-2", "westside")
    await consign(instance, org, "PKG/3 x", "st-marys")
    # Roles: a driver sees nothing; no token is 401; a client only its own packages.
    driver = token("driver", "d-1", org)
    assert (await http(instance, "GET", "/v1/packages", driver))[0] == 403
    assert (await http(instance, "POST", "/v1/packages", driver, body))[0] == 403
    assert (await http(instance, "GET", "/v1/packages"))[0] == 401
    _, listed = await http(instance, "GET", "/v1/packages", disp)
    assert [p["package"] for p in listed["packages"]] == ["PKG-1", "PKG-2", "PKG/3 x"]
    _, listed = await http(instance, "GET", "/v1/packages", disp, query={"client": "westside"})
    assert [p["package"] for p in listed["packages"]] == ["PKG-2"]
    _, page = await http(instance, "GET", "/v1/packages", disp, query={"limit": 2})
    assert [p["package"] for p in page["packages"]] == ["PKG-1", "PKG-2"] and page["next"] == "PKG-2"
    _, page = await http(instance, "GET", "/v1/packages", disp, query={"limit": 2, "after": page["next"]})
    assert [p["package"] for p in page["packages"]] == ["PKG/3 x"] and page["next"] is None
    st_marys = token("client", "c-admin", org, client="st-marys")
    _, listed = await http(instance, "GET", "/v1/packages", st_marys)
    assert [p["package"] for p in listed["packages"]] == ["PKG-1", "PKG/3 x"]
    assert "consigned_by" not in listed["packages"][0]
    _, listed = await http(instance, "GET", "/v1/packages", st_marys, query={"client": "westside"})
    assert listed["packages"] == []
    status, out = await http(instance, "GET", pkg_path("PKG/3 x"), st_marys)
    assert (status, out["package"], out["custody"]) == (200, "PKG/3 x", [])
    for path in (pkg_path("PKG-2"), pkg_path("PKG-2", "/verify"), pkg_path("nope")):
        status, out = await http(instance, "GET", path, st_marys)
        assert (status, out["error"]["code"]) == (404, "not_found"), path
    # Another org's dispatcher does not see them.
    _, listed = await http(instance, "GET", "/v1/packages", token("dispatcher", "u-9", org + "-x"))
    assert listed["packages"] == []
    assert (await http(instance, "GET", pkg_path("PKG-1"), token("dispatcher", "u-9", org + "-x")))[0] == 404
    assert (await http(instance, "GET", "/v1/packages", disp, query={"state": "lost"}))[0] == 400


async def test_journey_live_frames_alerts_and_chain_of_custody(instance: Instance, org: str) -> None:
    disp_dash = await Dash.connect(instance.url, token("dispatcher", "u", org), subscribe={})
    mine = await Dash.connect(instance.url, token("client", "c", org, client="st-marys"), subscribe={})
    theirs = await Dash.connect(instance.url, token("client", "c2", org, client="westside"), subscribe={})
    await consign(instance, org, "PKG-1", "st-marys")
    d_got: list[dict[str, Any]] = []
    m_got: list[dict[str, Any]] = []
    created = await until_frame(disp_dash, d_got, "package", package="PKG-1")
    assert created == {
        "type": "package",
        "package": "PKG-1",
        "state": "created",
        "driver": None,
        "client": "st-marys",
        "ts": created["ts"],
    }
    assert_frame_valid(created, "package")
    await until_frame(mine, m_got, "package", package="PKG-1", state="created")
    phone = await Phone.connect(instance.url, token("driver", "d-1", org, name="Amina"))
    t = now_ms() - 60_000
    await phone.send(scan(1, "PKG-1", "pickup", ts=t, lat=-1.29, lon=36.82, temp_c=5.4, note="cool box"))
    picked = await until_frame(mine, m_got, "package", package="PKG-1", state="picked_up")
    assert (picked["driver"], picked["client"], picked["ts"]) == ("d-1", "st-marys", t)
    sc = frames_of(m_got, "scan")[0]
    assert sc == {
        "type": "scan",
        "driver": "d-1",
        "seq": 1,
        "ts": t,
        "package": "PKG-1",
        "event": "pickup",
        "lat": -1.29,
        "lon": 36.82,
        "temp_c": 5.4,
        "note": "cool box",
    }
    assert m_got.index(sc) < m_got.index(picked)  # the scan, then the package change
    assert_frame_valid(sc, "live-scan")
    # A temperature excursion; then a delivery 2 km from the destination, outside the range too.
    await phone.send(scan(2, "PKG-1", "handover", ts=t + 1000, temp_c=9.0))  # d-1 already holds it: anomaly
    await phone.send(pos(3, ts=t + 2000, lat=-1.28, lon=36.81))
    await phone.send(
        scan(
            4,
            "PKG-1",
            "deliver",
            ts=t + 3000,
            lat=-1.318,
            lon=36.8,
            temp_c=1.0,
            recipient="Dr. W. Kamau",
            pod="pod/PKG-1.png",
        )
    )
    delivered = await until_frame(disp_dash, d_got, "package", package="PKG-1", state="delivered")
    await until_frame(disp_dash, d_got, "alert", kind="delivery_far_from_destination")
    alerts = frames_of(d_got, "alert")
    assert sorted((a["kind"], a["state"]) for a in alerts) == [
        ("delivery_far_from_destination", "open"),
        ("scan_anomaly", "open"),
        ("temperature_excursion", "open"),
        ("temperature_excursion", "open"),
    ]
    for frame in alerts:
        assert_frame_valid(frame, "alert")
        assert frame["package"] == "PKG-1" and frame["driver"] == "d-1"
    temp = next(a for a in alerts if a["kind"] == "temperature_excursion" and "9.0" in a["message"])
    assert temp["message"] == "9.0 °C, cold-chain range 2..8 °C"
    assert delivered["ts"] == t + 3000
    # The client sees its package's alerts, except operational scan anomalies; the other client nothing.
    await until_frame(mine, m_got, "alert", kind="delivery_far_from_destination")
    assert sorted(a["kind"] for a in frames_of(m_got, "alert")) == [
        "delivery_far_from_destination",
        "temperature_excursion",
        "temperature_excursion",
    ]
    assert frames_of(m_got, "pos") and all(f["seq"] == 3 for f in frames_of(m_got, "pos"))
    # HTTP: state and the full chain of custody, phone and server time, temperatures, proof of delivery.
    status, out = await http(instance, "GET", pkg_path("PKG-1"), token("dispatcher", "u", org))
    assert status == 200
    assert (out["state"], out["driver"], out["chain_length"]) == ("delivered", "d-1", 3)
    assert [(r["index"], r["event"], r["seq"], r["ts"], r["temp_c"]) for r in out["custody"]] == [
        (1, "pickup", 1, t, 5.4),
        (2, "handover", 2, t + 1000, 9.0),
        (3, "deliver", 4, t + 3000, 1.0),
    ]
    last = out["custody"][2]
    assert (last["recipient"], last["pod"], last["lat"], last["driver"]) == (
        "Dr. W. Kamau",
        "pod/PKG-1.png",
        -1.318,
        "d-1",
    )
    assert all(r["received_at"] >= t + 60_000 - 5_000 and not r["recovered"] for r in out["custody"])
    assert len(last["alerts"]) == 2 and len(out["alerts"]) == 4
    _, seen = await http(instance, "GET", pkg_path("PKG-1"), token("client", "c", org, client="st-marys"))
    assert len(seen["alerts"]) == 3 and len(seen["custody"]) == 3
    _, verdict = await http(instance, "GET", pkg_path("PKG-1", "/verify"), token("dispatcher", "u", org))
    assert verdict == {"package": "PKG-1", "ok": True, "length": 3, "problems": [], "recovered": 0, "unchained": 0}
    # Snapshot: the package and its open alerts, in scope.
    snap = await mine.subscribe({})
    assert snap["packages"] == [
        {"package": "PKG-1", "state": "delivered", "driver": "d-1", "client": "st-marys", "ts": t + 3000}
    ]
    assert sorted(a["kind"] for a in snap["alerts"]) == [
        "delivery_far_from_destination",
        "temperature_excursion",
        "temperature_excursion",
    ]
    assert snap["drivers"] == []  # d-1 holds none of st-marys' packages any more
    snap = await theirs.subscribe({})
    assert snap == {"drivers": [], "packages": [], "alerts": []}
    snap = await disp_dash.subscribe({})
    assert len(snap["alerts"]) == 4 and [p["package"] for p in snap["packages"]] == ["PKG-1"]
    frame = {"type": "snapshot", **snap}
    assert_frame_valid(frame, "snapshot")
    assert not [f for f in theirs.frames if f["type"] not in ("welcome", "snapshot")]


async def test_late_scan_resolves_an_anomaly(instance: Instance, org: str) -> None:
    disp = await Dash.connect(instance.url, token("dispatcher", "u", org), subscribe={})
    got: list[dict[str, Any]] = []
    await consign(instance, org, "PKG-9", "st-marys")
    a = await Phone.connect(instance.url, token("driver", "d-a", org))
    b = await Phone.connect(instance.url, token("driver", "d-b", org))
    t = now_ms() - 600_000
    await a.send(scan(1, "PKG-9", "pickup", ts=t))
    await until_frame(disp, got, "package", state="picked_up", driver="d-a")
    # d-b was offline: its phone sends the newest first (the delivery), its backlog after.
    await b.send(scan(7, "PKG-9", "deliver", ts=t + 20_000))
    opened = await until_frame(disp, got, "alert", kind="scan_anomaly")
    assert (opened["state"], opened["driver"]) == ("open", "d-b")
    assert "d-a holds" in opened["message"]
    assert frames_of(got, "package", state="delivered", driver="d-b")  # a scan is a fact: delivered
    await b.send({"type": "batch", "items": [scan(6, "PKG-9", "handover", ts=t + 10_000)]})
    resolved = await until_frame(disp, got, "alert", state="resolved")
    assert resolved["id"] == opened["id"] and resolved["kind"] == "scan_anomaly"
    assert_frame_valid(resolved, "alert")
    snap = await disp.subscribe({})
    assert snap["alerts"] == []
    _, out = await http(instance, "GET", pkg_path("PKG-9"), token("dispatcher", "u", org))
    assert [(r["event"], r["driver"]) for r in out["custody"]] == [
        ("pickup", "d-a"),
        ("deliver", "d-b"),
        ("handover", "d-b"),
    ]  # in the order stored
    assert (out["state"], out["driver"]) == ("delivered", "d-b")
    assert [(x["kind"], x["state"]) for x in out["alerts"]] == [("scan_anomaly", "resolved")]


async def test_unknown_package_then_consigned(instance: Instance, org: str) -> None:
    disp = await Dash.connect(instance.url, token("dispatcher", "u", org), subscribe={})
    client = await Dash.connect(instance.url, token("client", "c", org, client="kenyatta"), subscribe={})
    got: list[dict[str, Any]] = []
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await phone.send(scan(1, "RX-1", "pickup", temp_c=30.0))
    alert = await until_frame(disp, got, "alert", kind="scan_anomaly")
    assert "never consigned" in alert["message"]
    picked = await until_frame(disp, got, "package", package="RX-1")
    assert (picked["state"], picked["client"]) == ("picked_up", None)
    assert (await http(instance, "GET", pkg_path("RX-1"), token("client", "c", org, client="kenyatta")))[0] == 404
    # Consigned afterwards: the anomaly is resolved, the cold chain applies, the client now sees it.
    await consign(instance, org, "RX-1", "kenyatta")
    await until_frame(disp, got, "alert", state="resolved")
    temp = await until_frame(disp, got, "alert", kind="temperature_excursion")
    assert temp["state"] == "open"
    c_got: list[dict[str, Any]] = []
    frame = await until_frame(client, c_got, "package", package="RX-1")
    assert (frame["state"], frame["driver"], frame["client"]) == ("picked_up", "d-1", "kenyatta")
    # ... and the driver's position, which is now within its window.
    await eventually(lambda: _stamp(instance, org, "d-1"), lambda s: s == b'["kenyatta"]')
    await phone.send(pos(2, lat=-1.2))
    assert (await until_frame(client, c_got, "pos"))["driver"] == "d-1"


async def _stamp(inst: Instance, org: str, driver: str) -> bytes:
    conn = inst.node.drivers.sessions.get((org, driver))
    return conn.stamp if conn is not None else b"?"


async def test_scans_stored_before_a_crash_are_chained_by_the_sweep(
    start_instance: Any, org: str, db: asyncpg.Connection
) -> None:
    inst: Instance = await start_instance(custody_grace_s=0.0, custody_sweep_s=3600.0)
    await consign(inst, org, "PKG-5", "st-marys")
    node = inst.node
    extension = node.extension
    extension.scans_stored = lambda stored: None  # type: ignore[method-assign]  # as if the instance died right after the commit
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t = now_ms() - 1000
    await phone.send(scan(1, "PKG-5", "pickup", ts=t))
    await phone.send(scan(2, "PKG-5", "deliver", ts=t + 1, lat=-1.3, lon=36.8))
    await acked(phone, 1, 2)
    assert await db.fetchval("SELECT count(*) FROM custody WHERE org = $1", org) == 0
    del extension.scans_stored  # the class's method again
    disp = await Dash.connect(inst.url, token("dispatcher", "u", org), subscribe={})
    await inst.server.app.state.custody._sweep()
    got: list[dict[str, Any]] = []
    await until_frame(disp, got, "package", state="delivered")
    assert [f["seq"] for f in frames_of(got, "scan")] == [1, 2]  # scans are always fanned out
    _, verdict = await http(inst, "GET", pkg_path("PKG-5", "/verify"), token("dispatcher", "u", org))
    assert (verdict["ok"], verdict["length"], verdict["recovered"]) == (True, 2, 2)


async def test_delivery_distance_and_custody_key_are_settings(start_instance: Any, org: str) -> None:
    from tracker.config import Settings

    env = Settings.from_env({"TRACKER_DELIVERY_MAX_M": "5000", "TRACKER_CUSTODY_KEY": "k" * 40})
    assert (env.delivery_max_m, env.custody_key) == (5000.0, "k" * 40)
    inst: Instance = await start_instance(delivery_max_m=5000.0, custody_key="key-one-" + "x" * 32)
    disp = await Dash.connect(inst.url, token("dispatcher", "u", org), subscribe={})
    await consign(inst, org, "PKG-1", "st-marys")
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(scan(1, "PKG-1", "pickup"))
    await phone.send(scan(2, "PKG-1", "deliver", lat=-1.318, lon=36.8))  # 2 km away: within 5 km
    got: list[dict[str, Any]] = []
    await until_frame(disp, got, "package", state="delivered")
    assert frames_of(got, "alert") == []
    _, out = await http(inst, "GET", pkg_path("PKG-1"), token("dispatcher", "u", org))
    assert (out["state"], out["alerts"]) == ("delivered", [])
    _, verdict = await http(inst, "GET", pkg_path("PKG-1", "/verify"), token("dispatcher", "u", org))
    assert verdict["ok"] is True
    # The key lives outside the database: an instance with another key cannot vouch for the chain.
    other: Instance = await start_instance(custody_key="key-two-" + "x" * 32)
    _, verdict = await http(other, "GET", pkg_path("PKG-1", "/verify"), token("dispatcher", "u", org))
    assert verdict["ok"] is False and verdict["length"] == 2
