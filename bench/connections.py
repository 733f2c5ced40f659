"""Connections: memory per idle connected driver, and connect rate, at 10,000 drivers.

One server process with a fresh database and a private redis-server; its RSS is read once it is
up and idle (after a first dashboard-free settle), then N drivers connect as fast as the load
generator's --concurrency allows (each: TCP, WebSocket upgrade, hello with a JWT, welcome), they
stay connected and idle for --settle seconds, and the RSS is read again. Memory per idle
connection = (RSS after - RSS before) / N; connect rate = N / time to connect them all. The
server's CPU per connection (from /proc) is reported beside it.

    .venv/bin/python bench/connections.py [--systems tracker,node,python] [--drivers 10000] [--repeat 3]

The fd hard limit of this machine is 20,000 (``ulimit -Hn``): 10,000 drivers fit in the server and
in the load generator's two processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import CpuMeter, log


def once(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"conn-{kind}-{time.strftime('%H%M%S')}"
    with (
        common.private_redis() as (redis_url, redis_pid),
        common.start_server(kind, redis_url, log_file=common.RESULTS / f"server-{tag}.log") as srv,
    ):
        time.sleep(args.settle)
        before = srv.rss()
        meter = CpuMeter(
            {
                "server": lambda: [srv.pid],
                "redis": lambda: [redis_pid],
                "postgres": lambda: common.postgres_pids(srv.database)[0],
            }
        )
        out: dict[str, Any] = {"system": kind, "rss_before": before, "load": common.load_average()}
        idle = CpuMeter(
            {
                "server": lambda: [srv.pid],
                "redis": lambda: [redis_pid],
                "postgres": lambda: common.postgres_pids(srv.database)[0],
            }
        )

        def on_event(ev: dict[str, Any]) -> None:
            if ev["ev"] == "connected":
                cpu = meter.stop()
                out.update(
                    connected=ev["drivers"],
                    failed=ev["failed"],
                    connect_s=round(ev["ms"] / 1000, 2),
                    connects_per_s=round(ev["per_s"]),
                    server_us_per_connect=round(cpu["server"] / max(1, ev["drivers"]) * 1e6),
                    postgres_us_per_connect=round(cpu["postgres"] / max(1, ev["drivers"]) * 1e6),
                    redis_us_per_connect=round(cpu["redis"] / max(1, ev["drivers"]) * 1e6),
                )
            elif ev["ev"] == "idle":
                idle.start()
                time.sleep(args.settle)
                cpu = idle.stop()
                out.update(idle_cores={k: round(v / idle.wall_s, 3) for k, v in cpu.items()})
                after = srv.rss()
                p = psutil.Process(srv.pid)
                out.update(
                    rss_after=after,
                    fds=p.num_fds(),
                    kb_per_connection=round((after - before) / max(1, out["connected"]) / 1024, 2),
                )
                assert proc_ref[0].stdin is not None
                proc_ref[0].stdin.close()

        proc_ref: list[Any] = []

        def started(p: Any) -> None:
            proc_ref.append(p)
            meter.start()

        load = [
            "--proto",
            "tracker" if kind == "tracker" else "socketio",
            "--url",
            srv.url,
            "--secret",
            common.SECRET,
            "--mode",
            "idle",
            "--drivers",
            str(args.drivers),
            "--dashboards",
            "0",
            "--workers",
            str(args.workers),
            "--connect-concurrency",
            str(args.concurrency),
            "--hold",
            "300",
        ]
        common.run_load(load, on_event, timeout=600, stdin_open=True, on_start=started)
    log(
        f"{kind}: {out.get('connected')} connected in {out.get('connect_s')} s ({out.get('connects_per_s')}/s), "
        f"{out.get('kb_per_connection')} KB per idle connection (RSS {before / 2**20:.0f} -> "
        f"{out.get('rss_after', 0) / 2**20:.0f} MiB), server {out.get('server_us_per_connect')} us CPU per connect, "
        f"idle CPU (cores) {out.get('idle_cores')}"
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="tracker", help="tracker,node,python (default tracker)")
    p.add_argument("--drivers", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=256, help="connections being opened at once")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--settle", type=float, default=10.0, help="seconds idle before reading RSS (and idle CPU)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    common.ensure_node_modules()
    systems = args.systems.split(",")
    if "python" in systems:
        common.ensure_peers_venv()
    common.exit_on_sigterm()
    info = common.machine()
    log(f"machine: {info}")
    results: dict[str, list[dict[str, Any]]] = {}
    for kind in systems:
        results[kind] = [once(kind, args) for _ in range(args.repeat)]
    lines = [
        "| system | drivers | KB per idle connection (median, runs) | connects/s (median, runs) | "
        "server us CPU per connect | server CPU while idle (cores) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, runs in results.items():
        kb = [r.get("kb_per_connection", 0) for r in runs]
        cps = [r.get("connects_per_s", 0) for r in runs]
        us = [r.get("server_us_per_connect", 0) for r in runs]
        lines.append(
            f"| {kind} | {runs[0].get('connected')} | {statistics.median(kb)} ({kb}) | "
            f"{statistics.median(cps)} ({cps}) | {statistics.median(us)} | "
            f"{statistics.median(r.get('idle_cores', {}).get('server', 0) for r in runs)} |"
        )
    table = "\n".join(lines)
    print(table)
    info["load_end"] = common.load_average()
    path = common.save("connections", {"machine": info, "args": vars(args), "results": results, "table": table})
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
