"""Quick ingest check: N drivers stream single `pos` frames at a fixed total rate to one running
tracker with K dashboards; reports server CPU per position (from /proc), acks and deliveries.

    python bench/quick_ingest.py --pid <tracker pid> --url ws://127.0.0.1:8099 --secret S \
        --drivers 1000 --rate 5000 --seconds 10 --dashboards 1 --procs 2

Connections are made before the measured window; only steady streaming is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
import uuid

import orjson
from websockets.asyncio.client import connect

from tracker.auth import mint_token


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(args: argparse.Namespace, idx: int, org: str, ready: mp.Queue, go: mp.Event, out: mp.Queue) -> None:
    n = args.drivers // args.procs
    sem = asyncio.Semaphore(100)

    async def one(i: int) -> object:
        async with sem:
            ws = await connect(args.url + "/v1/driver", compression=None, max_queue=None, open_timeout=60)
            tok = mint_token(args.secret, role="driver", sub=f"d{idx}-{i}", org=org)
            await ws.send(orjson.dumps({"type": "hello", "token": tok}).decode())
            await ws.recv()
            return ws

    phones: list = await asyncio.gather(*(one(i) for i in range(n)))
    acked = 0

    async def reader(ws: object) -> None:
        nonlocal acked
        async for msg in ws:  # type: ignore[attr-defined]
            frame = orjson.loads(msg)
            if frame["type"] == "ack":
                acked += sum(b - a + 1 for a, b in frame["ranges"])

    readers = [asyncio.create_task(reader(ws)) for ws in phones]
    ready.put(idx)
    await asyncio.to_thread(go.wait)
    per_proc_rate = args.rate / args.procs
    tick = 0.01
    per_tick = per_proc_rate * tick
    sent = 0
    seq = [0] * n
    t0 = time.monotonic()
    carry = 0.0
    j = 0
    while time.monotonic() - t0 < args.seconds:
        carry += per_tick
        k = int(carry)
        carry -= k
        now = int(time.time() * 1000)
        for _ in range(k):
            j = (j + 1) % n
            seq[j] += 1
            await phones[j].send(
                orjson.dumps(
                    {
                        "type": "pos",
                        "seq": seq[j],
                        "ts": now,
                        "lat": -1.29 + j * 1e-5,
                        "lon": 36.82,
                        "spd": 8.5,
                        "bat": 0.8,
                        "acc": 5.0,
                    }
                ).decode()
            )
            sent += 1
        await asyncio.sleep(max(0.0, t0 + (sent / per_proc_rate) - time.monotonic()))
    out.put(("sent", sent))
    deadline = time.monotonic() + 15
    while acked < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    out.put((sent, acked))
    for r in readers:
        r.cancel()
    for ws in phones:
        await ws.close()


def proc_main(args: argparse.Namespace, idx: int, org: str, ready: mp.Queue, go: mp.Event, out: mp.Queue) -> None:
    asyncio.run(drive(args, idx, org, ready, go, out))


async def dashboards(args: argparse.Namespace, org: str, stop: asyncio.Event, counts: list[int]) -> None:
    async def one(i: int) -> None:
        async with connect(args.url + "/v1/live", compression=None, max_size=None, max_queue=None) as ws:
            tok = mint_token(args.secret, role="dispatcher", sub=f"u{i}", org=org)
            await ws.send(orjson.dumps({"type": "hello", "token": tok}).decode())
            await ws.recv()
            await ws.send('{"type":"subscribe"}')
            while not stop.is_set():
                try:
                    msg = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                frame = orjson.loads(msg)
                items = frame["items"] if frame["type"] == "batch" else [frame]
                counts[i] += sum(1 for f in items if f["type"] == "pos")

    await asyncio.gather(*(one(i) for i in range(args.dashboards)))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--url", default="ws://127.0.0.1:8099")
    p.add_argument("--secret", default=os.environ.get("TRACKER_JWT_SECRET", ""))
    p.add_argument("--drivers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=5000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--dashboards", type=int, default=1)
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args()
    org = "bench-" + uuid.uuid4().hex[:8]
    stop = asyncio.Event()
    counts = [0] * args.dashboards
    dash = asyncio.create_task(dashboards(args, org, stop, counts))
    out: mp.Queue = mp.Queue()
    ready: mp.Queue = mp.Queue()
    go = mp.Event()
    procs = [mp.Process(target=proc_main, args=(args, i, org, ready, go, out)) for i in range(args.procs)]
    for pr in procs:
        pr.start()
    t_conn = time.monotonic()
    for _ in procs:
        await asyncio.to_thread(ready.get)
    print(f"{args.drivers} drivers connected in {time.monotonic() - t_conn:.1f}s")
    await asyncio.sleep(2)
    c0, w0 = cpu_s(args.pid), time.monotonic()
    go.set()
    for _ in procs:
        await asyncio.to_thread(out.get)
    c1, w1 = cpu_s(args.pid), time.monotonic()
    results = [await asyncio.to_thread(out.get) for _ in procs]
    stop.set()
    await dash
    for pr in procs:
        pr.join()
    sent = sum(r[0] for r in results)
    acked = sum(r[1] for r in results)
    print(f"sent {sent} acked {acked} in {args.seconds:.0f}s ({sent / args.seconds:.0f}/s); dashboards got {counts}")
    print(f"server cpu {c1 - c0:.2f}s over {w1 - w0:.1f}s wall = {(c1 - c0) / sent * 1e6:.1f} us per position")


if __name__ == "__main__":
    asyncio.run(main())
