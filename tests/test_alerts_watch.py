"""Time-based alerts end to end (custody/watch.py): data gaps, missed windows, temperature
durations, long stops, arrival and departure; per-org thresholds; several instances.

Each test starts a tracker whose periodic check runs every 0.2 s and sets its org's thresholds
through the API to seconds, so that what takes minutes on the road takes a second here."""

from __future__ import annotations

import contextlib
from typing import Any

from harness.clients import Dash, Phone, acked, frames_of, now_ms, pos, scan, until_frame
from harness.http import DEST, consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token
from harness.wait import eventually

from .schema_check import assert_frame_valid

FAST = {"watch_interval_s": 0.2}
FAR = {"lat": -1.2, "lon": 36.9}


def _disp(org: str) -> str:
    return token("dispatcher", "u", org)


async def _limits(inst: Instance, org: str, **values: Any) -> dict[str, Any]:
    status, out = await http(inst, "PUT", "/v1/alerts/thresholds", _disp(org), values)
    assert status == 200, out
    return out  # type: ignore[no-any-return]


async def _alerts(inst: Instance, tok: str, **query: Any) -> list[dict[str, Any]]:
    status, out = await http(inst, "GET", "/v1/alerts", tok, query=query)
    assert status == 200, out
    return out["alerts"]  # type: ignore[no-any-return]


async def test_thresholds_api(instance: Instance, org: str) -> None:
    status, out = await http(instance, "GET", "/v1/alerts/thresholds", _disp(org))
    assert status == 200 and out["overrides"] == {} and out["thresholds"] == out["defaults"]
    assert out["defaults"]["data_gap_s"] == 900.0
    out = await _limits(instance, org, data_gap_s=60, long_stop_s=600)
    assert out["thresholds"]["data_gap_s"] == 60 and out["overrides"] == {"data_gap_s": 60, "long_stop_s": 600}
    out = await _limits(instance, org, long_stop_s=None)  # back to the default
    assert out["overrides"] == {"data_gap_s": 60} and out["thresholds"]["long_stop_s"] == 1200.0
    for bad in ({"bogus_s": 1}, {"data_gap_s": 0}, {"data_gap_s": "60"}, {"stop_radius_m": True}, [1]):
        assert (await http(instance, "PUT", "/v1/alerts/thresholds", _disp(org), bad))[0] == 400
    client = token("client", "c", org, client="st-marys")
    assert (await http(instance, "GET", "/v1/alerts/thresholds", client))[0] == 403
    assert (await http(instance, "PUT", "/v1/alerts/thresholds", client, {"data_gap_s": 5}))[0] == 403
    other = (await http(instance, "GET", "/v1/alerts/thresholds", _disp(org + "-b")))[1]
    assert other["overrides"] == {}  # per org


async def test_data_gap_opens_then_data_returns(start_instance: Any, org: str) -> None:
    inst = await start_instance(**FAST)
    await _limits(inst, org, data_gap_s=1)
    await consign(inst, org, "PKG-1", "st-marys")
    disp = await Dash.connect(inst.url, _disp(org), subscribe={})
    client = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    got: list[dict[str, Any]] = []
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t0 = now_ms()
    # One batch: one commit, so the fix is stored by the time the pickup makes the driver a carrier.
    await phone.send({"type": "batch", "items": [scan(1, "PKG-1", "pickup", ts=t0 - 500), pos(2, ts=t0)]})
    await acked(phone, 1, 2)
    opened = await until_frame(disp, got, "alert", kind="data_gap", state="open")
    assert_frame_valid(opened, "alert")
    assert (opened["driver"], opened["package"], opened["details"]) == ("d-1", None, {"start": t0})
    assert now_ms() - t0 >= 1000  # the dwell: not before a second without a fix
    listed = await _alerts(inst, _disp(org), kind="data_gap", driver="d-1", state="open")
    assert [a["id"] for a in listed] == [opened["id"]] and listed[0]["details"] == {"start": t0}
    await phone.send(pos(3))  # the phone is back, with no backlog
    done = await until_frame(disp, got, "alert", id=opened["id"], state="resolved")
    assert done["resolved_by"] is None and done["resolved_reason"].startswith("automatic: data returned")
    assert done["details"]["start"] == t0 and done["details"]["duration_ms"] >= 1000
    # A package-less alert about a driver: dispatchers only.
    assert await _alerts(inst, token("client", "c", org, client="st-marys"), kind="data_gap") == []
    c_got: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            c_got += await client.live(timeout=0.3)
    assert not frames_of(c_got, "alert", kind="data_gap")


