"""Trail exports at a million points: the server's memory and CPU per point, per format.

Starts `tracker serve` as a subprocess (harness TrackerProc) on a fresh database of the benchmark
cluster, stores --points positions of one driver with COPY, then downloads
`GET /v1/drivers/{id}/trail.{gpx,geojson,csv}` over a raw socket that reads and drops 64 KB at a
time (a browser saving a file). Reported per format: bytes, seconds, points/s, the server's CPU
per point (utime + stime from /proc) and its peak RSS above its RSS before the download (sampled
every 100 ms by TrackerProc). The server holds no more than one cursor page (2,000 rows) and one
64 KB chunk at a time, so the peak must not grow with --points (run with 100000 and 1000000).

    .venv/bin/python bench/export_trail.py [--points 1000000] [--redis redis://127.0.0.1:6379/5] [--db NAME]

No peer here: bench/peers/ holds live-tracking servers, none of which exports trails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import log

from harness.instances import TrackerProc
from harness.tokens import SECRET, token

ORG, DRIVER = "bench-export", "d-1"
T0 = 1_764_000_000_000
EXTRA = (5.0, 11.2, 90.0, 1650.0, 0.8)  # acc, spd, hdg, alt, bat


async def store_points(dsn: str, n: int) -> None:
    """COPY straight into the partitioned table (tracker/sql/0008), as a bulk import would."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO drivers (org, driver_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", ORG, DRIVER)
        did = await conn.fetchval("SELECT id FROM drivers WHERE org = $1 AND driver_id = $2", ORG, DRIVER)
        step = 200_000
        for lo in range(0, n, step):
            rows = [
                (did, i + 1, T0 + i * 1000, T0 + i * 1000, -1.3 + (i % 5000) * 1e-5, 36.8 + (i % 7000) * 1e-5, *EXTRA)
                for i in range(lo, min(n, lo + step))
            ]
            columns = ["driver", "seq", "ts", "received_at", "lat", "lon", "acc", "spd", "hdg", "alt", "bat"]
            await conn.copy_records_to_table("position_rows", records=rows, columns=columns)
    finally:
        await conn.close()


async def download(port: int, path: str, tok: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n".encode())
    total = 0
    while chunk := await reader.read(65_536):
        total += len(chunk)
    writer.close()
    return total


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    ap.add_argument("--db", default="tracker_bench_export", help="database created afresh on the bench cluster")
    args = ap.parse_args()
    dsn = common.fresh_database(args.db)
    proc = await TrackerProc(database_url=dsn, redis_url=args.redis, secret=SECRET).start()
    try:
        t = time.perf_counter()
        await store_points(dsn, args.points)
        log(f"stored {args.points} points in {time.perf_counter() - t:.1f} s")
        assert proc.proc is not None
        pid, tok = proc.proc.pid, token("dispatcher", "bench", ORG)
        q = f"?from={T0}&to={T0 + args.points * 1000 + 1}"
        results = []
        for fmt in ("gpx", "geojson", "csv"):
            await asyncio.sleep(1.0)  # let the RSS sampler see the idle process
            base = psutil.Process(pid).memory_info().rss
            proc.peak_rss = base
            cpu0, t = common.ticks(pid), time.perf_counter()
            size = await download(proc.port, f"/v1/drivers/{DRIVER}/trail.{fmt}{q}", tok)
            wall = time.perf_counter() - t
            cpu_s = (common.ticks(pid) - cpu0) / 100  # clock ticks (USER_HZ 100)
            row = {
                "format": fmt,
                "points": args.points,
                "MB": round(size / 1e6, 1),
                "s": round(wall, 1),
                "points/s": round(args.points / wall),
                "server CPU us/point": round(cpu_s / args.points * 1e6, 2),
                "peak RSS above idle MB": round((proc.peak_rss - base) / 1e6, 1),
                "idle RSS MB": round(base / 1e6, 1),
            }
            log(row)
            results.append(row)
        common.save("export_trail", {"machine": common.machine(), "load": common.load_average(), "results": results})
    finally:
        await proc.close()


if __name__ == "__main__":
    asyncio.run(main())
