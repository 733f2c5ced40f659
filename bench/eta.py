"""ETA error on the simulator's routes: mean absolute error against the actual arrival, by distance.

The simulator's drivers (tracker/sim/driver.py: acceleration, lights, 1-4 minute deliveries, the
roads of tracker/sim/data/routes.json) drive their day in simulated time; their phones report a
position every `--interval` seconds. Every `--sample` seconds, each package on board is given an
ETA by tracker's estimator (tracker/eta/model.py) from the positions so far, exactly as the
service computes it; when the driver scans the package delivered (or failed: it arrived), every
ETA given for it is compared with that time. Errors are grouped by the straight-line distance to
the destination when the ETA was given.

Beside the default estimate, in the same run: the naive peer (straight line at a fixed 30 km/h,
no road factor, no stops) and variants with one knob changed, so each knob's worth shows.

    .venv/bin/python bench/eta.py [--drivers-per-route 3] [--hours 6] [--interval 5] [--sample 60]

Pure computation: no server, no database. Prints a Markdown table; raw results in bench/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # harness/ and bench/ as in the other scripts

from bench.common import log, machine, save
from tracker.eta.model import Fix, Params, Query, Stop, moving_speed, straight_line
from tracker.sim.driver import DriverModel
from tracker.sim.routes import ROUTES

BANDS = ((0, 1_000), (1_000, 3_000), (3_000, 5_000), (5_000, 10_000), (10_000, 10**9))
FIXES_KEPT = 200  # the service reads at most this many recent positions of a driver


@dataclass(frozen=True)
class Variant:
    name: str
    params: Params
    fixed_mps: float | None = None  # the naive peer: a constant speed


def variants() -> list[Variant]:
    d = Params()
    return [
        Variant("tracker default", d),
        Variant("naive peer: 30 km/h, no road factor, no stops", replace(d, road_factor=1.0, stop_s=0.0), 30 / 3.6),
        Variant("road factor 1.0", replace(d, road_factor=1.0)),
        Variant("no stop time", replace(d, stop_s=0.0)),
        Variant("half-life 60 s", replace(d, half_life_s=60.0)),
    ]


def band_of(dist: float) -> int:
    return next(i for i, (lo, hi) in enumerate(BANDS) if lo <= dist < hi)


def run(args: argparse.Namespace) -> dict[str, object]:
    vs = variants()
    # predictions[variant][package] = [(band, predicted ts, given at)]
    predictions: list[dict[str, list[tuple[int, int, int]]]] = [defaultdict(list) for _ in vs]
    arrivals: dict[str, int] = {}
    drivers = [
        DriverModel(i, org="bench", seed=args.seed, record_plans=True)
        for i in range(len(ROUTES) * args.drivers_per_route)
    ]
    dest: dict[str, tuple[float, float]] = {}
    onboard: list[set[str]] = [set() for _ in drivers]
    fixes: list[list[Fix]] = [[] for _ in drivers]
    seconds = int(args.hours * 3600)
    cpu, estimates = 0.0, 0  # CPU seconds spent estimating (time.process_time: this process, from the kernel)
    for t in range(1, seconds + 1):
        now = t * 1000
        for i, model in enumerate(drivers):
            events = model.step(1.0)
            assert model.planned is not None
            for pkg, _cold, lat, lon in model.planned:
                dest[pkg] = (lat, lon)
            model.planned.clear()
            for ev in events:
                if ev["type"] == "scan":
                    if ev["event"] == "pickup":
                        onboard[i].add(ev["package"])
                    elif ev["event"] in ("deliver", "fail") and ev["package"] in onboard[i]:
                        onboard[i].discard(ev["package"])
                        arrivals[ev["package"]] = now
                elif t % args.interval == 0:
                    fixes[i].append(Fix(now, ev["lat"], ev["lon"], ev["spd"]))
                    del fixes[i][:-FIXES_KEPT]
            if t % args.sample or not onboard[i] or not fixes[i]:
                continue
            last = fixes[i][-1]
            stops = tuple(Stop(p, *dest[p]) for p in sorted(onboard[i]))
            for v, preds in zip(vs, predictions, strict=True):
                started = time.process_time()
                speed = v.fixed_mps if v.fixed_mps is not None else moving_speed(fixes[i], v.params)
                query = Query("bench", now, last.ts, (last.lat, last.lon), speed, stops, v.params)
                ests = straight_line(query)
                if v is vs[0]:
                    cpu += time.process_time() - started
                    estimates += 1
                for est in ests:
                    preds[est.package].append((band_of(est.distance_m), est.ts, now))
        if t % 3600 == 0:
            log(f"simulated {t // 3600} h of {args.hours:g}; {len(arrivals)} arrivals")
    out: dict[str, object] = {}
    for v, preds in zip(vs, predictions, strict=True):
        errors: list[list[float]] = [[] for _ in BANDS]
        signed: list[list[float]] = [[] for _ in BANDS]
        remaining: list[list[float]] = [[] for _ in BANDS]
        for pkg, plist in preds.items():
            arrived = arrivals.get(pkg)
            if arrived is None:
                continue  # still on board when the run ended
            for band, predicted, given in plist:
                errors[band].append(abs(predicted - arrived) / 60_000)
                signed[band].append((predicted - arrived) / 60_000)
                remaining[band].append((arrived - given) / 60_000)
        out[v.name] = [
            {
                "band": f"{lo / 1000:g}-{hi / 1000:g} km" if hi < 10**9 else f">= {lo / 1000:g} km",
                "n": len(e),
                "mae_min": round(statistics.fmean(e), 2) if e else None,
                "median_abs_min": round(statistics.median(e), 2) if e else None,
                "bias_min": round(statistics.fmean(s), 2) if s else None,
                "mean_remaining_min": round(statistics.fmean(r), 2) if r else None,
            }
            for (lo, hi), e, s, r in zip(BANDS, errors, signed, remaining, strict=True)
        ]
    per_driver_us = round(cpu / max(estimates, 1) * 1e6, 1)
    return {
        "arrivals": len(arrivals),
        "drivers": len(drivers),
        "variants": out,
        "cpu_us_per_driver_estimate": per_driver_us,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drivers-per-route", type=int, default=3)
    p.add_argument("--hours", type=float, default=6.0)
    p.add_argument("--interval", type=int, default=5, help="seconds between a phone's positions")
    p.add_argument("--sample", type=int, default=60, help="seconds between ETAs of a package")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    started = time.time()
    result = run(args)
    result["args"] = vars(args)
    result["machine"] = machine()
    result["seconds"] = round(time.time() - started, 1)
    path = save("eta", result)
    drivers, arrivals = result["drivers"], result["arrivals"]
    print(f"{drivers} drivers on {len(ROUTES)} routes, {args.hours:g} h simulated, {arrivals} arrivals")
    print(f"CPU per estimate of one driver's load (speed from up to {FIXES_KEPT} fixes + every package on board):")
    print(f"{result['cpu_us_per_driver_estimate']} us (time.process_time)")
    print()
    print("| estimate | band | ETAs | MAE (min) | median abs (min) | bias (min) | mean time to arrival (min) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in result["variants"].items():  # type: ignore[attr-defined]
        for r in rows:
            print(
                f"| {name} | {r['band']} | {r['n']} | {r['mae_min']} | {r['median_abs_min']} | {r['bias_min']} | "
                f"{r['mean_remaining_min']} |"
            )
    log(f"raw results: {path}")


if __name__ == "__main__":
    main()
