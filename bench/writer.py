"""PostgreSQL write rate of the batch writer alone (no websockets): rows/s and CPU per row.

Three ways to store a batch of positions idempotently, on one connection, batch after batch:

- ``unnest``: the current path, ``tracker.store.insert_events`` (INSERT ... SELECT FROM
  unnest(arrays) WHERE NOT EXISTS (the scans table) ON CONFLICT DO NOTHING, in a transaction);
- ``copy``: asyncpg ``copy_records_to_table`` into a temporary staging table, then
  INSERT ... SELECT (same NOT EXISTS) ON CONFLICT DO NOTHING, in a transaction;
- ``executemany``: one INSERT ... VALUES (...) ON CONFLICT DO NOTHING per row, pipelined by
  asyncpg's executemany, in a transaction (no NOT EXISTS: the cheapest form of it).

For each method and batch size (default 100, 1000, 5000) the table is emptied, then --rows
rows (default 200,000: 1,000 drivers) are written; reported: rows/s (wall), the PostgreSQL
backend's CPU per row and this process's CPU per row (encoding the batch is the service's CPU),
from /proc. Each configuration runs --repeat times; the median is reported.

    .venv/bin/python bench/writer.py [--rows 200000] [--sizes 100,1000,5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import log

from tracker import store
from tracker.protocol.events import Position
from tracker.store import Pending

COLUMNS = ("org", "driver_id", "seq", "ts", "received_at", "lat", "lon", "acc", "spd", "hdg", "alt", "bat")
STAGE = """
CREATE TEMP TABLE IF NOT EXISTS stage_positions (LIKE positions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
FROM_STAGE = """
INSERT INTO positions SELECT t.* FROM stage_positions t
WHERE NOT EXISTS (SELECT 1 FROM scans s WHERE s.org = t.org AND s.driver_id = t.driver_id AND s.seq = t.seq OFFSET 0)
ON CONFLICT DO NOTHING
"""
EXECUTEMANY = (
    "INSERT INTO positions (org, driver_id, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING"
)


def make_batches(rows: int, size: int, drivers: int = 1000) -> list[list[Pending]]:
    """``rows`` positions of ``drivers`` drivers, interleaved as a live flush sees them."""
    now = int(time.time() * 1000)
    items = []
    for i in range(rows):
        d, seq = i % drivers, i // drivers + 1
        ev = Position(
            seq=seq,
            ts=now + seq * 1000,
            lat=-1.29 + d * 1e-4,
            lon=36.82 + seq * 1e-5,
            acc=6.5,
            spd=11.2,
            hdg=274.0,
            alt=1661.0,
            bat=0.81,
        )
        items.append(Pending(None, "bench", f"d-{d}", ev, now))
    return [items[i : i + size] for i in range(0, rows, size)]


async def by_unnest(conn: asyncpg.Connection, batch: list[Pending]) -> None:
    verdicts = await store.insert_events(conn, batch)
    assert all(verdicts)


async def by_copy(conn: asyncpg.Connection, batch: list[Pending]) -> None:
    records = [
        (it.org, it.driver, e.seq, e.ts, it.received_at, e.lat, e.lon, e.acc, e.spd, e.hdg, e.alt, e.bat)
        for it in batch
        for e in (it.event,)
    ]
    async with conn.transaction():
        await conn.copy_records_to_table("stage_positions", records=records, columns=COLUMNS)
        status = await conn.execute(FROM_STAGE)
    assert int(status.rsplit(" ", 1)[-1]) == len(batch)


async def by_executemany(conn: asyncpg.Connection, batch: list[Pending]) -> None:
    args = [
        (it.org, it.driver, e.seq, e.ts, it.received_at, e.lat, e.lon, e.acc, e.spd, e.hdg, e.alt, e.bat)
        for it in batch
        for e in (it.event,)
    ]
    async with conn.transaction():
        await conn.executemany(EXECUTEMANY, args)


METHODS = {"unnest": by_unnest, "copy": by_copy, "executemany": by_executemany}


async def one(dsn: str, database: str, method: str, size: int, rows: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE positions, scans")
        await conn.execute(STAGE)
        await conn.execute("CHECKPOINT")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        batches = make_batches(rows, size)
        fn = METHODS[method]
        await fn(conn, batches[0])  # warm: plans, type introspection
        await conn.execute("TRUNCATE positions")
        meter = common.CpuMeter(
            {
                "postgres": lambda: [backend],
                "postgres_shared": lambda: common.postgres_pids(database)[1],
                "client": lambda: [os.getpid()],
            }
        )
        meter.start()
        t0 = time.perf_counter()
        for b in batches:
            await fn(conn, b)
        wall = time.perf_counter() - t0
        cpu = meter.stop()
        stored = await conn.fetchval("SELECT count(*) FROM positions")
    finally:
        await conn.close()
    assert stored == rows, (stored, rows)
    return {
        "method": method,
        "batch": size,
        "rows": rows,
        "wall_s": round(wall, 3),
        "rows_per_s": round(rows / wall),
        "pg_us_per_row": round(cpu["postgres"] / rows * 1e6, 2),
        "pg_shared_us_per_row": round(cpu["postgres_shared"] / rows * 1e6, 2),
        "client_us_per_row": round(cpu["client"] / rows * 1e6, 2),
        "load": common.load_average(),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    database = "bench_writer"
    dsn = common.fresh_database(database)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    await store.migrate(pool)
    await pool.close()
    out = []
    for size in [int(x) for x in args.sizes.split(",")]:
        for method in args.methods.split(","):
            runs = []
            for _ in range(args.repeat):
                r = await one(dsn, database, method, size, args.rows)
                log(
                    f"{method:12s} batch {size:5d}: {r['rows_per_s']:8d} rows/s, pg {r['pg_us_per_row']:.2f} us/row, "
                    f"client {r['client_us_per_row']:.2f} us/row (load {r['load']})"
                )
                runs.append(r)
            med = sorted(runs, key=lambda r: r["rows_per_s"])[len(runs) // 2]
            med = {
                **med,
                "runs_rows_per_s": [r["rows_per_s"] for r in runs],
                "pg_us_per_row_median": statistics.median(r["pg_us_per_row"] for r in runs),
            }
            out.append(med)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--sizes", default="100,1000,5000")
    p.add_argument("--methods", default="unnest,copy,executemany")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    common.exit_on_sigterm()
    info = common.machine()
    log(f"machine: {info}")
    results = asyncio.run(run(args))
    lines = [
        "| method | batch | rows/s (median) | runs | PostgreSQL us/row | client us/row |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['rows_per_s']} | {r['runs_rows_per_s']} | "
            f"{r['pg_us_per_row_median']} | {r['client_us_per_row']} |"
        )
    table = "\n".join(lines)
    print(table)
    info["load_end"] = common.load_average()
    path = common.save("writer", {"machine": info, "args": vars(args), "results": results, "table": table})
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
