"""The `Broker` in this process: live fan-out, latest positions and presence without Redis.

For fast unit tests, and to run a node in a single process. Several `MemoryBroker`s may share one
`MemoryBus` (what one Redis is to several `RedisBroker`s), so multi-instance behaviour (kick,
sweep once, control messages) can be tested in one event loop; tests/test_broker_conformance.py
runs the same suite against both implementations.

It keeps the Redis one's contract, step for step (tracker/lua/*.lua): positions are newest-only by
live ts, a message is lines `<stamp>\\t<frame>` joined by `\\n` and led by `#<ms>` for a tick's
publish, presence goes offline only from the connection that set it online, and an expiry is
published once however many instances sweep. Every state change is atomic (it never awaits), and
messages reach every started broker of the bus that follows their org (control messages: that
follows the org's control messages) in publish order, from the event loop, never from
inside the publisher's call. `MemoryBus.down()` / `up()` simulate an outage: awaited calls raise
`BrokerUnavailable` (the Broker contract), live frames are dropped, and every broker reports
`on_status(False)`, then `on_status(True)`; `MemoryBus.wipe()` is a restarted store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from . import metrics
from .broker import BrokerUnavailable, Held, LiveItem, LiveState, Offline, Online, Registered
from .clock import now_ms
from .protocol.live import presence_frame

log = logging.getLogger("tracker.memory_broker")


@dataclass
class _OrgState:
    """One org's shared state (Redis: trk:lastpos, trk:names, trk:pconn, trk:pstamp, trk:presence)."""

    lastpos: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # driver -> (live ts, frame)
    laststamp: dict[str, bytes] = field(default_factory=dict)  # driver -> the stamp of its lastpos
    names: dict[str, str] = field(default_factory=dict)
    conn: dict[str, str] = field(default_factory=dict)  # driver -> the connection that set it online
    stamp: dict[str, bytes] = field(default_factory=dict)  # driver -> stamp of its presence frames
    expiry: dict[str, int] = field(default_factory=dict)  # driver -> online until (ms)
    inst: dict[str, str] = field(default_factory=dict)  # driver -> the instance that registered it last


class MemoryBus:
    """The state and the pub/sub that the `MemoryBroker`s of one test (or one process) share."""

    def __init__(self, *, clock: Callable[[], int] = now_ms) -> None:
        self.clock = clock  # ms since the epoch; a test may pass a fake one to expire presence at will
        self.orgs: dict[str, _OrgState] = {}
        self.synced: set[str] = set()
        self.is_up = True
        # The last connection generation given; survives `wipe`, as Redis's clock does (presence_on.lua).
        self.generation = 0
        self.brokers: list[MemoryBroker] = []  # started and not closed: the subscribers

    def org(self, org: str) -> _OrgState:
        state = self.orgs.get(org)
        if state is None:
            state = self.orgs[org] = _OrgState()
        return state

    def down(self) -> None:
        """An outage: the store neither answers nor delivers; every broker reports it."""
        self.is_up = False
        for broker in self.brokers:
            broker._schedule_status(False)

    def up(self) -> None:
        """The store is back (with its state, as after a network partition)."""
        self.is_up = True
        for broker in self.brokers:
            broker._schedule_status(True)

    def wipe(self) -> None:
        """Lose every position, name, presence and synced flag, as a restarted Redis does."""
        self.orgs.clear()
        self.synced.clear()

    def check(self) -> None:
        if not self.is_up:
            raise BrokerUnavailable("the memory bus is down")

    def publish_live(self, org: str, message: bytes) -> None:
        for broker in self.brokers:
            if org in broker.following:  # as a Redis subscription: decided when published
                broker._schedule(broker._deliver_live, org, message)

    def publish_control(self, org: str, message: str) -> None:
        parts = message.split("\t")
        for broker in self.brokers:
            if org in broker.controlling:  # as a Redis subscription: decided when published
                broker._schedule(broker._deliver_ctl, parts)

    def publish_kick(self, instance_id: str, message: str) -> None:
        """To the one instance `instance_id` (its own channel, subscribed from its start)."""
        parts = message.split("\t")
        for broker in self.brokers:
            if broker.instance_id == instance_id:
                broker._schedule(broker._deliver_ctl, parts)

    def apply_live(self, org: str, items: list[LiveItem]) -> int:
        """Keep each driver's newest position and publish, in one step, the positions that became
        newest and every always-published item (tracker/lua/live.lua); returns the lines published."""
        state = self.org(org)
        lastpos = state.lastpos
        positions: list[bytes] = []
        always: list[bytes] = []
        for kind, driver, lts, stamp, frame in items:
            if kind != "p":
                always.append(stamp + b"\t" + frame)
                continue
            have = lastpos.get(driver)
            if have is None or have[0] < lts:
                lastpos[driver] = (lts, frame)
                state.laststamp[driver] = stamp
                positions.append(stamp + b"\t" + frame)
        lines = positions + always
        if lines:
            self.publish_live(org, b"\n".join([b"#%d" % self.clock(), *lines]))
        return len(lines)


