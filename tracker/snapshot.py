"""Building a dashboard's snapshot, and handing over to live frames with nothing lost between.

The dashboard is registered in the hub *before* the state is read, with `live=False`: frames
that arrive meanwhile wait in `dash.pre`. After the snapshot is written, they are replayed,
except positions no newer than the one the snapshot holds for their driver. Redis updates the
latest position and publishes it in one atomic script, so every update is either in the state
read or among the waiting frames (or both, which the replay filter resolves).
"""

from __future__ import annotations

import asyncio
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


# Set in Redis (a hash: org -> 1) once PostgreSQL's newest positions of an org have been merged
# into Redis. A restarted Redis has lost it along with the positions, so the next snapshot of that
# org merges again (fault test: tests/test_faults_redis.py).
SYNCED_KEY = "trk:pgsynced"

# One PostgreSQL read per org however many dashboards want a snapshot at once (all of them do,
# right after the live feed comes back).
_reading: dict[tuple[int, str], asyncio.Future[list[dict[str, Any]]]] = {}


async def _stored_positions(node: Node, org: str) -> list[dict[str, Any]]:
    key = (id(node), org)
    future = _reading.get(key)
    if future is None:
        future = asyncio.ensure_future(store.last_positions(node.pool, org))
        _reading[key] = future
        future.add_done_callback(lambda _: _reading.pop(key, None))
    return await asyncio.shield(future)


async def _positions(node: Node, org: str) -> tuple[dict[str, tuple[int, bytes]], dict[str, str], set[str]]:
    from .node import pos_frame

    positions: dict[str, tuple[int, bytes]] = {}
    names: dict[str, str] = {}
    online: set[str] = set()
    redis_ok = True
    try:
        positions, names, online = await node.broker.live_state(org)
        if positions and await node.broker.redis.hexists(SYNCED_KEY, org):
            return positions, names, online
    except (RedisError, OSError) as exc:
        redis_ok = False
        log.debug("snapshot without Redis: %s", exc)
    # Redis is down, or has lost the live state (restarted): PostgreSQL has every stored position.
    # A restarted Redis may already hold the newest positions of drivers that sent since, but not
    # those of drivers that went quiet: merge, the newer (by live ts) winning.
    try:
        rows = await _stored_positions(node, org)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("snapshot has no stored positions: PostgreSQL failed (%s)", exc)
        return positions, names, online
    restore = []
    for row in rows:
        driver = row["driver_id"]
        if row["name"] and driver not in names:
            names[driver] = row["name"]
        lts = live_ts(row["ts"], row["received_at"])
        if driver in positions and positions[driver][0] >= lts:
            continue
        ev = Position(row["seq"], row["ts"], row["lat"], row["lon"], row["acc"], row["spd"], row["hdg"], row["alt"],
                      row["bat"])
        frame = pos_frame(driver, ev)
        positions[driver] = (lts, frame)
        restore.append((driver, lts, frame))
    if redis_ok:
        try:
            await node.broker.restore_positions(org, restore)
            await node.broker.redis.hset(SYNCED_KEY, org, 1)  # type: ignore[misc]
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
