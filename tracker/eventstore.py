"""Storing a batch of events: one statement, one round trip, no BEGIN/COMMIT.

`insert_events` stores positions (into the day partitions of `position_rows`, keyed by the
driver's integer id) and scans with `INSERT ... SELECT FROM unnest(arrays)` statements with
data-modifying CTEs: a single statement is its own transaction, so it commits in the same round
trip that carries it. Live traffic (positions above their driver's highest stored seq) takes one
statement (FAST; from COPY_MIN positions on, COPYed into a stage first, in a transaction);
the rest (resends, out-of-order backlogs, scans) a statement with the probes
(INSERT), and what that did not store a read-only statement comparing it with what is stored
under its key (EXISTING).

Uniqueness of (org, driver, seq) across partitions and tables (sql/0008): a day partition's
unique (driver, seq) index catches a resend (same event, same ts, same day); `driver_seqs.hi`
(the driver's highest stored seq, raised in the same statement) lets an event above it skip every
probe, and an event at or below it probes all partitions and `scans` for its seq, so a different
event under a taken seq is a `conflict` whichever day holds the first one. Two instances storing
different events under one new seq of one driver at the very same moment can both succeed (as
two transactions' NOT EXISTS could before this change): only a phone that is itself broken does
that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, cast

import asyncpg

from .protocol.events import Position, Scan
from .store import PARTITION_AHEAD_DAYS, Pending, identity, stored_identity

# The common case: positions above their driver's highest stored seq. No probe of other days or of
# scans (whose cost would grow with the number of partitions: each is an index scan to set up);
# returns the keys (driver, seq) of the rows stored, as two arrays (joining them back to the input
# in the statement cost ~0.5-1 us of PostgreSQL CPU per row: BENCHMARKS.md, issue 13 at a low load).
# What it leaves goes through INSERT below.
FAST: Final = """
WITH t AS (
    SELECT * FROM unnest($1::int4[], $2::int8[], $3::int8[], $4::int8[], $5::float8[], $6::float8[],
                         $7::float4[], $8::float4[], $9::float4[], $10::float4[], $11::float4[])
        AS t(driver, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)
), p AS (
    INSERT INTO position_rows (seq, ts, received_at, lat, lon, driver, acc, spd, hdg, alt, bat)
    SELECT t.seq, t.ts, t.received_at, t.lat, t.lon, t.driver, t.acc, t.spd, t.hdg, t.alt, t.bat
    FROM t LEFT JOIN driver_seqs w ON w.driver = t.driver
    WHERE t.seq > coalesce(w.hi, 0) AND t.ts >= (SELECT floor_ts FROM position_floor)
    ON CONFLICT DO NOTHING
    RETURNING driver, seq
), hi AS (
    INSERT INTO driver_seqs AS w (driver, hi)
    SELECT driver, max(seq) FROM p GROUP BY driver ORDER BY driver  -- locked in id order: no deadlock
    ON CONFLICT (driver) DO UPDATE SET hi = EXCLUDED.hi WHERE w.hi < EXCLUDED.hi
)
SELECT array_agg(driver) AS drivers, array_agg(seq) AS seqs FROM p
"""

# FAST for a large batch, from a stage filled by COPY (bench/writer.py: at 5,000 rows 1.9x the rows/s,
# PostgreSQL 22 against 27 us/row, tracker 2 against 6 us/row; at 40 rows 2.5x costlier, hence
# COPY_MIN). The stage empties at the commit: a failure leaves nothing behind on the connection.
COPY_MIN: Final = 1_000
STAGE: Final = """
CREATE TEMP TABLE IF NOT EXISTS tracker_stage (seq int8, ts int8, received_at int8, lat float8, lon float8,
    driver int4, acc float4, spd float4, hdg float4, alt float4, bat float4) ON COMMIT DELETE ROWS
