"""This process's driver connections: the registry, replacement (4001) and presence.

A driver is `(org, sub)`. One connection per driver: the newest one, where "newest" is the order
in which the broker registered them (`Broker.drivers_online`: one serialisation point across
instances, told with `kick` and a generation). A connection is welcomed only if
the broker registered it as current; every older one is closed 4001, also one superseded before
its welcome (then it is never welcomed), however many hellos arrive in one tick or on how many
instances. Presence lives in the broker with an expiry this instance refreshes, so a dead instance
leaves no driver online past the TTL, and only the connection that set a driver online sets it
offline. A failure during a connect undoes it all (registration, presence, the gauge).

A kick goes to the instance that registered the replaced connection (or, when the broker does not
know it, to the instances listening to the org's control messages). An instance listens to an org's
control messages (stamps; such kicks) only while it holds a connection of one of the org's drivers:
from before that connection is registered in the broker (so the kick of a later connection
elsewhere cannot be missed) until the org's last connection here ends.
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
        self.sessions: dict[DriverKey, DriverConn] = {}  # each driver's current connection here
        # Every open connection of a driver here (hellos in progress and superseded ones not yet
        # gone included), and the highest generation heard of (own answers and kicks).
        self._local: dict[DriverKey, list[DriverConn]] = {}
        self._newest: dict[DriverKey, int] = {}
        self._per_org: dict[str, int] = {}  # org -> open connections here (follows its control while > 0)
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

    def bucket(self, key: DriverKey) -> TokenBucket:
        """The driver's rate budget: one per driver, shared by its websocket and its HTTP uploads."""
        bucket = self._buckets.get(key)
        if bucket is None:
            s = self.settings
            bucket = self._buckets[key] = TokenBucket(s.rate_per_s, s.rate_burst, time.monotonic())
        return bucket

    async def connected(self, conn: DriverConn) -> int:
        """Register a connection, record it in PostgreSQL and the broker; returns welcome's
        `last_seq` (0 while PostgreSQL is away: the map must not freeze). Welcome it only if it is
        not `closed` afterwards: superseded before its welcome, it was closed 4001. If this raises,
        the connection is already undone (as by `disconnected`)."""
        p = conn.principal
        key = conn.key
        conn.bucket = self.bucket(key)
        self._local.setdefault(key, []).append(conn)
        self._per_org[p.org] = self._per_org.get(p.org, 0) + 1
        metrics.CONNECTIONS.labels("driver").inc()
        try:
            # The newest hello here holds the registry (stamps apply to it) until the broker says
            # which connection is current; the older one stays open until then.
            self._switch(key, conn, self.sessions.get(key))
            # Before the broker registers it (and before its stamp is read): a later connection of
            # the driver on another instance is kicked on the org's control channel.
            await self.broker.follow_control(p.org)
            await self.extension.driver_connected(conn)  # may set conn.stamp
            line = conn.stamp + b"\t" + presence_frame(p.sub, True, now_ms(), p.name)
            online, hello = await asyncio.gather(
                self._online.get((p.org, p.sub, conn.conn_id, p.name, line)),
                self._hello.get((p.org, p.sub, p.name)),
                return_exceptions=True,
            )
            if isinstance(online, OSError):
                log.debug("presence not recorded (broker: %s); the newest hello here wins", online)
                self._registered_here(conn)
            elif isinstance(online, BaseException):
                raise online
            else:
                conn.live_ts = max(conn.live_ts, online.live_ts)
                self._registered(conn, online.gen, online.current)
        except Exception:
            await self.disconnected(conn)
            raise
        if isinstance(hello, BaseException):
            log.warning("last_seq unknown for %s/%s (PostgreSQL: %s); welcoming with 0", p.org, p.sub, hello)
            return 0
        return hello

    def _registered(self, conn: DriverConn, gen: int, current: bool) -> None:
        """The broker registered `conn` with generation `gen`: close whichever is older."""
        key = conn.key
        conn.gen = gen
        if not current or gen < self._newest.get(key, 0) or conn.closed:
            self.replace(conn)  # superseded before its welcome
            return
        self._newest[key] = gen
        self._close_older(key, gen, conn.conn_id)

    def _registered_here(self, conn: DriverConn) -> None:
        """The broker could not order it: the newest hello here wins, as it is the registry's."""
        if conn.closed or self.sessions.get(conn.key) is not conn:
            self.replace(conn)
            return
        conn.gen = self._newest.get(conn.key, 0)
        for other in list(self._local.get(conn.key, ())):
            if other is not conn and other.gen is not None:
                self.replace(other)

    def _close_older(self, key: DriverKey, gen: int, conn_id: str) -> None:
        """Close (4001) this instance's connections of `key` registered before generation `gen`;
        those whose registration is still in flight decide when it is answered."""
        for other in list(self._local.get(key, ())):
            if other.conn_id != conn_id and other.gen is not None and other.gen < gen:
                self.replace(other)

    def _switch(self, key: DriverKey, new: DriverConn, prev: DriverConn | None) -> None:
        """Make `new` the registry's connection of `key`; the stamp and live ts are the driver's."""
        if prev is not None and prev is not new:
            new.stamp = prev.stamp
            new.live_ts = max(new.live_ts, prev.live_ts)
        self.sessions[key] = new

    def replace(self, old: DriverConn) -> None:
        """Close `old` with 4001 (a newer connection of its driver exists)."""
        if old.closed:
            return
        old.closed = True
        if self.sessions.get(old.key) is old:
            self._fall_back(old)
        self.spawn(old.channel.close(4001, "replaced by a newer connection"))

    def _fall_back(self, gone: DriverConn) -> None:
        """`gone` held the registry: hand it to the driver's best open connection here, if any (a
        hello in progress first, else the highest generation)."""
        rest = [c for c in self._local.get(gone.key, ()) if not c.closed and c is not gone]
        if rest:
            self._switch(gone.key, max(reversed(rest), key=lambda c: (c.gen is None, c.gen or 0)), gone)
        else:
            self.sessions.pop(gone.key, None)

    def kick(self, org: str, driver: str, conn_id: str, gen: int | None = None) -> None:
        """The broker registered `conn_id` as the driver's newest connection, with generation `gen`:
        close ours registered before it (4001). Without `gen` (an instance of the previous release),
        close every registered one but `conn_id`."""
        key = (org, driver)
        if key not in self._local:
            return
        if gen is None:
            gen = max((c.gen or 0 for c in self._local[key]), default=0) + 1
        elif gen > self._newest.get(key, 0):
            self._newest[key] = gen
        self._close_older(key, gen, conn_id)

    async def disconnected(self, conn: DriverConn) -> None:
        """The connection ended (or its connect failed): unregister it, set it offline if it is
        still the driver's connection in the broker, and count it gone. Once per connection."""
        local = self._local.get(conn.key)
        if local is None or conn not in local:
            return
        local.remove(conn)
        if not local:
            del self._local[conn.key]
            self._newest.pop(conn.key, None)
        org = conn.key[0]
        left = self._per_org[org] = self._per_org[org] - 1
        if not left:
            del self._per_org[org]
            self.broker.unfollow_control(org)
        conn.closed = True
        if self.sessions.get(conn.key) is conn:
            self._fall_back(conn)
        metrics.CONNECTIONS.labels("driver").dec()
        p = conn.principal
        try:
            line = conn.stamp + b"\t" + presence_frame(p.sub, False, now_ms())
            await self._offline.get((p.org, p.sub, conn.conn_id, line))
        except OSError as exc:
            log.debug("presence offline not recorded (broker: %s); it expires", exc)
        except Exception:
            log.exception("presence offline of %s/%s not recorded; it expires", p.org, p.sub)

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
