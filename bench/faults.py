"""Fault scenarios against `tracker serve` subprocesses, with the figures RELIABILITY.md reports:
events acknowledged, lost, duplicated, time to recover, peak RSS of the instance(s).

    .venv/bin/python bench/faults.py                       # every scenario, default durations
    .venv/bin/python bench/faults.py redis pg_down --pg-down-s 60 --json bench/results/faults.json

Each scenario starts a private PostgreSQL cluster and redis-server (harness/servers.py), so it may
kill them, and fresh tracker subprocesses. "Lost" is an acknowledged (driver, seq) missing from
PostgreSQL; "duplicated" is a (driver, seq) stored more than once. Phones are harness.fleet.Driver:
they keep what is not acknowledged and resend it, as docs/PROTOCOL.md asks of the app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

from harness.clients import Dash  # the recording dashboard: Dash(url, token).start()
from harness.fleet import Fleet
from harness.flood import Flood
from harness.instances import TrackerProc
from harness.loss import check_stored
from harness.proxy import Proxy
from harness.servers import PgCluster, RedisServer
from harness.wait import wait_until
from tracker.auth import mint_token

SECRET = "bench-faults-" + "x" * 40


@dataclass
class Result:
    scenario: str
    fault: str
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    recover_s: float | None = None
    peak_rss_mb: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Env:
    args: argparse.Namespace
    pg: PgCluster
    dsn: str
    redis: RedisServer
    procs: list[TrackerProc] = field(default_factory=list)

    async def spawn(self, **env: str) -> TrackerProc:
        settings = {"TRACKER_PRESENCE_REFRESH_S": "2", "TRACKER_PRESENCE_TTL_S": "10", **env}
        proc = TrackerProc(database_url=self.dsn, redis_url=self.redis.url, secret=SECRET, env=settings)
        self.procs.append(proc)
        return await proc.start()

    def peak_mb(self, *procs: TrackerProc) -> float:
        return round(max(p.peak_rss for p in procs) / 2**20, 1)


def dispatcher(org: str) -> str:
    return mint_token(SECRET, role="dispatcher", sub="bench", org=org)


def new_org() -> str:
    return "fault-" + uuid.uuid4().hex[:8]


def p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


async def finish(env: Env, res: Result, org: str, fleet: Fleet, timeout: float = 120.0) -> Result:
    """Drain the fleet (everything acknowledged) and check PostgreSQL."""
    res.notes["drain_s"] = round(await fleet.drain(timeout), 2)
    check = await check_stored(env.dsn, org, fleet.acked())
    res.acked, res.lost, res.duplicated = check.acked, len(check.lost), len(check.duplicated)
    res.notes["generated"] = fleet.generated
    res.notes["errors"] = dict(fleet.errors())
    return res


async def warm(fleet: Fleet, seconds: float) -> None:
    await wait_until(lambda: all(d.acked for d in fleet.drivers), 30, "every driver acknowledged")
    await asyncio.sleep(seconds)  # steady load before the fault


# -- scenarios ---------------------------------------------------------------------------------


async def redis(env: Env) -> Result:
    a = env.args
    res = Result("redis", f"Redis killed for {a.redis_down_s:g} s under steady ingest, restarted empty")
    inst = await env.spawn()
    org = new_org()
    watcher = await Dash(inst.url, dispatcher(org)).start()
    try:
        async with Fleet([inst.url], SECRET, org, a.drivers, interval=a.interval) as fleet:
            await warm(fleet, a.warm_s)
            env.redis.kill()
            down = time.monotonic()
            await asyncio.sleep(a.redis_down_s)  # hold the outage
            res.notes["acks_while_down"] = fleet.acks_between(down + 0.5, time.monotonic())
            await env.redis.start()
            up = time.monotonic()
            await wait_until(lambda: any(t >= up and live for t, live in watcher.statuses), 30, "status live:true")
            n = len(watcher.pos_times)
            await wait_until(lambda: len(watcher.pos_times) > n, 10, "live positions")
            res.recover_s = round(watcher.pos_times[n] - up, 2)
            res.notes["status_live_true_s"] = round(next(t for t, v in watcher.statuses if t >= up and v) - up, 2)
            res.notes["snapshot_after"] = any(t >= up for t, _ in watcher.snapshots)
            await finish(env, res, org, fleet)
    finally:
        await watcher.close()
    res.peak_rss_mb = env.peak_mb(inst)
    return res


async def pg_down(env: Env) -> Result:
    a = env.args
    res = Result("pg_down", f"PostgreSQL killed mid-batch (SIGKILL), down {a.pg_down_s:g} s")
    inst = await env.spawn()
    org = new_org()
    watcher = await Dash(inst.url, dispatcher(org)).start()
    try:
        async with Fleet([inst.url], SECRET, org, a.drivers, interval=a.interval, resend_after=30) as fleet:
            await warm(fleet, a.warm_s)
            env.pg.kill()
            down = time.monotonic()
            await asyncio.sleep(a.pg_down_s)  # hold the outage
            up = time.monotonic()
            res.notes["acks_while_down"] = fleet.acks_between(down + 0.5, up)
            res.notes["live_frames_while_down"] = sum(1 for t in watcher.pos_times if down <= t <= up)
            await env.pg.start()
            await wait_until(lambda: fleet.last_ack() > up, 60, "an ack after the restart")
            res.notes["first_ack_s"] = round(fleet.last_ack() - up, 2)
            await finish(env, res, org, fleet)
            res.recover_s = round(time.monotonic() - up, 2)  # until everything is acknowledged
    finally:
        await watcher.close()
    res.peak_rss_mb = env.peak_mb(inst)
    return res


async def pg_readonly(env: Env) -> Result:
    import asyncpg

    a = env.args
    res = Result("pg_readonly", "primary turns read-only (failover): pooled sessions refuse writes, new ones accept")
    inst = await env.spawn()
    org = new_org()
    admin = await asyncpg.connect(env.dsn)
    db = env.dsn.rsplit("/", 1)[1]
    try:
        async with Fleet([inst.url], SECRET, org, a.drivers, interval=a.interval) as fleet:
            await warm(fleet, a.warm_s)
            await admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = off')
            await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await admin.execute("SELECT pg_reload_conf()")
            t = time.monotonic()
            await asyncio.sleep(1)  # hold: let the read-only sessions meet writes
            await wait_until(lambda: fleet.last_ack() > t + 1, 30, "acks again")
            res.recover_s = round(fleet.last_ack() - t, 2)
            await finish(env, res, org, fleet)
    finally:
        with contextlib.suppress(Exception):
            await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
            await admin.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
            await admin.execute("SELECT pg_reload_conf()")
        await admin.close()
    res.peak_rss_mb = env.peak_mb(inst)
    return res


async def sigkill(env: Env) -> Result:
    a = env.args
    res = Result("sigkill", "one of two instances SIGKILLed under load; its drivers reconnect to the other")
    first, second = await asyncio.gather(env.spawn(), env.spawn())
    org = new_org()
    async with Fleet([first.url, second.url], SECRET, org, a.drivers, interval=a.interval) as fleet:
        await warm(fleet, a.warm_s)
        first.signal(signal.SIGKILL)
        t = time.monotonic()
        await wait_until(lambda: all(d.ack_times[-1] > t + 0.05 for d in fleet.drivers), 60, "all back")
        res.recover_s = round(time.monotonic() - t, 2)
        res.notes["reconnects"] = sum(d.stats.connects for d in fleet.drivers) - a.drivers
        await finish(env, res, org, fleet)
    res.peak_rss_mb = env.peak_mb(first, second)
    return res


async def sigterm(env: Env) -> Result:
    a = env.args
    grace = "10"
    res = Result("sigterm", f"rolling deploy: SIGTERM to one of two instances (TRACKER_SHUTDOWN_GRACE_S={grace})")
    first, second = await asyncio.gather(*(env.spawn(TRACKER_SHUTDOWN_GRACE_S=grace) for _ in range(2)))
    org = new_org()
    async with Fleet([first.url, second.url], SECRET, org, a.drivers, interval=a.interval) as fleet:
        await warm(fleet, a.warm_s)
        first.signal(signal.SIGTERM)
        t = time.monotonic()
        await first.exited(30)
        res.notes["exit_s"] = round(time.monotonic() - t, 2)
        await wait_until(lambda: all(d.ack_times[-1] > t + 0.05 for d in fleet.drivers), 60, "all back")
        res.recover_s = round(time.monotonic() - t, 2)
        res.notes["closes"] = {str(k): v for k, v in fleet.closes().items()}
        late = 0
        for d in fleet.drivers:
            closed = next((ct for ct, code in d.close_times if code == 1012), None)
            if closed is not None:
                late += sum(1 for s, b in d.born.items() if b < t - 0.2 and d.acked_at.get(s, 1e18) > closed)
        res.notes["received_before_sigterm_not_acked_before_1012"] = late
        await finish(env, res, org, fleet)
    res.peak_rss_mb = env.peak_mb(first, second)
    return res


async def slow_dashboards(env: Env) -> Result:
    import socket

    from websockets.asyncio.client import connect

    a = env.args
    res = Result("slow_dashboards", "one dashboard on a 1 KB/s link, one that never reads; a healthy one measured")
    inst = await env.spawn()
    org = new_org()
    fast = await Dash(inst.url, dispatcher(org)).start()
    proxy = await Proxy(inst.port, buffer=4096).start()
    slow = await Dash(f"ws://127.0.0.1:{proxy.port}", dispatcher(org)).start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", inst.port))
    never = await connect(inst.url + "/v1/live", sock=sock, max_queue=1, compression=None)
    await never.send(orjson.dumps({"type": "hello", "token": dispatcher(org)}).decode())
    await never.send(orjson.dumps({"type": "subscribe"}).decode())
    try:
        async with Fleet([inst.url], SECRET, org, a.drivers, interval=a.interval) as fleet:
            await warm(fleet, a.warm_s)
            base = list(fast.latency_ms)
            rss_before = inst.peak_rss
            proxy.slow(1024)
            await asyncio.sleep(a.slow_s)  # hold the slow link under load
            loaded = fast.latency_ms[len(base) :]
            res.notes["healthy_latency_ms_p50_p95_before"] = (p(base, 0.5), p(base, 0.95))
            res.notes["healthy_latency_ms_p50_p95_during"] = (p(loaded, 0.5), p(loaded, 0.95))
            res.notes["rss_growth_mb"] = round((inst.peak_rss - rss_before) / 2**20, 1)
            res.notes["slow_dashboard_closed"] = slow.close_code
            last = {d.name: d.seq for d in fleet.drivers}
            proxy.restore()
            t = time.monotonic()
            await finish(env, res, org, fleet)
            await wait_until(
                lambda: all(slow.positions.get(d, {}).get("seq") == s for d, s in last.items()), 60, "catch-up"
            )
            res.recover_s = round(time.monotonic() - t, 2)  # the link restored: newest positions shown
    finally:
        never.transport.abort()
        await slow.close()
        await fast.close()
        await proxy.close()
    res.peak_rss_mb = env.peak_mb(inst)
    return res


async def overload(env: Env) -> Result:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    a = env.args
    res = Result(
        "overload",
        f"{a.flood} idle unauthenticated websockets + {a.flood // 4} silent TCP sockets, a driver at 1,000 "
        "events/s for 3 s (burst 1,000), a 10 MB frame, a compression bomb",
    )
    # A burst of 1,000 (the default, 20,000, lets a day's offline backlog in at once: 1,000 events/s
    # would take 20 s to reach the limit).
    inst = await env.spawn(TRACKER_WS_DEFLATE="true", TRACKER_RATE_BURST="1000")
    org = new_org()
    flood = Flood(inst.port)
    try:
        async with Fleet([inst.url], SECRET, org, a.drivers, interval=a.interval) as fleet:
            await warm(fleet, a.warm_s)
            base = [x for d in fleet.drivers for x in d.stats.ack_latency_ms]
            marks = [len(d.stats.ack_latency_ms) for d in fleet.drivers]
            t = time.monotonic()
            greedy = asyncio.create_task(_greedy(inst.url, org))
            await asyncio.gather(flood.open(a.flood, upgrade=True), flood.open(a.flood // 4, upgrade=False))
            opened = time.monotonic()
            res.notes["flood_upgraded"] = flood.upgraded
            res.notes["flood_open_s"] = round(opened - t, 2)
            await wait_until(lambda: flood.open_count == 0, 60, "the flood shed")
            # Until every idle socket was closed, from the last one opened (hello deadline 10 s).
            res.recover_s = round(time.monotonic() - opened, 2)
            res.notes["greedy_acked_rate_limited"] = await greedy
            codes = []
            for compression in (None, "deflate"):
                ws = await connect(inst.url + "/v1/driver", compression=compression, max_size=None)
                await ws.send(orjson.dumps({"type": "hello", "token": _driver(org, "big")}).decode())
                await ws.recv()
                with contextlib.suppress(ConnectionClosed):
                    await ws.send('{"type":"pos","note":"' + "0" * (10 * 2**20) + '"}')
                    async with asyncio.timeout(10):
                        while True:
                            await ws.recv()
                codes.append(ws.close_code)
                ws.transport.abort()
            res.notes["close_codes_10mb_frame_and_bomb"] = codes
            during = [x for d, m in zip(fleet.drivers, marks, strict=True) for x in d.stats.ack_latency_ms[m:]]
            res.notes["others_ack_ms_p50_p95_before"] = (p(base, 0.5), p(base, 0.95))
            res.notes["others_ack_ms_p50_p95_during"] = (p(during, 0.5), p(during, 0.95))
            await finish(env, res, org, fleet)
        res.notes["alive"] = inst.proc is not None and inst.proc.poll() is None
    finally:
        await flood.close()
    res.peak_rss_mb = env.peak_mb(inst)
    return res


def _driver(org: str, sub: str) -> str:
    return mint_token(SECRET, role="driver", sub=sub, org=org)


async def _greedy(url: str, org: str) -> tuple[int, int]:
    """A driver sending 1,000 events/s for 3 s; (acked, rate_limited) once every event is answered."""
    from websockets.asyncio.client import connect

    ws = await connect(url + "/v1/driver", compression=None, max_queue=None)
    acked: set[int] = set()
    limited = 0
    try:
        await ws.send(orjson.dumps({"type": "hello", "token": _driver(org, "greedy")}).decode())
        await ws.recv()

        async def read() -> None:
            nonlocal limited
            async for data in ws:
                f = orjson.loads(data)
                if f["type"] == "ack":
                    acked.update(s for x, y in f["ranges"] for s in range(x, y + 1))
                elif f.get("code") == "rate_limited":
                    limited += 1

        reader = asyncio.create_task(read())
        now = int(time.time() * 1000)
        for i in range(3000):
            await ws.send(orjson.dumps({"type": "pos", "seq": i + 1, "ts": now + i, "lat": 1.0, "lon": 2.0}).decode())
            if i % 10 == 9:
                await asyncio.sleep(0.01)  # the pace: 1,000 events/s
        await wait_until(lambda: len(acked) + limited >= 3000, 30, "every greedy event answered")
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        return len(acked), limited
    finally:
        ws.transport.abort()


async def flaky(env: Env) -> Result:
    from tracker.sim.run import SimOptions, simulate

    a = env.args
    res = Result("flaky", f"simulator --flaky: {a.flaky_drivers} drivers for {a.flaky_s:g} s (drops, offline, slow)")
    inst = await env.spawn()
    report = await simulate(
        SimOptions(
            url=inst.url,
            drivers=a.flaky_drivers,
            interval=1.0,
            dashboards=1,
            duration=a.flaky_s,
            flaky=True,
            seed=6,
            secret=SECRET,
            dsn=env.dsn,
            processes=a.flaky_processes,
            drain_timeout=120.0,
            resend_after=10.0,
            connect_rate=500.0,
            progress=False,
        )
    )
    res.acked, res.lost, res.duplicated = report.acked, report.lost, report.stored_duplicates or 0
    res.recover_s = round(report.drain_s, 2)  # after the last fault: until everything was acknowledged
    res.notes = {
        "generated": report.generated,
        "drained": report.drained,
        "connects": report.connects,
        "ack_ms_p50_p99": (report.ack_latency_ms.p50, report.ack_latency_ms.p99),
        "dashboard_duplicates": sum(d.duplicates for d in report.dashboard_results),
    }
    res.peak_rss_mb = env.peak_mb(inst)
    return res


SCENARIOS: dict[str, Callable[[Env], Awaitable[Result]]] = {
    "redis": redis,
    "pg_down": pg_down,
    "pg_readonly": pg_readonly,
    "sigkill": sigkill,
    "sigterm": sigterm,
    "slow_dashboards": slow_dashboards,
    "overload": overload,
    "flaky": flaky,
}


@contextlib.asynccontextmanager
async def environment(args: argparse.Namespace) -> AsyncIterator[Env]:
    pg = PgCluster()
    redis_server = RedisServer()
    env: Env | None = None
    try:
        await pg.start()
        dsn = await pg.create_database("tracker")
        await redis_server.start()
        env = Env(args, pg, dsn, redis_server)
        yield env
    finally:
        if env is not None:
            await asyncio.gather(*(p.close() for p in env.procs))
        redis_server.close()
        pg.close()


def table(results: list[Result]) -> str:
    head = f"{'scenario':<16} {'acked':>8} {'lost':>5} {'dup':>4} {'recover s':>10} {'peak RSS MB':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        rec = "-" if r.recover_s is None else f"{r.recover_s:.2f}"
        lines.append(f"{r.scenario:<16} {r.acked:>8} {r.lost:>5} {r.duplicated:>4} {rec:>10} {r.peak_rss_mb:>12.1f}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--drivers", type=int, default=200, help="phones per scenario (default %(default)s)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between a phone's events")
    ap.add_argument("--warm-s", type=float, default=3.0, help="steady load before each fault")
    ap.add_argument("--redis-down-s", type=float, default=10.0)
    ap.add_argument("--pg-down-s", type=float, default=60.0)
    ap.add_argument("--slow-s", type=float, default=10.0, help="how long the slow links are held under load")
    ap.add_argument("--flood", type=int, default=4000, help="idle unauthenticated websockets")
    ap.add_argument("--flaky-drivers", type=int, default=1000)
    ap.add_argument("--flaky-s", type=float, default=60.0)
    ap.add_argument("--flaky-processes", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    unknown = set(args.scenarios) - SCENARIOS.keys()
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


async def main(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    for name in args.scenarios or list(SCENARIOS):
        print(f"== {name}", file=sys.stderr, flush=True)
        async with environment(args) as env:
            started = time.monotonic()
            try:
                result = await SCENARIOS[name](env)
            except Exception as exc:  # one failed scenario is a result too
                result = Result(name, "FAILED", notes={"error": repr(exc)})
            result.notes["wall_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        print(orjson.dumps(asdict(result)).decode(), file=sys.stderr, flush=True)
    return results


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


if __name__ == "__main__":
    ns = parse()
    try:
        import uvloop

        out = uvloop.run(main(ns))
    except ImportError:
        out = asyncio.run(main(ns))
    print(table(out))
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_bytes(
            orjson.dumps(
                {"machine": machine(), "args": vars(ns) | {"json": str(ns.json)}, "results": [asdict(r) for r in out]},
                option=orjson.OPT_INDENT_2,
            )
        )
    sys.exit(0 if all(r.lost == 0 and r.duplicated == 0 and r.fault != "FAILED" for r in out) else 1)