class MemoryBroker:
    """The `Broker` on a `MemoryBus`: what `RedisBroker` does, with no I/O."""

    def __init__(self, bus: MemoryBus | None = None, *, instance_id: str = "", presence_ttl_s: float = 30.0) -> None:
        self.bus = bus if bus is not None else MemoryBus()
        self.instance_id = instance_id or f"memory-{uuid.uuid4().hex[:8]}"
        self.presence_ttl_ms = int(presence_ttl_s * 1000)
        self.live = False
        self.on_live: Callable[[str, bytes], None] = lambda org, payload: None
        self.on_ctl: Callable[[list[str]], None] = lambda parts: None
        self.on_status: Callable[[bool], None] = lambda live: None
        self._pending: dict[str, list[LiveItem]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.following: set[str] = set()
        self.controlling: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the bus; `live` turns True on the next loop iteration if the bus is up."""
        self._loop = asyncio.get_running_loop()
        if self not in self.bus.brokers:
            self.bus.brokers.append(self)
        self._schedule_status(self.bus.is_up)

    async def close(self) -> None:
        """Unsubscribe; like RedisBroker's, reports `on_status(False)` if it was live."""
        self._set_live(False)
        if self in self.bus.brokers:
            self.bus.brokers.remove(self)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._loop = None

    @property
    def receiving(self) -> bool:
        """As RedisBroker's: only once the feed is proven live (the status delivered from the
        loop after `start`), never merely because `start` was called."""
        return self._loop is not None and self.bus.is_up and self.live

    async def ping(self) -> bool:
        await asyncio.sleep(0)
        return self.bus.is_up

    async def _round_trip(self) -> None:
        """Every awaited call yields once, as a network round trip would, then needs the bus up."""
        await asyncio.sleep(0)
        self.bus.check()

    # -- delivery -------------------------------------------------------------------------------

    def _schedule(self, callback: Callable[..., None], *args: object) -> None:
        if self._loop is not None:
            self._loop.call_soon(callback, *args)

    def _schedule_status(self, live: bool) -> None:
        self._schedule(self._set_live, live)

    def _set_live(self, live: bool) -> None:
        live = live and self.bus.is_up and self._loop is not None  # a stale "up" after a new "down"
        metrics.BROKER_LIVE.set(1 if live else 0)
        if live != self.live:
            self.live = live
            log.warning("live feed %s", "restored" if live else "interrupted")
            self.on_status(live)

    def _deliver_live(self, org: str, message: bytes) -> None:
        if self._loop is None:
            return
        try:
            self.on_live(org, message)
        except Exception:  # one bad message must not stop the others (as RedisBroker's subscriber)
            log.exception("error while handling a live message of org %r", org)

    def _deliver_ctl(self, parts: list[str]) -> None:
        if self._loop is None:
            return
        try:
            self.on_ctl(parts)
        except Exception:
            log.exception("error while handling a control message %r", parts[:1])

    # -- following ------------------------------------------------------------------------------

    async def follow(self, org: str) -> None:
        """Receive `org`'s messages published from now on (RedisBroker: once Redis confirmed)."""
        self.following.add(org)
        await asyncio.sleep(0)

    def unfollow(self, org: str) -> None:
        self.following.discard(org)

    async def follow_control(self, org: str) -> None:
        """Receive `org`'s control messages published from now on."""
        self.controlling.add(org)
        await asyncio.sleep(0)

    def unfollow_control(self, org: str) -> None:
        self.controlling.discard(org)

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, org: str, items: list[LiveItem]) -> None:
        """Queue one org's live frames; a tick's go out together, one message per org. Never awaits."""
        if not self.bus.is_up:  # live is best effort: nothing is kept for later
            metrics.LIVE_FAILED.inc(len(items))
            return
        self._pending.setdefault(org, []).extend(items)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        n = sum(len(items) for items in pending.values())
        if not self.bus.is_up:
            metrics.LIVE_FAILED.inc(n)
            return
        for org, items in pending.items():
            self.bus.apply_live(org, items)
        metrics.LIVE_PUBLISHED.inc(n)

    async def publish_control(self, org: str, kind: str, payload: bytes) -> None:
        await self._round_trip()
        self.bus.publish_control(org, kind + "\t" + payload.decode())

    # -- presence -------------------------------------------------------------------------------

    async def drivers_online(self, conns: list[Online]) -> list[Registered]:
        """tracker/lua/presence_on.lua: in order, publish each presence line, give the connection
        the driver's next generation, kick the connection it replaces; then say which are current."""
        await self._round_trip()
        bus = self.bus
        expiry = bus.clock() + self.presence_ttl_ms
        out: list[tuple[int, int]] = []
        for org, driver, conn, name, line in conns:
            state = bus.org(org)
            prev = state.conn.get(driver)
            prev_at = state.inst.get(driver)
            state.inst[driver] = self.instance_id
            gen = bus.generation = max(bus.generation + 1, bus.clock() * 1000)
            state.conn[driver] = conn
            state.stamp[driver] = line.partition(b"\t")[0]
            state.expiry[driver] = expiry
            if name:
                state.names[driver] = name
            bus.publish_live(org, line)
            if prev is not None and prev != conn:
                kick = f"kick\t{org}\t{driver}\t{conn}\t{gen}"
                if prev_at is not None:
                    bus.publish_kick(prev_at, kick)
                else:  # unknown (re-created by a refresh after a wipe): every instance with the org's drivers
                    bus.publish_control(org, kick)
            last = state.lastpos.get(driver)
            out.append((last[0] if last is not None else 0, gen))
        return [
            Registered(lts, gen, bus.org(org).conn.get(driver) == conn)
            for (org, driver, conn, _, _), (lts, gen) in zip(conns, out, strict=True)
        ]

    async def drivers_offline(self, conns: list[Offline]) -> list[bool]:
        """tracker/lua/presence_off.lua: offline only from the connection that set it online."""
        await self._round_trip()
        out: list[bool] = []
        for org, driver, conn, line in conns:
            state = self.bus.org(org)
            went = state.conn.get(driver) == conn
            if went:
                self._forget(state, driver)
                self.bus.publish_live(org, line)
            out.append(went)
        return out

    @staticmethod
    def _forget(state: _OrgState, driver: str) -> bytes:
        state.conn.pop(driver, None)
        state.expiry.pop(driver, None)
        return state.stamp.pop(driver, b"")

    async def refresh_presence(self, conns: list[Held], *, spread_s: float = 1.0) -> None:
        """tracker/lua/presence_refresh.lua: another TTL; re-creates what a wiped bus lost. One step
        (`spread_s` spreads Redis's work; here there is nothing to spread)."""
        await self._round_trip()
        expiry = self.bus.clock() + self.presence_ttl_ms
        for org, driver, conn, stamp in conns:
            state = self.bus.org(org)
            cur = state.conn.setdefault(driver, conn)
            if cur == conn:
                state.expiry[driver] = expiry
                state.stamp[driver] = stamp

    async def sweep(self) -> int:
        """tracker/lua/presence_sweep.lua: publish one offline per expired driver, once in all."""
        await self._round_trip()
        now = self.bus.clock()
        n = 0
        for org, state in list(self.bus.orgs.items()):
            for driver in [d for d, exp in state.expiry.items() if exp <= now]:
                stamp = self._forget(state, driver)
                self.bus.publish_live(org, stamp + b"\t" + presence_frame(driver, False, now))
                n += 1
        return n

    # -- snapshot reads -------------------------------------------------------------------------

    async def live_state(self, org: str) -> LiveState:
        await self._round_trip()
        state = self.bus.org(org)
        now = self.bus.clock()
        online = {d for d, exp in state.expiry.items() if exp >= now}
        return dict(state.lastpos), dict(state.names), online

    async def latest(self, org: str, driver: str) -> tuple[int, bytes, bytes] | None:
        await self._round_trip()
        state = self.bus.org(org)
        kept = state.lastpos.get(driver)
        return None if kept is None else (kept[0], state.laststamp.get(driver, b""), kept[1])

    async def restore_positions(self, org: str, items: list[tuple[str, int, bytes]]) -> None:
        """Newest-only, and published like a tick's positions (as RedisBroker does)."""
        await self._round_trip()
        if items:
            self.bus.apply_live(org, [("p", d, lts, b"", f) for d, lts, f in items])

    async def is_synced(self, org: str) -> bool:
        await self._round_trip()
        return org in self.bus.synced

    async def mark_synced(self, org: str) -> None:
        await self._round_trip()
        self.bus.synced.add(org)
