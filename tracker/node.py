"""The node wires this process's pieces: driver sessions, the batch writer, the broker, the hub.

Ingest is batched per event-loop tick: every driver frame handled in one loop iteration lands in
`_pending`; one callback at the end of the iteration hands them all to the writer (one buffer
append) and to the broker (one pipelined round trip per tick). Acks go out after the commit,
one `ack` frame per driver per commit, written without awaiting the phone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from . import metrics
from .auth import Principal
from .batching import TickBatcher
from .broker import LiveItem, RedisBroker
from .config import Settings
from .hub import Hub
from .protocol import frames
from .protocol.events import Position, Refusal, Scan, check_event, live_ts
from .snapshot import Extras, no_extras, send_snapshot
from .store import Pending, drivers_hello
from .writer import Writer, now_ms
from .wsio import Channel

log = logging.getLogger("tracker.node")

POS_OPTIONAL = ("acc", "spd", "hdg", "alt", "bat")
SCAN_OPTIONAL = ("lat", "lon", "temp_c", "note", "recipient", "pod")


@dataclass(slots=True)
class RateBucket:
    """A driver's event budget (token bucket). It belongs to the driver, not to a connection, so
    reconnecting does not buy a fresh burst."""

    tokens: float
    refilled: float = field(default_factory=time.monotonic)

    def take(self, rate: float, burst: int) -> bool:
        now = time.monotonic()
        self.tokens = min(float(burst), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, rate: float, burst: int, now: float) -> bool:
        return self.tokens + (now - self.refilled) * rate >= burst


@dataclass(eq=False)
class DriverConn:
    """One open driver connection."""

    principal: Principal
    channel: Channel
    conn_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    live_ts: int = 0  # the newest live ts fanned out for this driver
    bucket: RateBucket = field(default_factory=lambda: RateBucket(0.0))
    stamp: bytes = b""  # client ids entitled to this driver's live frames (packages it holds)
    closed: bool = False
    welcomed: bool = False  # nothing but `welcome` may reach the phone before `welcome`
    expiry: asyncio.TimerHandle | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.principal.key


def pos_frame(driver: str, ev: Position) -> bytes:
    frame: dict[str, Any] = {"type": "pos", "driver": driver, "seq": ev.seq, "ts": ev.ts, "lat": ev.lat, "lon": ev.lon}
    for key in POS_OPTIONAL:
        value = getattr(ev, key)
        if value is not None:
            frame[key] = value
    return frames.encode(frame)


def scan_frame(driver: str, ev: Scan) -> bytes:
    frame: dict[str, Any] = {"type": "scan", "driver": driver, "seq": ev.seq, "ts": ev.ts, "package": ev.package,
                             "event": ev.event}
    for key in SCAN_OPTIONAL:
        value = getattr(ev, key)
        if value is not None:
            frame[key] = value
    return frames.encode(frame)


class Node:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, broker: RedisBroker, hub: Hub) -> None:
        self.settings = settings
        self.pool = pool
        self.broker = broker
        self.hub = hub
        self.writer = Writer(pool, self._answered, flush_interval_ms=settings.flush_interval_ms,
                             flush_max_events=settings.flush_max_events, concurrency=settings.writer_concurrency,
                             buffer_max=settings.writer_buffer_max, answer_deadline_s=settings.answer_deadline_s)
        self.sessions: dict[tuple[str, str], DriverConn] = {}
        self._buckets: dict[tuple[str, str], RateBucket] = {}
        self._pending: list[Pending] = []
        self._live: dict[str, list[LiveItem]] = {}
        self._tick_handle: asyncio.Handle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.draining = False
        # Hooks for the packages (chain of custody) layer. With `on_stored_scans` set, scans are
        # fanned out by that layer after their commit (it stamps them with the package's client
        # and publishes the package change beside them), not at receipt.
        self.on_stored_scans: Callable[[list[Pending]], None] | None = None
        self.on_driver_connected: Callable[[DriverConn], Awaitable[None]] | None = None
        # Called at a scan's receipt, before the connection's next event: the packages layer closes
        # a client's view of the driver right there (PROTOCOL.md: the window closes on receipt).
        self.on_scan_received: Callable[[DriverConn, Scan], None] | None = None
        # A "stamp" control message (another instance changed which packages drivers hold).
        self.on_stamp_ctl: Callable[[str], None] | None = None
        self._hello = TickBatcher(self._hello_batch, max_batch=2000)
        self._online = TickBatcher(self.broker.drivers_online, max_batch=2000)
        self._offline = TickBatcher(self.broker.drivers_offline, max_batch=2000)
        self.trail_windows: Callable[[Principal, str], Awaitable[list[tuple[int, int]]]] | None = None
        self.snapshot_extras: Extras = no_extras
        broker.on_live = hub.deliver
        broker.on_ctl = self._on_ctl
        broker.on_status = self._on_status

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()
        self.broker.start()
        self._tasks.append(asyncio.create_task(self._presence_loop(), name="presence"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.writer.close()
        await self.broker.close()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- driver sessions ------------------------------------------------------------------------

    async def driver_connected(self, conn: DriverConn) -> int:
        """Register a driver connection (replacing an older one); returns welcome's last_seq."""
        p = conn.principal
        bucket = self._buckets.get(conn.key)
        if bucket is None:
            bucket = self._buckets[conn.key] = RateBucket(float(self.settings.rate_burst))
        conn.bucket = bucket
        old = self.sessions.get(conn.key)
        if old is not None and old is not conn:
            self._replace(old)
        self.sessions[conn.key] = conn
        metrics.CONNECTIONS.labels("driver").inc()
        if self.on_driver_connected is not None:
            await self.on_driver_connected(conn)  # sets conn.stamp: the clients whose packages it holds
        line = b"\t" + frames.encode({"type": "presence", "driver": p.sub, "online": True, "ts": now_ms(),
                                      **({"name": p.name} if p.name else {})})
        online, hello = await asyncio.gather(
            self._online.get((p.org, p.sub, conn.conn_id, p.name, conn.stamp + line)),
            self._hello.get((p.org, p.sub, p.name)), return_exceptions=True)
        if isinstance(online, BaseException):
            log.debug("presence not recorded (Redis: %s)", online)
        else:
            conn.live_ts = online
        if isinstance(hello, BaseException):
            # The map must not freeze while PostgreSQL fails over: welcome with what we know.
            log.warning("last_seq unknown for %s/%s (PostgreSQL: %s); welcoming with 0", p.org, p.sub, hello)
            return 0
        return hello

    async def _hello_batch(self, keys: list[tuple[str, str, str | None]]) -> list[int]:
        return await drivers_hello(self.pool, keys)

    def _replace(self, old: DriverConn) -> None:
        old.closed = True
        self.sessions.pop(old.key, None)
        self.spawn(old.channel.close(4001, "replaced by a newer connection"))

    def _on_ctl(self, parts: list[str]) -> None:
        if len(parts) == 2 and parts[0] == "stamp" and self.on_stamp_ctl is not None:
            self.on_stamp_ctl(parts[1])
        elif len(parts) == 4 and parts[0] == "kick":
            conn = self.sessions.get((parts[1], parts[2]))
            if conn is not None and conn.conn_id != parts[3]:
                self._replace(conn)

    async def driver_disconnected(self, conn: DriverConn) -> None:
        if conn.expiry is not None:
            conn.expiry.cancel()
        if self.sessions.get(conn.key) is conn:
            del self.sessions[conn.key]
        conn.closed = True
        metrics.CONNECTIONS.labels("driver").dec()
        p = conn.principal
        line = conn.stamp + b"\t" + frames.encode({"type": "presence", "driver": p.sub, "online": False,
                                                   "ts": now_ms()})
        try:
            await self._offline.get((p.org, p.sub, conn.conn_id, line))
        except (RedisError, OSError) as exc:
            log.debug("presence offline not recorded (Redis: %s); it expires", exc)

    def _prune_buckets(self) -> None:
        """Forget the budgets of disconnected drivers that are full again (they would be recreated
        full anyway): memory stays proportional to recently active drivers."""
        now, rate, burst = time.monotonic(), self.settings.rate_per_s, self.settings.rate_burst
        for key in [k for k, b in self._buckets.items() if k not in self.sessions and b.full(rate, burst, now)]:
            del self._buckets[key]

    async def _presence_loop(self) -> None:
        interval = self.settings.presence_refresh_s
        while True:
            await asyncio.sleep(interval)
            try:
                conns = [(c.principal.org, c.principal.sub, c.conn_id, c.stamp) for c in self.sessions.values()]
                self._prune_buckets()
                await self.broker.refresh_presence(conns, spread_s=min(2.0, interval / 4))
                await self.broker.sweep()
            except (RedisError, OSError) as exc:
                log.debug("presence refresh failed: %s", exc)

    # -- ingest ---------------------------------------------------------------------------------

    def ingest(self, conn: DriverConn, items: list[Any]) -> None:
        """Validate events of one frame and queue them for this tick. Never awaits."""
        received = now_ms()
        p = conn.principal
        rate, burst = self.settings.rate_per_s, self.settings.rate_burst
        scans: list[Scan] = []
        for obj in items:
            ev = check_event(obj, received)
            if type(ev) is Refusal:
                metrics.EVENTS_REFUSED.labels(ev.code).inc()
                conn.channel.write(frames.error(ev.code, ev.message, seq=ev.seq))
                continue
            if self.draining:
                conn.channel.write(frames.error("unavailable", "the instance is restarting", seq=ev.seq,  # type: ignore[union-attr]
                                                retry_ms=1000))
                continue
            if not conn.bucket.take(rate, burst):
                metrics.EVENTS_REFUSED.labels("rate_limited").inc()
                conn.channel.write(frames.error("rate_limited", "over the per-driver event rate",
                                                seq=ev.seq, retry_ms=int(1000 / rate) + 1))  # type: ignore[union-attr]
                continue
            self._pending.append(Pending(conn, p.org, p.sub, ev, received))  # type: ignore[arg-type]
            if type(ev) is Position:
                lts = live_ts(ev.ts, received)
                if lts > conn.live_ts:  # only an event that becomes the driver's newest goes live
                    conn.live_ts = lts
                    self._live.setdefault(p.org, []).append(("p", p.sub, lts, conn.stamp, pos_frame(p.sub, ev)))
            else:
                scans.append(ev)  # type: ignore[arg-type]
                if self.on_scan_received is not None:
                    self.on_scan_received(conn, ev)  # type: ignore[arg-type]
        if scans and self.on_stored_scans is None:
            live = self._live.setdefault(p.org, [])
            for scan in scans:
                live.append(("a", p.sub, scan.ts, conn.stamp, scan_frame(p.sub, scan)))
        if self._tick_handle is None and (self._pending or self._live):
            self._tick_handle = asyncio.get_running_loop().call_soon(self._tick)

    def publish(self, org: str, item: LiveItem) -> None:
        """Queue a live frame of another kind (package change, alert) for this tick:
        (kind 'a', driver or "", ts, stamp, frame)."""
        self._live.setdefault(org, []).append(item)
        if self._tick_handle is None:
            self._tick_handle = asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        pending, self._pending = self._pending, []
        live, self._live = self._live, {}
        if pending:
            scans = sum(1 for it in pending if type(it.event) is Scan)
            metrics.POSITIONS_RECEIVED.inc(len(pending) - scans)
            metrics.SCANS_RECEIVED.inc(scans)
            rejected = self.writer.submit(pending)
            if rejected:
                self._answered([], [(it, "unavailable", "the write buffer is full; resend later") for it in rejected])
            metrics.WRITER_BUFFERED.set(self.writer.buffered)
        for org, items in live.items():
            self.broker.publish(org, items)

    def _answered(self, stored: list[Pending], refused: list[tuple[Pending, str, str]]) -> None:
        """After a commit: one ack per driver connection; errors for what was refused."""
        acks: dict[DriverConn, list[int]] = {}
        oldest: dict[DriverConn, int] = {}
        for it in stored:
            conn = it.owner
            seqs = acks.get(conn)
            if seqs is None:
                acks[conn] = [it.event.seq]
                oldest[conn] = it.received_at
            else:
                seqs.append(it.event.seq)
        if self.on_stored_scans is not None:
            scans = [it for it in stored if type(it.event) is Scan]
            if scans:
                self.on_stored_scans(scans)
        now = now_ms()
        for conn, seqs in acks.items():
            target = conn if not conn.closed else self.sessions.get(conn.key)
            if target is not None and target.welcomed:
                target.channel.write(frames.ack(seqs))
                metrics.ACK_SECONDS.observe((now - oldest[conn]) / 1000)
        unavailable: dict[DriverConn, list[int]] = {}
        for it, code, message in refused:
            conn = it.owner if not it.owner.closed else self.sessions.get(it.owner.key)
            if conn is None or not conn.welcomed:
                continue
            if code == "unavailable":
                unavailable.setdefault(conn, []).append(it.event.seq)
            else:
                conn.channel.write(frames.error(code, message, seq=it.event.seq))
        for conn, seqs in unavailable.items():
            conn.channel.write(frames.error("unavailable", "cannot store now; resend later", seqs=seqs,
                                            retry_ms=2000))

    # -- live status ----------------------------------------------------------------------------

    def _on_status(self, live: bool) -> None:
        frame = frames.encode({"type": "status", "live": live, **({} if live else {"reason": "broker unavailable"})})
        for dash in self.hub.dashboards():
            dash.channel.write(frame)
        if live:  # what was missed while the feed was down: a fresh snapshot for everyone
            for dash in self.hub.dashboards():
                dash.live = False
                dash.take()
                self.spawn(send_snapshot(self, dash))

    async def drain(self) -> None:
        """Rolling deploy: stop taking events, commit and ack what is buffered, close with 1012."""
        self.draining = True
        await self.writer.drain(self.settings.shutdown_grace_s)
        closes = [c.channel.close(1012, "the instance is restarting") for c in list(self.sessions.values())]
        closes += [d.channel.close(1012, "the instance is restarting") for d in self.hub.dashboards()]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*closes, return_exceptions=True), 3.0)
