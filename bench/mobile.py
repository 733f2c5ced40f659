"""Bytes on the wire and server CPU per position for every way a phone can send (issue 14).

Each form runs `tracker simulate` (in this process) against a fresh tracker (one process, a
private Redis, a fresh database) through a byte-counting TCP proxy (harness/proxy.py): websocket
or HTTP bytes both ways, handshakes, hello, welcome, acks, pings and closes included, no TCP/IP or
TLS headers. The simulator's own counts at its sockets are printed beside the proxy's (they must
agree). Server CPU is utime + stime of the tracker process from /proc over the run.

    .venv/bin/python bench/mobile.py [--drivers 20] [--duration 130] [--forms live-json,...]

`--forms deflate` measures permessage-deflate for v1 JSON phones (off by default in tracker):
`websockets` clients that negotiate it (context takeover, 15-bit windows: the library's and
browsers' default) send a JSON `pos` a second and read their acks, against a tracker started with
TRACKER_WS_DEFLATE=true; then the same without it; bytes through the proxy, server CPU per
position, and the server's RSS per open connection with and without it.

`--breakdown` records every byte through the proxy and splits it, each way, by what carried it:
the HTTP heads of the upgrade, then websocket frames (headers included) by JSON `type` or binary
kind (compact-1/compact-2 batch, live frame, compact ack, resume hello, binary welcome), pings,
pongs and closes. The `batch-compact2-resume` form starts each phone with the resume token an
earlier connection would have given it (`tracker simulate --resume warm`): a phone on the road
since before the measured window, reconnecting with a resume hello instead of its JWT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SECRET,
    TRACKER_REF,
    CpuMeter,
    exit_on_sigterm,
    fresh_database,
    log,
    machine,
    private_redis,
    save,
    tracker_source,
)
from harness.http import wait_ready
from harness.ports import free_port
from harness.proxy import Proxy
from harness.servers import popen, stop_process
from tracker.auth import mint_token
from tracker.protocol.wscodec import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameCollector
from tracker.sim import SimOptions
from tracker.sim.driver import DriverModel
from tracker.sim.run import simulate

ROOT = Path(__file__).resolve().parent.parent
DATABASE = f"bench_mobile_{ROOT.name}".replace("-", "_")


@dataclass(frozen=True)
class Form:
    name: str
    encoding: str
    acks: str
    transport: str
    batch: bool
    resume: str = "off"  # warm: phones hold a resume token from an earlier connection (no JWT hello)


FORMS = {
    f.name: f
    for f in (
        Form("live-json", "json", "per-commit", "ws", False),
        Form("live-json-cumulative", "json", "cumulative", "ws", False),
        Form("live-compact", "compact", "cumulative", "ws", False),
        Form("live-compact-acks", "compact", "compact", "ws", False),
        Form("live-compact2-acks", "compact2", "compact", "ws", False),
        Form("batch-json", "json", "per-commit", "ws", True),
        Form("batch-compact", "compact", "compact", "ws", True),
        Form("batch-compact2", "compact2", "compact", "ws", True),
        Form("batch-compact2-resume", "compact2", "compact", "ws", True, "warm"),
        Form("batch-http-json", "json", "per-commit", "http", True),
        Form("batch-http-compact", "compact", "per-commit", "http", True),
        Form("batch-http-compact2", "compact2", "per-commit", "http", True),
    )
}


@contextlib.contextmanager
def tracker(redis_url: str, env: dict[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """A tracker from this work tree on a free port with a fresh database: (port, pid)."""
    dsn = fresh_database(DATABASE)
    port = free_port()
    base = {
        **os.environ,
        "DATABASE_URL": dsn,
        "REDIS_URL": redis_url,
        "TRACKER_JWT_SECRET": SECRET,
        "TRACKER_CUSTODY_KEY": "bench-custody-key-" + "y" * 40,
        "TRACKER_PORT": str(port),
        "TRACKER_HOST": "127.0.0.1",
        "TRACKER_LOG_LEVEL": "warning",
        **(env or {}),
    }
    src, sha = tracker_source(TRACKER_REF)  # a clean copy of the commit (the work tree may be edited meanwhile)
    base["PYTHONPATH"] = str(src)
    log(f"tracker from {sha}")
    proc = popen([sys.executable, "-m", "tracker", "serve"], cwd=src, env=base)
    try:
        asyncio.run(wait_ready(port, proc=proc, timeout=90, interval=0.3))
        yield port, proc.pid
    finally:
        stop_process(proc, grace=20)


def _frame_size(payload: int, masked: bool) -> int:
    return (2 if payload < 126 else 4 if payload < 65536 else 10) + (4 if masked else 0) + payload


def _kind(opcode: int, payload: bytes) -> str:
    names = {OP_PING: "ping", OP_PONG: "pong", OP_CLOSE: "close"}
    if opcode in names:
        return names[opcode]
    if opcode == OP_BINARY:
        kinds = {0xC1: "compact-1 batch", 0xC2: "compact-1 live", 0xC3: "compact-2 batch", 0xA1: "compact ack"}
        kinds |= {0xA3: "resume hello", 0xA4: "binary welcome"}
        return kinds.get(payload[0] if payload else -1, "binary other")
    try:
        kind = str(orjson.loads(payload).get("type"))
    except (orjson.JSONDecodeError, AttributeError):
        return "text other"
    return "hello (JWT)" if kind == "hello" else kind


def breakdown(pipes: list[Any]) -> dict[str, dict[str, int]]:
    """Bytes on the wire by what carried them, each way: the HTTP heads of the upgrade, then each
    websocket frame (its header included) by kind: JSON `type`, compact frame, ping, pong, close."""
    out: dict[str, dict[str, int]] = {"up": {}, "down": {}}
    for pipe in pipes:
        for way, data, masked in (("up", pipe.log_up, True), ("down", pipe.log_down, False)):
            head, sep, rest = bytes(data or b"").partition(b"\r\n\r\n")
            tally = out[way]
            tally["http head"] = tally.get("http head", 0) + len(head) + len(sep)
            with contextlib.suppress(Exception):  # a connection cut mid-frame: count what parsed
                for opcode, payload in FrameCollector(masked=masked).feed(rest):
                    kind = _kind(opcode, payload)
                    tally[kind] = tally.get(kind, 0) + _frame_size(len(payload), masked)
    return out


async def run_form(form: Form, port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    proxy = await Proxy(port, record=args.breakdown).start()
    meter = CpuMeter({"tracker": lambda: [pid]})
    meter.start()
    try:
        report = await simulate(
            SimOptions(
                url=f"ws://127.0.0.1:{proxy.port}",
                drivers=args.drivers,
                dashboards=0,
                duration=args.duration,
                interval=1.0,
                batch_mode=form.batch,
                batch_window=60.0,
                encoding=form.encoding,
                acks=form.acks,
                transport=form.transport,
                resume=form.resume,
                secret=SECRET,
                seed=14,
                progress=False,
                settle=0.0,
                drain_timeout=60.0,
            )
        )
    finally:
        cpu = meter.stop()
        await proxy.close()
    first = b"GET /v1/driver " if form.transport == "ws" else b"POST /v1/driver/events "
    pipes = [p for p in proxy.done if p.said.startswith(first)]
    positions = max(1, round(report.bytes_out / report.up_per_position)) if report.up_per_position else 1
    up, down = sum(p.up for p in pipes), sum(p.down for p in pipes)
    return {
        "form": form.name,
        "encoding": form.encoding,
        "acks": form.acks,
        "transport": form.transport,
        "resume": form.resume,
        "mode": "batch (uploads every 60 s)" if form.batch else "live (each fix when taken)",
        "positions": positions,
        "events": report.generated,
        "lost": report.lost,
        "proxy_up_per_position": round(up / positions, 2),
        "proxy_down_per_position": round(down / positions, 2),
        "proxy_total_per_position": round((up + down) / positions, 2),
        "sim_up_per_position": report.up_per_position,
        "sim_down_per_position": report.down_per_position,
        "connections": len(pipes),
        "server_cpu_us_per_position": round(cpu["tracker"] / positions * 1e6, 1),
        "ack_p50_ms": report.ack_latency_ms.p50,
        **(
            {
                "breakdown_per_position": {
                    w: {k: round(v / positions, 2) for k, v in sorted(t.items())} for w, t in breakdown(pipes).items()
                }
            }
            if args.breakdown and form.transport == "ws"  # HTTP bodies are not websocket frames
            else {}
        ),
    }


# -- permessage-deflate for v1 JSON phones ------------------------------------------------------


async def deflate_phones(port: int, pid: int, args: argparse.Namespace, compression: str | None) -> dict[str, Any]:
    """v1 JSON phones over `websockets` (with or without permessage-deflate), through the proxy."""
    from websockets.asyncio.client import connect

    proxy = await Proxy(port).start()
    org = f"bench-deflate-{int(time.time())}"
    stop_at = time.monotonic() + args.duration
    positions = [0]

    async def phone(i: int) -> None:
        tok = mint_token(SECRET, sub=f"d-{i}", role="driver", org=org, name=f"Driver {i}", ttl_s=3600)
        async with connect(f"ws://127.0.0.1:{proxy.port}/v1/driver", compression=compression) as ws:
            await ws.send(
                orjson.dumps({"type": "hello", "token": tok, "device": f"sim-{i:06d}", "app": "sim/1"}).decode()
            )
            await ws.recv()
            model = DriverModel(i, org=org, seed=14, dwell_scale=min(1.0, max(0.05, args.duration / 600.0)))
            seq = 0
            reader = asyncio.create_task(_drain(ws))
            while time.monotonic() < stop_at:  # what the simulator's JSON phones send, one step a second
                for body in model.step(1.0):
                    seq += 1
                    body["seq"], body["ts"] = seq, int(time.time() * 1000)
                    await ws.send(orjson.dumps(body).decode())
                    positions[0] += body["type"] == "pos"
                await asyncio.sleep(1.0)
            await asyncio.sleep(1.0)  # the last acks
            reader.cancel()

    meter = CpuMeter({"tracker": lambda: [pid]})
    meter.start()
    await asyncio.gather(*(phone(i) for i in range(args.drivers)))
    cpu = meter.stop()
    await proxy.close()
    pipes = [p for p in proxy.done if p.said.startswith(b"GET /v1/driver ")]
    up, down, n = sum(p.up for p in pipes), sum(p.down for p in pipes), max(1, positions[0])
    rss = await _rss_per_connection(port, pid, compression, org)
    return {
        "form": "live-json-deflate" if compression else "live-json-websockets",
        "positions": n,
        "proxy_up_per_position": round(up / n, 2),
        "proxy_down_per_position": round(down / n, 2),
        "proxy_total_per_position": round((up + down) / n, 2),
        "server_cpu_us_per_position": round(cpu["tracker"] / n * 1e6, 1),
        "server_rss_per_connection_kib": rss,
    }


async def _drain(ws: Any) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass


async def _rss_per_connection(port: int, pid: int, compression: str | None, org: str, n: int = 200) -> float:
    """The server's RSS growth per open driver connection that has sent 5 positions and read their acks."""
    from websockets.asyncio.client import connect

    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    conns = []
    for i in range(n):
        tok = mint_token(SECRET, sub=f"m-{i}", role="driver", org=org + "-m", ttl_s=3600)
        ws = await connect(f"ws://127.0.0.1:{port}/v1/driver", compression=compression)
        await ws.send(orjson.dumps({"type": "hello", "token": tok}).decode())
        await ws.recv()
        for seq in range(1, 6):
            await ws.send(
                orjson.dumps(
                    {"type": "pos", "seq": seq, "ts": int(time.time() * 1000), "lat": 1.0 + seq * 1e-4, "lon": 2.0}
                ).decode()
            )
        conns.append(ws)
    for ws in conns:
        async with asyncio.timeout(30):
            for _ in range(5):
                frame = orjson.loads(await ws.recv())
                if frame.get("ranges") and frame["ranges"][-1][1] == 5:
                    break
    await asyncio.sleep(1.0)
    after = proc.memory_info().rss
    for ws in conns:
        await ws.close()
    return round((after - before) / n / 1024, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drivers", type=int, default=20)
    p.add_argument("--duration", type=float, default=130.0)
    p.add_argument("--forms", default=",".join([*FORMS, "deflate"]))
    p.add_argument("--breakdown", action="store_true", help="record the websocket forms' bytes by frame kind")
    args = p.parse_args()
    exit_on_sigterm()
    commit = tracker_source(TRACKER_REF)[1]
    rows: list[dict[str, Any]] = []
    with private_redis() as (redis_url, _):
        for name in args.forms.split(","):
            if name == "idle":  # what the server costs with no phone at all, to subtract
                with tracker(redis_url) as (port, pid):
                    meter = CpuMeter({"tracker": lambda: [pid]})
                    meter.start()
                    time.sleep(args.duration)
                    cpu = meter.stop()
                    rows.append({"form": "idle", "server_cpu_s_per_s": round(cpu["tracker"] / meter.wall_s, 4)})
                    log(json.dumps(rows[-1]))
                continue
            if name == "deflate":
                for compression, env in (("deflate", {"TRACKER_WS_DEFLATE": "true"}), (None, {})):
                    with tracker(redis_url, env) as (port, pid):
                        log(f"deflate={compression}: {args.drivers} phones, {args.duration} s")
                        rows.append(asyncio.run(deflate_phones(port, pid, args, compression)))
                        log(json.dumps(rows[-1]))
                continue
            form = FORMS[name]
            with tracker(redis_url) as (port, pid):
                log(f"{name}: {args.drivers} drivers, {args.duration} s")
                rows.append(asyncio.run(run_form(form, port, pid, args)))
                log(json.dumps(rows[-1]))
    payload = {"commit": commit.strip(), "machine": machine(), "args": vars(args), "rows": rows}
    path = save("mobile", payload)
    print("| form | positions | up B/pos | down B/pos | total B/pos | server CPU us/pos |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["form"] == "idle":
            print(f"| idle (no phone) | | | | | {r['server_cpu_s_per_s'] * 1e6:.0f} us per second |")
            continue
        print(
            f"| {r['form']} | {r['positions']} | {r['proxy_up_per_position']} | {r['proxy_down_per_position']} | "
            f"{r['proxy_total_per_position']} | {r['server_cpu_us_per_position']} |"
        )
    print(f"\n(saved to {path})")


if __name__ == "__main__":
    main()
