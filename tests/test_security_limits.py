"""Abuse limits: frame size, handshake and hello deadlines, sockets waiting for hello, dashboards per
instance and per user, subscription size and rate (SECURITY.md, "Limits")."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness.clients import Dash, Peer, Phone, now_ms, pos
from harness.instances import Instance
from harness.tokens import token
from harness.wait import wait_until
from tracker.transport.admission import Admission


def admission(inst: Instance) -> Admission:
    adm: Admission = inst.server.app.state.admission
    return adm


async def close_of(peer: Peer, timeout: float = 5.0) -> tuple[int | None, str]:
    """The server's close (code, reason), reading and dropping frames until then."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await peer.ws.recv()
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


async def hello(inst: Instance, path: str, tok: str) -> Peer:
    peer = Peer(await connect(inst.url + path))
    await peer.send({"type": "hello", "token": tok})
    return peer


# -- deadlines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [b"", b"GET /v1/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"])
async def test_connection_without_a_complete_request_head_is_closed(start_instance: Any, head: bytes) -> None:
    """Slowloris: uvicorn alone waits for a request head forever; the head deadline closes it."""
    inst = await start_instance(handshake_timeout_s=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", inst.port)
    try:
        writer.write(head)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server, nothing answered
    finally:
        writer.close()
        await writer.wait_closed()
    # A request that completes its head in time is served, and so is a websocket.
    phone = await Phone.connect(inst.url, token("driver", "d-1", "org-x"))
    assert phone.welcome["type"] == "welcome"


async def test_oversized_request_head_is_refused(instance: Instance) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", instance.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 400")


async def test_no_hello_in_time_closes_a_dashboard_4000(start_instance: Any) -> None:
    inst = await start_instance(hello_timeout_s=0.3)
    peer = Peer(await connect(inst.url + "/v1/live"))
    assert await close_of(peer) == (4000, "no hello in time")
    assert admission(inst).pending == 0


@pytest.mark.parametrize("path", ["/v1/driver", "/v1/live"])
async def test_oversized_frame_before_hello_closes_1009(instance: Instance, path: str) -> None:
    peer = Peer(await connect(instance.url + path, max_size=None))
    await peer.send(orjson.dumps({"type": "hello", "token": "x" * 70_000}).decode())
    assert (await close_of(peer))[0] == 1009


async def test_oversized_frame_on_a_dashboard_closes_1009(instance: Instance, org: str) -> None:
    dash = await Dash.connect(instance.url, token("dispatcher", "u-1", org), subscribe={})
    await dash.send({"type": "subscribe", "drivers": ["d-" + "x" * 60] * 1200})  # ~80 KB
    assert (await close_of(dash))[0] == 1009


# -- sockets and dashboards per instance and per user ----------------------------------------------


async def test_sockets_waiting_for_hello_are_capped_1013(start_instance: Any, org: str) -> None:
    inst = await start_instance(max_pending=2)
    idle = [Peer(await connect(inst.url + path)) for path in ("/v1/driver", "/v1/live")]
    await wait_until(lambda: admission(inst).pending == 2, 5, "two sockets waiting for hello", interval=0.01)
    for path in ("/v1/driver", "/v1/live"):
        third = Peer(await connect(inst.url + path))
        assert await close_of(third) == (1013, "too many connections waiting for hello")
    # Once one of them says hello, there is room again.
    await idle[0].send({"type": "hello", "token": token("driver", "d-1", org)})
    assert (await idle[0].recv())["type"] == "welcome"
    await wait_until(lambda: admission(inst).pending == 1, 5, "one socket waiting for hello", interval=0.01)
    phone = await Phone.connect(inst.url, token("driver", "d-2", org))
    assert phone.welcome["driver"] == "d-2"


async def test_dashboards_per_user_are_capped_1013(start_instance: Any, org: str) -> None:
    inst = await start_instance(max_dashboards_per_user=2)
    mine = token("dispatcher", "u-1", org)
    first = await Dash.connect(inst.url, mine, subscribe={})
    await Dash.connect(inst.url, mine)
    third = await hello(inst, "/v1/live", mine)
    code, reason = await close_of(third)
    assert code == 1013 and reason == "too many dashboards for this user (at most 2)"
    # The same sub in another org, and another user of this org, are other principals.
    await Dash.connect(inst.url, token("dispatcher", "u-1", org + "-b"))
    await Dash.connect(inst.url, token("client", "u-2", org, client="c-1"))
    # Closing one frees its place.
    await first.close()
    await wait_until(lambda: admission(inst).per_user[(org, "u-1")] == 1, 5, "one dashboard of u-1", interval=0.01)
    again = await Dash.connect(inst.url, mine, subscribe={})
    assert again.snapshot == {"drivers": [], "packages": [], "alerts": []}


