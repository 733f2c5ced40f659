"""Tracking links: made and revoked by dispatchers and client admins, read by recipients.

A link's token is 256 random bits (URL-safe base64); only its SHA-256 is stored. Reading a link
costs one PostgreSQL query (the link and its package), one Redis read (the holder's newest
position and its stamp) and, in the window, the ETA's two queries. A live feed (`stream`) reads
at most once per `TRACKER_SHARE_LIVE_S` per link on this instance, however many pages follow it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Protocol

import asyncpg
import orjson

from ..broker import Broker
from ..config import Settings
from ..eta.service import EtaService
from . import store
from .limits import Limits
from .view import PICKED_UP, Link, gone, in_window, position, render

log = logging.getLogger("tracker.share")

PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
STREAMS_PER_LINK: Final = 8  # open live feeds of one link on one instance
KEEPALIVE_S: Final = 15.0
TOKEN_MAX: Final = 100
ETA_STEP_MS: Final = 30_000

View = dict[str, Any] | str | None  # the view; why the link is gone; None: no such link


class Marks(Protocol):
    """What the custody layer offers the links (custody/stamps.py implements it)."""

    def share(self, org: str, package: str) -> None:
        """From now on (on every instance, once told) the package's holder's live frames carry
        its mark in their stamp. Never awaits."""

    def needle(self, package: str) -> bytes:
        """The package's mark as it appears in a stamp."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ShareService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: Broker,
        marks: Marks,
        eta: EtaService,
        settings: Settings,
        *,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.pool, self.broker, self.marks, self.eta = pool, broker, marks, eta
        self.draining = draining  # the instance is shutting down: live feeds end (a deploy never waits for them)
        self.grace_ms = int(settings.share_grace_s * 1000)
        self.max_ms = int(settings.share_max_s * 1000)
        self.live_s = settings.share_live_s
        self.named_orgs = frozenset(settings.share_driver_name_orgs)
        self.limits = Limits(settings.share_rate_per_s, settings.share_ip_rate_per_s, settings.share_burst)
        self.streams: Counter[bytes] = Counter()
        self._cache: dict[bytes, tuple[float, View]] = {}

    # -- made by a dispatcher or client admin -----------------------------------------------------

    async def create(
        self, org: str, package: str, by: str, now: int, state: str, state_ts: int | None
    ) -> tuple[str, int]:
        """A new link of the package: (token, expires_at). The caller checked the scope."""
        expires = now + self.max_ms
        if state == "delivered" and state_ts is not None:
            expires = min(expires, state_ts + self.grace_ms)
        token = secrets.token_urlsafe(32)
        await store.create(self.pool, digest(token), org, package, by, now, expires)
        self.marks.share(org, package)
        return token, expires

    async def revoke(self, org: str, package: str, now: int) -> int:
        revoked = await store.revoke(self.pool, org, package, now)
        self._cache.clear()  # a live feed of a revoked link ends at its next look
        return revoked

    # -- read by a recipient ----------------------------------------------------------------------

    async def view(self, token_sha256: bytes, now: int) -> View:
        """What the link shows now (never cached)."""
        row = await store.find(self.pool, token_sha256)
        if row is None:
            return None
        dest = None
        if row["dest_lat"] is not None:
            dest = {"name": row["dest_name"], "lat": row["dest_lat"], "lon": row["dest_lon"]}
        window = None
        if row["window_from"] is not None or row["window_to"] is not None:
            window = {"from": row["window_from"], "to": row["window_to"]}
        link = Link(
            row["org"],
            row["package_id"],
            row["expires_at"],
            row["revoked_at"],
            row["state"],
            row["holder"],
            row["state_ts"],
            row["live_view"],
            dest,
            window,
        )
        why = gone(link, self.grace_ms, now)
        if why is not None:
            return why
        driver, eta_ts = None, None
        if link.state == PICKED_UP and link.holder is not None and link.live_view:
            try:
                latest = await self.broker.latest(link.org, link.holder)
            except OSError as exc:
                log.debug("tracking link without a position (Redis: %s)", exc)
                latest = None
            if latest is not None and in_window(link, latest[1], self.marks.needle(link.package)):
                driver = position(latest[2])
            if driver is not None:
                if link.org in self.named_orgs:
                    driver["name"] = await store.driver_name(self.pool, link.org, link.holder)
                rows = [{"package_id": link.package, "state": link.state, "holder": link.holder}]
                eta = (await self.eta.for_rows(link.org, rows)).get(link.package)
                # Rounded to 30 s: a recipient reads minutes, and the live feed sends only changes.
                eta_ts = round(eta["ts"] / ETA_STEP_MS) * ETA_STEP_MS if eta is not None else None
        return render(link, self.grace_ms, driver=driver, eta_ts=eta_ts)

    async def _recent_view(self, token_sha256: bytes) -> View:
        """The view, computed at most once per `live_s` for every live feed of the link here."""
        at = time.monotonic()
        cached = self._cache.get(token_sha256)
        if cached is not None and at - cached[0] < self.live_s:
            return cached[1]
        view = await self.view(token_sha256, int(time.time() * 1000))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token_sha256] = (at, view)
        return view

    async def stream(self, token_sha256: bytes) -> AsyncIterator[bytes]:
        """Server-sent events: `view` whenever the view changes (looked at every `live_s`), a
        comment every 15 s of silence, and `gone` (then the end) once the link no longer works.
        Ends without a word when the instance drains (the page polls, then follows another)."""
        last, quiet = b"", 0.0
        self.streams[token_sha256] += 1
        try:
            while not self.draining():
                try:
                    view = await self._recent_view(token_sha256)
                except PG_ERRORS as exc:
                    log.debug("tracking link feed: storage unavailable (%s); trying again", exc)
                    await asyncio.sleep(self.live_s)
                    continue
                if not isinstance(view, dict):
                    why = view or "no such tracking link"
                    yield b"event: gone\ndata: " + orjson.dumps({"error": {"code": "gone", "message": why}}) + b"\n\n"
                    return
                body = orjson.dumps(view)
                if body != last:
                    last, quiet = body, 0.0
                    yield b"event: view\ndata: " + body + b"\n\n"
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield b": keepalive\n\n"
                await asyncio.sleep(self.live_s)  # a period: the feed looks again
                quiet += self.live_s
        finally:
            self.streams[token_sha256] -= 1
            if self.streams[token_sha256] <= 0:
                del self.streams[token_sha256]
