"""The dashboard's map in headless Chromium (issue 16): street tiles from the configured origin and
nothing else, the bundled basemap without one, driver clusters, the fleet-wide search, route
replay, the package view, alert rings, faded stale markers and the client's own view.

Real service, real phones over websockets, packages consigned over HTTP; the tiles come from a
tile server inside the test (harness/browser.py `TileServer`, generated PNGs on a port of its own),
or from a PMTiles archive the test writes into the data folder and tracker serves itself.
Screenshots go to test-artifacts/browser/map-*.png. Every wait has a deadline.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from harness.browser import (
    ARTIFACTS,
    TILE_RED,
    PageWatch,
    TileServer,
    launch,
    png_pixel,
    require_browser,
    solid_png,
    tile_colour,
)
from harness.clients import Phone, now_ms, pos, scan
from harness.http import DEST, consign, request
from harness.instances import Instance
from harness.pmtiles import write_archive
from harness.tokens import token

pytestmark = pytest.mark.browser

LAGOS = {"name": "Lagos Island General Hospital", "lat": 6.4541, "lon": 3.3947}


def origin(url: str) -> str | None:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") else None


def csp_img_src(headers: dict[str, str]) -> list[str]:
    for directive in headers["content-security-policy"].split(";"):
        words = directive.split()
        if words and words[0] == "img-src":
            return words[1:]
    raise AssertionError("no img-src in the CSP")


async def new_page(browser: Any, label: str, t0: float) -> tuple[PageWatch, set[str]]:
    """A page that records the origin of every request it makes."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = PageWatch(await ctx.new_page(), label, t0)
    origins: set[str] = set()
    page.page.on("request", lambda r: (o := origin(r.url)) and origins.add(o))
    return page, origins


async def screen_pixel(page: PageWatch, name: str, x: float, y: float) -> tuple[int, ...]:
    """Screenshot (kept as map-<name>.png) and the pixel at map point (x, y)."""
    await page.page.evaluate("() => window.trackerDebug.render()")
    box = await page.page.get_by_test_id("map-canvas").bounding_box()
    shot = await page.page.screenshot(path=str(ARTIFACTS / f"map-{name}.png"))
    return png_pixel(shot, round(box["x"] + x), round(box["y"] + y))


async def test_street_tiles_come_only_from_the_configured_origin(start_instance: Any, org: str) -> None:
    async_playwright = require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    async with TileServer() as tiles:
        inst: Instance = await start_instance(map_tiles=tiles.template, map_tiles_attribution="© Test Tiles")
        _, headers, _ = await request(inst, "GET", "/")
        assert csp_img_src(headers) == ["'self'", "data:", tiles.origin]  # exactly the tile origin
        async with async_playwright() as pw:
            browser = await launch(pw)
            try:
                page, origins = await new_page(browser, "tiles page", t0)
                await page.goto(f"{inst.http}/#token={token('dispatcher', 'u-disp', org)}")
                await page.until("(s) => s.connection === 'live' && s.base.tiles", what="live, with street tiles")
                await page.page.evaluate("() => window.trackerDebug.setView(36.82, -1.29, 15)")
                await page.page.wait_for_function(
                    "() => document.querySelectorAll('.leaflet-tile-loaded').length >= 4", timeout=15_000
                )
                assert any(z == 15 for z, _, _ in tiles.tiles()), tiles.requests[:10]
                st = await page.state()
                assert st["base"] == {"tiles": tiles.template, "tileOrigin": tiles.origin, "basemap": False}
                # The tiles are what the user sees: a pixel clear of the panels is a generated tile's.
                px = await screen_pixel(page, "01-street-tiles", 600, 450)
                assert px[0] == TILE_RED, f"not a tile pixel at the map's centre: {px}"
                credits = await page.page.get_by_test_id("attribution").inner_text()
                assert "© Test Tiles" in credits and "Natural Earth" not in credits, credits
                # Nothing was fetched from anywhere but the page's own origin and the tile server.
                assert origins == {inst.http, tiles.origin}, origins
                page.assert_clean()  # a tile blocked by the CSP would be a console error
            finally:
                await browser.close()


