"""SQL of the periodic alert check (custody/watch.py): what it reads, and the one function that
commits the alerts it opens, updates and resolves (`commit_alerts`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson

from . import alerts_store as als
from .store import Conn, Tx

# One instance checks at a time (the others skip that round): pg_try_advisory_xact_lock.
WATCH_LOCK: Final = 0x7472_6B77  # "trkw"
FIXES_MAX: Final = 5_000  # newest fixes read per driver per round

PACKAGES: Final = """
SELECT p.org, p.package_id, p.client, p.consigned_at, p.state, p.holder, p.state_ts, p.dest_lat, p.dest_lon,
       p.window_to, p.temp_min, p.temp_max, p.arrived_at, p.departed_at
FROM packages p
WHERE (p.state = 'picked_up' AND p.holder IS NOT NULL)
   OR (p.consigned_at IS NOT NULL AND (p.state_ts >= $1 OR (p.window_to <= $2 AND p.window_to > $1)))
   OR (p.org, p.package_id) IN (SELECT org, package_id FROM alerts
                                WHERE state = 'open' AND kind = ANY($3::text[]) AND package_id IS NOT NULL)
"""
OPEN: Final = """
SELECT a.org, a.id, a.kind, a.package_id, a.driver_id, a.seq, a.message, a.details::text AS details,
       a.acknowledged_by, a.acknowledged_at, p.client, p.consigned_at
FROM alerts a LEFT JOIN packages p ON p.org = a.org AND p.package_id = a.package_id
WHERE a.state = 'open' AND a.kind = ANY($1::text[])
"""
KNOWN: Final = """
SELECT a.org, a.id, a.state, a.resolved_by FROM unnest($1::text[], $2::text[]) AS k(org, id)
JOIN alerts a ON a.org = k.org AND a.id = k.id
"""
FIXES: Final = """
SELECT k.org, k.d, f.ts, f.lat, f.lon FROM unnest($1::text[], $2::text[]) AS k(org, d)
CROSS JOIN LATERAL (SELECT ts, lat, lon FROM position_rows
                    WHERE driver = (SELECT id FROM drivers WHERE org = k.org AND driver_id = k.d)
                      AND ts >= $3 AND ts <= $4 ORDER BY ts DESC LIMIT $5) f
"""
LOCK_ALERTS: Final = """
SELECT a.org, a.id, a.state, a.resolved_by FROM unnest($1::text[], $2::text[]) AS k(org, id)
JOIN alerts a ON a.org = k.org AND a.id = k.id ORDER BY a.org, a.id FOR UPDATE OF a
"""
UPSERT: Final = """
INSERT INTO alerts (org, id, kind, reason, state, package_id, driver_id, seq, message, details, opened_at, ts)
SELECT t.org, t.id, t.kind, '', t.state, t.package_id, t.driver_id, t.seq, t.message, t.details::jsonb, $10, $10
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::text[],
            $9::text[]) AS t(org, id, kind, state, package_id, driver_id, seq, message, details)
ON CONFLICT (org, id) DO UPDATE SET state = EXCLUDED.state, message = EXCLUDED.message,
    ts = CASE WHEN alerts.state = 'resolved' THEN EXCLUDED.ts ELSE alerts.ts END,
    details = EXCLUDED.details,
    opened_at = CASE WHEN alerts.state = 'resolved' THEN EXCLUDED.opened_at ELSE alerts.opened_at END,
    acknowledged_by = CASE WHEN alerts.state = 'resolved' THEN NULL ELSE alerts.acknowledged_by END,
    acknowledged_at = CASE WHEN alerts.state = 'resolved' THEN NULL ELSE alerts.acknowledged_at END,
    ack_comment = CASE WHEN alerts.state = 'resolved' THEN NULL ELSE alerts.ack_comment END,
    resolved_by = NULL, resolved_reason = NULL
"""
RESOLVE: Final = """
UPDATE alerts a SET state = 'resolved', ts = $5, resolved_by = NULL, resolved_reason = u.reason,
    details = coalesce(u.details::jsonb, a.details)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(org, id, reason, details)
