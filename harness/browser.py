"""Headless Chromium for the dashboard's browser tests: Debian's `chromium` driven by Playwright
(`executable_path`, nothing downloaded), a watch on the page's errors, screenshots, and a small
tile server that serves generated PNGs (the map's street tiles, from a known origin).

`PageWatch` fails a test on any console error, uncaught exception or failed load of the page's own
files, and every failed wait reports the page state and those errors.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"
WAIT_MS = 15_000  # the deadline of each wait in the page


def require_browser() -> Any:
    """Playwright and Debian's chromium, or a failure that says what CI must install (never a skip)."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: install the dev extras (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); .ci/run does it. "
            "The browser test never downloads a browser."
        )
    return async_playwright


STATE = "() => window.trackerDebug ? window.trackerDebug.state() : null"


class PageWatch:
    """Console errors, uncaught exceptions and failed loads of the page's own files (its ES modules,
    the stylesheet, the basemap); the test fails on any, and every failed wait reports them."""

    def __init__(self, page: Any, label: str, t0: float) -> None:
        self.page = page
        self.label = label
        self.t0 = t0
        self.errors: list[str] = []
        self.scripts: list[str] = []  # the /static/ scripts the page loaded
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _failed(self, request: Any) -> None:
        if "/static/" in request.url:
            self.errors.append(f"requestfailed: {request.url} {request.failure}")

    def _response(self, response: Any) -> None:
        path = urlsplit(response.url).path
        if not path.startswith("/static/"):
            return
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {path}")
        if path.endswith((".js", ".mjs")) and response.status < 400:
            self.scripts.append(path)
            mime = response.headers.get("content-type", "").split(";")[0].strip()
            if mime not in ("text/javascript", "application/javascript"):
                self.errors.append(f"{path} served as {mime!r}: a browser refuses a module script of that type")

    async def goto(self, url: str) -> None:
        """Open the page: once loaded, every module has run (module scripts run before the load event),
        so the test hook exists unless a module failed to load, link or run."""
        await self.page.goto(url)
        hook = await self.page.evaluate("() => typeof window.trackerDebug?.state === 'function'")
        assert hook and "/static/js/main.js" in self.scripts, (
            f"{self.label}: the page's modules did not load (no window.trackerDebug); "
            f"scripts loaded: {self.scripts}; errors: {self.errors}"
        )
        self.assert_clean()

    async def state(self) -> dict[str, Any]:
        st: dict[str, Any] = await self.page.evaluate(STATE)
        return st

    async def until(self, js: str, arg: Any = None, what: str = "") -> Any:
        """Wait until `js` (a function of the page state and `arg`) is truthy; return its value."""
        fn = f"(arg) => {{ const s = window.trackerDebug?.state(); return !!s && ({js})(s, arg); }}"
        try:
            await self.page.wait_for_function(fn, arg=arg, timeout=WAIT_MS, polling=100)
        except Exception as exc:
            st = await self.state()
            keys = ("connection", "role", "drivers", "markers", "packages", "alerts", "view", "subscribedBbox")
            brief = {k: st.get(k) for k in keys} if st else st
            raise AssertionError(
                f"{self.label}: not reached in {WAIT_MS} ms: {what or js}\nstate: {brief}\nerrors: {self.errors}"
            ) from exc
        return await self.page.evaluate(f"(arg) => ({js})(window.trackerDebug.state(), arg)", arg)

    async def row(self, testid: str, **data: str) -> Any:
        """Wait for a list row `[data-testid=testid][data-k="v"]...` to exist; return its locator."""
        sel = f"[data-testid={testid}]" + "".join(f'[data-{k}="{v}"]' for k, v in data.items())
        loc = self.page.locator(sel)
        await loc.wait_for(timeout=WAIT_MS)
        return loc

    async def shot(self, name: str) -> None:
        await self.page.evaluate("() => window.trackerDebug.render()")
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
        print(f"{time.monotonic() - self.t0:5.1f} s  {name}.png")  # shown with -s or on failure

    def assert_clean(self) -> None:
        assert not self.errors, f"{self.label}: errors in the page: {self.errors}"


STATE = "() => window.trackerDebug ? window.trackerDebug.state() : null"


async def launch(pw: Any) -> Any:
    """Debian's chromium, headless, with the flags every browser test uses."""
    return await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


# -- PNG: generated tiles, and reading a screenshot's pixels (no imaging library needed) -----------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def solid_png(rgb: tuple[int, int, int], size: int = 256) -> bytes:
    """A `size` x `size` PNG of one colour (8-bit RGB)."""
    row = b"\x00" + bytes(rgb) * size
    head = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + _chunk(b"IDAT", zlib.compress(row * size)) + _chunk(b"IEND", b"")
    )


