"""Redis between instances: live fan-out over pub/sub, latest positions, presence.

One publish per org per event-loop tick: a Lua script keeps each driver's newest position (by
live ts, so a late event never overwrites a newer one) and publishes, in the same atomic step,
the frames that became newest plus every scan, presence, package and alert frame. A message on
`trk:live:<org>` is lines `<stamp>\\t<frame>` joined by `\\n` (orjson never emits a raw tab or
newline), where `<stamp>` is empty or a JSON array of the client ids entitled to the frame.

Every instance holds one subscriber (`trk:live:*`, `trk:ctl`, and its own probe channel). The
subscriber proves it receives with a loop-back probe; a subscriber that is connected but deaf is
torn down and made again. Live delivery is best effort: when Redis is down, ingest and acks go on
(PostgreSQL does not depend on Redis) and dashboards are told with `status` frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics
from .broker import BrokerUnavailable, LiveItem, Registered

log = logging.getLogger("tracker.broker")

LUA_DIR: Final = Path(__file__).parent / "lua"


def _lua(name: str) -> str:
    return (LUA_DIR / name).read_text()


P = ParamSpec("P")
R = TypeVar("R")


def unavailable(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Redis's errors leave this module as `BrokerUnavailable` (the Broker contract)."""

    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except RedisError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped


LIVE_PREFIX: Final = "trk:live:"
CTL_CHANNEL: Final = "trk:ctl"
# A hash org -> 1, set once PostgreSQL's newest positions of an org were merged into Redis. A
# restarted Redis has lost it along with the positions, so the next snapshot merges again.
SYNCED_KEY: Final = "trk:pgsynced"
PUBLISH_CHUNK: Final = 2_000  # live items per published message
REFRESH_CHUNK: Final = 250  # connections per presence refresh call (~2 ms of Redis each)

LIVE_LUA: Final = _lua("live.lua")


def live_args(org: str, items: list[LiveItem]) -> list[Any]:
    """LIVE_LUA's arguments for one org's items of a tick."""
    drivers: list[Any] = []
    ltss: list[Any] = []
    plines: list[Any] = []
    always: list[Any] = []
    for kind, driver, lts, stamp, frame in items:
        if kind == "p":
            drivers.append(driver)
            ltss.append(lts)
            plines.append(stamp + b"\t" + frame)
        else:
            always.append(stamp + b"\t" + frame)
    return [org, len(drivers), *drivers, *ltss, *plines, *always]


