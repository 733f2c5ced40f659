"""Building a dashboard's snapshot, and handing over to live frames with nothing lost between.

The dashboard is registered in the hub *before* the state is read, with `live=False`: frames
that arrive meanwhile wait in `dash.pre`. After the snapshot is written, they are replayed,
except positions no newer than the one the snapshot holds for their driver. Redis updates the
latest position and publishes it in one atomic script, so every update is either in the state
read or among the waiting frames (or both, which the replay filter resolves).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from . import store
from .hub import Dashboard, in_bbox
from .protocol import frames
from .protocol.events import Position, live_ts

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("tracker.snapshot")

# Set by the packages layer: (node, dash) -> (visible drivers or None for all, packages, alerts).
Extras = Callable[["Node", Dashboard], Awaitable[tuple[set[str] | None, list[Any], list[Any]]]]


async def no_extras(node: Node, dash: Dashboard) -> tuple[set[str] | None, list[Any], list[Any]]:
    # Without the packages layer a client admin sees no driver: its window is never open.
    return (set() if dash.principal.role == "client" else None), [], []


async def _positions(node: Node, org: str) -> tuple[dict[str, tuple[int, bytes]], dict[str, str], set[str]]:
    from .node import pos_frame

    positions: dict[str, tuple[int, bytes]] = {}
    names: dict[str, str] = {}
    online: set[str] = set()
    redis_ok = True
    try:
        positions, names, online = await node.broker.live_state(org)
    except (RedisError, OSError) as exc:
        redis_ok = False
        log.debug("snapshot without Redis: %s", exc)
    if positions:
        return positions, names, online
    # Redis has lost the live state (restarted) or is down: PostgreSQL has every stored position.
    try:
        rows = await store.last_positions(node.pool, org)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("snapshot has no positions: Redis and PostgreSQL both failed (%s)", exc)
        return positions, names, online
    restore = []
    for row in rows:
        ev = Position(row["seq"], row["ts"], row["lat"], row["lon"], row["acc"], row["spd"], row["hdg"], row["alt"],
                      row["bat"])
        frame = pos_frame(row["driver_id"], ev)
        lts = live_ts(row["ts"], row["received_at"])
        positions[row["driver_id"]] = (lts, frame)
        if row["name"]:
            names[row["driver_id"]] = row["name"]
        restore.append((row["driver_id"], lts, frame))
    if redis_ok and restore:
        try:
            await node.broker.restore_positions(org, restore)
        except (RedisError, OSError):
            pass
    return positions, names, online


async def send_snapshot(node: Node, dash: Dashboard) -> None:
    p, flt = dash.principal, dash.flt
    if not node.broker.live:
        dash.channel.write(frames.encode({"type": "status", "live": False, "reason": "broker unavailable"}))
    positions, names, online = await _positions(node, p.org)
    visible, packages, alerts = await node.snapshot_extras(node, dash)
    drivers: list[dict[str, Any]] = []
    known: dict[str, int] = {}
    for driver, (_, encoded) in positions.items():
        if visible is not None and driver not in visible:
            continue
        if not (flt.follows_all or (flt.drivers and driver in flt.drivers) or driver in dash.carriers):
            continue
        entry = orjson.loads(encoded)
        del entry["type"]
        if flt.bbox is not None:
            if not in_bbox(flt.bbox, entry["lat"], entry["lon"]):
                continue
            dash.inside.add(driver)
        entry["name"] = names.get(driver)
        entry["online"] = driver in online
        drivers.append(entry)
        known[driver] = entry["ts"]
    if flt.bbox is None:  # drivers online that have not sent a position yet
        for driver in online - positions.keys():
            if (visible is None or driver in visible) and (flt.follows_all or (flt.drivers and driver in flt.drivers)):
                drivers.append({"driver": driver, "name": names.get(driver), "online": True})
    chunk = node.settings.snapshot_chunk
    parts = max(1, -(-max(len(drivers), len(packages), len(alerts)) // chunk))
    for i in range(parts):
        frame: dict[str, Any] = {"type": "snapshot", "drivers": drivers[i * chunk:(i + 1) * chunk],
                                 "packages": packages[i * chunk:(i + 1) * chunk],
                                 "alerts": alerts[i * chunk:(i + 1) * chunk]}
        if i < parts - 1:
            frame["more"] = True
        dash.channel.write(frames.encode(frame))
    dash.finish_snapshot(known)
