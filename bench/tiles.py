"""Street tiles from a PMTiles archive (tracker/tiles): what one tile costs.

1. In process: `Archive.tile()` on an archive of `--zoom`+1 levels over a city (leaf directories of
   `--leaf` entries, as large archives have), warm (every leaf cached) and cold (the cache emptied
   before each lookup: a leaf read and decoded each time); CPU microseconds per tile.
2. Over HTTP: a `tracker serve` subprocess with TRACKER_MAP_TILES naming that archive, `--conns`
   keep-alive connections each GETting tiles in turn; tiles per second and the server's CPU
   microseconds per tile (from /proc, its process only).

    TRACKER_TEST_DATABASE_URL=... TRACKER_TEST_REDIS_URL=... .venv/bin/python bench/tiles.py

Needs PostgreSQL and Redis for the server (DATABASE_URL/REDIS_URL, else the TRACKER_TEST_ ones).
Raw results in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CLK_TCK, load_average, log, machine, save, ticks
from harness.browser import solid_png
from harness.http import wait_ready
from harness.pmtiles import write_archive
from harness.ports import free_port
from harness.servers import popen, stop_process
from tracker.tiles import archive as archive_mod

NAIROBI = (36.6, -1.5, 37.0, -1.1)


def city_tiles(max_zoom: int) -> dict[tuple[int, int, int], bytes]:
    """Every tile over NAIROBI from zoom 0 to `max_zoom`, each a distinct small PNG."""
    import math

    def tile_of(z: int, lon: float, lat: float) -> tuple[int, int]:
        n = 1 << z
        return int((lon + 180) / 360 * n), int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)

    west, south, east, north = NAIROBI
    tiles = {}
    for z in range(max_zoom + 1):
        (x0, y0), (x1, y1) = tile_of(z, west, north), tile_of(z, east, south)
        for x in range(x0, x1 + 1):
            for y in range(y0, y1 + 1):
                tiles[(z, x, y)] = solid_png((x % 251, y % 251, z), 16)
    return tiles


def in_process(path: Path, keys: list[tuple[int, int, int]], n: int) -> dict[str, float]:
    arc = archive_mod.open_archive(path)
    try:
        rnd = random.Random(1)
        sample = [rnd.choice(keys) for _ in range(n)]
        for k in sample:  # warm the leaf cache (as far as it holds)
            arc.tile(*k)
        t0 = time.process_time()
        for k in sample:
            arc.tile(*k)
        warm = (time.process_time() - t0) / n * 1e6
        t0 = time.process_time()
        for k in sample:
            arc._leaves.clear()
            arc._cached_entries = 0
            arc.tile(*k)
        cold = (time.process_time() - t0) / n * 1e6
        return {"warm_us_per_tile": round(warm, 2), "cold_us_per_tile": round(cold, 2), "leaf_cache": len(arc._leaves)}
    finally:
        arc.close()


async def fetch(port: int, paths: list[str]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        for p in paths:
            writer.write(f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1]
            )
            await reader.readexactly(length)
            ok += head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return ok


def over_http(data_dir: Path, keys: list[tuple[int, int, int]], n: int, conns: int) -> dict[str, float]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": os.environ.get("DATABASE_URL") or os.environ["TRACKER_TEST_DATABASE_URL"],
        "REDIS_URL": os.environ.get("REDIS_URL") or os.environ["TRACKER_TEST_REDIS_URL"],
        "TRACKER_JWT_SECRET": "bench-tiles-" + "x" * 40,
        "TRACKER_CUSTODY_KEY": "bench-tiles-custody-" + "y" * 40,
        "TRACKER_MAP_TILES": "city.pmtiles",
        "TRACKER_DATA_DIR": str(data_dir),
        "TRACKER_PORT": str(port),
        "TRACKER_LOG_LEVEL": "warning",
    }
    proc = popen([sys.executable, "-m", "tracker", "serve"], log=data_dir / "serve.log", env=env)
    try:
        asyncio.run(wait_ready(port, proc=proc, log=data_dir / "serve.log", timeout=60))
        rnd = random.Random(2)
        paths = [f"/tiles/{z}/{x}/{y}.png" for z, x, y in (rnd.choice(keys) for _ in range(n))]
        asyncio.run(_run(port, paths[: n // 10], conns))  # warm-up
        t0, c0 = time.monotonic(), ticks(proc.pid)
        ok = asyncio.run(_run(port, paths, conns))
        wall, cpu = time.monotonic() - t0, (ticks(proc.pid) - c0) / CLK_TCK
        return {
            "tiles": n,
            "ok": ok,
            "conns": conns,
            "tiles_per_s": round(n / wall),
            "server_cpu_us_per_tile": round(cpu / n * 1e6, 1),
        }
    finally:
        stop_process(proc, grace=20)


async def _run(port: int, paths: list[str], conns: int) -> int:
    parts = [paths[i::conns] for i in range(conns)]
    return sum(await asyncio.gather(*(fetch(port, p) for p in parts)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoom", type=int, default=16)
    ap.add_argument("--leaf", type=int, default=2000)
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--conns", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tiles-") as tmp:
        tiles = city_tiles(args.zoom)
        path = write_archive(Path(tmp) / "city.pmtiles", tiles, leaf_size=args.leaf, bounds=NAIROBI)
        keys = sorted(tiles)
        result = {
            "archive": {"tiles": len(tiles), "bytes": path.stat().st_size, "max_zoom": args.zoom, "leaf": args.leaf},
            "in_process": in_process(path, keys, args.lookups),
        }
        log("in process", result["in_process"])
        result["http"] = over_http(Path(tmp), keys, args.requests, args.conns)
        log("http", result["http"])
    result |= {"load": load_average(), "machine": machine()}
    log("saved", save("tiles", result))


if __name__ == "__main__":
    main()
