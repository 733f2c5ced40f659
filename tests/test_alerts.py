"""The alert workflow over HTTP and live: list, acknowledge, resolve, history, scope, frames."""

from __future__ import annotations

import asyncio
from typing import Any

from harness.clients import Dash, Phone, frames_of, now_ms, scan, until_frame
from harness.http import consign, http
from harness.instances import Instance
from harness.tokens import token

from .schema_check import assert_frame_valid

AUTO = "automatic: the anomaly no longer holds"


def _disp(org: str, sub: str = "u") -> str:
    return token("dispatcher", sub, org)


async def _alerts(inst: Instance, tok: str, **query: Any) -> tuple[int, Any]:
    return await http(inst, "GET", "/v1/alerts", tok, query=query)


async def _post(inst: Instance, tok: str, alert: str, action: str, body: Any = None) -> tuple[int, Any]:
    return await http(inst, "POST", f"/v1/alerts/{alert}/{action}", tok, body)


async def _excursion_and_anomaly(inst: Instance, org: str, disp: Dash, got: list[dict[str, Any]]) -> tuple[str, str]:
    """A temperature excursion on st-marys' PKG-1 and a scan anomaly on it: (excursion id, anomaly id)."""
    await consign(inst, org, "PKG-1", "st-marys")
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t = now_ms() - 60_000
    await phone.send(scan(1, "PKG-1", "pickup", ts=t, temp_c=9.5))
    await phone.send(scan(2, "PKG-1", "pickup", ts=t + 1000))  # d-1 holds it already: a scan anomaly
    temp = await until_frame(disp, got, "alert", kind="temperature_excursion")
    anomaly = await until_frame(disp, got, "alert", kind="scan_anomaly")
    return temp["id"], anomaly["id"]


