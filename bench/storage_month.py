"""A month of positions in place (issue 13): ingest cost, a trail query and dropping a day.

On a fresh database (created and dropped by this script):

1. **empty**: the real `Writer` stores positions paced at --rate per second (default 2,000: a
   fleet of 10,000 phones at one fix per 5 s, flushed every 20 ms) for --seconds; measured: the
   PostgreSQL backends' CPU per stored row and this process's (from /proc), and the ack latency
   (submit -> answered after the commit) p50/p99.
2. **load**: --days (30) past days x --per-day (1,000,000) positions of --drivers (10,000) drivers,
   each day COPYed into its own table, indexed, then ATTACHed as that day's partition (the way a
   bulk import would; the service's own writes go through the writer).
3. **month**: step 1 again, on top of the month.
4. **trail**: one driver's day (`store.trail`, as `GET /v1/drivers/{id}/trail` runs it) for
   --trails drivers on a middle day: median and max ms.
5. **drop**: while positions keep flowing at --rate, the --drops (3) oldest days are expired one
   after another, the way the service does it (`partitions.drop`: floor, DETACH CONCURRENTLY,
   DROP): each one's wall time, and the ack latency p99 within 1 s of a drop against the p99 of
   the rest of the same flow.

    .venv/bin/python bench/storage_month.py [--days 30] [--per-day 1000000] [--drivers 10000]
        [--rate 2000] [--seconds 20] [--drops 3] [--database bench_storage] [--keep] [--warmup 0]
        [--flush-ms 20]

The pool releases connections as the service's does (tracker.app: no reset round trip). With
--warmup S, each ingest phase is preceded by S unmeasured seconds of the same flow (5 at the
defaults: every driver once, so the writer's driver-id cache is warm, as in a service that has run).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root

import common
from common import log

from tracker import partitions, store
from tracker.app import _reset as app_reset
from tracker.partitions import DAY_MS
from tracker.protocol.events import Position
from tracker.store import Pending
from tracker.writer import Writer

ORG = "bench"
COLUMNS = ("seq", "ts", "received_at", "lat", "lon", "driver", "acc", "spd", "hdg", "alt", "bat")
DAY_TABLE = """
SELECT format('CREATE TABLE %I (LIKE position_rows)', $1::text),
       format('CREATE UNIQUE INDEX %I ON %I (driver, seq)', $1::text || '_seq', $1::text),
       format('CREATE INDEX %I ON %I (driver, ts)', $1::text || '_trail', $1::text),
       format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (ts >= %s AND ts < %s)', $1::text, $1::text || '_r', $2::bigint,
              $3::bigint),
       format('ALTER TABLE position_rows ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', $1::text, $2::bigint,
              $3::bigint)
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Flow:
    """Positions submitted to a real Writer at a steady rate; ack latencies recorded."""

    def __init__(self, pool: asyncpg.Pool, drivers: int, start_seq: int, flush_ms: int = 20) -> None:
        self.latencies: list[tuple[float, float]] = []  # (answered at, latency s)
        self.refused = 0
        self.sent: dict[int, float] = {}
        self.writer = Writer(pool, self._done, flush_interval_ms=flush_ms)
        self.drivers = drivers
        self.seq = start_seq
        self.n = 0

    def _done(self, stored: list[Pending], refused: list[tuple[Pending, str, str]]) -> None:
        now = time.perf_counter()
        for it in stored:
            self.latencies.append((now, now - it.owner))
        self.refused += len(refused)

    async def run(self, rate: int, seconds: float) -> None:
        tick = 0.02
        per_tick = max(1, int(rate * tick))
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < seconds:
            now_ms = int(time.time() * 1000)
            batch = []
            for _ in range(per_tick):
                d = self.n % self.drivers
                if d == 0:
                    self.seq += 1
                self.n += 1
                ev = Position(self.seq, now_ms, -1.29 + d * 1e-5, 36.82, acc=6.0, spd=11.0, hdg=90.0, bat=0.8)
                # owner: whom the service answers; here, when it was submitted
                batch.append(Pending(time.perf_counter(), ORG, f"d-{d}", ev, now_ms))
            assert not self.writer.submit(batch)
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * tick - time.perf_counter()))
        await self.writer.drain(30)


