"""The recipient's tracking page in headless Chromium (Debian's `chromium`, Playwright with
`executable_path`, nothing downloaded): before, during and after custody, and once revoked.

A client admin makes a link over HTTP; a real phone drives towards the destination; the page,
on a phone-sized viewport, follows the live feed: "being prepared" with no driver and no ETA
before the pickup; the driver's distance and an ETA while it carries the package (never its id
or name: the org does not allow names); "Delivered at" and nothing of the driver after the
delivery, although it keeps driving; and "revoked" once the link is revoked. The page's strict
CSP must not block anything it needs: any console error fails the test. Screenshots go to
test-artifacts/browser/share-*.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import ConnectionClosed

from harness.clients import Phone, pos, scan
from harness.http import consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"
WAIT_MS = 15_000
DEST = {"name": "Langata Clinic", "lat": -1.300, "lon": 36.800}


def _require_browser() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: install the dev extras (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    return async_playwright


class Van:
    """A phone driving north towards the destination, a fix every 0.3 s, reading its acks."""

    def __init__(self, phone: Phone) -> None:
        self.phone, self.seq, self.lat = phone, 0, -1.330
        self.task: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def _drive(self) -> None:
        while True:
            self.lat = min(self.lat + 0.0003, DEST["lat"] - 0.001)
            await self.phone.send(pos(self.next_seq(), lat=round(self.lat, 6), lon=DEST["lon"], spd=11.0))
            await asyncio.sleep(0.3)  # the phone's fix interval

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.phone.pump(timeout=3600)

    def start(self) -> None:
        self.task = asyncio.create_task(self._drive())
        self.reader = asyncio.create_task(self._read())

    async def scan(self, package: str, event: str, **extra: Any) -> None:
        await self.phone.send(scan(self.next_seq(), package, event, lat=self.lat, lon=DEST["lon"], **extra))

    async def stop(self) -> None:
        for task in (self.task, self.reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def test_share_page_before_during_and_after_custody(start_instance: Any, org: str) -> None:
    async_playwright = _require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    inst: Instance = await start_instance()
    admin = token("client", "u-clinic", org, client="clinic-a")
    await consign(inst, org, "PKG-7", "clinic-a", destination=DEST)
    await consign(inst, org, "PKG-8", "clinic-a", destination={**DEST, "lat": -1.29})
    status, made = await http(inst, "POST", pkg_path("PKG-7", "/share"), admin)
    assert status == 201, made
    url = made["url"]
    assert urlsplit(url).path == "/share"
    van = Van(await Phone.connect(inst.url, token("driver", "d-1", org, name="Amina Otieno")))
    van.start()
    errors: list[str] = []
    t0 = time.monotonic()
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                ctx = await browser.new_context(viewport={"width": 390, "height": 760}, device_scale_factor=2)
                page = await ctx.new_page()
                page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
                page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
                card = page.get_by_test_id("share")

                async def state(value: str) -> None:
                    try:
                        await page.wait_for_selector(f'[data-testid=share][data-state="{value}"]', timeout=WAIT_MS)
                    except Exception as exc:
                        raise AssertionError(f"the page never showed {value}; errors: {errors}") from exc

                async def shot(name: str) -> None:
                    await page.screenshot(path=str(ARTIFACTS / f"share-{name}.png"), full_page=True)
                    print(f"{time.monotonic() - t0:5.1f} s  share-{name}.png")

                # Before custody: the package, its destination; no driver, no ETA.
                await page.goto(url)
                await state("created")
                assert await page.get_by_test_id("package").inner_text() == "PKG-7"
                assert await page.get_by_test_id("destination").inner_text() == "Langata Clinic"
                assert not await page.get_by_test_id("radar").is_visible()
                assert not await page.get_by_test_id("eta").is_visible()
                await page.get_by_test_id("feed").filter(has_text="Live").wait_for(timeout=WAIT_MS)
                await shot("1-before-custody")

                # In custody (with another package of the same client on board): distance and ETA.
                await van.scan("PKG-8", "pickup")
                await van.scan("PKG-7", "pickup")
                await state("picked_up")
                await page.get_by_test_id("radar").wait_for(state="visible", timeout=WAIT_MS)
                eta = page.get_by_test_id("eta")
                await eta.wait_for(state="visible", timeout=WAIT_MS)
                assert (await eta.inner_text()).startswith("Arriving around")
                driver_text = await page.get_by_test_id("driver").inner_text()
                assert "away" in driver_text and "Amina" not in driver_text and "d-1" not in driver_text
                first = await page.get_by_test_id("driver").inner_text()
                await page.wait_for_function(  # the driver moves on the page as positions arrive
                    "(t) => document.querySelector('[data-testid=driver]').textContent !== t",
                    arg=first,
                    timeout=WAIT_MS,
                )
                assert "on its way" in await page.get_by_test_id("headline").inner_text()
                await shot("2-in-custody")

                # Delivered: nothing of the driver any more, though it keeps driving with PKG-8.
                await van.scan("PKG-7", "deliver", recipient="Dr W. Kamau")
                await state("delivered")
                assert (await page.get_by_test_id("headline").inner_text()).startswith("Delivered at")
                await page.get_by_test_id("radar").wait_for(state="hidden", timeout=WAIT_MS)
                assert not await eta.is_visible()
                seq = van.seq
                await page.wait_for_timeout(1500)  # let positions sent after the delivery arrive (they must not show)
                assert van.seq > seq + 2
                assert not await page.get_by_test_id("radar").is_visible()
                await shot("3-delivered")

                # Revoked: the live feed ends with `gone` and the page says so.
                status, _ = await http(inst, "DELETE", pkg_path("PKG-7", "/share"), admin)
                assert status == 200
                await state("gone")
                assert "revoked" in await page.get_by_test_id("headline").inner_text()
                await shot("4-revoked")
                assert await card.get_attribute("data-state") == "gone"
                assert not errors, errors  # a CSP violation is a console error
            finally:
                await browser.close()
    finally:
        await van.stop()