def png_pixel(data: bytes, x: int, y: int) -> tuple[int, ...]:
    """The (r, g, b[, a]) of pixel (x, y) of an 8-bit RGB or RGBA, non-interlaced PNG (a screenshot)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    channels = 3
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, _, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    for row_no in range(y + 1):  # unfilter rows up to y (each row's filter depends on the one above)
        start = row_no * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
    return tuple(prev[x * channels : (x + 1) * channels])


TILE_RED = 201  # every generated tile has this red value: a pixel of it on screen is a tile's


def tile_colour(z: int, x: int, y: int) -> tuple[int, int, int]:
    return (TILE_RED, 90 + 40 * (x % 3), 90 + 40 * (y % 3))


class TileServer:
    """An XYZ tile server on 127.0.0.1 (a port of its own, so another origin than the tracker):
    `GET /tiles/{z}/{x}/{y}.png` answers a solid PNG in `tile_colour`; every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None
        self._cache: dict[tuple[int, int, int], bytes] = {}

    @property
    def origin(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def template(self) -> str:
        return self.origin + "/tiles/{z}/{x}/{y}.png"

    async def __aenter__(self) -> TileServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode("latin-1")
                self.requests.append(path)
                parts = path.split("?")[0].removesuffix(".png").split("/")
                try:
                    z, x, y = (int(p) for p in parts[-3:])
                    assert parts[1] == "tiles"
                except (ValueError, AssertionError, IndexError):
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    continue
                key = (z, x, y)
                body = self._cache.get(key) or self._cache.setdefault(key, solid_png(tile_colour(z, x, y)))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nCache-Control: no-store\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def tiles(self) -> list[tuple[int, int, int]]:
        out = []
        for path in self.requests:
            parts = path.split("?")[0].removesuffix(".png").split("/")
            if len(parts) >= 4 and parts[1] == "tiles":
                out.append((int(parts[-3]), int(parts[-2]), int(parts[-1])))
        return out


# The frame-time measurement (tests/test_browser_frames.py, bench/dashboard_frames.py): in a page
# booted with `boot({ connect: false })`, `drivers` drivers spread over the view at `zoom` each move
# once a second (a 250-position `batch` every 50 ms, as the live feed sends them); for `seconds`
# after a 1 s warm-up, the time between animation frames is recorded. Returns its p50/p95/max (ms),
# the frame count, trackerDebug.perf(), the clusters drawn and the markers on screen.
FRAME_HARNESS = """async ({ drivers, zoom, seconds }) => {
  const dbg = window.trackerDebug;
  dbg.setView(36.82, -1.29, zoom);
  dbg.render();
  const v = dbg.state().view;
  const [w, s, e, n] = v.bbox;
  const pts = Array.from({ length: drivers }, (_, i) => ({
    lat: s + (n - s) * (0.05 + 0.9 * ((i * 7919) % 1000) / 1000),
    lon: w + (e - w) * (0.05 + 0.9 * ((i * 104729) % 997) / 997),
  }));
  const t = Date.now();
  dbg.feed({ type: 'snapshot', packages: [], alerts: [], drivers: pts.map((p, i) => (
    { driver: `d-${i}`, name: `Driver ${i}`, online: true, ts: t, seq: 1, lat: p.lat, lon: p.lon }))});
  dbg.render();
  // Every driver moves once a second: a 250-position batch every 50 ms, as the live feed sends them.
  let next = 0;
  let seq = 1;
  const step = (e - w) / 4000;
  const feeder = setInterval(() => {
    const items = [];
    for (let k = 0; k < 250; k++, next = (next + 1) % drivers) {
      const p = pts[next];
      p.lon += step * ((next % 3) - 1);
      p.lat += step * ((next % 5) - 2) / 2;
      items.push({ type: 'pos', driver: `d-${next}`, seq: ++seq, ts: Date.now(), lat: p.lat, lon: p.lon });
    }
    dbg.feed({ type: 'batch', items });
  }, 50);
  await new Promise((r) => setTimeout(r, 1000)); // warm up
  dbg.resetPerf();
  const intervals = [];
  let last = performance.now();
  let running = true;
  const tick = (now) => { intervals.push(now - last); last = now; if (running) requestAnimationFrame(tick); };
  requestAnimationFrame((now) => { last = now; requestAnimationFrame(tick); });
  await new Promise((r) => setTimeout(r, seconds * 1000));
  running = false;
  clearInterval(feeder);
  const sorted = [...intervals].sort((a, b) => a - b);
  const p95 = sorted[Math.ceil(0.95 * sorted.length) - 1];
  const st = dbg.state();
  return { p50: sorted[Math.floor(0.5 * sorted.length)], p95, max: sorted[sorted.length - 1],
           frames: intervals.length, perf: dbg.perf(), clusters: (st.clusters ?? []).length,
           visible: st.markers.filter((m) => m.visible).length };
}"""