WHERE a.org = u.org AND a.id = u.id AND a.state = 'open'
"""
ARRIVALS: Final = """
UPDATE packages p SET arrived_at = u.arrived_at, departed_at = u.departed_at
FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS u(org, package_id, arrived_at, departed_at)
WHERE p.org = u.org AND p.package_id = u.package_id
"""
THRESHOLDS: Final = "SELECT org, thresholds::text AS t FROM alert_thresholds"


async def try_lock(conn: Tx) -> bool:
    """In a transaction: whether this instance runs this round (released at its end)."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", WATCH_LOCK))


async def packages(conn: Conn, since: int, now: int, kinds: Sequence[str]) -> list[asyncpg.Record]:
    """Packages carried now, consigned ones changed since `since` or whose window ended since, and
    those with an open alert of `kinds`."""
    return await conn.fetch(PACKAGES, since, now, list(kinds))


async def open_alerts(conn: Conn, kinds: Sequence[str]) -> list[asyncpg.Record]:
    return await conn.fetch(OPEN, list(kinds))


async def known(conn: Conn, ids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], asyncpg.Record]:
    rows = await conn.fetch(KNOWN, [i[0] for i in ids], [i[1] for i in ids])
    return {(r["org"], r["id"]): r for r in rows}


async def fixes(
    conn: Conn, drivers: Sequence[tuple[str, str]], since: int, until: int
) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """The newest `FIXES_MAX` fixes of each driver with since <= ts <= until, oldest first."""
    out: dict[tuple[str, str], list[tuple[int, float, float]]] = {d: [] for d in drivers}
    rows = await conn.fetch(FIXES, [d[0] for d in drivers], [d[1] for d in drivers], since, until, FIXES_MAX)
    for r in rows:
        out[(r["org"], r["d"])].append((r["ts"], r["lat"], r["lon"]))
    for v in out.values():
        v.sort()
    return out


async def thresholds(conn: Conn) -> dict[str, dict[str, Any]]:
    return {r["org"]: orjson.loads(r["t"]) for r in await conn.fetch(THRESHOLDS)}


@dataclass(frozen=True, slots=True)
class Change:
    """One alert change: `event` opened, reopened, updated (its details) or resolved (`reason`)."""

    org: str
    id: str
    kind: str
    event: str
    package: str | None
    driver: str | None
    n: int
    message: str
    details: dict[str, Any] | None
    reason: str | None = None


async def commit_alerts(conn: Tx, changes: Sequence[Change], now: int) -> list[tuple[str, str]]:
    """The commit point of the periodic check's alerts (in the caller's transaction, after the
    packages concerned are locked): lock the alerts, skip what a person resolved meanwhile (a
    person's resolution is final), write the rest and their history. Returns the ids written."""
    if not changes:
        return []
    locked = await conn.fetch(LOCK_ALERTS, [c.org for c in changes], [c.id for c in changes])
    by_id = {(r["org"], r["id"]): r for r in locked}
    done: list[Change] = []
    for c in changes:
        row = by_id.get((c.org, c.id))
        if row is not None and row["state"] == "resolved" and row["resolved_by"] is not None:
            continue
        if c.event == "resolved" and (row is None or row["state"] != "open"):
            continue
        done.append(c)
    upserts = [c for c in done if c.event != "resolved"]
    if upserts:
        cols = [(c.org, c.id, c.kind, "open", c.package, c.driver, c.n, c.message, _json(c.details)) for c in upserts]
        await conn.execute(UPSERT, *(list(col) for col in zip(*cols, strict=True)), now)
    resolves = [c for c in done if c.event == "resolved"]
    if resolves:
        cols2 = [(c.org, c.id, c.reason, _json(c.details)) for c in resolves]
        await conn.execute(RESOLVE, *(list(col) for col in zip(*cols2, strict=True)), now)
    history = [(c.org, c.id, c.event, None, now, c.reason) for c in done if c.event != "updated"]
    await als.add_events(conn, history)
    return [(c.org, c.id) for c in done]


async def record_arrivals(conn: Tx, rows: Sequence[tuple[str, str, int | None, int | None]]) -> None:
    """The commit point of arrivals and departures: (org, package, arrived_at, departed_at)."""
    if rows:
        await conn.execute(ARRIVALS, *(list(col) for col in zip(*rows, strict=True)))


def _json(details: dict[str, Any] | None) -> str | None:
    return None if details is None else orjson.dumps(details).decode()
