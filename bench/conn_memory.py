"""Where an idle driver connection's memory goes: tracker in this process under tracemalloc (its
asyncio loop, not uvloop: the transports' C memory is not seen), N drivers connected by load.js
(idle mode); the Python allocations they added per connection, by file and by line.

    .venv/bin/python bench/conn_memory.py [drivers, default 2000] [lines shown, default 22]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common

from harness.instances import Instance
from tracker.config import Settings


async def measure(redis_url: str, n: int, top: int) -> None:
    dsn = common.fresh_database(f"bench_mem_{common.ROOT.name}".replace("-", "_"))
    env = {
        "DATABASE_URL": dsn,
        "REDIS_URL": redis_url,
        "TRACKER_JWT_SECRET": common.SECRET,
        "TRACKER_CUSTODY_KEY": "bench-custody-key-" + "y" * 40,
        "TRACKER_PORT": "0",
        "TRACKER_HOST": "127.0.0.1",
        "TRACKER_LOG_LEVEL": "warning",
    }
    inst = await Instance.start(Settings.from_env(env))
    await asyncio.sleep(2)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    snap0 = tracemalloc.take_snapshot()
    proc = await asyncio.create_subprocess_exec(
        *("node", str(common.LOAD_JS), "--proto", "tracker", "--url", inst.url, "--secret", common.SECRET),
        *("--mode", "idle", "--drivers", str(n), "--dashboards", "0", "--hold", "600"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    while True:
        line = await proc.stdout.readline()
        if not line or b'"idle"' in line:
            break
    await asyncio.sleep(3)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    rss1 = psutil.Process().memory_info().rss
    traced = sum(s.size for s in snap1.statistics("filename")) - sum(s.size for s in snap0.statistics("filename"))
    rss = (rss1 - rss0) / n / 1024
    print(f"{n} drivers: RSS +{rss:.1f} KB each (tracemalloc's own included), Python +{traced / n / 1024:.1f} KB")
    for key in ("filename", "lineno"):
        print(f"-- per connection, by {key}")
        for st in snap1.compare_to(snap0, key)[:top]:
            frame = st.traceback[0]
            where = frame.filename.split("site-packages/")[-1] + (f":{frame.lineno}" if key == "lineno" else "")
            print(f"{st.size_diff / n:8.0f} B {st.count_diff / n:6.1f} objects  {where}")
    proc.stdin.close()
    await proc.wait()
    await inst.stop()
    common.psql(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 22
    common.ensure_node_modules()
    tracemalloc.start(1)
    with common.private_redis() as (redis_url, _):
        asyncio.run(measure(redis_url, n, top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