async def test_backlog_upload_resolves_as_data_recovered(start_instance: Any, org: str) -> None:
    inst = await start_instance(**FAST)
    await _limits(inst, org, data_gap_s=1.5)
    await consign(inst, org, "PKG-1", "st-marys")
    disp = await Dash.connect(inst.url, _disp(org), subscribe={})
    got: list[dict[str, Any]] = []
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t0 = now_ms()
    # One batch: one commit, so the fix is stored by the time the pickup makes the driver a carrier.
    await phone.send({"type": "batch", "items": [scan(1, "PKG-1", "pickup", ts=t0 - 500), pos(2, ts=t0)]})
    await acked(phone, 1, 2)
    opened = await until_frame(disp, got, "alert", kind="data_gap", state="open")
    # The phone was recording all along (a tunnel, no signal): its backlog fills the gap.
    end = now_ms()
    backlog = [pos(3 + i, ts=t) for i, t in enumerate(range(t0 + 400, end, 400))]
    await phone.send({"type": "batch", "items": backlog})
    done = await until_frame(disp, got, "alert", id=opened["id"], state="resolved")
    assert done["resolved_reason"].startswith("automatic: data recovered"), done
    assert done["details"]["duration_ms"] <= 400 and done["details"]["start"] >= t0
    (row,) = await _alerts(inst, _disp(org), kind="data_gap")
    assert row["state"] == "resolved" and row["resolved_reason"] == done["resolved_reason"]


async def test_delivery_window_missed_and_a_late_upload_that_explains_it(start_instance: Any, org: str) -> None:
    inst = await start_instance(**FAST)
    # Subscribed first: every alert reaches it live (one opened before a subscription is in its snapshot).
    client = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    got: list[dict[str, Any]] = []
    t0 = now_ms()
    await consign(inst, org, "PKG-1", "st-marys", window={"from": t0 - 60_000, "to": t0 + 1000})
    await consign(inst, org, "PKG-2", "st-marys", window={"from": t0 - 60_000, "to": t0 + 1000})
    await consign(inst, org, "PKG-3", "st-marys", window={"from": t0 - 60_000, "to": t0 - 30_000})
    late = await until_frame(client, got, "alert", kind="delivery_window_missed", package="PKG-3")
    assert late["driver"] is None  # nobody had picked it up
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(scan(1, "PKG-1", "pickup", ts=t0 - 5000))
    await phone.send(scan(2, "PKG-2", "pickup", ts=t0 - 5000))
    await phone.send(scan(5, "PKG-3", "pickup", ts=now_ms()))  # a holder now: still the same missed window
    await acked(phone, 1, 2, 5)
    first = await until_frame(client, got, "alert", kind="delivery_window_missed", package="PKG-1")
    await until_frame(client, got, "alert", kind="delivery_window_missed", package="PKG-2")
    assert_frame_valid(first, "alert")
    assert first["state"] == "open" and first["details"] == {"window_to": t0 + 1000} and now_ms() >= t0 + 1000
    # PKG-1 was delivered in time by a phone that was offline: its upload resolves the alert.
    await phone.send(scan(3, "PKG-1", "deliver", ts=t0 - 1000, lat=DEST["lat"], lon=DEST["lon"]))
    await until_frame(client, got, "alert", id=first["id"], state="resolved")
    # PKG-2, delivered after its window: the alert stays open.
    await phone.send(scan(4, "PKG-2", "deliver", ts=now_ms(), lat=DEST["lat"], lon=DEST["lon"]))
    await until_frame(client, got, "package", package="PKG-2", state="delivered")
    await eventually(lambda: _alerts(inst, _disp(org), kind="delivery_window_missed"), lambda a: len(a) == 3)
    states = {a["package"]: a["state"] for a in await _alerts(inst, _disp(org), kind="delivery_window_missed")}
    assert states == {"PKG-1": "resolved", "PKG-2": "open", "PKG-3": "open"}
    assert not frames_of(got, "alert", id=late["id"], state="resolved")
    mine = await _alerts(inst, token("client", "c", org, client="st-marys"), kind="delivery_window_missed")
    assert len(mine) == 3  # client admins see them


