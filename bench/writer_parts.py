"""Where PostgreSQL's CPU per stored position goes: the writer's statement taken apart.

On a fresh database, batches of --rows positions (one per driver) are stored --batches times by
each of: ``fast`` (``eventstore.FAST``: the whole live path), ``plain`` (INSERT ... SELECT FROM
unnest into the partitioned ``position_rows``: heap and its two indexes, no dedupe, no
driver_seqs), ``heap`` (the same into an unindexed, unpartitioned copy of the table) and ``hi``
(the ``driver_seqs`` upsert alone). Reported: the backend's user and system CPU per row, from
/proc/<backend pid>/stat. Run twice in a row (``--rounds``) to see the noise.

    .venv/bin/python bench/writer_parts.py [--rows 200] [--batches 200] [--rounds 2]
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
PARTS = {"fast": FAST, "plain": PLAIN, "heap": HEAP, "hi": HI}


async def run(args: argparse.Namespace) -> list[dict[str, float | str]]:
    dsn = common.fresh_database(args.database)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    out: list[dict[str, float | str]] = []
    try:
        await store.migrate(pool)
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE bare_rows (LIKE position_rows)")
            n = args.rows
            ids = await DriverKeys().ids(conn, [("bench", f"d-{i}") for i in range(n)])
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            now = int(time.time() * 1000)
            seq = 0
            for _ in range(args.rounds):
                for name, sql in PARTS.items():
                    stmt = await conn.prepare(sql)
                    u0, s0 = common.ticks2(pid)
                    for _ in range(args.batches):
                        seq += 1
                        params = [ids, [seq] * n, [now + seq] * n, [now] * n, [-1.29] * n, [36.82] * n]
                        params += [[6.0] * n, [11.0] * n, [90.0] * n, [None] * n, [0.8] * n]
                        await stmt.fetch(*(params[:2] if name == "hi" else params))
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
