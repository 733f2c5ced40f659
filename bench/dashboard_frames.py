"""Dashboard frame time: N drivers on screen, each moving once a second, in headless Chromium.

For each git ref (default: HEAD and the last commit before the Leaflet map), its tracker/static is
served from a clean `git archive` copy by a small HTTP server on 127.0.0.1 (no tracker service:
the page is booted with `boot({ connect: false })` and fed frames, harness/browser.py
FRAME_HARNESS). Per ref and zoom: the time between animation frames (p50/p95/max), the page's own
render time (trackerDebug.perf), and the CPU of Chromium's renderer process from /proc per frame.
The refs run one after the other in the same session, so they share the machine's load.

    .venv/bin/python bench/dashboard_frames.py [--refs HEAD,a5655b8] [--drivers 5000] [--zooms 14,11] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import statistics
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # harness/ (see bench/README.md)
from common import CLK_TCK, load_average, log, machine, save, ticks, tracker_source

from harness.browser import CHROMIUM, CHROMIUM_ARGS, FRAME_HARNESS

BEFORE_LEAFLET = "a5655b8"  # the hand-drawn canvas map, before issue 16
NICE = 0  # --nice: run Chromium at this priority (root only for < 0), to measure the page, not the neighbours


class _Static(http.server.SimpleHTTPRequestHandler):
    """/ -> static/index.html, /static/* -> the files; JavaScript as text/javascript."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript"}

    def translate_path(self, path: str) -> str:
        path = path.split("?")[0]
        return super().translate_path("/static/index.html" if path == "/" else path)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    handler = functools.partial(_Static, directory=str(root / "tracker"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium_tree() -> list[int]:
    """Every Chromium process started by this script (browser, renderer, GPU, utility)."""
    return [c.pid for c in psutil.Process().children(recursive=True)]


def renderers() -> list[int]:
    """Chromium renderer processes started by this script."""
    me = psutil.Process()
    out = []
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "--type=renderer" in " ".join(child.cmdline()):
                out.append(child.pid)
    return out


async def measure(url: str, drivers: int, zoom: float, seconds: float) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
            await ctx.add_init_script("window.trackerNoAutoBoot = true")
            page = await ctx.new_page()
            await page.goto(url + "/")
            await page.evaluate("() => import('/static/js/main.js').then((m) => m.boot({ connect: false }))")
            if NICE:
                for pid in chromium_tree():
                    with contextlib.suppress(psutil.Error):
                        psutil.Process(pid).nice(NICE)
            pids = renderers()
            before = sum(ticks(p) for p in pids)
            result: dict[str, Any] = await page.evaluate(
                FRAME_HARNESS, {"drivers": drivers, "zoom": zoom, "seconds": seconds}
            )
            cpu_s = (sum(ticks(p) for p in pids) - before) / CLK_TCK  # includes the 1 s warm-up
            result["renderer_cpu_s"] = cpu_s
            result["renderer_cpu_pct"] = 100 * cpu_s / (seconds + 1)
            result["cpu_ms_per_frame"] = 1000 * cpu_s / max(1, result["perf"]["renders"])
            return result
        finally:
            await browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", default=f"HEAD,{BEFORE_LEAFLET}", help="comma-separated git refs ('.': work tree)")
    ap.add_argument("--drivers", type=int, default=5000)
    ap.add_argument("--zooms", default="14,11", help="street zoom (every driver a marker), city zoom (clusters)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0, help="Chromium's nice value (e.g. -10 on a shared, loaded machine)")
    args = ap.parse_args()
    global NICE
    NICE = args.nice
    info = machine()
    log("machine", info)
    rows = []
    for ref in args.refs.split(","):
        root, sha = tracker_source(ref)
        with serve(root) as url:
            for zoom in (float(z) for z in args.zooms.split(",")):
                runs = []
                for run in range(args.runs):
                    log(f"{ref} ({sha}) zoom {zoom} run {run + 1}: load {load_average()}")
                    runs.append(asyncio.run(measure(url, args.drivers, zoom, args.seconds)))
                    log("  ", {k: v for k, v in runs[-1].items() if k != "perf"})
                rows.append({"ref": ref, "sha": sha, "zoom": zoom, "runs": runs, "load": load_average()})
    print(
        f"\n{args.drivers} drivers on screen, each moving once a second; {args.seconds:g} s per run, "
        f"{args.runs} runs (median of runs); Chromium at nice {args.nice}; {info['nproc']} CPUs, {info['cpu']}, "
        f"load {load_average()}\n"
    )
    print(
        "| ref | zoom | frames/s | frame interval p50 / p95 / max (ms) | render avg / p95 (ms) | clusters "
        "| renderer CPU ms per render |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        med = lambda key, rs=row["runs"]: statistics.median(r[key] for r in rs)  # noqa: E731
        perf = lambda key, rs=row["runs"]: statistics.median(r["perf"].get(key) or 0 for r in rs)  # noqa: E731
        print(
            f"| {row['ref']} (`{row['sha']}`) | {row['zoom']:g} | {med('frames') / args.seconds:.0f} "
            f"| {med('p50'):.1f} / {med('p95'):.1f} / {med('max'):.1f} "
            f"| {perf('avgRenderMs'):.1f} / {perf('p95RenderMs'):.1f} | {med('clusters'):.0f} "
            f"| {med('cpu_ms_per_frame'):.1f} |"
        )
    path = save("dashboard_frames", {"machine": info, "args": vars(args), "rows": rows})
    log("saved", path)


if __name__ == "__main__":
    main()
