"""End to end in headless Chromium: the dashboard page against a running service and moving drivers.

Real phones (harness/clients.py, real websockets) drive along a Nairobi road from the simulator's
routes; packages are consigned over HTTP as a dispatcher; the page is Debian's `chromium` driven by
Playwright (`executable_path`, nothing downloaded). The dispatcher's page signs in from the URL
fragment, goes live, shows markers moving, a pickup scan (package row, marker count, temperature
alert), a driver going offline; a client administrator's page then shows only its client's
packages and only the driver holding one of them, and loses that driver when it delivers.

Screenshots of every step go to test-artifacts/browser/ (gitignored; CI keeps them as artifacts).
Every wait has a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from harness.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, WAIT_MS, PageWatch, require_browser
from harness.clients import Phone, pos, scan
from harness.http import DEST, consign
from harness.instances import Instance
from harness.tokens import token
from tracker.sim.routes import CITIES

pytestmark = pytest.mark.browser

NAIROBI_ROAD = CITIES[0].roads["Uhuru Highway - Mombasa Road"]


class Driver:
    """A phone that drives along a polyline, one fix per step (~60 m), and numbers its own events."""

    def __init__(self, phone: Phone, route: tuple[tuple[float, float], ...], start: int = 0) -> None:
        self.phone = phone
        self.route = route
        self.step_no = start
        self.seq = 0
        self.lat, self.lon = route[0]
        self.answered = asyncio.Event()  # set by the reader after each ack or error

    async def all_acked(self) -> None:
        while not set(range(1, self.seq + 1)) <= self.phone.acked:
            self.answered.clear()
            await self.answered.wait()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def step(self) -> None:
        # 8 fixes per road segment, back and forth along the road.
        n = len(self.route) - 1
        i, frac = divmod(self.step_no, 8)
        i %= 2 * n
        a, b = (self.route[i], self.route[i + 1]) if i < n else (self.route[2 * n - i], self.route[2 * n - i - 1])
        self.lat = round(a[0] + (b[0] - a[0]) * frac / 8, 6)
        self.lon = round(a[1] + (b[1] - a[1]) * frac / 8, 6)
        self.step_no += 1
        await self.phone.send(pos(self.next_seq(), lat=self.lat, lon=self.lon, spd=12.5, hdg=160, bat=0.8))

    async def scan(self, package: str, event: str, **extra: Any) -> None:
        frame = scan(self.next_seq(), package, event, lat=self.lat, lon=self.lon, **extra)
        await self.phone.send(frame)


@contextlib.asynccontextmanager
async def driving(drivers: dict[str, Driver], interval: float = 0.3) -> AsyncIterator[set[str]]:
    """Move every driver named in the yielded set every `interval` s until the block ends, and read
    every phone's acks (unread, they would fill the client's queue and stall its closing handshake)."""
    moving = set(drivers)

    async def loop() -> None:
        while True:
            for name in sorted(moving):
                await drivers[name].step()
            await asyncio.sleep(interval)

    async def read(d: Driver) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await d.phone.pump(timeout=3600)
                d.answered.set()

    tasks = [asyncio.create_task(loop())] + [asyncio.create_task(read(d)) for d in drivers.values()]
    try:
        yield moving
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def marker(st: dict[str, Any], driver: str) -> dict[str, Any] | None:
    return next((m for m in st["markers"] if m["driver"] == driver), None)


async def test_dashboard_end_to_end(start_instance: Any, org: str) -> None:
    async_playwright = require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    t0 = time.monotonic()
    inst: Instance = await start_instance()
    dispatcher = token("dispatcher", "u-disp", org, name="Dana Dispatcher")
    clinic_a = token("client", "u-clinic-a", org, client="clinic-a", name="Clinic A admin")

    # Two clients' packages; two drivers on the road.
    for pkg, client in (("PKG-A1", "clinic-a"), ("PKG-A2", "clinic-a"), ("PKG-B1", "clinic-b")):
        await consign(inst, org, pkg, client)
    drivers = {
        "d-1": Driver(await Phone.connect(inst.url, token("driver", "d-1", org, name="Amina")), NAIROBI_ROAD),
        "d-2": Driver(await Phone.connect(inst.url, token("driver", "d-2", org, name="Baraka")), NAIROBI_ROAD, 40),
    }
    for d in drivers.values():
        await d.step()

    async with async_playwright() as pw, driving(drivers) as moving:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
            page = PageWatch(await ctx.new_page(), "dispatcher page", t0)

            # 1. Sign in from the fragment; live, with both markers.
            await page.goto(f"{inst.http}/#token={dispatcher}")
            await page.until("(s) => s.connection === 'live' && s.markers.length === 2", what="live with two markers")
            assert "token" not in page.page.url, "the token must be wiped from the address bar"
            st = await page.state()
            assert (st["role"], st["org"]) == ("dispatcher", org)
            assert {m["driver"] for m in st["markers"]} == {"d-1", "d-2"}
            assert {p["package"] for p in st["packages"]} == {"PKG-A1", "PKG-A2", "PKG-B1"}
            status = page.page.get_by_test_id("connection-status")
            assert await status.get_attribute("data-state") == "live"
            assert "Dana Dispatcher" in (await page.page.get_by_test_id("who").inner_text())
            await page.shot("01-dispatcher-live-africa")

            # 2. Zoom to Nairobi (a new, smaller subscription); the markers move as positions arrive.
            await page.page.evaluate("() => window.trackerDebug.setView(36.83, -1.30, 13)")
            await page.until(
                "(s) => s.view.zoom === 13 && s.subscribedBbox && s.subscribedBbox[2] - s.subscribedBbox[0] < 1"
                " && s.connection === 'live' && s.markers.filter((m) => m.visible).length === 2",
                what="subscribed to the Nairobi view, both markers on screen",
            )
            before = marker(await page.state(), "d-1")
            assert before is not None
            moved = await page.until(
                "(s, b) => { const m = s.markers.find((m) => m.driver === 'd-1');"
                " return m && Math.hypot(m.x - b.x, m.y - b.y) > 5 && m; }",
                before,
                what="d-1's marker moves",
            )
            # The marker sits where its position projects to, and is drawn there.
            proj = await page.page.evaluate("(m) => window.trackerDebug.project(m.lon, m.lat)", moved)
            assert abs(proj["x"] - moved["x"]) < 0.01 and abs(proj["y"] - moved["y"]) < 0.01
            await page.until(
                "(s) => s.markers.filter((m) => m.visible).length === 2", what="both markers still on screen"
            )
            drawn = await page.page.evaluate(
                """() => {
                  window.trackerDebug.render();
                  const c = document.querySelector('[data-testid=map-canvas]');
                  const dpr = c.width / c.getBoundingClientRect().width;
                  const m = window.trackerDebug.state().markers.find((m) => m.driver === 'd-1');
                  const px = c.getContext('2d').getImageData(Math.round(m.x * dpr), Math.round(m.y * dpr), 1, 1).data;
                  return Array.from(px);
                }"""
            )
            assert drawn[3] > 0, f"nothing drawn on the overlay canvas at d-1's marker: rgba {drawn}"
            await page.shot("02-markers-moved-nairobi")

            # 3. A pickup scan arrives: package state and holder, marker count, list row, and the
            # temperature alert (9.5 °C against the 2-8 °C cold chain).
            await drivers["d-1"].scan("PKG-A1", "pickup", temp_c=9.5, note="2 boxes")
            await drivers["d-2"].scan("PKG-B1", "pickup", temp_c=5.0)
            await page.until(
                "(s) => { const p = s.packages.find((p) => p.package === 'PKG-A1');"
                " const m = s.markers.find((m) => m.driver === 'd-1');"
                " return p && p.state === 'picked_up' && p.driver === 'd-1' && p.lastEvent === 'pickup'"
                " && m && m.packages === 1; }",
                what="PKG-A1 picked up by d-1",
            )
            await page.page.get_by_test_id("tab-packages").click()
            row = await page.row("package-row", package="PKG-A1", state="picked_up")
            assert "with Amina" in await row.inner_text()
            await page.row("package-row", package="PKG-B1", state="picked_up")
            await page.shot("03-scan-package-picked-up")
            alert = await page.until(
                "(s) => s.alerts.find((a) => a.kind === 'temperature_excursion' && a.package === 'PKG-A1')",
                what="temperature alert for PKG-A1",
            )
            await page.page.get_by_test_id("tab-alerts").click()
            item = page.page.locator(f'[data-testid=alert-item][data-alert="{alert["id"]}"]')
            await item.wait_for(timeout=WAIT_MS)
            assert "Temperature excursion" in await item.inner_text()
            await page.shot("04-scan-temperature-alert")

            # 4. d-2 goes offline: its phone's connection closes.
            await page.page.get_by_test_id("tab-drivers").click()
            await page.row("driver-row", driver="d-2", online="true")
            moving.discard("d-2")
            await drivers["d-2"].phone.close()
            await page.until(
                "(s) => { const m = s.markers.find((m) => m.driver === 'd-2'); return m && m.online === false; }",
                what="d-2 offline",
            )
            off_row = await page.row("driver-row", driver="d-2", online="false")
            assert "offline" in await off_row.inner_text()
            d1_row = page.page.locator('[data-testid=driver-row][data-driver="d-1"]')
            assert await d1_row.get_attribute("data-online") == "true"
            assert (marker(await page.state(), "d-2") or {}).get("packages") == 1  # still holds PKG-B1
            await page.shot("05-driver-offline")

            # 5. A client administrator's page: only clinic-a's packages, only the driver holding one.
            cctx = await browser.new_context(viewport={"width": 1280, "height": 800})
            cpage = PageWatch(await cctx.new_page(), "client page", t0)
            await cpage.goto(f"{inst.http}/#token={clinic_a}")
            await cpage.until(
                "(s) => s.connection === 'live' && s.packages.length >= 2 && s.markers.length >= 1",
                what="client page live with its packages",
            )
            st = await cpage.state()
            assert st["role"] == "client"
            assert sorted(p["package"] for p in st["packages"]) == ["PKG-A1", "PKG-A2"]
            assert {p.get("client") for p in st["packages"]} == {"clinic-a"}
            assert [m["driver"] for m in st["markers"]] == ["d-1"], st["markers"]
            assert st["alerts"] and {a.get("package") for a in st["alerts"]} == {"PKG-A1"}, st["alerts"]
            await cpage.page.get_by_test_id("tab-packages").click()
            await cpage.row("package-row", package="PKG-A2")
            rows = cpage.page.locator("[data-testid=package-row]")
            await cpage.until("(s) => s.packages.length === 2")
            listed = sorted([await r.get_attribute("data-package") for r in await rows.all()])
            assert listed == ["PKG-A1", "PKG-A2"], listed
            assert "2 packages" in await cpage.page.get_by_test_id("package-summary").inner_text()
            # Live frames keep moving d-1 for the client, and never show d-2 or PKG-B1.
            before = marker(await cpage.state(), "d-1")
            await cpage.until(
                "(s, b) => { const m = s.markers.find((m) => m.driver === 'd-1'); return m && m.lat !== b.lat; }",
                before,
                what="d-1 moves on the client's page",
            )
            await cpage.shot("06-client-admin-own-packages")

            # 6. d-1 delivers PKG-A1 at the destination: the client's window on d-1 closes.
            moving.discard("d-1")
            drivers["d-1"].lat, drivers["d-1"].lon = DEST["lat"], DEST["lon"]
            await drivers["d-1"].scan("PKG-A1", "deliver", recipient="Ward 3 pharmacist")
            await cpage.until(
                "(s) => s.packages.some((p) => p.package === 'PKG-A1' && p.state === 'delivered')"
                " && !s.markers.some((m) => m.driver === 'd-1')",
                what="PKG-A1 delivered and d-1 gone from the client's map",
            )
            await cpage.row("package-row", package="PKG-A1", state="delivered")
            st = await cpage.state()
            assert sorted(p["package"] for p in st["packages"]) == ["PKG-A1", "PKG-A2"]
            await cpage.shot("07-client-admin-delivered")
            await page.until(
                "(s) => s.packages.some((p) => p.package === 'PKG-A1' && p.state === 'delivered')"
                " && s.markers.some((m) => m.driver === 'd-1' && m.packages === 0)",
                what="the dispatcher sees the delivery and keeps d-1",
            )
            await page.page.get_by_test_id("tab-packages").click()
            await page.row("package-row", package="PKG-A1", state="delivered")
            await page.shot("08-dispatcher-delivered")

            page.assert_clean()
            cpage.assert_clean()
            # The phones' events were all stored and none refused.
            d1 = drivers["d-1"]
            await asyncio.wait_for(d1.all_acked(), 10)
            assert not d1.phone.errors and not drivers["d-2"].phone.errors
            await cctx.close()
            await ctx.close()
        finally:
            await browser.close()
    assert time.monotonic() - t0 < 60, "the browser test must stay under a minute"
