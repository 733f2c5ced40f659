"""Where PostgreSQL's CPU per stored position goes: the writer's statement taken apart.

On a fresh database, batches of --rows positions (one per driver) are stored --batches times by
each of: ``fast`` (``eventstore.FAST``: the whole live path), ``plain`` (INSERT ... SELECT FROM
unnest into the partitioned ``position_rows``: heap and its two indexes, no dedupe, no
driver_seqs), ``heap`` (the same into an unindexed, unpartitioned copy of the table) and ``hi``
(the ``driver_seqs`` upsert alone); and the candidates measured for issue 13 (``joined``: FAST
before it returned the stored keys as they are; ``update``: the hi rows UPDATEd instead of upserted;
``fast_one_index``: FAST into a day partition with the one unique (driver, ts, seq) index;
``noseqs``: no ``driver_seqs``, the seq probed in the open days' partitions; ``conflict_only``:
no ``driver_seqs`` and no probe; ``uniq_seq``, ``trail``, ``uniq_ts_seq``: an unpartitioned copy
with that one index). Reported: the backend's user and system CPU per row, from
/proc/<backend pid>/stat. Run twice in a row (``--rounds``) to see the noise.

    .venv/bin/python bench/writer_parts.py [--rows 200] [--batches 200] [--rounds 2] [--parts fast,plain]
        [--pace-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root

import common
from common import log

from tracker import store
from tracker.eventstore import FAST, DriverKeys

PLAIN = """
INSERT INTO position_rows (seq, ts, received_at, lat, lon, driver, acc, spd, hdg, alt, bat)
SELECT * FROM unnest($2::int8[], $3::int8[], $4::int8[], $5::float8[], $6::float8[], $1::int4[], $7::float4[],
                     $8::float4[], $9::float4[], $10::float4[], $11::float4[])
