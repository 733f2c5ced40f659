"""SQL and migrations; batched idempotent writes; reads for snapshots and trails.

All SQL is static text with `$n` parameters; nothing is built from input.
Times are integer milliseconds since the Unix epoch (as on the wire): `ts` is the phone's clock,
`received_at` the server's.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg

from .protocol.events import Position, Scan

log = logging.getLogger("tracker.store")

Migration = tuple[int, str]


def load_migrations(folder: Path) -> list[Migration]:
    """`NNNN_name.sql` files of a folder, as (version NNNN, SQL). Versions are global: the core
    and the extensions number their migrations from one sequence."""
    return sorted((int(f.name.split("_", 1)[0]), f.read_text()) for f in folder.glob("[0-9]*_*.sql"))


SQL_DIR: Final = Path(__file__).parent / "sql"
MIGRATION_LOCK: Final = 0x7472_6B72  # "trkr": one advisory lock serialises concurrent migrators

MIGRATIONS: Final = load_migrations(SQL_DIR)


async def migrate(pool: asyncpg.Pool, extra: Sequence[Migration] = ()) -> int:
    """Apply pending migrations (the core's, then `extra` from extensions, by version);
    idempotent and safe with several instances starting at once."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tracker_schema (version int PRIMARY KEY, applied_at timestamptz DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM tracker_schema")}
        applied = 0
        for version, sql in sorted([*MIGRATIONS, *extra]):
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO tracker_schema (version) VALUES ($1)", version)
            applied += 1
            log.info("applied migration %d", version)
        return applied


@dataclass(slots=True)
class Pending:
    """One accepted event waiting to be stored. `owner` is whom to answer (a driver session)."""

    owner: Any
    org: str
    driver: str
    event: Position | Scan
    received_at: int
    deferred: bool = False  # not live at receipt: goes live after its commit, if stored (ingest.py)
    seal: bytes | None = None  # a scan's MAC by the extension, computed at receipt (Extension.seal)
    offset_ms: int | None = None  # the connection's clock offset at receipt (DriverConn.clock_offset)


INSERT_POSITIONS: Final = """
INSERT INTO positions (org, driver_id, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)
SELECT t.* FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::float8[], $7::float8[],
                       $8::float4[], $9::float4[], $10::float4[], $11::float4[], $12::float4[])
    AS t(org, driver_id, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)
-- OFFSET 0 keeps this a per-row index probe: flattened into an anti-join, the planner hashes
-- the whole other table for every batch.
WHERE NOT EXISTS (SELECT 1 FROM scans s WHERE s.org = t.org AND s.driver_id = t.driver_id AND s.seq = t.seq OFFSET 0)
ON CONFLICT DO NOTHING
"""

INSERT_SCANS: Final = """
INSERT INTO scans (org, driver_id, seq, ts, received_at, package, event, lat, lon, temp_c, note, recipient, pod,
                   seal, offset_ms)
SELECT t.* FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[], $7::text[],
                       $8::float8[], $9::float8[], $10::float4[], $11::text[], $12::text[], $13::text[],
                       $14::bytea[], $15::int8[])
    AS t(org, driver_id, seq, ts, received_at, package, event, lat, lon, temp_c, note, recipient, pod, seal,
         offset_ms)
WHERE NOT EXISTS (SELECT 1 FROM positions p WHERE p.org = t.org AND p.driver_id = t.driver_id AND p.seq = t.seq
                  OFFSET 0)
ON CONFLICT DO NOTHING
"""

# What is stored under each key now (read after the inserts, so rows committed meanwhile by
# another instance are seen too): the whole content decides "same event" (ack) or "conflict".
EXISTING: Final = """
SELECT k.i, 'pos' AS kind, p.ts, p.lat, p.lon, p.acc, p.spd, p.hdg, p.alt, p.bat, NULL::text AS package,
       NULL::text AS event, NULL::real AS temp_c, NULL::text AS note, NULL::text AS recipient, NULL::text AS pod
FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS k(org, d, seq, i)
    JOIN positions p ON p.org = k.org AND p.driver_id = k.d AND p.seq = k.seq
UNION ALL
SELECT k.i, 'scan', s.ts, s.lat, s.lon, NULL, NULL, NULL, NULL, NULL, s.package, s.event, s.temp_c, s.note,
       s.recipient, s.pod
FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS k(org, d, seq, i)
    JOIN scans s ON s.org = k.org AND s.driver_id = k.d AND s.seq = k.seq
"""


def _real(value: float | None) -> float | None:
    """`value` as a `real` (float4) column stores it, so that a resend compares equal to the row."""
    if value is None:
        return None
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:  # out of float4's range: cannot be stored, so it cannot equal a row
        return value


def identity(ev: Position | Scan) -> tuple[Any, ...]:
    """What names an event under its seq: its whole content as stored (every field the phone sent
    but `seq`; optional numbers at the precision of their `real` columns). The same seq with the
    same identity is a resend (ack); with another identity, a `conflict`."""
    if type(ev) is Position:
        return ("pos", ev.ts, ev.lat, ev.lon, _real(ev.acc), _real(ev.spd), _real(ev.hdg), _real(ev.alt), _real(ev.bat))
    sc: Scan = ev  # type: ignore[assignment]
    return ("scan", sc.ts, sc.package, sc.event, sc.lat, sc.lon, _real(sc.temp_c), sc.note, sc.recipient, sc.pod)


def _stored_identity(row: asyncpg.Record) -> tuple[Any, ...]:
    if row["kind"] == "pos":
        return ("pos", *(row[k] for k in ("ts", "lat", "lon", "acc", "spd", "hdg", "alt", "bat")))
    return ("scan", *(row[k] for k in ("ts", "package", "event", "lat", "lon", "temp_c", "note", "recipient", "pod")))