async def test_dashboards_per_instance_are_capped_1013(start_instance: Any, org: str) -> None:
    inst = await start_instance(max_dashboards=2)
    for user in ("u-1", "u-2"):
        await Dash.connect(inst.url, token("dispatcher", user, org))
    refused = await hello(inst, "/v1/live", token("dispatcher", "u-3", org))
    assert await close_of(refused) == (1013, "too many dashboards on this instance")
    assert admission(inst).dashboards == 2


async def test_drivers_per_instance_are_capped(start_instance: Any, org: str) -> None:
    """TRACKER_MAX_CONNECTIONS: a driver beyond it is closed with 1013 before its hello is read."""
    inst = await start_instance(max_connections=1)
    await Phone.connect(inst.url, token("driver", "d-1", org))
    peer = Peer(await connect(inst.url + "/v1/driver"))
    assert await close_of(peer) == (1013, "too many connections")


# -- subscriptions ---------------------------------------------------------------------------------


async def test_subscribe_naming_too_many_ids_closes_1008(start_instance: Any, org: str) -> None:
    inst = await start_instance(subscribe_max_ids=3)
    dash = await Dash.connect(inst.url, token("dispatcher", "u-1", org))
    await dash.subscribe({"drivers": ["d-1", "d-2"], "packages": ["P-1"]})  # exactly the limit
    await dash.send({"type": "subscribe", "drivers": ["d-1", "d-2"], "packages": ["P-1", "P-2"]})
    frame = await dash.recv()
    assert frame["type"] == "error" and frame["code"] == "protocol" and "at most 3" in frame["message"]
    assert (await close_of(dash))[0] == 1008


async def test_subscribe_flood_is_coalesced_newest_wins(start_instance: Any, org: str) -> None:
    """Each subscribe costs a snapshot (database reads): beyond the burst they wait for their turn,
    and only the newest waiting one is applied. Nothing is lost: the last one gets its snapshot."""
    inst = await start_instance(subscribe_rate_per_s=5.0, subscribe_burst=3)
    phone = await Phone.connect(inst.url, token("driver", "d-x", org))
    await phone.send(pos(1, ts=now_ms(), lat=-1.25))
    await phone.until(lambda p: p.acked == {1})
    dash = await Dash.connect(inst.url, token("dispatcher", "u-1", org))
    started = asyncio.get_running_loop().time()
    for k in range(30):
        await dash.send({"type": "subscribe", "drivers": [f"nobody-{k}"]})
    await dash.send({"type": "subscribe", "drivers": ["d-x"]})
    snapshots: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not (snapshots and snapshots[-1]["drivers"]):
            frame = await dash.recv()
            if frame["type"] == "snapshot":
                snapshots.append(frame)
    assert [d["driver"] for d in snapshots[-1]["drivers"]] == ["d-x"]
    # At most the burst, what the rate refilled meanwhile (a loaded machine sends slowly), and the last.
    allowed = 3 + int((asyncio.get_running_loop().time() - started) * 5.0) + 1
    assert len(snapshots) <= allowed < 31, f"{len(snapshots)} snapshots for 31 subscribes (allowed {allowed})"
    # The dashboard is live on its newest filter.
    await phone.send(pos(2, ts=now_ms(), lat=-1.26))
    got = await dash.collect(lambda fs: any(f["type"] == "pos" for f in fs))
    assert [f["lat"] for f in got if f["type"] == "pos"] == [-1.26]


async def test_snapshots_per_dashboard_are_rate_limited(start_instance: Any, org: str) -> None:
    """A dashboard that waits for each snapshot before the next subscribe (so that every one of them
    reads the database) gets them no faster than the configured rate after its burst."""
    inst = await start_instance(subscribe_rate_per_s=10.0, subscribe_burst=2)
    dash = await Dash.connect(inst.url, token("dispatcher", "u-1", org))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for k in range(8):
        await dash.subscribe({"drivers": [f"d-{k}"]})  # each answered by its own snapshot
    assert loop.time() - started >= (8 - 2) / 10.0 * 0.9


async def test_the_event_rate_survives_a_reconnect(start_instance: Any, org: str) -> None:
    """A rogue driver app reconnecting to get a fresh burst each time: the limit holds per driver, not
    per socket."""
    inst = await start_instance(rate_per_s=0.1, rate_burst=5)
    stored = 0
    for first in (1, 11, 21):
        phone = await Phone.connect(inst.url, token("driver", "d-1", org))
        await phone.send({"type": "batch", "items": [pos(s) for s in range(first, first + 10)]})
        await phone.until(lambda p: len(p.acked) + len(p.errors) >= 10)
        stored += len(phone.acked)
        await phone.close()
    assert stored <= 6
