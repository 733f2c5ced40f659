"""This process's driver connections: the registry, replacement (4001) and presence.

A driver is `(org, sub)`. One connection per driver: a newer one replaces the older (here, or on
another instance, which the broker tells with `kick`). Presence lives in the broker with an
expiry this instance refreshes, so a dead instance leaves no driver online past the TTL, and only
the connection that set a driver online sets it offline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterator
from typing import Any

from . import metrics
from .batching import TickBatcher
from .broker import Broker
from .clock import now_ms
from .config import Settings
from .conn import DriverConn, DriverKey
from .extension import Extension
from .protocol.bucket import TokenBucket
from .protocol.live import presence_frame

log = logging.getLogger("tracker.drivers")


class Drivers:
    """The registry of this instance's driver connections, and their presence in the broker."""

    def __init__(self, settings: Settings, broker: Broker, store_hello: Any, extension: Extension) -> None:
        self.settings = settings
        self.broker = broker
        self.extension = extension
        self.sessions: dict[DriverKey, DriverConn] = {}
        self._buckets: dict[DriverKey, TokenBucket] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._hello: TickBatcher[tuple[str, str, str | None], int] = TickBatcher(store_hello, max_batch=2000)
        self._online = TickBatcher(broker.drivers_online, max_batch=2000)
        self._offline = TickBatcher(broker.drivers_offline, max_batch=2000)

    # -- the registry ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sessions)

    def __contains__(self, key: object) -> bool:
        return key in self.sessions

    def __iter__(self) -> Iterator[DriverKey]:
        return iter(self.sessions)

    def get(self, key: DriverKey) -> DriverConn | None:
        return self.sessions.get(key)

    def current(self, conn: DriverConn) -> DriverConn | None:
        """Whom to answer for events received on `conn`: itself, or the connection that replaced it."""
        return conn if not conn.closed else self.sessions.get(conn.key)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def connected(self, conn: DriverConn) -> int:
        """Register a connection (replacing an older one), record it in PostgreSQL and the broker;
        returns welcome's `last_seq` (0 while PostgreSQL is away: the map must not freeze)."""
        p = conn.principal
        bucket = self._buckets.get(conn.key)
        if bucket is None:
            s = self.settings
            bucket = self._buckets[conn.key] = TokenBucket(s.rate_per_s, s.rate_burst, time.monotonic())
        conn.bucket = bucket
        old = self.sessions.get(conn.key)
        if old is not None and old is not conn:
            self.replace(old)
        self.sessions[conn.key] = conn
        metrics.CONNECTIONS.labels("driver").inc()
        await self.extension.driver_connected(conn)  # may set conn.stamp
        line = conn.stamp + b"\t" + presence_frame(p.sub, True, now_ms(), p.name)
        online, hello = await asyncio.gather(
            self._online.get((p.org, p.sub, conn.conn_id, p.name, line)),
            self._hello.get((p.org, p.sub, p.name)),
            return_exceptions=True,
        )
        if isinstance(online, BaseException):
            log.debug("presence not recorded (broker: %s)", online)
        else:
            conn.live_ts = online
        if isinstance(hello, BaseException):
            log.warning("last_seq unknown for %s/%s (PostgreSQL: %s); welcoming with 0", p.org, p.sub, hello)
            return 0
        return hello

    def replace(self, old: DriverConn) -> None:
        old.closed = True
        self.sessions.pop(old.key, None)
        self.spawn(old.channel.close(4001, "replaced by a newer connection"))

    def kick(self, org: str, driver: str, conn_id: str) -> None:
        """Another instance took this driver's newest connection: close ours (4001)."""
        conn = self.sessions.get((org, driver))
        if conn is not None and conn.conn_id != conn_id:
            self.replace(conn)

    async def disconnected(self, conn: DriverConn) -> None:
        if self.sessions.get(conn.key) is conn:
            del self.sessions[conn.key]
        conn.closed = True
        metrics.CONNECTIONS.labels("driver").dec()
        p = conn.principal
        line = conn.stamp + b"\t" + presence_frame(p.sub, False, now_ms())
        try:
            await self._offline.get((p.org, p.sub, conn.conn_id, line))
        except OSError as exc:
            log.debug("presence offline not recorded (broker: %s); it expires", exc)

    # -- presence -------------------------------------------------------------------------------

    def _prune_buckets(self) -> None:
        """Forget the budgets of disconnected drivers that are full again (they would be recreated
        full anyway): memory stays proportional to recently active drivers."""
        now = time.monotonic()
        for key in [k for k, b in self._buckets.items() if k not in self.sessions and b.full(now)]:
            del self._buckets[key]

    async def presence_loop(self) -> None:
        interval = self.settings.presence_refresh_s
        while True:
            await asyncio.sleep(interval)
            try:
                conns = [(c.principal.org, c.principal.sub, c.conn_id, c.stamp) for c in self.sessions.values()]
                self._prune_buckets()
                await self.broker.refresh_presence(conns, spread_s=min(2.0, interval / 4))
                await self.broker.sweep()
            except OSError as exc:
                log.debug("presence refresh failed: %s", exc)