async def test_temperature_duration_rules(start_instance: Any, org: str) -> None:
    inst = await start_instance(**FAST)
    await consign(inst, org, "PKG-1", "st-marys")  # 2..8 °C
    client = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    got: list[dict[str, Any]] = []
    d1 = await Phone.connect(inst.url, token("driver", "d-1", org))
    d2 = await Phone.connect(inst.url, token("driver", "d-2", org))
    s, t = 1000, now_ms()
    await d1.send(scan(1, "PKG-1", "pickup", ts=t - 300 * s, temp_c=9.5))
    await acked(d1, 1)
    await d2.send(scan(1, "PKG-1", "handover", ts=t - 200 * s, temp_c=10.5))
    await acked(d2, 1)
    await d1.send(scan(2, "PKG-1", "handover", ts=t - 150 * s, temp_c=6.0))
    await acked(d1, 2)
    await d2.send(scan(2, "PKG-1", "handover", ts=t - 100 * s, temp_c=9.0))
    await acked(d2, 2)
    await d2.send(scan(3, "PKG-1", "deliver", ts=t - 50 * s, temp_c=5.0, lat=DEST["lat"], lon=DEST["lon"]))
    await acked(d2, 3)
    await until_frame(client, got, "package", package="PKG-1", state="delivered")
    # The thresholds come down once the journey is over (the default ones are half an hour and an hour).
    await _limits(inst, org, temp_consecutive_s=60, temp_cumulative_s=100)
    cons = await until_frame(client, got, "alert", kind="temperature_consecutive")
    cum = await until_frame(client, got, "alert", kind="temperature_cumulative")
    for frame in (cons, cum):
        assert_frame_valid(frame, "alert")
    assert (cons["driver"], cons["details"]) == (
        "d-1",
        {"start": t - 300 * s, "duration_ms": 150 * s, "min_c": 9.5, "max_c": 10.5, "ongoing": False},
    )
    assert cum["details"] == {
        "start": t - 300 * s,
        "duration_ms": 200 * s,
        "min_c": 9.0,
        "max_c": 10.5,
        "excursions": 2,
        "ongoing": False,
    }
    # The second excursion (50 s) is under the consecutive threshold: one consecutive alert only.
    listed = await _alerts(inst, _disp(org), package="PKG-1", kind="temperature_consecutive")
    assert [a["id"] for a in listed] == [cons["id"]]


async def test_long_stop_with_cold_chain_goods(start_instance: Any, org: str) -> None:
    inst = await start_instance(**FAST)
    await _limits(inst, org, long_stop_s=1, stop_radius_m=100)
    await consign(inst, org, "PKG-1", "st-marys")  # cold chain
    await consign(inst, org, "PKG-2", "st-marys", cold_chain=None)  # not cold chain
    client = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    got: list[dict[str, Any]] = []
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t = now_ms()
    await phone.send(scan(1, "PKG-1", "pickup", ts=t - 3000))
    await phone.send(scan(2, "PKG-2", "pickup", ts=t - 3000))
    await phone.send(pos(3, ts=t - 2000, **FAR))
    await phone.send(pos(4, ts=t - 1500))
    await phone.send(pos(5, ts=t - 500))
    await acked(phone, 1, 2, 3, 4, 5)
    stop = await until_frame(client, got, "alert", kind="long_stop", state="open")
    assert_frame_valid(stop, "alert")
    assert (stop["package"], stop["driver"], stop["details"]["start"]) == ("PKG-1", "d-1", t - 1500)
    assert (stop["details"]["lat"], stop["details"]["lon"]) == (-1.29207, 36.82195)
    await phone.send(pos(6, **FAR))  # on the move again
    done = await until_frame(client, got, "alert", id=stop["id"], state="resolved")
    assert done["resolved_reason"] == "automatic: the driver moved on"
    assert [a["package"] for a in await _alerts(inst, _disp(org), kind="long_stop")] == ["PKG-1"]