"""
STAGE_COLUMNS: Final = ("seq", "ts", "received_at", "lat", "lon", "driver", "acc", "spd", "hdg", "alt", "bat")
FAST_STAGED: Final = FAST.replace(
    """    SELECT * FROM unnest($1::int4[], $2::int8[], $3::int8[], $4::int8[], $5::float8[], $6::float8[],
                         $7::float4[], $8::float4[], $9::float4[], $10::float4[], $11::float4[])
        AS t(driver, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)""",
    "    SELECT * FROM tracker_stage",
)


def position_columns(items: Sequence[Pending], drivers: Sequence[int]) -> list[list[Any]]:
    """The parameters $1-$11 of FAST and INSERT: one array per column of `position_rows`."""
    ev: list[Any] = [it.event for it in items]
    return [
        list(drivers),
        [e.seq for e in ev],
        [e.ts for e in ev],
        [it.received_at for it in items],
        [e.lat for e in ev],
        [e.lon for e in ev],
        [e.acc for e in ev],
        [e.spd for e in ev],
        [e.hdg for e in ev],
        [e.alt for e in ev],
        [e.bat for e in ev],
    ]


async def store_staged(conn: asyncpg.Connection, items: Sequence[Pending], drivers: Sequence[int]) -> Any:
    """FAST_STAGED for positions (all new-looking): COPY into the stage, one statement from it, in
    one transaction; the row FAST returns."""
    records = [
        (e.seq, e.ts, it.received_at, e.lat, e.lon, d, e.acc, e.spd, e.hdg, e.alt, e.bat)
        for it, d in zip(items, drivers, strict=True)
        for e in (cast(Position, it.event),)
    ]
    async with conn.transaction():
        await conn.execute(STAGE)
        await conn.copy_records_to_table("tracker_stage", records=records, columns=STAGE_COLUMNS)
        return await conn.fetchrow(FAST_STAGED)


# Any batch: positions and scans, each probed for its seq in every partition and in scans when
# at or below its driver's highest stored seq.
INSERT: Final = """
WITH tp AS (
    SELECT * FROM unnest($1::int4[], $2::int8[], $3::int8[], $4::int8[], $5::float8[], $6::float8[],
                         $7::float4[], $8::float4[], $9::float4[], $10::float4[], $11::float4[])
        AS t(driver, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)
), tsc AS (
    SELECT * FROM unnest($12::int4[], $13::text[], $14::text[], $15::int8[], $16::int8[], $17::int8[], $18::text[],
                         $19::text[], $20::float8[], $21::float8[], $22::float4[], $23::text[], $24::text[],
                         $25::text[], $26::bytea[], $27::int8[])
        AS t(driver, org, driver_id, seq, ts, received_at, package, event, lat, lon, temp_c, note, recipient, pod,
             seal, offset_ms)
), p AS (
    INSERT INTO position_rows (seq, ts, received_at, lat, lon, driver, acc, spd, hdg, alt, bat)
    SELECT t.seq, t.ts, t.received_at, t.lat, t.lon, t.driver, t.acc, t.spd, t.hdg, t.alt, t.bat
    FROM tp t LEFT JOIN driver_seqs w ON w.driver = t.driver
    WHERE t.ts >= (SELECT floor_ts FROM position_floor)
      AND (t.seq > coalesce(w.hi, 0) OR (
          NOT EXISTS (SELECT 1 FROM position_rows x WHERE x.driver = t.driver AND x.seq = t.seq)
          AND NOT EXISTS (SELECT 1 FROM drivers d JOIN scans s ON s.org = d.org AND s.driver_id = d.driver_id
                          WHERE d.id = t.driver AND s.seq = t.seq)))
    ON CONFLICT DO NOTHING
    RETURNING driver, seq
), s AS (
    INSERT INTO scans (org, driver_id, seq, ts, received_at, package, event, lat, lon, temp_c, note, recipient, pod,
                       seal, offset_ms)
    SELECT t.org, t.driver_id, t.seq, t.ts, t.received_at, t.package, t.event, t.lat, t.lon, t.temp_c, t.note,
           t.recipient, t.pod, t.seal, t.offset_ms
    FROM tsc t LEFT JOIN driver_seqs w ON w.driver = t.driver
    WHERE t.seq > coalesce(w.hi, 0)
       OR NOT EXISTS (SELECT 1 FROM position_rows x WHERE x.driver = t.driver AND x.seq = t.seq)
    ON CONFLICT DO NOTHING
    RETURNING org, driver_id, seq
), hi AS (
    INSERT INTO driver_seqs AS w (driver, hi)
    SELECT n.driver, max(n.seq) FROM (
        SELECT driver, seq FROM p
        UNION ALL
        SELECT t.driver, t.seq FROM s JOIN tsc t ON t.org = s.org AND t.driver_id = s.driver_id AND t.seq = s.seq
    ) n GROUP BY n.driver ORDER BY n.driver  -- rows locked in id order: concurrent flushes cannot deadlock
    ON CONFLICT (driver) DO UPDATE SET hi = EXCLUDED.hi WHERE w.hi < EXCLUDED.hi
)
SELECT (SELECT count(*) FROM p) + (SELECT count(*) FROM s)
"""

# What is stored under each key now (a statement after the insert's, so rows another instance
# committed meanwhile are seen too), and the expiry floor.
EXISTING: Final = """
SELECT k.i, 'pos' AS kind, p.ts, p.lat, p.lon, p.acc, p.spd, p.hdg, p.alt, p.bat, NULL::text AS package,
       NULL::text AS event, NULL::real AS temp_c, NULL::text AS note, NULL::text AS recipient, NULL::text AS pod
