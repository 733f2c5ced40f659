"""CPU per event of decoding (the server's side) and encoding (the phone's side) each batch
encoding, on the simulator's drivers: JSON `batch`, compact-1 (positions; scans as JSON), compact-2
(positions and scans). Decoding includes `check_event` of every item, as the server does; bytes per
event are the frames' payloads (no websocket header). In-process, CPU time (process_time), the
median of --repeat rounds.

    .venv/bin/python bench/codec_cpu.py [--drivers 20] [--seconds 130] [--batch 60] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from tracker.protocol import compact, compact2
from tracker.protocol.events import check_event
from tracker.sim.driver import DriverModel

T0 = 1_764_240_000_000


def batches(drivers: int, seconds: int, size: int) -> list[list[dict[str, Any]]]:
    """Each driver's events, a fix a second with ms jitter, cut into batches of `size`."""
    out = []
    for d in range(drivers):
        model = DriverModel(d, org="sim-bench0001", seed=14, dwell_scale=seconds / 600)
        events, seq = [], 0
        for step in range(seconds):
            for body in model.step(1.0):
                seq += 1
                body["seq"], body["ts"] = seq, T0 + 1000 * step + (step * 7919) % 23
                events.append(body)
        out.extend(events[i : i + size] for i in range(0, len(events), size))
    return out


def _json(batch: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps({"type": "batch", "items": batch})]


def _compact1(batch: list[dict[str, Any]]) -> list[bytes]:
    scans = [e for e in batch if e["type"] == "scan"]
    frames = [compact.encode([e for e in batch if e["type"] == "pos"])]
    return frames + ([orjson.dumps({"type": "batch", "items": scans})] if scans else [])


def _compact2(batch: list[dict[str, Any]]) -> list[bytes]:
    return [compact2.encode(batch)]


def _decode(frame: bytes) -> list[dict[str, Any]]:
    if frame[:1] == b"\xc1":
        return compact.decode(frame, 10_000)
    if frame[:1] == b"\xc3":
        return compact2.decode(frame, 10_000)
    return orjson.loads(frame)["items"]  # type: ignore[no-any-return]


def measure(
    encode: Callable[[list[dict[str, Any]]], list[bytes]], data: list[list[dict[str, Any]]], repeat: int
) -> dict[str, float]:
    events = sum(len(b) for b in data)
    enc, dec = [], []
    frames: list[bytes] = []
    for _ in range(repeat):
        t = time.process_time()
        frames = [f for b in data for f in encode(b)]
        enc.append(time.process_time() - t)
        t = time.process_time()
        for f in frames:
            for item in _decode(f):
                check_event(item, T0 + 86_400_000)
        dec.append(time.process_time() - t)
    return {
        "bytes_per_event": round(sum(len(f) for f in frames) / events, 2),
        "decode_us_per_event": round(statistics.median(dec) / events * 1e6, 2),
        "encode_us_per_event": round(statistics.median(enc) / events * 1e6, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drivers", type=int, default=20)
    p.add_argument("--seconds", type=int, default=130)
    p.add_argument("--batch", type=int, default=60)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    data = batches(args.drivers, args.seconds, args.batch)
    print(f"{sum(len(b) for b in data)} events in {len(data)} batches; {machine()}")
    print("| encoding | bytes/event | server decode + check, us/event | phone encode, us/event |")
    print("|---|---|---|---|")
    for name, enc in (("JSON batch", _json), ("compact-1 (+ scans as JSON)", _compact1), ("compact-2", _compact2)):
        r = measure(enc, data, args.repeat)
        print(f"| {name} | {r['bytes_per_event']} | {r['decode_us_per_event']} | {r['encode_us_per_event']} |")


if __name__ == "__main__":
    main()
