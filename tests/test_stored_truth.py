"""The map shows only what PostgreSQL holds (issue 11, item 1): real websockets, two instances,
real PostgreSQL and Redis."""

from __future__ import annotations

from typing import Any

from harness.clients import Dash, Phone, now_ms, pos
from harness.http import http
from harness.tokens import token


def last_of(drivers: list[dict[str, Any]], driver: str) -> dict[str, Any]:
    [entry] = [d for d in drivers if d["driver"] == driver]
    return entry


async def test_a_conflicting_position_never_reaches_the_map(start_instance: Any, org: str) -> None:
    """Instance 1 stores seq 1; the same driver then sends another, newer position under seq 1 to
    instance 2. PostgreSQL keeps the first: no live frame, snapshot or last position may show the
    second."""
    one, two = await start_instance(), await start_instance()
    disp = token("dispatcher", "u-1", org)
    dash = await Dash.connect(one.url, disp, subscribe={})
    t = now_ms() - 10_000
    first = await Phone.connect(one.url, token("driver", "d-1", org))
    await first.send(pos(1, ts=t, lat=1.0, lon=1.0))
    await first.until(lambda p: p.acked == {1})
    await first.close()

    phone = await Phone.connect(two.url, token("driver", "d-1", org))
    assert phone.welcome["last_seq"] == 1
    await phone.send(pos(1, ts=t + 5_000, lat=50.0, lon=50.0))  # a different event under a stored seq
    await phone.until(lambda p: p.refused("conflict") == {1})

    # What a dashboard opened now, and the drivers list, show: the stored event.
    fresh = await Dash.connect(two.url, disp, subscribe={})
    [drv] = [d for d in fresh.snapshot["drivers"] if d["driver"] == "d-1"]
    assert (drv["seq"], drv["lat"], drv["ts"]) == (1, 1.0, t)
    for inst in (one, two):
        status, body = await http(inst, "GET", "/v1/drivers", disp)
        assert status == 200
        last = last_of(body["drivers"], "d-1")["last"]
        assert (last["seq"], last["lat"], last["ts"]) == (1, 1.0, t)

    # A stored position after it goes live; nothing before it showed the refused one.
    await phone.send(pos(2, ts=t + 6_000, lat=2.0, lon=2.0))
    got = await dash.collect(lambda fs: any(f["type"] == "pos" and f["seq"] == 2 for f in fs))
    shown = [(f["seq"], f["lat"]) for f in got if f["type"] == "pos"]
    assert shown == [(1, 1.0), (2, 2.0)], shown
    await phone.until(lambda p: 2 in p.acked)
    assert phone.errors == [e for e in phone.errors if e["seq"] == 1]


async def test_a_stored_position_resent_out_of_order_still_goes_live_after_its_commit(
    start_instance: Any, org: str
) -> None:
    """A position whose seq is not above what the connection has seen is not live at receipt;
    once stored, it goes live if it is still the driver's newest."""
    inst = await start_instance()
    disp = token("dispatcher", "u-1", org)
    dash = await Dash.connect(inst.url, disp, subscribe={})
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t = now_ms() - 10_000
    await phone.send(pos(5, ts=t, lat=5.0, lon=5.0))
    await phone.send(pos(3, ts=t + 1_000, lat=3.0, lon=3.0))  # an older seq, yet a newer fix
    await phone.until(lambda p: p.acked == {3, 5})
    got = await dash.collect(lambda fs: any(f["type"] == "pos" and f["seq"] == 3 for f in fs))
    assert [(f["seq"], f["lat"]) for f in got if f["type"] == "pos"] == [(5, 5.0), (3, 3.0)]
    status, body = await http(inst, "GET", "/v1/drivers", disp)
    assert status == 200 and last_of(body["drivers"], "d-1")["last"]["seq"] == 3