"""
HEAP = PLAIN.replace("INTO position_rows", "INTO bare_rows")
HI = """
INSERT INTO driver_seqs AS w (driver, hi)
SELECT d, max(s) FROM unnest($1::int4[], $2::int8[]) AS x(d, s) GROUP BY d ORDER BY d
ON CONFLICT (driver) DO UPDATE SET hi = EXCLUDED.hi WHERE w.hi < EXCLUDED.hi
"""
# Candidates (issue 13, "Storage at fleet scale"): FAST without driver_seqs, a position's seq
# probed in the open days' partitions instead ($12: where they start; the day the row lands in
# is checked by ON CONFLICT); and unpartitioned copies of the table with one index each.
NOSEQS = """
WITH t AS (
    SELECT * FROM unnest($1::int4[], $2::int8[], $3::int8[], $4::int8[], $5::float8[], $6::float8[],
                         $7::float4[], $8::float4[], $9::float4[], $10::float4[], $11::float4[])
        AS t(driver, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)
), p AS (
    INSERT INTO position_rows (seq, ts, received_at, lat, lon, driver, acc, spd, hdg, alt, bat)
    SELECT t.seq, t.ts, t.received_at, t.lat, t.lon, t.driver, t.acc, t.spd, t.hdg, t.alt, t.bat
    FROM t
    WHERE t.ts >= (SELECT floor_ts FROM position_floor)
      AND NOT EXISTS (SELECT FROM position_rows x WHERE x.driver = t.driver AND x.seq = t.seq AND x.ts >= $12)
    ON CONFLICT DO NOTHING
    RETURNING driver, seq
)
SELECT array_agg(driver) AS drivers, array_agg(seq) AS seqs FROM p
"""
ONLY_CONFLICT = NOSEQS.replace(
    "\n      AND NOT EXISTS (SELECT FROM position_rows x WHERE x.driver = t.driver AND x.seq = t.seq AND x.ts >= $12)",
    "\n      AND $12::int8 IS NOT NULL",
)
DAY = 86_400_000
ONE_INDEX = {  # table: its one index
    "uniq_seq": "CREATE UNIQUE INDEX ON {} (driver, seq)",
    "trail": "CREATE INDEX ON {} (driver, ts)",
    "uniq_ts_seq": "CREATE UNIQUE INDEX ON {} (driver, ts, seq)",
}
# JOINED: FAST as it was before 2026-11-30 12:30 (the stored rows' input indexes, by a join back to the
# input); UPDATE: FAST with the hi rows UPDATEd where present (nothing upserts the absent here).
JOINED = FAST.replace(
    "SELECT array_agg(driver) AS drivers, array_agg(seq) AS seqs FROM p",
    "SELECT array_agg(t.i) AS stored FROM t JOIN p ON p.driver = t.driver AND p.seq = t.seq",
).replace(
    "        AS t(driver, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)",
    "        WITH ORDINALITY AS t(driver, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat, i)",
)
assert JOINED.count("ORDINALITY") == 1 and "t.i" in JOINED
UPDATE = FAST.replace(
    """), hi AS (
    INSERT INTO driver_seqs AS w (driver, hi)
    SELECT driver, max(seq) FROM p GROUP BY driver ORDER BY driver  -- locked in id order: no deadlock
    ON CONFLICT (driver) DO UPDATE SET hi = EXCLUDED.hi WHERE w.hi < EXCLUDED.hi
)""",
    """), m AS (
    SELECT driver, max(seq) AS hi FROM p GROUP BY driver
), hi AS (
    UPDATE driver_seqs w SET hi = m.hi FROM m WHERE w.driver = m.driver AND w.hi < m.hi
)""",
)
ONE_PART = FAST.replace("INSERT INTO position_rows", "INSERT INTO rows1")
PARTS = {"fast": FAST, "joined": JOINED, "update": UPDATE, "fast_one_index": ONE_PART, "noseqs": NOSEQS}
PARTS |= {"conflict_only": ONLY_CONFLICT, "plain": PLAIN, "heap": HEAP, "hi": HI}
PARTS |= {name: PLAIN.replace("INTO position_rows", f"INTO rows_{name}") for name in ONE_INDEX}


async def run(args: argparse.Namespace) -> list[dict[str, float | str]]:
    dsn = common.fresh_database(args.database)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    out: list[dict[str, float | str]] = []
    try:
        await store.migrate(pool)
        async with pool.acquire() as conn:
            now = int(time.time() * 1000)
            await conn.execute("CREATE TABLE bare_rows (LIKE position_rows)")
            await conn.execute("CREATE TABLE rows1 (LIKE position_rows) PARTITION BY RANGE (ts)")
            await conn.execute(
                f"CREATE TABLE rows1_day PARTITION OF rows1 FOR VALUES FROM ({now - DAY}) TO ({now + DAY})"
            )
            await conn.execute("CREATE UNIQUE INDEX ON rows1_day (driver, ts, seq)")
            for name, index in ONE_INDEX.items():
                await conn.execute(f"CREATE TABLE rows_{name} (LIKE position_rows)")
                await conn.execute(index.format(f"rows_{name}"))
            n = args.rows
            ids = await DriverKeys().ids(conn, [("bench", f"d-{i}") for i in range(n)])
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            seq = 0
            for _ in range(args.rounds):
                for name, sql in PARTS.items():
                    if args.parts and name not in args.parts.split(","):
                        continue
                    stmt = await conn.prepare(sql)
                    u0, s0 = common.ticks2(pid)
                    for _ in range(args.batches):
                        seq += 1
                        params = [ids, [seq] * n, [now + seq] * n, [now] * n, [-1.29] * n, [36.82] * n]
                        params += [[6.0] * n, [11.0] * n, [90.0] * n, [None] * n, [0.8] * n]
                        if name == "hi":
                            params = params[:2]
                        elif name in ("noseqs", "conflict_only"):
                            params.append(now - DAY - now % DAY)
                        await stmt.fetch(*params)
                        if args.pace_ms:
                            await asyncio.sleep(args.pace_ms / 1000)
                    u1, s1 = common.ticks2(pid)
                    rows = args.batches * n
                    r = {
                        "part": name,
                        "user_us_per_row": round((u1 - u0) / common.CLK_TCK / rows * 1e6, 1),
                        "system_us_per_row": round((s1 - s0) / common.CLK_TCK / rows * 1e6, 1),
                    }
                    log(str(r))
                    out.append(r)
    finally:
        await pool.close()
        common.psql(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200, help="positions per statement (one per driver)")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--database", default="bench_writer_parts")
    p.add_argument("--parts", default="", help="comma-separated: only these parts (default: all)")
    p.add_argument("--pace-ms", type=float, default=0.0, help="sleep between statements (20: a live flush's pace)")
    args = p.parse_args()
    info = common.machine()
    log(f"machine: {info}")
    result = asyncio.run(run(args))
    info["load_end"] = common.load_average()
    path = common.save("writer_parts", {"machine": info, "args": vars(args), "result": result})
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
