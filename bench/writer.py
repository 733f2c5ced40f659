"""PostgreSQL write rate of the batch writer alone (no websockets): rows/s and CPU per row.

Ways to store a batch of positions idempotently, on one connection, batch after batch:

- ``statement``: the current path, ``tracker.eventstore.insert_events``: for new positions one
  INSERT ... SELECT FROM unnest(arrays) statement with CTEs (``eventstore.FAST``: positions and
  driver_seqs), one round trip, no BEGIN/COMMIT (sql/0008's day partitions, integer driver keys);
- ``copy``: ``eventstore.store_staged`` at every batch size (the service takes it from
  ``COPY_MIN`` rows): COPY into a temporary stage, then ``eventstore.FAST_STAGED`` from it.

For each method and batch size the table is emptied, then --rows rows (default 200,000: 1,000
drivers) are written; reported: rows/s (wall), the PostgreSQL backend's CPU per row and this
process's CPU per row (encoding the batch is the service's CPU), from /proc. Each configuration
runs --repeat times; the median is reported. A batch of 40 is a 20 ms flush at 2,000 positions/s.

    .venv/bin/python bench/writer.py [--rows 200000] [--sizes 40,1000,5000] [--repeat 3]
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
from tracker.eventstore import DriverKeys, insert_events, store_staged
from tracker.protocol.events import Position
from tracker.store import Pending

KEYS = DriverKeys()


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


async def by_statement(conn: asyncpg.Connection, batch: list[Pending]) -> None:
    ids = await KEYS.ids(conn, [(it.org, it.driver) for it in batch])
    verdicts = await insert_events(conn, batch, ids)
    assert all(verdicts)


async def by_copy(conn: asyncpg.Connection, batch: list[Pending]) -> None:
    ids = await KEYS.ids(conn, [(it.org, it.driver) for it in batch])
    row = await store_staged(conn, batch, ids)  # the service's own COPY path, at any batch size
    assert row is not None


METHODS = {"statement": by_statement, "copy": by_copy}


async def one(dsn: str, database: str, method: str, size: int, rows: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE position_rows, scans, driver_seqs")
        await conn.execute("CHECKPOINT")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        batches = make_batches(rows, size)
        fn = METHODS[method]
        await fn(conn, batches[0])  # warm: plans, type introspection
        await conn.execute("TRUNCATE position_rows, driver_seqs")
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
        stored = await conn.fetchval("SELECT count(*) FROM position_rows")
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
    database = args.database
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
    p.add_argument("--sizes", default="40,1000,5000")
    p.add_argument("--methods", default="statement,copy")
    p.add_argument("--database", default="bench_writer", help="created afresh (dropped first)")
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