async def test_list_filters_and_paging(instance: Instance, org: str) -> None:
    disp = await Dash.connect(instance.url, _disp(org), subscribe={})
    got: list[dict[str, Any]] = []
    temp, anomaly = await _excursion_and_anomaly(instance, org, disp, got)
    phone = await Phone.connect(instance.url, token("driver", "d-2", org))
    await phone.send(scan(1, "PKG-2", "deliver"))  # never consigned, never picked up
    third = (await until_frame(disp, got, "alert", package="PKG-2"))["id"]
    status, out = await _alerts(instance, _disp(org))
    assert status == 200 and out["next"] is None
    assert sorted(a["id"] for a in out["alerts"]) == sorted([temp, anomaly, third])
    assert [a["id"] for a in out["alerts"]] == sorted(a["id"] for a in out["alerts"])  # by id
    first = next(a for a in out["alerts"] if a["id"] == temp)
    assert first["state"] == "open" and first["acknowledged_by"] is None and first["resolved_by"] is None
    assert (first["kind"], first["package"], first["driver"]) == ("temperature_excursion", "PKG-1", "d-1")
    # Paging: `after` the last id, `next` until the end.
    seen, after = [], None
    while True:
        status, page = await _alerts(instance, _disp(org), limit=1, after=after)
        assert status == 200 and len(page["alerts"]) <= 1
        seen += [a["id"] for a in page["alerts"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == [a["id"] for a in out["alerts"]]
    # Filters.
    assert [a["id"] for a in (await _alerts(instance, _disp(org), kind="temperature_excursion"))[1]["alerts"]] == [temp]
    assert [a["id"] for a in (await _alerts(instance, _disp(org), package="PKG-2"))[1]["alerts"]] == [third]
    by_d1 = (await _alerts(instance, _disp(org), driver="d-1"))[1]["alerts"]
    assert sorted(a["id"] for a in by_d1) == sorted([temp, anomaly])
    assert (await _alerts(instance, _disp(org), state="resolved"))[1]["alerts"] == []
    assert (await _alerts(instance, _disp(org), state="bogus"))[0] == 400
    assert (await _post(instance, _disp(org), temp, "ack"))[0] == 200
    acked = (await _alerts(instance, _disp(org), state="acknowledged"))[1]["alerts"]
    assert [a["id"] for a in acked] == [temp]
    unacked = (await _alerts(instance, _disp(org), state="unacknowledged"))[1]["alerts"]
    assert sorted(a["id"] for a in unacked) == sorted([anomaly, third])
    assert len((await _alerts(instance, _disp(org), state="open"))[1]["alerts"]) == 3
    # A client admin: its packages' alerts, not scan anomalies; another client's: none.
    mine = (await _alerts(instance, token("client", "c", org, client="st-marys")))[1]["alerts"]
    assert [a["id"] for a in mine] == [temp]
    assert (await _alerts(instance, token("client", "c", org, client="westside")))[1]["alerts"] == []
    assert (await _alerts(instance, token("driver", "d-1", org)))[0] == 403


async def test_ack_then_resolve_with_history_and_live_frames(instance: Instance, org: str) -> None:
    disp = await Dash.connect(instance.url, _disp(org), subscribe={})
    client = await Dash.connect(instance.url, token("client", "c", org, client="st-marys"), subscribe={})
    got: list[dict[str, Any]] = []
    c_got: list[dict[str, Any]] = []
    temp, anomaly = await _excursion_and_anomaly(instance, org, disp, got)
    await until_frame(client, c_got, "alert", id=temp, state="open")
    # The scan anomaly's acknowledgement reaches the dispatcher only.
    status, out = await _post(instance, _disp(org), anomaly, "ack", {"comment": "checking with d-1"})
    assert status == 200 and (out["acknowledged_by"], out["ack_comment"]) == ("u", "checking with d-1")
    frame = await until_frame(disp, got, "alert", id=anomaly, acknowledged_by="u")
    assert frame["state"] == "open" and frame["acknowledged_at"] == out["acknowledged_at"]
    assert_frame_valid(frame, "alert")
    # The excursion: acknowledged (no comment), live to the dispatcher and the package's client.
    status, out = await _post(instance, _disp(org), temp, "ack")
    assert status == 200 and out["state"] == "open" and out["acknowledged_by"] == "u"
    for dash, frames in ((disp, got), (client, c_got)):
        frame = await until_frame(dash, frames, "alert", id=temp, acknowledged_by="u")
        assert (frame["state"], frame["acknowledged_at"]) == ("open", out["acknowledged_at"])
        assert_frame_valid(frame, "alert")
    assert not frames_of(c_got, "alert", id=anomaly)  # published before the excursion's: never to the client
    # Acknowledging again: the same person, 200 and unchanged; another dispatcher, 409.
    again = await _post(instance, _disp(org), temp, "ack", {"comment": "again"})
    assert again == (200, out)
    assert (await _post(instance, _disp(org, "v"), temp, "ack"))[0] == 409
    # Resolved by a person, with a reason.
    assert (await _post(instance, _disp(org), temp, "resolve", {}))[0] == 400
    status, res = await _post(instance, _disp(org), temp, "resolve", {"reason": "probe faulty; goods checked"})
    assert status == 200
    reason = "probe faulty; goods checked"
    assert (res["state"], res["resolved_by"], res["resolved_reason"]) == ("resolved", "u", reason)
    assert res["acknowledged_by"] == "u"
    for dash, frames in ((disp, got), (client, c_got)):
        frame = await until_frame(dash, frames, "alert", id=temp, state="resolved")
        assert (frame["resolved_by"], frame["resolved_reason"]) == ("u", "probe faulty; goods checked")
        assert frame["acknowledged_by"] == "u"
        assert_frame_valid(frame, "alert")
    assert [(h["event"], h["actor"], h["note"]) for h in res["history"]] == [
        ("opened", None, None),
        ("acknowledged", "u", None),
        ("resolved", "u", "probe faulty; goods checked"),
    ]
    # Once resolved: no second resolution, no acknowledgement.
    assert (await _post(instance, _disp(org), temp, "resolve", {"reason": "x"}))[0] == 409
    assert (await _post(instance, _disp(org, "v"), temp, "ack"))[0] == 409
    status, detail = await http(instance, "GET", f"/v1/alerts/{temp}", _disp(org))
    assert (status, detail) == (200, res)
    # The client reads it (with its history) but may not change it.
    status, seen = await http(instance, "GET", f"/v1/alerts/{temp}", token("client", "c", org, client="st-marys"))
    assert (status, seen["history"]) == (200, res["history"])
    assert (await _post(instance, token("client", "c", org, client="st-marys"), anomaly, "resolve", {"reason": "x"}))[
        0
    ] == 403
    snap = await disp.subscribe({})
    assert [a["id"] for a in snap["alerts"]] == [anomaly]
    assert snap["alerts"][0]["acknowledged_by"] == "u"  # a dashboard that reconnects still sees who acknowledged


async def test_automatic_resolution_keeps_the_acknowledgement(instance: Instance, org: str) -> None:
    disp = await Dash.connect(instance.url, _disp(org), subscribe={})
    got: list[dict[str, Any]] = []
    await consign(instance, org, "PKG-9", "st-marys")
    a = await Phone.connect(instance.url, token("driver", "d-a", org))
    b = await Phone.connect(instance.url, token("driver", "d-b", org))
    t = now_ms() - 600_000
    await a.send(scan(1, "PKG-9", "pickup", ts=t))
    await until_frame(disp, got, "package", state="picked_up", driver="d-a")
    await b.send(scan(7, "PKG-9", "deliver", ts=t + 20_000))  # d-a holds it: an anomaly, until...
    opened = await until_frame(disp, got, "alert", kind="scan_anomaly")
    status, acked = await _post(instance, _disp(org), opened["id"], "ack", {"comment": "calling d-b"})
    assert status == 200
    await b.send({"type": "batch", "items": [scan(6, "PKG-9", "handover", ts=t + 10_000)]})  # ...d-b's backlog
    resolved = await until_frame(disp, got, "alert", id=opened["id"], state="resolved")
    assert (resolved["resolved_by"], resolved["resolved_reason"]) == (None, AUTO)
    assert (resolved["acknowledged_by"], resolved["acknowledged_at"]) == ("u", acked["acknowledged_at"])
    assert_frame_valid(resolved, "alert")
    status, out = await http(instance, "GET", f"/v1/alerts/{opened['id']}", _disp(org))
    assert status == 200
    assert (out["state"], out["resolved_by"], out["acknowledged_by"], out["ack_comment"]) == (
        "resolved",
        None,
        "u",
        "calling d-b",
    )
    assert [(h["event"], h["actor"], h["note"]) for h in out["history"]] == [
        ("opened", None, None),
        ("acknowledged", "u", "calling d-b"),
        ("resolved", None, AUTO),
    ]
    assert (await _post(instance, _disp(org), opened["id"], "resolve", {"reason": "x"}))[0] == 409


async def test_a_persons_resolution_is_not_reopened_by_the_same_anomaly(instance: Instance, org: str) -> None:
    disp = await Dash.connect(instance.url, _disp(org), subscribe={})
    got: list[dict[str, Any]] = []
    await consign(instance, org, "PKG-5", "st-marys")
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms() - 60_000
    await phone.send(scan(1, "PKG-5", "pickup", ts=t))
    await phone.send(scan(2, "PKG-5", "pickup", ts=t + 1000))  # a duplicate: an anomaly that stays
    first = await until_frame(disp, got, "alert", kind="scan_anomaly")
    status, _ = await _post(instance, _disp(org), first["id"], "resolve", {"reason": "a double tap, harmless"})
    assert status == 200
    await until_frame(disp, got, "alert", id=first["id"], state="resolved")
    # Another scan replays the package: the duplicate is still an anomaly, and stays resolved.
    await phone.send(scan(3, "PKG-5", "pickup", ts=t + 2000))
    async with asyncio.timeout(10):
        while len(frames_of(got, "alert", kind="scan_anomaly", state="open")) < 2:  # seq 3's, a new alert
            got += await disp.live(10)
    assert [f["state"] for f in frames_of(got, "alert", id=first["id"])] == ["open", "resolved"]
    status, out = await http(instance, "GET", f"/v1/alerts/{first['id']}", _disp(org))
    assert (out["state"], out["resolved_by"]) == ("resolved", "u")
    assert [h["event"] for h in out["history"]] == ["opened", "resolved"]


async def test_scope_other_orgs_and_clients_get_404(instance: Instance, org: str) -> None:
    disp = await Dash.connect(instance.url, _disp(org), subscribe={})
    got: list[dict[str, Any]] = []
    temp, anomaly = await _excursion_and_anomaly(instance, org, disp, got)
    other = _disp(org + "-other")
    for alert in (temp, anomaly, "al-nonexistent"):
        assert (await http(instance, "GET", f"/v1/alerts/{alert}", other))[0] == 404
        assert (await _post(instance, other, alert, "ack"))[0] == 404
        assert (await _post(instance, other, alert, "resolve", {"reason": "x"}))[0] == 404
    assert (await _alerts(instance, other))[1] == {"alerts": [], "next": None}
    westside = token("client", "c", org, client="westside")
    assert (await http(instance, "GET", f"/v1/alerts/{temp}", westside))[0] == 404
    st_marys = token("client", "c", org, client="st-marys")
    assert (await http(instance, "GET", f"/v1/alerts/{anomaly}", st_marys))[0] == 404  # dispatchers only
    assert (await _post(instance, st_marys, temp, "ack"))[0] == 403
    assert (await _post(instance, token("driver", "d-1", org), temp, "ack"))[0] == 403
    assert (await _post(instance, _disp(org), temp, "ack", b"[1]"))[0] == 400
    assert (await _post(instance, _disp(org), temp, "resolve", {"reason": "x" * 1001}))[0] == 400
    status, out = await http(instance, "GET", f"/v1/alerts/{temp}", _disp(org))
    assert (status, out["state"], out["acknowledged_by"]) == (200, "open", None)  # nothing above changed it
