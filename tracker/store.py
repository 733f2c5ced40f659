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
PARTITION_AHEAD_DAYS: Final = 3  # days of position partitions kept ready past today (ts may be 1 day ahead)


async def migrate(pool: asyncpg.Pool, extra: Sequence[Migration] = ()) -> int:
    """Apply pending migrations (the core's, then `extra` from extensions, by version);
    idempotent and safe with several instances starting at once."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tracker_schema (version int PRIMARY KEY, applied_at timestamptz DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM tracker_schema")}
        applied: list[int] = []
        for version, sql in sorted([*MIGRATIONS, *extra]):
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO tracker_schema (version) VALUES ($1)", version)
            applied.append(version)
        if applied:  # one line, however many: a new database's start stays a short banner
            log.info("applied migration%s %s", "s" if len(applied) > 1 else "", ", ".join(map(str, applied)))
        if await conn.fetchval("SELECT to_regprocedure('tracker_position_days(integer)') IS NOT NULL"):
            # Day partitions of positions up to PARTITION_AHEAD_DAYS from now (tracker/partitions.py
            # keeps them ahead while the service runs): a database migrated days ago stays writable.
            await conn.execute(
                "SELECT tracker_position_days((extract(epoch FROM now())::bigint / 86400)::integer + $1)",
                PARTITION_AHEAD_DAYS,
            )
        return len(applied)


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


def stored_identity(row: asyncpg.Record) -> tuple[Any, ...]:
    if row["kind"] == "pos":
        return ("pos", *(row[k] for k in ("ts", "lat", "lon", "acc", "spd", "hdg", "alt", "bat")))
    return ("scan", *(row[k] for k in ("ts", "package", "event", "lat", "lon", "temp_c", "note", "recipient", "pod")))


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
            -- A known driver keeps its id: the identity's nextval only for a new one (an upsert
            -- evaluates the default for every row it proposes, so each reconnect would use one).
            INSERT INTO drivers (id, org, driver_id, name, last_connected_at)
            SELECT coalesce(x.id, nextval(pg_get_serial_sequence('drivers', 'id'))), n.org, n.d, n.name, now()
            FROM (SELECT DISTINCT ON (org, d) org, d, name FROM k ORDER BY org, d, i DESC) n
                LEFT JOIN drivers x ON x.org = n.org AND x.driver_id = n.d
            ORDER BY n.org, n.d
            ON CONFLICT (org, driver_id) DO UPDATE
                SET name = coalesce(EXCLUDED.name, drivers.name), last_connected_at = now()
        )
        SELECT k.i, greatest((SELECT w.hi FROM drivers x JOIN driver_seqs w ON w.driver = x.id
                              WHERE x.org = k.org AND x.driver_id = k.d),
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
            SELECT * FROM position_rows p WHERE p.driver = d.id ORDER BY p.ts DESC LIMIT 1
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
        SELECT seq, ts, lat, lon, spd, hdg, acc, bat FROM position_rows
        WHERE driver = (SELECT id FROM drivers WHERE org = $1 AND driver_id = $2) AND ts >= $3 AND ts < $4
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
        "SELECT count(*) FROM position_rows WHERE driver = (SELECT id FROM drivers WHERE org = $1 AND driver_id = $2)"
        " AND ts >= $3 AND ts < $4",
        org,
        driver,
        start,
        end,
    )
    return int(value)
