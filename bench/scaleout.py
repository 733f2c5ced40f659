"""Scale-out (issue 17): 1, 2 and 4 `tracker serve` instances under the same offered load.

One private Redis (or a private three-master Redis Cluster, `--redis cluster`) and one fresh
PostgreSQL database per configuration. The load: `--orgs` orgs x `--drivers` drivers, each sending
one `pos` per 1/`--rate` s over its own websocket, driver i of every org through instance i mod N
(every instance holds drivers of every org); one dashboard of the first org, on instance 1. The
generator (phones and the dashboard) is a separate process of this script, not measured.

After the drivers are connected and `--warmup` s, for `--seconds` s, per instance: its CPU from
/proc/<pid>/stat (user + system, so the number holds on a shared machine), the positions it
stored (`tracker_events_stored_total`), the Redis live bytes and messages it received
(`tracker_live_received_bytes_total`, `..._messages_total`) and the control messages
(`tracker_control_received_messages_total`); and in total: redis-server's CPU (every node's on a
cluster), PostgreSQL's (the database's backends, plus the cluster's shared writers), the
positions stored, and the live positions the dashboard received.

    .venv/bin/python bench/scaleout.py                                   # 1, 2, 4 instances, one Redis
    .venv/bin/python bench/scaleout.py --redis cluster --instances 1,4   # on a Redis Cluster
    .venv/bin/python bench/scaleout.py --orgs 20 --drivers 50 --rate 1 --warmup 15 --seconds 60
    .venv/bin/python bench/scaleout.py --orgs-per-instance 5          # 5, 10, 20 orgs: load per instance fixed

The tracker code is HEAD's (a clean `git archive`, bench/common.py; BENCH_TRACKER_REF=<ref> for
another). Results go to bench/results/scaleout-<time>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import ROOT, log

from harness.http import request, wait_ready
from harness.ports import free_port, wait_port
from harness.servers import popen, stop_process

METRICS = {
    "stored": "tracker_events_stored_total",
    "live_bytes": "tracker_live_received_bytes_total",
    "live_messages": "tracker_live_received_messages_total",
    "control": "tracker_control_received_messages_total",
}


# --- the generator (a child process): phones and one dashboard -------------------------------


async def generator(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import connect

    from harness.clients import Dash
    from harness.tokens import token

    urls = args.urls.split(",")
    orgs = [f"{args.prefix}-{k}" for k in range(args.orgs)]
    stats = {"sent": 0, "acked": 0, "closed": 0}
    ready = asyncio.Event()
    connected = [0]
    total = args.orgs * args.drivers
    gate = asyncio.Semaphore(32)

    async def hello(url: str, org: str, i: int) -> tuple[Any, int]:
        ws = await connect(url + "/v1/driver", compression=None, max_queue=None)
        await ws.send(json.dumps({"type": "hello", "token": token("driver", f"d-{i}", org, secret=args.secret)}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        return ws, int(welcome.get("last_seq", 0))

    async def read(ws: Any) -> None:
        with contextlib.suppress(Exception):
            async for data in ws:
                frame = json.loads(data)
                if frame.get("type") == "ack":
                    stats["acked"] += sum(b - a + 1 for a, b in frame["ranges"])

    async def phone(org: str, i: int) -> None:
        url = urls[i % len(urls)]
        async with gate:
            ws, seq = await hello(url, org, i)
        connected[0] += 1
        if connected[0] == total:
            ready.set()
        reader = asyncio.create_task(read(ws))
        await ready.wait()
        period = 1.0 / args.rate
        await asyncio.sleep(random.random() * period)  # phones are not in step
        next_at = time.monotonic()
        try:
            while True:
                seq += 1
                lat = -1.29 + random.random() * 0.1
                pos = {"type": "pos", "seq": seq, "ts": int(time.time() * 1000), "lat": lat, "lon": 36.82}
                try:
                    await ws.send(json.dumps(pos))
                    stats["sent"] += 1
                except Exception:  # replaced (--churn): back on its own instance, which replaces the other
                    stats["closed"] += 1
                    reader.cancel()
                    ws, seq = await hello(url, org, i)
                    reader = asyncio.create_task(read(ws))
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            reader.cancel()

    async def churn() -> None:
        """--churn times a second, a driver connects through the next instance (kicking its phone's
        connection, which then comes back to its own instance and kicks this one): two kicks each."""
        others: list[Any] = []
        await ready.wait()
        while args.churn > 0:
            await asyncio.sleep(1.0 / args.churn)
            org, i = random.choice(orgs), random.randrange(args.drivers)
            with contextlib.suppress(Exception):
                ws, _ = await hello(urls[(i + 1) % len(urls)], org, i)
                others.append(asyncio.create_task(read(ws)))  # until the phone's return closes it

    dash = await Dash(urls[0], token("dispatcher", "u-1", orgs[0], secret=args.secret)).start()
    tasks = [asyncio.create_task(phone(org, i)) for org in orgs for i in range(args.drivers)]
    tasks.append(asyncio.create_task(churn()))
    await asyncio.wait_for(ready.wait(), 300)
    print(json.dumps({"ev": "connected"}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    marks: list[dict[str, Any]] = []

    async def on_stdin() -> None:  # "mark\n": report the counters now (the parent's window edges)
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"mark":
                marks.append({"ev": "mark", **stats, "dash_positions": len(dash.pos_times)})
                print(json.dumps(marks[-1]), flush=True)
        stop.set()

    listener = asyncio.create_task(on_stdin())
    await stop.wait()
    listener.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await dash.close()


# --- the parent: servers, CPU, metrics --------------------------------------------------------


async def _metrics(port: int) -> dict[str, float]:
    status, _, body = await request(port, "GET", "/metrics")
    assert status == 200, status
    out = {}
    for key, name in METRICS.items():
        m = re.search(rb"^" + name.encode() + rb" ([0-9.e+]+)$", body, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


@contextlib.contextmanager
def instances(n: int, dsn: str, redis_url: str) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    src, sha = common.tracker_source(common.TRACKER_REF)
    procs: list[tuple[int, subprocess.Popen[bytes]]] = []
    try:
        for i in range(n):
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(src),
                "DATABASE_URL": dsn,
                "REDIS_URL": redis_url,
                "TRACKER_JWT_SECRET": common.SECRET,
                "TRACKER_CUSTODY_KEY": "bench-custody-key-" + "y" * 40,
                "TRACKER_PORT": str(port),
                "TRACKER_HOST": "127.0.0.1",
                "TRACKER_LOG_LEVEL": "warning",
            }
            logf = common.RESULTS / f"scaleout-instance-{i + 1}.log"
            common.RESULTS.mkdir(parents=True, exist_ok=True)
            proc = popen([sys.executable, "-m", "tracker", "serve"], log=logf, cwd=src, env=env)
            procs.append((port, proc))
            wait_port(port, 90, proc)
            asyncio.run(wait_ready(port, proc=proc, log=logf, timeout=60, interval=0.3))
        log(f"{n} instance(s) of {sha} ready: ports {[p for p, _ in procs]}")
        yield procs
    finally:
        for _, proc in procs:
            stop_process(proc, grace=20)


@contextlib.contextmanager
def redis_servers(kind: str) -> Iterator[tuple[str, list[int]]]:
    """(REDIS_URL, the redis-server pids) of a private Redis or a private three-master cluster."""
    if kind == "single":
        with common.private_redis() as (url, pid):
            yield url, [pid]
        return
    from harness.redis_ha import RedisClusterSet

    cluster = asyncio.run(RedisClusterSet().start())
    try:
        yield cluster.url, [node.pid for node in cluster.nodes if node.pid is not None]
    finally:
        cluster.close()


def flush(kind: str, url: str) -> None:
    """A clean Redis for the next configuration (no presence or positions of the last one)."""
    import redis

    if kind == "single":
        redis.Redis.from_url(url).flushall()
        return
    for host_port in url.removeprefix("redis+cluster://").split(","):
        host, port = host_port.split(":")
        redis.Redis(host=host, port=int(port)).flushall()


def run_one(n: int, args: argparse.Namespace, redis_url: str, redis_pids: list[int]) -> dict[str, Any]:
    orgs = args.orgs_per_instance * n if args.orgs_per_instance else args.orgs
    database = f"bench_scaleout_{ROOT.name}".replace("-", "_")
    dsn = common.fresh_database(database)
    flush(args.redis, redis_url)
    with instances(n, dsn, redis_url) as procs:
        # What an instance costs with nothing to do (its timers, probe, presence, workers): the part
        # of its CPU that does not scale with the load.
        idle = common.CpuMeter({f"i{k + 1}": (lambda p=proc.pid: common.tree(p)) for k, (_, proc) in enumerate(procs)})
        idle.start()
        time.sleep(args.idle)
        idle_cpu = idle.stop()
        urls = ",".join(f"ws://127.0.0.1:{port}" for port, _ in procs)
        gen = subprocess.Popen(
            [
                *(sys.executable, __file__, "--generator", "--urls", urls, "--secret", common.SECRET),
                *("--orgs", str(orgs), "--drivers", str(args.drivers), "--rate", str(args.rate)),
                *("--prefix", f"so{n}", "--churn", str(args.churn)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert gen.stdin is not None and gen.stdout is not None
        try:
            line = gen.stdout.readline()
            if '"connected"' not in line:
                raise RuntimeError(f"the generator did not connect: {line!r}")
            log(f"{n} instance(s): {orgs * args.drivers} phones connected; warm-up {args.warmup} s")
            time.sleep(args.warmup)
            groups: dict[str, Any] = {
                f"i{k + 1}": (lambda p=proc.pid: common.tree(p)) for k, (_, proc) in enumerate(procs)
            }
            groups["redis"] = lambda: list(redis_pids)
            groups["pg"] = lambda: [pid for pids in common.postgres_pids(database) for pid in pids]
            meter = common.CpuMeter(groups)
            load0 = common.load_average()
            m0 = [asyncio.run(_metrics(port)) for port, _ in procs]
            gen.stdin.write("mark\n")
            g0 = json.loads(gen.stdout.readline())
            meter.start()
            time.sleep(args.seconds)
            cpu = meter.stop()
            gen.stdin.write("mark\n")
            g1 = json.loads(gen.stdout.readline())
            m1 = [asyncio.run(_metrics(port)) for port, _ in procs]
            load1 = common.load_average()
        finally:
            with contextlib.suppress(OSError):
                gen.stdin.close()
            try:
                gen.wait(30)
            except subprocess.TimeoutExpired:
                gen.kill()
                gen.wait()
    per: list[dict[str, Any]] = []
    for k, (a, b) in enumerate(zip(m0, m1, strict=True)):
        d = {key: b[key] - a[key] for key in METRICS}
        c = cpu[f"i{k + 1}"]
        per.append(
            {
                "instance": k + 1,
                "cpu_s": round(c, 2),
                "cpu_pct": round(100 * c / meter.wall_s, 1),
                "idle_pct": round(100 * idle_cpu[f"i{k + 1}"] / idle.wall_s, 1),
                "stored": int(d["stored"]),
                "us_per_pos": round(c / max(1, d["stored"]) * 1e6, 1),
                "live_bytes": int(d["live_bytes"]),
                "live_messages": int(d["live_messages"]),
                "control": int(d["control"]),
            }
        )
    stored = sum(p["stored"] for p in per)
    tracker_cpu = sum(p["cpu_s"] for p in per)
    idle_s = sum(p["idle_pct"] for p in per) / 100 * meter.wall_s
    return {
        "instances": n,
        "orgs": orgs,
        "wall_s": round(meter.wall_s, 1),
        "load": [load0, load1],
        "stored": stored,
        "rate": round(stored / meter.wall_s),
        "sent": g1["sent"] - g0["sent"],
        "acked": g1["acked"] - g0["acked"],
        "phones_closed": g1["closed"],
        "replaced_in_window": g1["closed"] - g0["closed"],
        "dash_positions": g1["dash_positions"] - g0["dash_positions"],
        "per_instance": per,
        "tracker_cpu_s": round(tracker_cpu, 2),
        "tracker_us_per_pos": round(tracker_cpu / max(1, stored) * 1e6, 1),
        "tracker_net_us_per_pos": round((tracker_cpu - idle_s) / max(1, stored) * 1e6, 1),
        "redis_cpu_s": round(cpu["redis"], 3),
        "redis_us_per_pos": round(cpu["redis"] / max(1, stored) * 1e6, 2),
        "pg_cpu_s": round(cpu["pg"], 2),
        "pg_us_per_row": round(cpu["pg"] / max(1, stored) * 1e6, 1),
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| instances | instance | positions stored/s | CPU % of a core | idle % | CPU us/position (net of idle) "
        "| live KiB/s received | live msgs/s | control msgs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w = r["wall_s"]
        for p in r["per_instance"]:
            rows.append(
                f"| {r['instances']} | {p['instance']} | {p['stored'] / w:.0f} | {p['cpu_pct']} | {p['idle_pct']} "
                f"| {p['us_per_pos']} ({(p['cpu_pct'] - p['idle_pct']) / 100 * w / max(1, p['stored']) * 1e6:.0f}) "
                f"| {p['live_bytes'] / w / 1024:.1f} | {p['live_messages'] / w:.1f} | {p['control']} |"
            )
        rows.append(
            f"| {r['instances']} | **total** | {r['rate']} | {100 * r['tracker_cpu_s'] / w:.1f} "
            f"| {sum(p['idle_pct'] for p in r['per_instance']):.1f} "
            f"| **{r['tracker_us_per_pos']}** ({r['tracker_net_us_per_pos']}) "
            f"| {sum(p['live_bytes'] for p in r['per_instance']) / w / 1024:.1f} "
            f"| | |"
        )
    rows += [
        "",
        "| instances (orgs) | positions/s | Redis us/position | PostgreSQL us/row | dashboard positions/s "
        "| sent/acked in window | load average (start, end) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['instances']} ({r['orgs']}) | {r['rate']} | {r['redis_us_per_pos']} | {r['pg_us_per_row']} "
            f"| {r['dash_positions'] / r['wall_s']:.0f} | {r['sent']}/{r['acked']} | {r['load'][0]}; {r['load'][1]} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", default="1,2,4", help="instance counts to run, comma-separated")
    p.add_argument("--orgs", type=int, default=20)
    p.add_argument(
        "--orgs-per-instance",
        type=int,
        default=0,
        help="instead of --orgs: this many orgs per instance (the load grows with the instances)",
    )
    p.add_argument("--drivers", type=int, default=50, help="drivers per org")
    p.add_argument("--rate", type=float, default=1.0, help="positions per second per driver")
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--seconds", type=float, default=60.0, help="the measured window")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle instances measured first")
    p.add_argument("--redis", choices=("single", "cluster"), default="single")
    p.add_argument("--churn", type=float, default=0.0, help="driver moves per second (two kicks each)")
    p.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--urls", help=argparse.SUPPRESS)
    p.add_argument("--secret", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="so", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generator:
        asyncio.run(generator(args))
        return 0
    common.exit_on_sigterm()
    info = common.machine()
    log(f"machine: {info}")
    results = []
    with redis_servers(args.redis) as (url, pids):
        for n in (int(x) for x in args.instances.split(",")):
            results.append(run_one(n, args, url, pids))
            log(json.dumps(results[-1]))
    info["load_end"] = common.load_average()
    sha = common.tracker_source(common.TRACKER_REF)[1]
    path = common.save("scaleout", {"machine": info, "args": vars(args), "commit": sha, "results": results})
    print(f"commit {sha}; {info['date']}; {info['nproc']} cores ({info['cpu']}); load at start {info['load']}")
    print(table(results))
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
