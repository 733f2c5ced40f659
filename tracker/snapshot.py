"""Building a dashboard's snapshot, and handing over to live frames with nothing lost between.

The dashboard is registered in the hub, and this instance subscribed to its org's live channel
(`Broker.follow`, confirmed by the broker), *before* the state is read, with `live=False`: frames
that arrive meanwhile wait in `dash.pre`. After the snapshot is written, they are replayed,
except positions no newer than the one the snapshot holds for their driver. Redis updates the
latest position and publishes it in one atomic script, so every update is either in the state
read or among the waiting frames (or both, which the replay filter resolves).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import orjson

from . import store
from .broker import Broker, LiveState
from .extension import Extension
from .hub import Dashboard
from .protocol import frames
from .protocol.events import Position, live_ts
from .protocol.live import pos_frame, status_frame
from .protocol.subscribe import in_bbox

log = logging.getLogger("tracker.snapshot")


class Snapshots:
    """Builds snapshots from the broker's live state, PostgreSQL (when the broker lost it) and the
    extension's scope (packages, alerts, which drivers a client may see)."""

    def __init__(self, pool: asyncpg.Pool, broker: Broker, extension: Extension, *, chunk: int) -> None:
        self.pool = pool
        self.broker = broker
        self.extension = extension
        self.chunk = chunk
        # One PostgreSQL read per org however many dashboards want a snapshot at once (all of them
        # do, right after the live feed comes back).
        self._reading: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}

    async def _stored_positions(self, org: str) -> list[dict[str, Any]]:
        future = self._reading.get(org)
        if future is None:
            future = asyncio.ensure_future(store.last_positions(self.pool, org))
            self._reading[org] = future
            future.add_done_callback(lambda _: self._reading.pop(org, None))
        return await asyncio.shield(future)

    async def _positions(self, org: str) -> LiveState:
        broker = self.broker
        positions: dict[str, tuple[int, bytes]] = {}
        names: dict[str, str] = {}
        online: set[str] = set()
        redis_ok = True
        try:
            positions, names, online = await broker.live_state(org)
            if positions and await broker.is_synced(org):
                return positions, names, online
        except OSError as exc:
            redis_ok = False
            log.debug("snapshot without the broker: %s", exc)
        # The broker is down, or has lost the live state (restarted): PostgreSQL has every stored
        # position. A restarted broker may already hold the newest positions of drivers that sent
        # since, but not those of drivers that went quiet: merge, the newer (by live ts) winning.
        try:
            rows = await self._stored_positions(org)
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
            ev = Position(
                row["seq"],
                row["ts"],
                row["lat"],
                row["lon"],
                row["acc"],
                row["spd"],
                row["hdg"],
                row["alt"],
                row["bat"],
            )
            frame = pos_frame(driver, ev)
            positions[driver] = (lts, frame)
            restore.append((driver, lts, frame))
        if redis_ok:
            try:
                await broker.restore_positions(org, restore)
                await broker.mark_synced(org)
            except OSError:
                pass
        return positions, names, online

    async def send(self, dash: Dashboard) -> None:
        """Write the dashboard's snapshot, then replay what arrived meanwhile and go live."""
        p, flt = dash.principal, dash.flt
        # Subscribed before the state is read: what is published from now on waits in dash.pre.
        await self.broker.follow(p.org)
        if not self.broker.live:
            dash.channel.write(status_frame(False))
        positions, names, online = await self._positions(p.org)
        visible, packages, alerts = await self.extension.snapshot_scope(dash)
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
                if (visible is None or driver in visible) and (
                    flt.follows_all or (flt.drivers and driver in flt.drivers)
                ):
                    drivers.append({"driver": driver, "name": names.get(driver), "online": True})
        chunk = self.chunk
        parts = max(1, -(-max(len(drivers), len(packages), len(alerts)) // chunk))
        for i in range(parts):
            frame: dict[str, Any] = {
                "type": "snapshot",
                "drivers": drivers[i * chunk : (i + 1) * chunk],
                "packages": packages[i * chunk : (i + 1) * chunk],
                "alerts": alerts[i * chunk : (i + 1) * chunk],
            }
            if i < parts - 1:
                frame["more"] = True
            dash.channel.write(frames.encode(frame))
        dash.finish_snapshot(known)
