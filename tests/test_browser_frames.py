"""Frame time of the dashboard's map in headless Chromium with 5,000 moving drivers (issue 16).

The page is booted without a service connection (`boot({ connect: false })`, as README.md's test
hook describes) and fed what the live feed sends: every driver moves once a second, a 250-position
`batch` every 50 ms. The frame time is the time between two animation frames while the map keeps
up (harness/browser.py FRAME_HARNESS): its p95 must stay at or under 20 ms, at street zoom (every
driver its own marker) and at city zoom (drivers clustered). bench/dashboard_frames.py measures the
same against the hand-drawn map that came before (BENCHMARKS.md).

Marked `slow` (run it with `./dev test tests/test_browser_frames.py -m slow`): it measures wall-clock
frame times, and the house rule puts performance targets in benchmark scripts, not in the timed
suite. Measured on 2026-11-30 at a load average of 2.5-3.5 on 2 CPUs: p95 16.8 ms at both zooms
(60 frames/s, the display's rate), renders 3.2 ms avg / 5.6 ms p95 at street zoom (BENCHMARKS.md,
bench/dashboard_frames.py). At a load average of 18-34 it measured the neighbours, not the page.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from harness.browser import FRAME_HARNESS, PageWatch, launch, require_browser
from harness.instances import Instance

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.mark.parametrize("zoom", [14.0, 11.0], ids=["each-driver", "clustered"])
async def test_frame_time_p95_with_5000_moving_drivers(instance: Instance, zoom: float) -> None:
    async_playwright = require_browser()
    t0 = time.monotonic()
    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
            await ctx.add_init_script("window.trackerNoAutoBoot = true")
            page = PageWatch(await ctx.new_page(), "frame time", t0)
            await page.page.goto(f"{instance.http}/")
            await page.page.evaluate("() => import('/static/js/main.js').then((m) => m.boot({ connect: false }))")
            result: dict[str, Any] = await page.page.evaluate(
                FRAME_HARNESS, {"drivers": 5000, "zoom": zoom, "seconds": 5}
            )
            print(f"zoom {zoom}: {result}")  # shown with -s or on failure
            assert result["visible"] == 5000  # all on screen, all moving
            assert (result["clusters"] > 0) == (zoom < 13)
            assert result["perf"]["renders"] >= 90, result  # it redrew (at least every batch: 20/s)
            assert result["p95"] <= 20, f"p95 frame time {result['p95']:.1f} ms > 20 ms: {result}"
            page.assert_clean()
        finally:
            await browser.close()
