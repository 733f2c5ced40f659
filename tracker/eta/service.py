"""ETAs of packages in transit, from what PostgreSQL holds: the holder's recent positions and the
destinations of every package it holds. Used by the packages API and the share page.

Two queries per call whatever the number of packages (one for the holders' recent fixes, one for
their loads), so a page of 1,000 packages costs what one does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final

import asyncpg

from ..clock import now_ms
from ..config import Settings
from .model import Estimate, Estimator, Fix, Params, Query, Stop, moving_speed, straight_line

log = logging.getLogger("tracker.eta")

FIXES_MAX: Final = 200  # recent positions read per driver (the speed's half-life needs no more)
FIX_AGE_MAX_MS: Final = 3_600_000  # positions older than this say nothing of the speed now

RECENT_FIXES: Final = """
SELECT d.driver AS driver_id, p.ts, p.lat, p.lon, p.spd
FROM unnest($2::text[]) AS d(driver)
CROSS JOIN LATERAL (
    SELECT ts, lat, lon, spd FROM positions
    WHERE org = $1 AND driver_id = d.driver AND ts > $3
    ORDER BY ts DESC LIMIT $4
) AS p
"""

LOADS: Final = """
SELECT holder, package_id, dest_lat, dest_lon FROM packages
WHERE org = $1 AND state = 'picked_up' AND holder = ANY($2::text[]) AND dest_lat IS NOT NULL
"""

Row = asyncpg.Record | dict[str, Any]  # a `packages` row, or a dict with its package_id, state, holder


def org_params(settings: Settings) -> tuple[Params, dict[str, float]]:
    """The default estimate's knobs, and the per-org road factors (`TRACKER_ETA_ROAD_FACTORS`)."""
    params = Params(
        road_factor=settings.eta_road_factor,
        stop_s=settings.eta_stop_s,
        half_life_s=settings.eta_half_life_s,
        floor_mps=settings.eta_floor_mps,
        default_mps=settings.eta_default_mps,
    )
    return params, dict(settings.eta_road_factor_orgs())


class EtaService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, estimator: Estimator | None = None) -> None:
        self.pool = pool
        self.params, self.factors = org_params(settings)
        self.estimator = estimator

    def params_of(self, org: str) -> Params:
        factor = self.factors.get(org)
        if factor is None:
            return self.params
        return Params(**{**{f: getattr(self.params, f) for f in Params.__dataclass_fields__}, "road_factor": factor})

    async def for_rows(self, org: str, rows: Iterable[Row]) -> dict[str, dict[str, Any]]:
        """package -> its ETA (`Estimate.as_json`), for the rows (`packages` rows: package_id,
        state, holder) in transit whose holder has a recent position; others have none."""
        wanted = {r["package_id"]: r["holder"] for r in rows if r["state"] == "picked_up" and r["holder"]}
        if not wanted:
            return {}
        holders = sorted(set(wanted.values()))
        now = now_ms()
        async with self.pool.acquire() as conn:
            fix_rows = await conn.fetch(RECENT_FIXES, org, holders, now - FIX_AGE_MAX_MS, FIXES_MAX)
            load_rows = await conn.fetch(LOADS, org, holders)
        fixes: dict[str, list[Fix]] = {}
        for r in fix_rows:
            fixes.setdefault(r["driver_id"], []).append(Fix(r["ts"], r["lat"], r["lon"], r["spd"]))
        loads: dict[str, list[Stop]] = {}
        for r in load_rows:
            loads.setdefault(r["holder"], []).append(Stop(r["package_id"], r["dest_lat"], r["dest_lon"]))
        params = self.params_of(org)
        out: dict[str, dict[str, Any]] = {}
        for driver in holders:
            recent = sorted(fixes.get(driver, ()), key=lambda f: f.ts)
            if not recent or not loads.get(driver):
                continue
            last = recent[-1]
            query = Query(
                org, now, last.ts, (last.lat, last.lon), moving_speed(recent, params), tuple(loads[driver]), params
            )
            for est in await self._estimate(query):
                if wanted.get(est.package) == driver:
                    out[est.package] = est.as_json(last.ts)
        return out

    async def _estimate(self, query: Query) -> list[Estimate]:
        if self.estimator is not None:
            try:
                return await self.estimator.estimate(query)
            except OSError as exc:
                log.warning("routing engine %s unavailable (%s): straight-line ETAs", self.estimator.name, exc)
        return straight_line(query)
