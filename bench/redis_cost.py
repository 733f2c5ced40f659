"""Redis's own CPU per position at a fleet's rate, for RedisBroker at two commits, side by side.

Issue 13's target: Redis CPU <= 5 us per position at 2,000 positions/s. The fleet shape is many
phones at a low rate, so an event-loop tick carries one or two positions: this drives each commit's
`RedisBroker` exactly so (every millisecond, the positions due by then, spread over N drivers of K
orgs), with the presence of N connected drivers kept as an instance keeps it (online once, then a
refresh of every connection each 10 s), and a second broker that receives the orgs (the instance of
the dashboard: following them where the commit has `follow`, all orgs by PSUBSCRIBE before).

Per commit: a private redis-server; W s of warm-up, then S s measured: redis-server's CPU from
/proc (user + system), positions published, Redis's calls (INFO commandstats) and the publishing
process's CPU. Each commit runs from a clean `git archive` (bench/common.py `tracker_source`).

    .venv/bin/python bench/redis_cost.py --refs a5655b8,HEAD          # before/after issue 17
    .venv/bin/python bench/redis_cost.py --refs HEAD --rate 2000 --drivers 10000 --orgs 20
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import CLK_TCK, log, ticks2


def _ticks(pid: int) -> float:
    user, system = ticks2(pid)
    return (user + system) / CLK_TCK


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the commit's source tree (sys.path): drives its RedisBroker."""
    import redis.asyncio as aioredis

    from tracker.protocol.events import Position
    from tracker.protocol.live import pos_frame, presence_frame
    from tracker.redis_broker import RedisBroker

    kw: dict[str, Any] = {"presence_ttl_s": 30.0}
    if "window_ms" in inspect.signature(RedisBroker).parameters:
        kw["window_ms"] = args.window_ms
    pub = RedisBroker(args.url, instance_id="bench-ingest", **kw)
    sub = RedisBroker(args.url, instance_id="bench-dash", **kw)
    received = [0, 0]

    def on_live(org: str, msg: bytes) -> None:
        received[0] += 1
        received[1] += len(msg)

    sub.on_live = on_live
    for b in (pub, sub):
        b.start()
    while not (pub.receiving and sub.receiving):
        await asyncio.sleep(0.05)
    orgs = [f"bench-{i}" for i in range(args.orgs)]
    if hasattr(sub, "follow"):
        for org in orgs:
            await sub.follow(org)
    drivers = [(orgs[i % len(orgs)], f"d-{i}") for i in range(args.drivers)]
    now = int(time.time() * 1000)
    for start in range(0, len(drivers) if args.presence else 0, 500):
        part = drivers[start : start + 500]
        await pub.drivers_online(
            [(o, d, f"c-{d}", None, b"\t" + presence_frame(d, True, now)) for o, d in part]  # type: ignore[arg-type]
        )

    async def presence() -> None:
        while True:
            await pub.refresh_presence([(o, d, f"c-{d}", b"") for o, d in drivers], spread_s=1.0)
            await asyncio.sleep(9.0)

    refresher = asyncio.create_task(presence() if args.presence else asyncio.sleep(0))
    sent = 0
    seq = 0

    async def drive(seconds: float) -> None:
        nonlocal sent, seq
        t0 = time.monotonic()
        due0 = sent
        while (elapsed := time.monotonic() - t0) < seconds:
            due = due0 + int(elapsed * args.rate)
            ts = int(time.time() * 1000)
            while sent < due:
                org, driver = drivers[sent % len(drivers)]
                seq += 1
                frame = pos_frame(driver, Position(seq, ts, -1.29 + (seq % 100) * 1e-4, 36.82))
                pub.publish(org, [("p", driver, ts * 1000 + sent % 1000, b"", frame)])
                sent += 1
            await asyncio.sleep(0.001)

    redis = aioredis.Redis.from_url(args.url)
    await drive(args.warmup)
    await redis.config_resetstat()  # type: ignore[no-untyped-call]
    r0, me0, sent0, recv0 = _ticks(args.redis_pid), _ticks(os.getpid()), sent, list(received)
    wall0 = time.monotonic()
    await drive(args.seconds)
    await asyncio.sleep(0.1)  # the last window's round trip
    wall = time.monotonic() - wall0
    r1, me1 = _ticks(args.redis_pid), _ticks(os.getpid())
    stats = await redis.info("commandstats")  # type: ignore[no-untyped-call]
    await redis.aclose()
    refresher.cancel()
    await asyncio.gather(pub.close(), sub.close())
    n = sent - sent0
    calls = {k.removeprefix("cmdstat_"): v for k, v in stats.items() if k.startswith("cmdstat_")}
    return {
        "positions": n,
        "wall_s": round(wall, 2),
        "rate": round(n / wall),
        "redis_cpu_s": round(r1 - r0, 3),
        "redis_us_per_pos": round((r1 - r0) / n * 1e6, 2),
        "publisher_us_per_pos": round((me1 - me0) / n * 1e6, 1),
        "live_messages_received": received[0] - recv0[0],
        "live_bytes_received": received[1] - recv0[1],
        "evalsha_calls": calls.get("evalsha", {}).get("calls", 0),
        "redis_calls": {k: (v["calls"], v["usec_per_call"]) for k, v in sorted(calls.items())},
    }


def run(ref: str, args: argparse.Namespace) -> dict[str, Any]:
    src, sha = common.tracker_source(ref)
    with common.private_redis() as (url, pid):
        log(f"{ref} ({sha}): redis pid {pid}; {args.rate}/s over {args.drivers} drivers, {args.orgs} orgs")
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--src", str(src), "--url", url, "--redis-pid", str(pid)]
            + [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in ("rate", "drivers", "orgs", "warmup", "seconds", "window_ms", "presence")
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{ref}: child failed:\n{out.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(ref=ref, commit=sha)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refs", default="HEAD", help="commits to compare, comma-separated")
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--drivers", type=int, default=10_000)
    p.add_argument("--orgs", type=int, default=1)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--window-ms", type=float, default=5.0, help="TRACKER_LIVE_WINDOW_MS where the commit has it")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--presence", type=int, default=1, help="0: no presence (the live path alone)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--redis-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, args.src)
        for name in [m for m in sys.modules if m == "tracker" or m.startswith("tracker.")]:
            del sys.modules[name]
        print(json.dumps(asyncio.run(child(args))))
        return
    log(f"machine: {common.machine()}")
    results = [run(ref, args) for _ in range(args.repeat) for ref in args.refs.split(",")]
    path = common.save("redis-cost", {"args": vars(args), "machine": common.machine(), "results": results})
    print("| commit | positions/s | Redis us/pos | EVALSHA calls | positions/call | publisher us/pos |")
    print("|---|---|---|---|---|---|")
    for r in results:
        per_call = r["positions"] / max(1, r["evalsha_calls"])
        print(
            f"| {r['ref']} ({r['commit']}) | {r['rate']} | **{r['redis_us_per_pos']}** | {r['evalsha_calls']} | "
            f"{per_call:.1f} | {r['publisher_us_per_pos']} |"
        )
    log(f"saved {path}")


if __name__ == "__main__":
    main()