async def ingest_phase(pool: asyncpg.Pool, database: str, args: argparse.Namespace, start_seq: int) -> dict[str, Any]:
    flow = Flow(pool, args.drivers, start_seq, args.flush_ms)
    flow.writer.start()
    if args.warmup > 0:  # every driver once: the writer's driver-id cache as in a service that has run
        await flow.run(args.rate, args.warmup)
        flow.latencies.clear()
    meter = common.CpuMeter({"postgres": lambda: common.postgres_pids(database)[0], "client": lambda: [os.getpid()]})
    meter.start()
    await flow.run(args.rate, args.seconds)
    cpu = meter.stop()
    await flow.writer.close()
    lat = [x for _, x in flow.latencies]
    n = len(lat)
    return {
        "rows": n,
        "refused": flow.refused,
        "pg_us_per_row": round(cpu["postgres"] / max(n, 1) * 1e6, 1),
        "client_us_per_row": round(cpu["client"] / max(n, 1) * 1e6, 1),
        "ack_p50_ms": round(pct(lat, 0.5) * 1000, 1),
        "ack_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "seq": flow.seq,
        "flow": flow,
    }


async def load_month(conn: asyncpg.Connection, args: argparse.Namespace, ids: list[int], today: int) -> float:
    """--days days before today as partitions, each COPYed then indexed then attached."""
    # The migration's `position_rows_before` covers every day before today; make it end where the
    # month begins, so that each loaded day is a partition of its own (empty database: instant).
    await conn.execute("DROP TABLE position_rows_before")
    first = today - args.days
    ddl = await conn.fetchval(
        "SELECT format('CREATE TABLE position_rows_before PARTITION OF position_rows FOR VALUES FROM (MINVALUE) "
        "TO (%s)', $1::bigint)",
        first * DAY_MS,
    )
    await conn.execute(ddl)
    per_driver = max(1, args.per_day // args.drivers)
    step = DAY_MS // per_driver
    t0 = time.perf_counter()
    for i in range(args.days):
        day = first + i
        name = "position_rows_" + time.strftime("%Y%m%d", time.gmtime(day * 86400))
        create, unique, trail, check, attach = await conn.fetchrow(DAY_TABLE, name, day * DAY_MS, (day + 1) * DAY_MS)
        await conn.execute(create)
        base = day * DAY_MS
        seq0 = i * per_driver
        records = (
            (
                seq0 + k + 1,
                base + k * step + d,
                base + k * step + d + 500,
                -1.29 + d * 1e-5,
                36.82 + k * 1e-4,
                ids[d],
                6.0,
                11.0,
                90.0,
                None,
                0.8,
            )
            for k in range(per_driver)
            for d in range(args.drivers)
        )
        await conn.copy_records_to_table(name, records=records, columns=COLUMNS)
        for sql in (unique, trail, check, attach):
            await conn.execute(sql)
        log(f"day {i + 1}/{args.days} loaded ({time.perf_counter() - t0:.0f} s)")
    await conn.execute(
        "INSERT INTO driver_seqs (driver, hi) SELECT unnest($1::int4[]), $2::bigint "
        "ON CONFLICT (driver) DO UPDATE SET hi = EXCLUDED.hi",
        ids,
        args.days * per_driver,
    )
    await conn.execute("ANALYZE position_rows")
    return time.perf_counter() - t0


async def trails(conn: asyncpg.Connection, args: argparse.Namespace, day: int) -> dict[str, Any]:
    times = []
    counts = []
    for k in range(args.trails):
        driver = f"d-{(k * 7919) % args.drivers}"
        t = time.perf_counter()
        rows = await store.trail(conn, ORG, driver, day * DAY_MS, (day + 1) * DAY_MS, 100_000)
        times.append((time.perf_counter() - t) * 1000)
        counts.append(len(rows))
    return {
        "queries": len(times),
        "rows_each": statistics.median(counts),
        "median_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
    }


async def drop_phase(pool: asyncpg.Pool, database: str, args: argparse.Namespace, seq: int) -> dict[str, Any]:
    """Positions flow for --seconds; the --drops oldest days are dropped one after another, spread
    over the flow. Ack latencies within 1 s of a drop are compared with the others of the same flow."""
    async with pool.acquire() as conn:
        oldest = [p for p in await partitions.partitions(conn) if p.start is not None][: args.drops]
    flow_task = asyncio.create_task(ingest_phase(pool, database, args, seq))
    windows = []
    for part in oldest:
        await asyncio.sleep(args.seconds / (len(oldest) + 1))
        async with pool.acquire() as conn:
            t0 = time.perf_counter()
            await partitions.drop(conn, part)
            windows.append((t0, time.perf_counter() - t0))
    result = await flow_task
    flow: Flow = result.pop("flow")

    def near(at: float) -> bool:
        return any(t0 - 1 <= at <= t0 + took + 1 for t0, took in windows)

    around = [x for at, x in flow.latencies if near(at)]
    elsewhere = [x for at, x in flow.latencies if not near(at)]
    return {
        "dropped": [p.name for p in oldest],
        "drop_s": [round(took, 3) for _, took in windows],
        "ack_p50_ms_whole": result["ack_p50_ms"],
        "ack_p99_ms_around_drops": round(pct(around, 0.99) * 1000, 1),
        "ack_p99_ms_elsewhere": round(pct(elsewhere, 0.99) * 1000, 1),
        "ack_max_ms_around_drops": round(max(around) * 1000, 1) if around else None,
        "rows": result["rows"],
        "refused": result["refused"],
    }


async def size(conn: asyncpg.Connection) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT sum(pg_table_size(c.oid)) AS heap, sum(pg_indexes_size(c.oid)) AS idx, sum(c.reltuples) AS n "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'position_rows'::regclass"
    )
    n = max(float(row["n"] or 0), 1.0)
    return {
        "rows": int(n),
        "heap_bytes_per_row": round(float(row["heap"]) / n, 1),
        "index_bytes_per_row": round(float(row["idx"]) / n, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    dsn = common.fresh_database(args.database)
    # The service's pool release hook (tracker.app): no reset round trip per release.
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4, reset=app_reset)
    out: dict[str, Any] = {}
    try:
        await store.migrate(pool)
        today = int(time.time() * 1000) // DAY_MS
        async with pool.acquire() as conn:
            await store.drivers_hello(conn, [(ORG, f"d-{d}", None) for d in range(args.drivers)])
            rows = await conn.fetch("SELECT driver_id, id FROM drivers WHERE org = $1", ORG)
            by_name = {r["driver_id"]: r["id"] for r in rows}
            ids = [by_name[f"d-{d}"] for d in range(args.drivers)]
        start_seq = 10_000_000
        log("empty database: ingest")
        empty = await ingest_phase(pool, args.database, args, start_seq)
        empty.pop("flow")
        out["empty"] = empty
        log(f"empty: {empty}")
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE position_rows, driver_seqs")
            out["load_s"] = round(await load_month(conn, args, ids, today), 1)
            out["size"] = await size(conn)
        log(f"month loaded in {out['load_s']} s: {out['size']}")
        month = await ingest_phase(pool, args.database, args, start_seq)
        month.pop("flow")
        out["month"] = month
        log(f"month: {month}")
        async with pool.acquire() as conn:
            out["trail"] = await trails(conn, args, today - args.days // 2)
        log(f"trail: {out['trail']}")
        out["drop"] = await drop_phase(pool, args.database, args, month["seq"] + 1)
        log(f"drop: {out['drop']}")
    finally:
        await pool.close()
        if not args.keep:
            common.psql(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--per-day", type=int, default=1_000_000)
    p.add_argument("--drivers", type=int, default=10_000)
    p.add_argument("--rate", type=int, default=2_000, help="positions per second in the ingest phases")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each ingest phase")
    p.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds of flow before each ingest phase")
    p.add_argument("--flush-ms", type=int, default=20, help="the writer's flush interval (TRACKER_FLUSH_INTERVAL_MS)")
    p.add_argument("--trails", type=int, default=50)
    p.add_argument("--drops", type=int, default=3, help="days dropped, one after another, during the last phase")
    p.add_argument("--database", default="bench_storage", help="created afresh, dropped at the end")
    p.add_argument("--keep", action="store_true", help="keep the database")
    args = p.parse_args()
    common.exit_on_sigterm()
    info = common.machine()
    log(f"machine: {info}")
    result = asyncio.run(run(args))
    info["load_end"] = common.load_average()
    path = common.save("storage_month", {"machine": info, "args": vars(args), "result": result})
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