FROM unnest($1::int4[], $2::int8[]) WITH ORDINALITY AS k(driver, seq, i)
    JOIN position_rows p ON p.driver = k.driver AND p.seq = k.seq
UNION ALL
SELECT k.i, 'scan', s.ts, s.lat, s.lon, NULL, NULL, NULL, NULL, NULL, s.package, s.event, s.temp_c, s.note,
       s.recipient, s.pod
FROM unnest($1::int4[], $2::int8[]) WITH ORDINALITY AS k(driver, seq, i)
    JOIN drivers d ON d.id = k.driver JOIN scans s ON s.org = d.org AND s.driver_id = d.driver_id AND s.seq = k.seq
UNION ALL
SELECT 0, 'floor', floor_ts, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM position_floor
"""

DRIVER_IDS: Final = """
WITH k AS (SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS k(org, d)),
ins AS (
    INSERT INTO drivers (org, driver_id)  -- only the absent: each proposed row uses an identity value
    SELECT org, d FROM k WHERE NOT EXISTS (SELECT FROM drivers x WHERE x.org = k.org AND x.driver_id = k.d)
    ORDER BY org, d
    ON CONFLICT DO NOTHING RETURNING org, driver_id, id
)
SELECT org, driver_id, id FROM ins
UNION ALL
SELECT x.org, x.driver_id, x.id FROM drivers x JOIN k ON x.org = k.org AND x.driver_id = k.d
"""


class Unsettled(RuntimeError):
    """An event was neither stored nor found stored (a day dropped meanwhile): retry the batch."""


class DriverKeys:
    """(org, driver) -> `drivers.id`, cached for the process's life: an id never changes."""

    def __init__(self, *, max_size: int = 1_000_000) -> None:
        self._ids: dict[tuple[str, str], int] = {}
        self._max = max_size

    async def ids(self, conn: Any, keys: Sequence[tuple[str, str]]) -> list[int]:
        """One id per key, in order; unknown drivers get a `drivers` row (one query per miss set)."""
        ids = self._ids
        missing = sorted({k for k in keys if k not in ids})
        for _ in range(3):  # a row another instance inserts meanwhile is seen on the next try
            if not missing:
                break
            if len(ids) + len(missing) > self._max:
                ids.clear()  # bounded memory; ids are re-read on the next misses
            rows = await conn.fetch(DRIVER_IDS, [k[0] for k in missing], [k[1] for k in missing])
            for row in rows:
                ids[(row["org"], row["driver_id"])] = row["id"]
            missing = [k for k in missing if k not in ids]
        if missing:
            raise Unsettled(f"no drivers row for {len(missing)} drivers")
        return [ids[k] for k in keys]