class FastPacking:
    """hiredis packs commands in C, ~15x faster than redis-py's Python packer: it matters when one
    call carries a tick's worth of items."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class FastConnection(FastPacking, aioredis.Connection):
    pass


class FastUnixConnection(FastPacking, aioredis.UnixDomainSocketConnection):
    pass


PRESENCE_ON_LUA: Final = _lua("presence_on.lua")

PRESENCE_OFF_LUA: Final = _lua("presence_off.lua")

REFRESH_LUA: Final = _lua("presence_refresh.lua")

SWEEP_LUA: Final = _lua("presence_sweep.lua")


class RedisBroker:
    """The `Broker` on Redis: moves live frames between instances and keeps the shared live state."""

    def __init__(self, url: str, *, instance_id: str, presence_ttl_s: float = 30.0) -> None:
        self.url = url
        self.instance_id = instance_id
        self.presence_ttl_ms = int(presence_ttl_s * 1000)
        # A bounded pool: callers queue for a connection instead of opening thousands.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=32, timeout=5, socket_timeout=3, socket_connect_timeout=2, health_check_interval=10
        )
        pool.connection_class = (
            FastUnixConnection
            if issubclass(pool.connection_class, aioredis.UnixDomainSocketConnection)
            else FastConnection
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self._live = self.redis.register_script(LIVE_LUA)
        self._on = self.redis.register_script(PRESENCE_ON_LUA)
        self._off = self.redis.register_script(PRESENCE_OFF_LUA)
        self._refresh = self.redis.register_script(REFRESH_LUA)
        self._sweep = self.redis.register_script(SWEEP_LUA)
        self._pending: dict[str, list[LiveItem]] = {}
        self._pending_count = 0
        self._send_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.probe_channel = f"trk:probe:{instance_id}"
        self._probe_sent = 0.0
        self._probe_seen = 0.0
        self._subscribed_at = 0.0
        self.subscribed = False
        self.live = False
        self.on_live: Callable[[str, bytes], None] = lambda org, payload: None
        self.on_ctl: Callable[[list[str]], None] = lambda parts: None
        self.on_status: Callable[[bool], None] = lambda live: None
        self.max_pending = 200_000

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, org: str, items: list[LiveItem]) -> None:
        """Queue live frames of one org; sent in one pipelined round trip per tick. Never awaits."""
        if self._pending_count > self.max_pending:  # Redis is slow or gone: live is best effort
            metrics.LIVE_FAILED.inc(len(items))
            return
        self._pending.setdefault(org, []).extend(items)
        self._pending_count += len(items)
        self._send_wake.set()

    async def _sender(self) -> None:
        while True:
            await self._send_wake.wait()
            self._send_wake.clear()
            pending, self._pending, self._pending_count = self._pending, {}, 0
            n = sum(len(v) for v in pending.values())
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for org, items in pending.items():
                        # Bounded messages: a backlog after a slow round trip must not become one
                        # multi-megabyte message that every instance and dashboard chokes on.
                        for start in range(0, len(items), PUBLISH_CHUNK):
                            await self._live(args=live_args(org, items[start : start + PUBLISH_CHUNK]), client=pipe)
                    await pipe.execute()
                metrics.LIVE_PUBLISHED.inc(n)
            except (RedisError, OSError) as exc:
                metrics.LIVE_FAILED.inc(n)
                log.debug("live publish failed: %s", exc)
                self._set_live(False)
                await asyncio.sleep(0.2)

    # -- presence -----------------------------------------------------------------------------

    @unavailable
    async def drivers_online(self, conns: list[tuple[str, str, str, str | None, bytes]]) -> list[Registered]:
        """Mark connections (org, driver, conn id, name, presence line) online, in order, each
        replacing any other of the same driver (lua/presence_on.lua: Redis's order is "newest")."""
        args: list[Any] = [int(time.time() * 1000) + self.presence_ttl_ms]
        for org, driver, conn, name, line in conns:
            args += (org, driver, conn, name or "", line)
        out = await self._on(args=args)
        return [
            Registered(int(last.split(b"\t", 1)[0]) if last else 0, int(gen), bool(current))
            for last, gen, current in zip(out[0::3], out[1::3], out[2::3], strict=True)
        ]

    @unavailable
    async def drivers_offline(self, conns: list[tuple[str, str, str, bytes]]) -> list[bool]:
        """Offline only where that connection is still the one that set the driver online."""
        args: list[Any] = []
        for item in conns:
            args += item
        return [bool(v) for v in await self._off(args=args)]

    @unavailable
    async def refresh_presence(self, conns: list[tuple[str, str, str, bytes]], *, spread_s: float = 1.0) -> None:
        """Keep (org, driver, conn id, stamp) online for another TTL.

        In small calls spread over `spread_s`: Redis runs one script at a time, and a call for
        5,000 connections held every tick's live publish and the subscriber for ~40 ms."""
        exp = int(time.time() * 1000) + self.presence_ttl_ms
        chunks = range(0, len(conns), REFRESH_CHUNK)
        pause = spread_s / max(1, len(chunks))
        for start in chunks:
            args: list[Any] = [exp]
            for item in conns[start : start + REFRESH_CHUNK]:
                args += item
            await self._refresh(args=args)
            await asyncio.sleep(pause)

    @unavailable
    async def sweep(self) -> int:
        return int(await self._sweep(args=[int(time.time() * 1000)]))

    # -- snapshot reads -----------------------------------------------------------------------

    @unavailable
    async def live_state(self, org: str) -> tuple[dict[str, tuple[int, bytes]], dict[str, str], set[str]]:
        """(driver -> (live ts, newest pos frame), driver -> name, drivers online) of one org."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"trk:lastpos:{org}")
            pipe.hgetall(f"trk:names:{org}")
            pipe.zrangebyscore(f"trk:presence:{org}", int(time.time() * 1000), "+inf")
            lastpos, names, online = await pipe.execute()
        positions = {}
        for driver, value in lastpos.items():
            lts, _stamp, frame = value.split(b"\t", 2)
            positions[driver.decode()] = (int(lts), frame)
        return (positions, {k.decode(): v.decode() for k, v in names.items()}, {d.decode() for d in online})

    @unavailable
    async def latest(self, org: str, driver: str) -> tuple[int, bytes, bytes] | None:
        value: bytes | None = await self.redis.hget(f"trk:lastpos:{org}", driver)  # type: ignore[misc,assignment]
        if value is None:
            return None
        lts, stamp, frame = value.split(b"\t", 2)
        return int(lts), stamp, frame

    @unavailable
    async def is_synced(self, org: str) -> bool:
        return bool(await self.redis.hexists(SYNCED_KEY, org))  # type: ignore[misc]

    @unavailable
    async def mark_synced(self, org: str) -> None:
        await self.redis.hset(SYNCED_KEY, org, 1)  # type: ignore[misc]

    @unavailable
    async def publish_control(self, kind: str, payload: bytes) -> None:
        await self.redis.publish(CTL_CHANNEL, kind.encode() + b"\t" + payload)

    @unavailable
    async def restore_positions(self, org: str, items: list[tuple[str, int, bytes]]) -> None:
        """Write back positions read from PostgreSQL (newest-only, never over a newer one)."""
        if items:
            # Published too: a dashboard that already has a newer one keeps it (hub checks ts).
            await self._live(args=live_args(org, [("p", d, lts, b"", f) for d, lts, f in items]))

    # -- subscriber and probe -----------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sender(), name="broker-sender"),
            asyncio.create_task(self._subscriber(), name="broker-subscriber"),
            asyncio.create_task(self._prober(), name="broker-probe"),
        ]

    async def close(self) -> None:
        self._closing = True  # the feed ending now is the shutdown, not an interruption
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()  # a pool we made is not closed by the client

    _was_live = False  # the first "live" is the start, not a restoration
    _closing = False

    def _set_live(self, live: bool) -> None:
        metrics.BROKER_LIVE.set(1 if live else 0)
        if live != self.live:
            self.live = live
            if live and not self._was_live:
                log.info("live feed up")
            elif self._closing:
                log.info("live feed closed")
            else:
                log.warning("live feed %s", "restored" if live else "interrupted")
            self._was_live = self._was_live or live
            self.on_status(live)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def _prober(self) -> None:
        """Loop-back probe: publish to our own channel; the subscriber must see it."""
        while True:
            try:
                self._probe_sent = time.monotonic()
                await self.redis.publish(self.probe_channel, b"%f" % self._probe_sent)
            except (RedisError, OSError):
                self._set_live(False)
            await asyncio.sleep(1.0)
            # Deaf: published fine, yet nothing came back for a while (a busy loop is not deaf).
            if self.subscribed and self._probe_sent - self._probe_seen > 8.0 and self._probe_seen:
                self._set_live(False)

    @property
    def receiving(self) -> bool:
        """Subscribed, and a probe published after this subscription was received back recently:
        a subscription that was only sent (not proven to deliver) is not receiving."""
        return self.subscribed and self._probe_seen > 0 and time.monotonic() - self._probe_seen < 8.5

    async def _subscriber(self) -> None:
        backoff = 0.1
        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=2)
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(LIVE_PREFIX + "*")
                await pubsub.subscribe(CTL_CHANNEL, self.probe_channel)
                self.subscribed = True
                self._probe_seen = 0.0  # receiving only once a probe came back on this subscription
                self._subscribed_at = time.monotonic()
                with contextlib.suppress(RedisError, OSError):  # the first proof now, not in a second
                    await self.redis.publish(self.probe_channel, b"%f" % time.monotonic())
                backoff = 0.1
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                log.debug("subscriber lost: %s", exc)
            finally:
                self.subscribed = False
                self._set_live(False)
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _listen(self, pubsub: Any) -> None:
        prefix_len = len(LIVE_PREFIX)
        probe = self.probe_channel.encode()
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                if time.monotonic() - max(self._probe_seen, self._subscribed_at) > 10.0:
                    log.warning("subscriber is connected but receives nothing: reconnecting")
                    return
                continue
            channel: bytes = msg["channel"]
            try:
                if msg["type"] == "pmessage":
                    self.on_live(channel[prefix_len:].decode(), msg["data"])
                elif channel == probe:
                    self._probe_seen = time.monotonic()
                    if not self.live:
                        self._set_live(True)
                else:
                    self.on_ctl(msg["data"].decode().split("\t"))
            except Exception:  # one bad message must not kill the subscriber
                log.exception("error while handling a message on %r", channel)


def default_instance_id() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