def _inserted(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


async def insert_events(conn: asyncpg.Connection, items: Sequence[Pending]) -> list[bool]:
    """Store `items` in one transaction; returns, per item, True if that very event is stored
    (now or before: an ack) and False if its seq names a different event (`conflict`).

    Keys must be unique within `items` (the writer dedupes first). Raises asyncpg errors as is;
    the caller decides between retrying (connection) and bisecting (data).
    """
    pos = [it for it in items if type(it.event) is Position]
    scans = [it for it in items if type(it.event) is Scan]
    stored = 0
    async with conn.transaction():
        if pos:
            ev: list[Position] = [it.event for it in pos]  # type: ignore[misc]
            status = await conn.execute(
                INSERT_POSITIONS,
                [it.org for it in pos],
                [it.driver for it in pos],
                [e.seq for e in ev],
                [e.ts for e in ev],
                [it.received_at for it in pos],
                [e.lat for e in ev],
                [e.lon for e in ev],
                [e.acc for e in ev],
                [e.spd for e in ev],
                [e.hdg for e in ev],
                [e.alt for e in ev],
                [e.bat for e in ev],
            )
            stored += _inserted(status)
        if scans:
            sv: list[Scan] = [it.event for it in scans]  # type: ignore[misc]
            status = await conn.execute(
                INSERT_SCANS,
                [it.org for it in scans],
                [it.driver for it in scans],
                [e.seq for e in sv],
                [e.ts for e in sv],
                [it.received_at for it in scans],
                [e.package for e in sv],
                [e.event for e in sv],
                [e.lat for e in sv],
                [e.lon for e in sv],
                [e.temp_c for e in sv],
                [e.note for e in sv],
                [e.recipient for e in sv],
                [e.pod for e in sv],
                [it.seal for it in scans],
                [it.offset_ms for it in scans],
            )
            stored += _inserted(status)
        if stored == len(items):
            return [True] * len(items)
        # Some keys were taken already: compare with what is stored under them.
        rows = await conn.fetch(
            EXISTING, [it.org for it in items], [it.driver for it in items], [it.event.seq for it in items]
        )
    verdict = [True] * len(items)
    for row in rows:
        it = items[row["i"] - 1]
        verdict[row["i"] - 1] = _stored_identity(row) == identity(it.event)
    return verdict


async def drivers_hello(
    conn: asyncpg.Connection | asyncpg.Pool, keys: Sequence[tuple[str, str, str | None]]
) -> list[int]:
    """Record connections of (org, driver, name) in one statement; return each one's highest
    stored seq (0 if none): welcome's `last_seq`. Rows are locked in key order, so two instances
    doing this at once cannot deadlock."""
    rows = await conn.fetch(
        """
        WITH k AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(org, d, name, i)
        ), up AS (
            INSERT INTO drivers (org, driver_id, name, last_connected_at)
            SELECT DISTINCT ON (org, d) org, d, name, now() FROM k ORDER BY org, d, i DESC
            ON CONFLICT (org, driver_id) DO UPDATE
                SET name = coalesce(EXCLUDED.name, drivers.name), last_connected_at = now()
        )
        SELECT k.i, greatest((SELECT max(seq) FROM positions p WHERE p.org = k.org AND p.driver_id = k.d),
                             (SELECT max(seq) FROM scans s WHERE s.org = k.org AND s.driver_id = k.d)) AS last
        FROM k ORDER BY k.i
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )
    return [int(row["last"] or 0) for row in rows]


async def last_positions(
    conn: asyncpg.Connection | asyncpg.Pool, org: str, drivers: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Each driver's latest stored position (by phone ts), with its name: the snapshot's fallback
    when Redis has lost the live state."""
    rows = await conn.fetch(
        """
        SELECT d.driver_id, d.name, p.seq, p.ts, p.received_at, p.lat, p.lon, p.acc, p.spd, p.hdg, p.alt, p.bat
        FROM drivers d
        CROSS JOIN LATERAL (
            SELECT * FROM positions p WHERE p.org = d.org AND p.driver_id = d.driver_id
            ORDER BY p.ts DESC LIMIT 1
        ) p
        WHERE d.org = $1 AND ($2::text[] IS NULL OR d.driver_id = ANY($2::text[]))
        """,
        org,
        list(drivers) if drivers is not None else None,
    )
    return [dict(row) for row in rows]


async def driver_names(conn: asyncpg.Connection | asyncpg.Pool, org: str) -> dict[str, str | None]:
    rows = await conn.fetch("SELECT driver_id, name FROM drivers WHERE org = $1", org)
    return {row["driver_id"]: row["name"] for row in rows}


async def trail(
    conn: asyncpg.Connection | asyncpg.Pool, org: str, driver: str, start: int, end: int, limit: int
) -> list[asyncpg.Record]:
    """Stored positions of one driver with start <= ts < end, in ts order, at most `limit` + 1."""
    return await conn.fetch(
        """
        SELECT seq, ts, lat, lon, spd, hdg, acc, bat FROM positions
        WHERE org = $1 AND driver_id = $2 AND ts >= $3 AND ts < $4
        ORDER BY ts LIMIT $5
        """,
        org,
        driver,
        start,
        end,
        limit + 1,
    )


async def count_trail(conn: asyncpg.Connection | asyncpg.Pool, org: str, driver: str, start: int, end: int) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM positions WHERE org = $1 AND driver_id = $2 AND ts >= $3 AND ts < $4",
        org,
        driver,
        start,
        end,
    )
    return int(value)
