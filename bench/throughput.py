"""Throughput, side by side: tracker vs the Socket.IO peers (Node and Python), in one run.

For each system and each dashboard count: one server process (one worker) with a fresh
PostgreSQL database and a private redis-server; N drivers (default 10,000) connected once, then
the offered rate steps up (default 2k, 5k, 10k, 20k, 30k, 40k, 50k positions/s, at most 5/s per
driver), each step a warm-up and a measured window. A step holds when phone->dashboard p99 <= 100
ms, every dashboard got every position, and nothing sent in the step is unacknowledged; the run
stops at the first step that does not hold. At the end, acknowledged minus stored is checked in
PostgreSQL over (driver, seq).

CPU per position is read from /proc over the measured window: the server process, the private
redis-server, the PostgreSQL backends of the system's database (and, apart, the cluster's shared
WAL writer/checkpointer/background writer), and the load generator (so it is visible when the
generator, not the server, is the bottleneck).

    .venv/bin/python bench/throughput.py                       # everything (about 15 minutes)
    .venv/bin/python bench/throughput.py --systems tracker --dashboards 1 --rates 2000,5000,10000
    .venv/bin/python bench/throughput.py --systems tracker --rates 10000 --py-spy 10   # + a profile
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import CpuMeter, log

SYSTEMS = ("tracker", "node", "python")


def run_system(kind: str, dashboards: int, args: argparse.Namespace) -> dict[str, Any]:
    """One system, one dashboard count: every step, CPU per position, loss."""
    tag = f"{kind}-{dashboards}d-{time.strftime('%H%M%S')}"
    if kind == "tracker" and args.tracker_workers != 1:
        tag += f"-w{args.tracker_workers}"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    acked_file = common.RESULTS / f"acked-{tag}.json"
    server_log = common.RESULTS / f"server-{tag}.log"
    steps: list[dict[str, Any]] = []
    with (
        common.private_redis() as (redis_url, redis_pid),
        common.start_server(kind, redis_url, log_file=server_log, tracker_workers=args.tracker_workers) as srv,
    ):
        log(
            f"{kind}: {srv.url} pid {srv.pid}, redis pid {redis_pid}, database {srv.database}; "
            f"load {common.load_average()}"
        )
        load_pid: list[int] = []
        meter = CpuMeter(
            {
                "server": lambda: common.tree(srv.pid),  # `serve --workers N`: the supervisor and its workers
                "redis": lambda: [redis_pid],
                "postgres": lambda: common.postgres_pids(srv.database)[0],
                "postgres_shared": lambda: common.postgres_pids(srv.database)[1],
                "load": lambda: common.tree(load_pid[0]) if load_pid else [],
            }
        )
        marks: dict[int, dict[str, Any]] = {}

        def scrape() -> dict[str, float]:
            # With `serve --workers N` each scrape lands on any one worker: deltas would mix them.
            return common.scrape(srv.url) if kind == "tracker" and args.tracker_workers == 1 else {}

        connect_metrics = scrape()
        spy: list[subprocess.Popen[Any]] = []

        def on_event(ev: dict[str, Any]) -> None:
            if ev["ev"] == "measure_start":
                marks[ev["step"]] = {"load_avg": common.load_average(), "metrics": scrape()}
                meter.start()
                if args.py_spy and kind == "tracker" and not spy:
                    out = common.RESULTS / f"pyspy-{tag}-step{ev['step']}.txt"
                    spy.append(
                        subprocess.Popen(
                            [
                                common.py_spy(),
                                "record",
                                "-p",
                                str(srv.pid),
                                "-d",
                                str(int(args.py_spy)),
                                "-f",
                                "raw",
                                "-o",
                                str(out),
                                "--nonblocking",
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
                    marks[ev["step"]]["py_spy"] = str(out)
            elif ev["ev"] == "measure_end":
                cpu = meter.stop()
                m = marks[ev["step"]]
                m.update(cpu_s=cpu, wall_s=meter.wall_s, stalls=common.stalls(m.pop("metrics"), scrape()))
            elif ev["ev"] == "step":
                m = marks.get(ev["step"], {})
                n = max(1, ev["sent_in_window"])
                cpu = m.get("cpu_s", {})
                ev["cpu_us_per_pos"] = {k: round(v / n * 1e6, 1) for k, v in cpu.items()}
                ev["cpu_cores"] = {k: round(v / max(1e-9, m.get("wall_s", 1)), 2) for k, v in cpu.items()}
                ev["load_avg"] = m.get("load_avg")
                ev["stalls"] = m.get("stalls")
                if ev["stalls"]:
                    log(f"{kind} {dashboards}d {ev['rate']}/s GC and loop lag in the window: {ev['stalls']}")
                ev.pop("dashboards", None)
                if ev.get("live_worst_per_500ms"):
                    log(f"{kind} {dashboards}d {ev['rate']}/s worst live ms per 500 ms: {ev['live_worst_per_500ms']}")
                steps.append(ev)
                us = ev["cpu_us_per_pos"]
                log(
                    f"{kind} {dashboards}d {ev['rate']}/s: achieved {ev['achieved_per_s']:.0f}/s live p99 "
                    f"{(ev['live_ms'] or {}).get('p99')} ms, ack p99 {ev['ack_ms']['p99']} ms, delivered "
                    f"{ev['delivered_ratio']}, unacked {ev['lost_unacked']}; us/pos server {us.get('server')} "
                    f"redis {us.get('redis')} pg {us.get('postgres')} (+shared {us.get('postgres_shared')}) "
                    f"load {us.get('load')}  {'OK' if ev['ok'] else 'FAIL'}"
                )
            elif ev["ev"] == "connected":
                ev["stalls"] = common.stalls(connect_metrics, scrape())
                if ev["failed"]:
                    log(f"{kind}: NOT THE SHAPE ASKED FOR: {ev['failed']} drivers did not connect ({ev.get('errors')})")
                log(
                    f"{kind}: {ev['drivers']} drivers connected in {ev['ms'] / 1000:.1f} s ({ev['per_s']:.0f}/s); "
                    f"load {common.load_average()}; GC and loop lag while connecting: {ev['stalls']}"
                )

        load_args = [
            "--proto",
            "tracker" if kind == "tracker" else "socketio",
            "--url",
            srv.url,
            "--secret",
            common.SECRET,
            "--mode",
            "rate",
            "--drivers",
            str(args.drivers),
            "--dashboards",
            str(dashboards),
            "--rates",
            args.rates,
            "--warmup",
            str(args.warmup),
            "--measure",
            str(args.measure),
            "--workers",
            str(args.workers),
            "--dash-workers",
            str(args.dash_workers),
            "--out",
            str(acked_file),
            "--connect-deadline",
            str(args.connect_deadline),
        ]
        if args.keep_going:
            load_args.append("--no-stop-on-fail")
        run = common.run_load(load_args, on_event, timeout=args.timeout, on_start=lambda p: load_pid.append(p.pid))
        for p in spy:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        errors = next((e.get("errors") for e in run.events if e["ev"] == "dumped"), {})
        lost = common.loss(acked_file, srv.dsn) if acked_file.exists() else {"error": "no acked file"}
        connected = next((e for e in run.events if e["ev"] == "connected"), {})
    held = [s for s in steps if s["ok"]]
    best = max(held, key=lambda s: s["rate"]) if held else None
    log(f"{kind} {dashboards}d: highest step held {best['rate'] if best else None}/s; lost over the run {lost}")
    name = f"tracker --workers {args.tracker_workers}" if kind == "tracker" and args.tracker_workers != 1 else kind
    return {
        "system": name,
        "dashboards": dashboards,
        "drivers": args.drivers,
        "connected": connected,
        "steps": steps,
        "highest_held": best["rate"] if best else 0,
        "best_step": best,
        "loss": lost,
        "client_errors": errors,
        "load_returncode": run.returncode,
    }


def summary(results: list[dict[str, Any]]) -> str:
    """Markdown: the highest step held per system, then every step."""
    lines = [
        "| system | dashboards | drivers connected | highest rate held (p99 <= 100 ms, 0 lost) | server us/pos there "
        "| lost (run) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["best_step"] or {}
        lost = r["loss"].get("lost", "?")
        lines.append(
            f"| {r['system']} | {r['dashboards']} | {r['connected'].get('drivers', '?')} of {r['drivers']} | "
            f"{r['highest_held'] or 'none'} | "
            f"{b.get('cpu_us_per_pos', {}).get('server', '-')} | {lost} |"
        )
    lines += [
        "",
        "| system | dash | offered/s | achieved/s | live p50 / p95 / p99 ms | ack p99 ms | delivered | unacked | "
        "server us/pos (kernel) | redis | pg (+shared) | load gen | held |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for st in r["steps"]:
            us = st.get("cpu_us_per_pos", {})
            live = st.get("live_ms") or {}
            lines.append(
                f"| {r['system']} | {r['dashboards']} | {st['rate']} | {st['achieved_per_s']:.0f} | "
                f"{live.get('p50', '-')} / {live.get('p95', '-')} / {live.get('p99', '-')} | "
                f"{st['ack_ms'].get('p99')} | {st['delivered_ratio']:.3f} | {st['lost_unacked']} | "
                f"{us.get('server')} ({us.get('server_kernel')}) | {us.get('redis')} | "
                f"{us.get('postgres')} (+{us.get('postgres_shared')}) | {us.get('load')} | "
                f"{'yes' if st['ok'] else 'no'} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="tracker,node,python (default all three)")
    p.add_argument("--dashboards", default="1,10", help="dashboard counts to run (default 1,10)")
    p.add_argument("--drivers", type=int, default=10_000)
    p.add_argument("--rates", default="2000,5000,10000,20000,30000,40000,50000", help="offered positions/s, in order")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of each step before the measured window")
    p.add_argument("--measure", type=float, default=12.0, help="measured seconds per step")
    p.add_argument("--workers", type=int, default=2, help="load generator processes for the drivers")
    p.add_argument("--dash-workers", type=int, default=1, help="load generator processes for the dashboards")
    p.add_argument(
        "--tracker-workers", type=int, default=1, help="tracker serve --workers N (then no GC and loop-lag numbers)"
    )
    p.add_argument("--py-spy", type=float, default=0, help="profile tracker for S seconds in its first measured step")
    p.add_argument(
        "--connect-deadline", type=float, default=300, help="seconds to connect the drivers; the rest count as failed"
    )
    p.add_argument("--keep-going", action="store_true", help="run every step even after one fails")
    p.add_argument("--timeout", type=float, default=1200, help="hard limit per system run, seconds")
    args = p.parse_args()
    common.ensure_node_modules()
    systems = [s for s in args.systems.split(",") if s]
    if "python" in systems:
        common.ensure_peers_venv()
    common.exit_on_sigterm()
    info = common.machine()
    log(f"machine: {info}")
    results = []
    for d in [int(x) for x in args.dashboards.split(",") if x]:
        for kind in systems:
            results.append(run_system(kind, d, args))
    info["load_end"] = common.load_average()
    table = summary(results)
    print(table)
    path = common.save("throughput", {"machine": info, "args": vars(args), "results": results, "table": table})
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