async def test_arrival_and_departure_recorded_on_the_package(start_instance: Any, org: str) -> None:
    inst = await start_instance(**FAST)
    await _limits(inst, org, arrival_dwell_s=2, arrival_radius_m=150)
    await consign(inst, org, "PKG-1", "st-marys", cold_chain=None)
    client = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    got: list[dict[str, Any]] = []
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t, s = now_ms(), 1000
    at = {"lat": DEST["lat"], "lon": DEST["lon"]}
    fixes = [pos(2, ts=t - 30 * s, **FAR), pos(3, ts=t - 25 * s, **at), pos(4, ts=t - 24 * s, **FAR)]  # passing by
    fixes += [pos(5, ts=t - 20 * s, **at), pos(6, ts=t - 18 * s, **at), pos(7, ts=t - 17 * s, **at)]
    await phone.send({"type": "batch", "items": [scan(1, "PKG-1", "pickup", ts=t - 40 * s), *fixes]})
    await acked(phone, *range(1, 8))
    frame = await until_frame(client, got, "package", package="PKG-1", arrived_at=t - 20 * s)
    assert frame["departed_at"] is None
    assert_frame_valid(frame, "package")
    await phone.send({"type": "batch", "items": [pos(8, ts=t - 10 * s, **FAR), pos(9, ts=t - 5 * s, **FAR)]})
    await until_frame(client, got, "package", package="PKG-1", departed_at=t - 10 * s)
    status, pkg = await http(inst, "GET", pkg_path("PKG-1"), _disp(org))
    assert status == 200 and (pkg["arrived_at"], pkg["departed_at"]) == (t - 20 * s, t - 10 * s)


async def test_two_instances_open_each_alert_once(start_instance: Any, org: str) -> None:
    a = await start_instance(watch_interval_s=0.05)
    b = await start_instance(watch_interval_s=0.05)
    await _limits(a, org, data_gap_s=1)
    await consign(a, org, "PKG-1", "st-marys")
    disp = await Dash.connect(b.url, _disp(org), subscribe={})
    got: list[dict[str, Any]] = []
    phone = await Phone.connect(a.url, token("driver", "d-1", org))
    await phone.send(scan(1, "PKG-1", "pickup", ts=now_ms() - 500))
    await acked(phone, 1)
    opened = await until_frame(disp, got, "alert", kind="data_gap")
    await phone.send(pos(2))
    await until_frame(disp, got, "alert", id=opened["id"], state="resolved")
    status, detail = await http(b, "GET", f"/v1/alerts/{opened['id']}", _disp(org))
    assert status == 200 and [h["event"] for h in detail["history"]] == ["opened", "resolved"]
    assert len(frames_of(got, "alert", id=opened["id"], state="open")) == 1


async def test_an_ongoing_excursion_is_updated_when_it_ends(start_instance: Any, org: str) -> None:
    inst = await start_instance(**FAST)
    await _limits(inst, org, temp_consecutive_s=1, temp_cumulative_s=3600)
    await consign(inst, org, "PKG-1", "st-marys")  # 2..8 °C
    client = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    got: list[dict[str, Any]] = []
    d1 = await Phone.connect(inst.url, token("driver", "d-1", org))
    d2 = await Phone.connect(inst.url, token("driver", "d-2", org))
    t = now_ms()
    await d1.send(scan(1, "PKG-1", "pickup", ts=t - 2000, temp_c=9.5))
    await acked(d1, 1)
    opened = await until_frame(client, got, "alert", kind="temperature_consecutive", state="open")
    assert opened["details"]["ongoing"] is True and opened["details"]["start"] == t - 2000
    await d2.send(scan(1, "PKG-1", "handover", ts=t - 500, temp_c=5.0))  # back within the range
    await acked(d2, 1)
    ended = await until_frame(client, got, "alert", id=opened["id"], details=_ended(t))
    assert ended["state"] == "open"  # it happened: a person resolves it
    assert_frame_valid(ended, "alert")


def _ended(t: int) -> dict[str, Any]:
    return {"start": t - 2000, "duration_ms": 1500, "min_c": 9.5, "max_c": 9.5, "ongoing": False}


async def test_bad_bodies_get_clear_answers_and_change_nothing(instance: Instance, org: str) -> None:
    """The JSON-object bodies (thresholds, webhooks): not JSON or not an object is a 400 naming
    it, above the size limit a 413; the org's thresholds are as before."""
    _, before = await http(instance, "GET", "/v1/alerts/thresholds", _disp(org))
    for method, path in (("PUT", "/v1/alerts/thresholds"), ("POST", "/v1/webhooks")):
        for body, status, says in (
            (b"{not json", 400, "the body is not JSON"),
            (b"[1, 2]", 400, "the body must be a JSON object"),
            (b'{"x": "' + b"y" * 20_000 + b'"}', 413, "the body is limited to"),
        ):
            got, out = await http(instance, method, path, _disp(org), body)
            assert got == status and says in out["error"]["message"], (path, body[:20], got, out)
    _, after = await http(instance, "GET", "/v1/alerts/thresholds", _disp(org))
    assert after == before
