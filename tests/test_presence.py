"""Presence: online while a connection is open; a dead instance leaves no driver online for long;
a stale offline from an old connection never hides a newer one."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from harness.clients import Dash, Phone, pos
from harness.instances import Spawn
from harness.tokens import token


async def test_replaced_connection_does_not_set_driver_offline(start_instance: Any, org: str) -> None:
    a, b = await start_instance(), await start_instance()
    dash = await Dash.connect(b.url, token("dispatcher", "u", org), subscribe={})
    old = await Phone.connect(a.url, token("driver", "d-1", org))
    new = await Phone.connect(b.url, token("driver", "d-1", org))
    assert await old.closed() == 4001
    await new.send(pos(1))
    await new.until(lambda p: p.acked == {1})
    frames = await dash.collect(lambda fs: any(f["type"] == "pos" for f in fs))
    presence = [f["online"] for f in frames if f["type"] == "presence"]
    assert presence and all(presence), "the old connection's close must not publish offline"
    snap = await dash.subscribe({})
    assert snap["drivers"][0]["online"] is True
    await new.close()
    frames = await dash.collect(lambda fs: any(f["type"] == "presence" for f in fs))
    assert [f["online"] for f in frames if f["type"] == "presence"] == [False]


async def test_killed_instance_leaves_no_driver_online(
    start_instance: Any, spawn: Spawn, org: str, database_url: str, redis_url: str
) -> None:
    survivor = await start_instance(presence_refresh_s=0.5)
    dash = await Dash.connect(survivor.url, token("dispatcher", "u", org), subscribe={})
    victim = await spawn(
        database_url, redis_url, TRACKER_PRESENCE_TTL_S="3", TRACKER_PRESENCE_REFRESH_S="1", PYTHONWARNINGS="ignore"
    )
    phone = await Phone.connect(victim.url, token("driver", "d-9", org))
    await phone.send(pos(1))
    await phone.until(lambda p: p.acked == {1})
    online = await dash.collect(lambda fs: any(f["type"] == "presence" and f["online"] for f in fs))
    assert online
    victim.signal(signal.SIGKILL)
    await victim.exited(10)
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    frames = await dash.collect(lambda fs: any(f["type"] == "presence" and not f["online"] for f in fs), timeout=30)
    assert [f["driver"] for f in frames if f["type"] == "presence"] == ["d-9"]
    assert loop.time() - killed_at < 30  # PROTOCOL.md: no driver left online for longer than 30 s
    snap = await dash.subscribe({})
    assert [(d["driver"], d["online"]) for d in snap["drivers"]] == [("d-9", False)]
