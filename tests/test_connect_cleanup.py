"""No ghosts (issue 11, item 5): any failure during a driver's connect or hello closes the socket
1011 and leaves no online driver (here, in the broker's presence, in `GET /v1/drivers`) and no
leaked connection gauge."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness.clients import Dash, Phone, pos
from harness.http import http
from harness.instances import Instance
from harness.tokens import token
from harness.wait import wait_until
from tracker import metrics
from tracker.protocol.driver import DriverSession


def gauge() -> float:
    return float(metrics.CONNECTIONS.labels("driver")._value.get())


async def _fail(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected failure")


def _fail_sync(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["extension", "welcome"])
async def test_a_failure_during_connect_leaves_no_ghost(
    instance: Instance, org: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    dash = await Dash.connect(instance.url, token("dispatcher", "u", org), subscribe={})
    if where == "extension":  # before the broker registered it (the custody stamp's query)
        monkeypatch.setattr(instance.node.extension, "driver_connected", _fail)
    else:  # after the broker registered it and published it online
        monkeypatch.setattr(DriverSession, "welcome", _fail_sync)
    before = gauge()
    async with connect(instance.url + "/v1/driver", compression=None) as ws:
        hello = {"type": "hello", "token": token("driver", "d-1", org), "device": "t", "app": "t/1"}
        await ws.send(orjson.dumps(hello).decode())
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert closed.value.rcvd.reason == "internal error"
    await wait_until(lambda: gauge() == before, 5, lambda: f"the gauge back at {before} (now {gauge()})")
    assert (org, "d-1") not in instance.node.drivers

    async def offline_in_broker() -> bool:
        _, _, online = await instance.node.broker.live_state(org)
        return "d-1" not in online

    await wait_until(offline_in_broker, 5, "d-1 offline in the broker's presence")
    status, body = await http(instance, "GET", "/v1/drivers", token("dispatcher", "u", org))
    assert status == 200
    assert all(not d["online"] for d in body["drivers"] if d["driver"] == "d-1"), body
    snap = await dash.subscribe({})
    assert all(not d["online"] for d in snap["drivers"] if d["driver"] == "d-1"), snap
    # The driver connects normally once the failure is gone.
    monkeypatch.undo()
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await phone.send(pos(1))
    await phone.until(lambda p: p.acked == {1})
    assert gauge() == before + 1