def tile_of(z: int, lon: float, lat: float) -> tuple[int, int]:
    """The x, y of the web-mercator tile at zoom `z` holding (lon, lat)."""
    n = 1 << z
    y = (1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n
    return int((lon + 180) / 360 * n), int(y)


async def test_tiles_from_a_pmtiles_archive_come_from_tracker_itself(
    start_instance: Any, org: str, tmp_path: Path
) -> None:
    """TRACKER_MAP_TILES names an archive in the data folder: the page draws its tiles, every one
    fetched from tracker (GET /tiles/z/x/y.png, 200) and nothing from any other origin."""
    async_playwright = require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    west, south, east, north = 36.6, -1.5, 37.0, -1.1  # Nairobi: the archive's area (a city extract)
    tiles = {}
    for z in range(14):
        (x0, y0), (x1, y1) = tile_of(z, west, north), tile_of(z, east, south)
        for x in range(max(x0 - 1, 0), min(x1 + 2, 1 << z)):  # a tile's margin: whatever Leaflet asks exists
            for y in range(max(y0 - 1, 0), min(y1 + 2, 1 << z)):
                tiles[(z, x, y)] = solid_png(tile_colour(z, x, y))
    (tmp_path / "maps").mkdir()
    write_archive(tmp_path / "maps" / "nairobi.pmtiles", tiles, leaf_size=64, bounds=(west, south, east, north))
    inst: Instance = await start_instance(map_tiles="maps/nairobi.pmtiles", map_tiles_attribution="© Test Archive")
    _, headers, _ = await request(inst, "GET", "/")
    assert csp_img_src(headers) == ["'self'", "data:"]  # the tiles are the page's own: no other origin
    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            page, origins = await new_page(browser, "archive tiles page", t0)
            answers: list[tuple[str, int]] = []
            page.page.on("response", lambda r: "/tiles/" in r.url and answers.append((r.url, r.status)))
            await page.goto(f"{inst.http}/#token={token('dispatcher', 'u-disp', org)}")
            await page.until("(s) => s.connection === 'live' && s.base.tiles", what="live, with the archive's tiles")
            st = await page.state()
            assert st["base"] == {"tiles": "/tiles/{z}/{x}/{y}.png", "tileOrigin": inst.http, "basemap": False}
            await page.page.evaluate("() => window.trackerDebug.setView(36.82, -1.29, 13)")
            await page.page.wait_for_function(
                "() => document.querySelectorAll('.leaflet-tile-loaded').length >= 12", timeout=15_000
            )
            # What the user sees at the map's centre is the archive's tile for that place.
            p = await page.page.evaluate("() => window.trackerDebug.project(36.82, -1.29)")
            px = await screen_pixel(page, "10-archive-tiles", p["x"] + 3, p["y"] + 3)
            want = tile_colour(13, *tile_of(13, 36.82, -1.29))
            assert tuple(px[:3]) == want, f"not tile 13/{tile_of(13, 36.82, -1.29)} at Nairobi: {px} != {want}"
            credits = await page.page.get_by_test_id("attribution").inner_text()
            assert "© Test Archive" in credits and "Natural Earth" not in credits, credits
            loaded = [(urlsplit(u).path, s) for u, s in answers]
            assert any(path.startswith("/tiles/13/") for path, _ in loaded), loaded[:10]
            assert all(re.fullmatch(r"/tiles/\d+/\d+/\d+\.png", path) and s == 200 for path, s in loaded), loaded
            assert all(u.startswith(inst.http + "/") for u, _ in answers)
            assert origins == {inst.http}, origins  # nothing from any other origin
            page.assert_clean()
        finally:
            await browser.close()


async def test_without_tiles_the_bundled_basemap_is_drawn_and_nothing_leaves_the_origin(
    start_instance: Any, org: str
) -> None:
    async_playwright = require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    inst: Instance = await start_instance()
    _, headers, _ = await request(inst, "GET", "/")
    assert csp_img_src(headers) == ["'self'", "data:"]
    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            page, origins = await new_page(browser, "offline page", t0)
            await page.goto(f"{inst.http}/#token={token('dispatcher', 'u-disp', org)}")
            await page.until("(s) => s.connection === 'live' && s.base.basemap && !s.base.tiles", what="basemap")
            # Central Africa, away from borders and labels: the basemap's land colour (#f6f3ea).
            p = await page.page.evaluate("() => window.trackerDebug.project(24.5, -6.5)")
            px = await screen_pixel(page, "02-offline-basemap", p["x"], p["y"])
            assert px[:3] == (246, 243, 234), f"not the basemap's land at the Congo basin: {px}"
            assert "Natural Earth" in await page.page.get_by_test_id("attribution").inner_text()
            assert origins == {inst.http}, origins
            page.assert_clean()
        finally:
            await browser.close()


async def drive(phone: Phone, points: list[tuple[float, float]], start_ts: int, step_ms: int = 10_000) -> None:
    """Send fixes along `points`, `step_ms` apart from `start_ts`, and wait for every ack."""
    base = phone.welcome["last_seq"]
    for i, (lat, lon) in enumerate(points):
        await phone.send(pos(base + i + 1, ts=start_ts + i * step_ms, lat=lat, lon=lon, spd=8.0, bat=0.7))
    last = base + len(points)
    await phone.until(lambda p: last in p.acked)


async def test_clusters_fleet_search_replay_package_view_and_alerts(start_instance: Any, org: str) -> None:
    async_playwright = require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    inst: Instance = await start_instance()
    now = now_ms()
    await consign(inst, org, "PKG-N1", "clinic-a", window={"from": now - 3_600_000, "to": now + 3_600_000})
    await consign(
        inst, org, "PKG-L1", "clinic-b", destination=LAGOS, window={"from": now - 7_200_000, "to": now - 60_000}
    )

    # Six drivers in Nairobi a few hundred metres apart, one in Lagos, one silent for 5 minutes.
    names = {"d-1": "Amina", "d-2": "Baraka", "d-3": "Chege", "d-4": "Dalia", "d-5": "Eko", "d-lagos": "Tunde"}
    phones = {d: await Phone.connect(inst.url, token("driver", d, org, name=n)) for d, n in names.items()}
    phones["d-6"] = await Phone.connect(inst.url, token("driver", "d-6", org, name="Faraji"))
    route = [(-1.2921 - 0.0004 * i, 36.8219 + 0.0003 * i) for i in range(12)]  # d-1's last 2 minutes
    await drive(phones["d-1"], route, now - 12 * 10_000)
    for k, d in enumerate(["d-2", "d-3", "d-4", "d-5"], start=1):
        await drive(phones[d], [(-1.2921 + 0.002 * k, 36.8219 - 0.0015 * k)], now)
    await drive(phones["d-6"], [(-1.2861, 36.8159)], now - 5 * 60_000)  # its newest fix is 5 min old
    await drive(phones["d-lagos"], [(6.4550, 3.3941)], now)
    nairobi = {"d-1", "d-2", "d-3", "d-4", "d-5", "d-6"}

    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            page, _ = await new_page(browser, "dispatcher map", t0)
            await page.goto(f"{inst.http}/#token={token('dispatcher', 'u-disp', org)}")

            # 1. Africa: the six Nairobi drivers are one badge "6"; Lagos is a marker of its own.
            await page.until("(s) => s.connection === 'live' && s.markers.length === 7", what="7 markers")
            st = await page.until(
                "(s) => s.clusters.length === 1 && s.fleet.drivers === 7 && s.fleet.late === 1 && s",
                what="one cluster, the whole fleet counted, PKG-L1 late",
            )
            cluster = st["clusters"][0]
            assert cluster["count"] == 6 and set(cluster["drivers"]) == nairobi, st["clusters"]
            lagos = next(m for m in st["markers"] if m["driver"] == "d-lagos")
            assert lagos["cluster"] is None and lagos["visible"]
            # The whole fleet, in words with the right plurals. PKG-L1's missed window may raise an
            # alert of its own (delivery_window_missed): the count is whatever is open.
            await page.until(
                "(s) => { const m = document.querySelector('[data-testid=fleet-summary]').textContent.match("
                "/^7 drivers · 7 online · 0 offline · 0 carrying · 1 late package · (\\d+) open alerts?$/);"
                " return m && +m[1] === s.alerts.filter((a) => a.state !== 'resolved').length; }",
                what="the summary: the whole fleet, the late package, the open alerts",
            )
            text = await page.page.get_by_test_id("fleet-summary").inner_text()
            found = re.fullmatch(
                r"7 drivers · 7 online · 0 offline · 0 carrying · 1 late package · (\d+) open (\w+)", text
            )
            assert found, text
            n_open = sum(1 for a in (await page.state())["alerts"] if a["state"] != "resolved")
            assert int(found[1]) == n_open and found[2] == ("alert" if n_open == 1 else "alerts"), text
            await page.shot("map-03-clusters-africa")

            # 2. A click on the badge zooms in until it breaks up into its drivers.
            box = await page.page.get_by_test_id("map-canvas").bounding_box()
            await page.page.mouse.click(box["x"] + cluster["x"], box["y"] + cluster["y"])
            st = await page.until(
                "(s, ids) => s.view.zoom >= 13 && s.clusters.length === 0 && ids.every((id) =>"
                " s.markers.some((m) => m.driver === id && m.visible && m.cluster === null)) && s",
                sorted(nairobi),
                what="the cluster opened into six markers",
            )
            # d-6's newest fix is 5 minutes old: drawn faded; the others at full strength.
            by_id = {m["driver"]: m for m in st["markers"]}
            assert by_id["d-6"]["stale"] and not by_id["d-2"]["stale"]
            alpha = await page.page.evaluate(
                """(ids) => { window.trackerDebug.render();
                  const c = document.querySelector('[data-testid=map-canvas]');
                  const dpr = c.width / c.getBoundingClientRect().width;
                  const ms = window.trackerDebug.state().markers;
                  return ids.map((id) => { const m = ms.find((m) => m.driver === id);
                    const ctx = c.getContext('2d');
                    return ctx.getImageData(Math.round(m.x * dpr), Math.round(m.y * dpr), 1, 1).data[3]; });
                }""",
                ["d-6", "d-2"],
            )
            assert alpha[1] == 255 and 40 < alpha[0] < 140, f"stale marker alpha {alpha[0]}, fresh {alpha[1]}"
            await page.shot("map-04-cluster-opened-stale-faded")

            # 3. Search the whole fleet: Tunde is in Lagos, far outside this view. Once the zoomed
            # view's subscription (debounced after the zoom) has its snapshot, he is not on the map.
            await page.until(
                "(s) => s.subscribedBbox && s.subscribedBbox[0] > 30 && !s.markers.some((m) => m.driver === 'd-lagos')",
                what="the view's own subscription, without Lagos",
            )
            await page.page.get_by_test_id("driver-filter").fill("tunde")
            row = await page.row("driver-row", driver="d-lagos")
            assert "elsewhere" in await row.inner_text()
            assert await page.page.get_by_test_id("driver-summary").inner_text() == "1 of 7 drivers match"
            await row.click()
            await page.until(
                "(s) => Math.abs(s.view.lon - 3.3941) < 0.01"
                " && s.markers.some((m) => m.driver === 'd-lagos' && m.visible)",
                what="the map went to Lagos and shows Tunde",
            )
            await page.shot("map-05-fleet-search-lagos")

            # 4. Replay Amina's route from the trail API with the time slider.
            await page.page.get_by_test_id("driver-filter").fill("amina")
            await (await page.row("driver-row", driver="d-1")).click()
            await page.until("(s) => s.selected === 'd-1' && s.replay.count >= 12", what="d-1's trail loaded")
            slider = page.page.get_by_test_id("replay-slider")
            await slider.focus()
            await page.page.keyboard.press("Home")  # the slider's keys, as a keyboard user would
            st = await page.until("(s) => s.replay.index === 0 && s", what="replay at the first fix")
            assert abs(st["replay"]["lat"] - route[0][0]) < 1e-5 and abs(st["replay"]["lon"] - route[0][1]) < 1e-5
            assert st["replay"]["ts"] == now - 12 * 10_000
            for _ in range(6):
                await page.page.keyboard.press("ArrowRight")
            st = await page.until("(s) => s.replay.index === 6 && s", what="replay at the 7th fix")
            assert abs(st["replay"]["lat"] - route[6][0]) < 1e-5
            assert "latest" not in await page.page.get_by_test_id("replay-time").inner_text()
            await page.shot("map-06-replay-midway")
            await page.page.get_by_test_id("replay-play").click()
            await page.until(
                "(s) => s.replay.playing === false && s.replay.index === s.replay.count - 1", what="played"
            )

            # 5. Amina picks PKG-N1 up at 5 °C: the package view shows its ETA (the service's estimate).
            d1 = phones["d-1"]
            seq = d1.welcome["last_seq"] + 12
            lat, lon = route[-1]
            await d1.send(scan(seq + 1, "PKG-N1", "pickup", lat=lat, lon=lon, temp_c=5.0))
            await d1.until(lambda p: seq + 1 in p.acked)
            await page.page.get_by_test_id("tab-packages").click()
            await (await page.row("package-row", package="PKG-N1", state="picked_up")).click()
            facts_box = page.page.get_by_test_id("package-facts")
            await facts_box.get_by_text("ETA").wait_for(timeout=15_000)
            assert "With" in await facts_box.inner_text()
            await page.shot("map-07-package-view-eta")
            # ...and delivers it at 9.5 °C at the destination: the open view follows (live refetch).
            await d1.send(
                scan(
                    seq + 2,
                    "PKG-N1",
                    "deliver",
                    lat=DEST["lat"],
                    lon=DEST["lon"],
                    temp_c=9.5,
                    recipient="Ward 3 pharmacist",
                    pod="pod/PKG-N1.png",
                )
            )
            await d1.until(lambda p: seq + 2 in p.acked)
            await page.until(
                "(s) => s.alerts.some((a) => a.package === 'PKG-N1' && a.kind === 'temperature_excursion')"
                " && s.alerted.includes('d-1')",
                what="the temperature alert names d-1",
            )
            await page.page.wait_for_function(
                "() => document.querySelectorAll('[data-testid=custody-item]').length === 2", timeout=15_000
            )
            facts = await page.page.get_by_test_id("package-facts").inner_text()
            assert "Delivered" in facts and "St Mary's Hospital" in facts and "2 to 8 °C" in facts, facts
            assert "Delivery window" in facts, facts
            chart = page.page.get_by_test_id("package-temperature")
            assert await chart.get_attribute("data-points") == "2" and await chart.is_visible()
            events = [
                await i.get_attribute("data-event") for i in await page.page.locator("[data-testid=custody-item]").all()
            ]
            assert events == ["pickup", "deliver"]
            pod = await page.page.get_by_test_id("package-pod").inner_text()
            assert "Ward 3 pharmacist" in pod and "pod/PKG-N1.png" in pod and "0 m" in pod, pod
            # The alert ring: red around d-1 (its marker drawn on its own, never hidden in a cluster).
            await page.page.evaluate("() => window.trackerDebug.setView(36.8219, -1.2921, 11)")
            st = await page.until("(s) => s.view.zoom === 11 && s.clusters.length >= 1 && s", what="zoomed out")
            m = next(m for m in st["markers"] if m["driver"] == "d-1")
            assert m["cluster"] is None, "a driver with an open alert must not hide in a cluster"
            ring = await screen_pixel(page, "08-package-view-alert-ring", m["x"] + 5.7, m["y"] + 5.7)  # r = 8 px
            assert ring[0] > 180 and ring[1] < 110 and ring[2] < 110, f"no red alert ring at d-1: {ring}"
            page.assert_clean()
        finally:
            await browser.close()
    assert time.monotonic() - t0 < 60, "keep the browser test under a minute"


async def test_client_page_is_titled_for_its_client_and_opens_on_its_deliveries(start_instance: Any, org: str) -> None:
    async_playwright = require_browser()
    t0 = time.monotonic()
    inst: Instance = await start_instance()
    await consign(inst, org, "PKG-C1", "clinic-a")  # to St Mary's Hospital, Nairobi
    await consign(inst, org, "PKG-B9", "clinic-b", destination=LAGOS)
    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            page, _ = await new_page(browser, "client page", t0)
            await page.goto(f"{inst.http}/#token={token('client', 'u-c', org, client='clinic-a', name='Ward clerk')}")
            st = await page.until(
                "(s) => s.connection === 'live' && s.view.zoom >= 10 && s",
                what="the client's view opens on its delivery, not on Africa",
            )
            west, south, east, north = st["view"]["bbox"]
            assert west < DEST["lon"] < east and south < DEST["lat"] < north, st["view"]
            assert east - west < 1, "opened on a city, not a continent"
            assert await page.page.title() == "clinic-a deliveries · Tracker"
            assert "clinic-a" in await page.page.get_by_test_id("brand-sub").inner_text()
            assert [p["package"] for p in st["packages"]] == ["PKG-C1"]
            await page.shot("map-09-client-opens-on-its-deliveries")
            page.assert_clean()
        finally:
            await browser.close()
