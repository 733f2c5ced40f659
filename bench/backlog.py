"""Offline backlog: 1,000 drivers reconnect and each uploads a 2,000-event backlog.

One tracker process with a fresh database and a private redis-server. The drivers connect (hello,
welcome), then each uploads its backlog in `batch` frames of the welcome's max_batch items, one
frame in flight per driver (the next one goes when the previous is fully acknowledged), resending
what is answered `unavailable`/`rate_limited` after retry_ms, as the protocol asks a phone to.
Reported: time from the first upload to the last ack, events/s, server and PostgreSQL CPU per event,
and PostgreSQL's verdict: every driver has exactly seqs 1..2000, none lost, none stored twice.

    .venv/bin/python bench/backlog.py [--drivers 1000] [--backlog 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common
from common import CpuMeter, log


async def verdict(dsn: str, org: str, drivers: int, backlog: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT (driver_id, seq)) AS distinct_n,"
            " count(DISTINCT driver_id) AS drivers,"
            " min(seq) AS lo, max(seq) AS hi FROM positions WHERE org = $1",
            org,
        )
        bad = await conn.fetchval(
            "SELECT count(*) FROM (SELECT driver_id FROM positions WHERE org = $1 GROUP BY driver_id"
            " HAVING count(*) <> $2 OR min(seq) <> 1 OR max(seq) <> $2) x",
            org,
            backlog,
        )
    finally:
        await conn.close()
    expected = drivers * backlog
    return {
        "rows": row["n"],
        "distinct": row["distinct_n"],
        "drivers": row["drivers"],
        "min_seq": row["lo"],
        "max_seq": row["hi"],
        "drivers_incomplete": bad,
        "lost": expected - row["distinct_n"],
        "duplicated": row["n"] - row["distinct_n"],
        "ok": row["n"] == row["distinct_n"] == expected and bad == 0,
    }


def once(args: argparse.Namespace) -> dict[str, Any]:
    tag = f"backlog-{time.strftime('%H%M%S')}"
    acked_file = common.RESULTS / f"acked-{tag}.json"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    with (
        common.private_redis() as (redis_url, redis_pid),
        common.start_server("tracker", redis_url, log_file=common.RESULTS / f"server-{tag}.log") as srv,
    ):
        meter = CpuMeter(
            {
                "server": lambda: [srv.pid],
                "redis": lambda: [redis_pid],
                "postgres": lambda: common.postgres_pids(srv.database)[0],
                "postgres_shared": lambda: common.postgres_pids(srv.database)[1],
            }
        )
        out: dict[str, Any] = {"load": common.load_average()}

        def on_event(ev: dict[str, Any]) -> None:
            if ev["ev"] == "backlog_start":
                meter.start()
            elif ev["ev"] == "backlog_done":
                cpu = meter.stop()
                n = args.drivers * args.backlog
                out.update(
                    seconds=round(ev["ms"] / 1000, 2),
                    outcome=ev["outcome"],
                    errors=ev["errors"],
                    events_per_s=round(n / (ev["ms"] / 1000)),
                    us_per_event={k: round(v / n * 1e6, 1) for k, v in cpu.items()},
                )
            elif ev["ev"] == "connected":
                out["connect_s"] = round(ev["ms"] / 1000, 1)

        org = f"backlog-{time.strftime('%H%M%S')}"
        load = [
            "--proto",
            "tracker",
            "--url",
            srv.url,
            "--secret",
            common.SECRET,
            "--org",
            org,
            "--mode",
            "backlog",
            "--drivers",
            str(args.drivers),
            "--backlog",
            str(args.backlog),
            "--workers",
            str(args.workers),
            "--drain",
            str(args.deadline),
            "--out",
            str(acked_file),
        ]
        common.run_load(load, on_event, timeout=args.deadline + 300)
        out["postgres"] = asyncio.run(verdict(srv.dsn, org, args.drivers, args.backlog))
        out["loss"] = common.loss(acked_file, srv.dsn)
    log(
        f"backlog: {args.drivers} x {args.backlog} in {out.get('seconds')} s ({out.get('events_per_s')}/s, "
        f"{out.get('outcome')}), errors {out.get('errors')}; cpu us/event {out.get('us_per_event')}; "
        f"PostgreSQL {out['postgres']}"
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drivers", type=int, default=1000)
    p.add_argument("--backlog", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--deadline", type=float, default=600, help="give up after this many seconds")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    common.ensure_node_modules()
    common.exit_on_sigterm()
    info = common.machine()
    log(f"machine: {info}")
    runs = [once(args) for _ in range(args.repeat)]
    secs = [r.get("seconds", float("nan")) for r in runs]
    med = sorted(runs, key=lambda r: r.get("seconds", 1e9))[len(runs) // 2]
    table = "\n".join(
        [
            "| drivers x backlog | seconds (median, runs) | events/s | server us/event | PostgreSQL us/event | "
            "lost | duplicated |",
            "|---|---|---|---|---|---|---|",
            f"| {args.drivers} x {args.backlog} | {statistics.median(secs)} ({secs}) | {med.get('events_per_s')} | "
            f"{med.get('us_per_event', {}).get('server')} | {med.get('us_per_event', {}).get('postgres')} | "
            f"{sum(r['postgres']['lost'] for r in runs)} | {sum(r['postgres']['duplicated'] for r in runs)} |",
        ]
    )
    print(table)
    info["load_end"] = common.load_average()
    path = common.save("backlog", {"machine": info, "args": vars(args), "results": runs, "table": table})
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