async def insert_events(conn: asyncpg.Connection, items: Sequence[Pending], drivers: Sequence[int]) -> list[bool]:
    """`store_events`, creating the day partitions first if one is missing (they are kept 3 days
    ahead, and a phone's ts is at most a day ahead: a missing day is the service's fault, never
    the event's, so it is never refused `invalid` for it)."""
    try:
        return await store_events(conn, items, drivers)
    except asyncpg.CheckViolationError as exc:
        if "no partition" not in str(exc):
            raise
        made = await conn.fetchval(
            "SELECT tracker_position_days((extract(epoch FROM now())::bigint / 86400)::integer + $1)",
            PARTITION_AHEAD_DAYS,
        )
        if not made:
            raise Unsettled(f"no day partition for a row ({exc})") from exc
        return await store_events(conn, items, drivers)


async def store_events(conn: asyncpg.Connection, items: Sequence[Pending], drivers: Sequence[int]) -> list[bool]:
    """Store `items` (of the drivers `drivers`, by id, one per item); returns,
    per item, True for an ack (that very event is stored, now or before, or it is a position
    older than the retention floor: expired, not stored) and False for a `conflict` (its seq
    names a different event).

    One statement, one round trip, when the batch is positions above their drivers' highest
    stored seqs (live traffic); resends, backlogs and scans take a second statement (with the
    probes), and a third (a read) when some were not stored.

    Keys must be unique within `items` (the writer dedupes first). Raises asyncpg errors as is;
    the caller decides between retrying (connection) and bisecting (data); `Unsettled` is a retry.
    """
    if all(type(it.event) is Position for it in items):
        # One round trip for the common case; the rest (resends, backlogs, conflicts) below.
        ev: list[Any] = [it.event for it in items]
        if len(items) >= COPY_MIN:
            row = await store_staged(conn, items, drivers)
        else:
            row = await conn.fetchrow(FAST, *position_columns(items, drivers))
        assert row is not None
        done = set(zip(row["drivers"] or (), row["seqs"] or (), strict=True))
        if len(done) == len(items):
            return [True] * len(items)
        rest = [k for k in range(len(items)) if (drivers[k], ev[k].seq) not in done]
        verdicts = await _insert_and_compare(conn, [items[k] for k in rest], [drivers[k] for k in rest])
        out = [True] * len(items)
        for k, ok in zip(rest, verdicts, strict=True):
            out[k] = ok
        return out
    return await _insert_and_compare(conn, items, drivers)


async def _insert_and_compare(conn: Any, items: Sequence[Pending], drivers: Sequence[int]) -> list[bool]:
    """INSERT (with every probe), then, for what it did not store, EXISTING."""
    pos = [(it, d) for it, d in zip(items, drivers, strict=True) if type(it.event) is Position]
    scans = [(it, d) for it, d in zip(items, drivers, strict=True) if type(it.event) is Scan]
    sv: list[Any] = [it.event for it, _ in scans]
    stored = await conn.fetchval(
        INSERT,
        *position_columns([it for it, _ in pos], [d for _, d in pos]),
        [d for _, d in scans],
        [it.org for it, _ in scans],
        [it.driver for it, _ in scans],
        [e.seq for e in sv],
        [e.ts for e in sv],
        [it.received_at for it, _ in scans],
        [e.package for e in sv],
        [e.event for e in sv],
        [e.lat for e in sv],
        [e.lon for e in sv],
        [e.temp_c for e in sv],
        [e.note for e in sv],
        [e.recipient for e in sv],
        [e.pod for e in sv],
        [it.seal for it, _ in scans],
        [it.offset_ms for it, _ in scans],
    )
    if stored == len(items):
        return [True] * len(items)
    # Some were not stored: compare with what is stored under their keys.
    rows = await conn.fetch(EXISTING, list(drivers), [it.event.seq for it in items])
    floor = 0
    found: dict[int, bool] = {}
    for row in rows:
        if row["kind"] == "floor":
            floor = row["ts"]
        else:
            found[row["i"] - 1] = stored_identity(row) == identity(items[row["i"] - 1].event)
    verdict = []
    for i, it in enumerate(items):
        if i in found:
            verdict.append(found[i])
        elif type(it.event) is Position and it.event.ts < floor:
            verdict.append(True)  # its day has expired: acknowledged, not stored (PROTOCOL.md, Retention)
        else:
            raise Unsettled(f"{it.org}/{it.driver} seq {it.event.seq} neither stored nor found")
    return verdict
