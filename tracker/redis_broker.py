"""Redis between instances: live fan-out over pub/sub, latest positions, presence.

Live frames are published per time window, not per event: `publish` queues, and the sender sends
everything queued at most every `window_ms` (default 5 ms) in one round trip: one Lua call for
every org of the window (tracker/lua/live.lua) keeps each driver's newest position (by live ts, so
a late event never overwrites a newer one) and publishes, in the same atomic step, one message per
org with the frames that became newest plus every scan, presence, package and alert frame. The
first frame after a quiet spell goes out at once; under load a window's frames share one call
(issue 13: Redis pays per call, not per position). A message on `trk:live:<org>` is lines
`<stamp>\\t<frame>` joined by `\\n` (orjson never emits a raw tab or newline), where `<stamp>` is empty
or a JSON array of the client ids entitled to the frame.

Each instance subscribes only to the live channels of the orgs that have dashboards here and to the
control channels (`trk:ctl:<org>`: kicks, stamps) of the orgs that have drivers here
(tracker/redis_sub.py), plus its own loop-back probe. Live delivery is best effort: when Redis is down,
ingest and acks go on (PostgreSQL does not depend on Redis) and dashboards are told with `status`
frames. A window that meets a connection the network left dead is kept and sent once more on a
fresh connection, so the first tick after a partition heals is not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from . import metrics
from .broker import BrokerUnavailable, Held, LiveItem, LiveState, Offline, Online, Registered
from .redis_keys import ORGS_KEY, SYNCED_KEY, clients
from .redis_lua import LIVE_LUA, PRESENCE_OFF_LUA, PRESENCE_ON_LUA, REFRESH_LUA, SWEEP_LUA, Call, Lua, live_calls
from .redis_sub import Subscriber

log = logging.getLogger("tracker.broker")

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


REFRESH_CHUNK: Final = 250  # connections per presence refresh call (~2 ms of Redis each)


def _by_org(conns: list[Any]) -> dict[str, list[int]]:
    """Indexes of `conns` per org (first field), in order: one script call per org."""
    groups: dict[str, list[int]] = {}
    for i, conn in enumerate(conns):
        groups.setdefault(conn[0], []).append(i)
    return groups


class RedisBroker:
    """The `Broker` on Redis: moves live frames between instances and keeps the shared live state."""

    def __init__(self, url: str, *, instance_id: str, presence_ttl_s: float = 30.0, window_ms: float = 5.0) -> None:
        self.url = url
        self.instance_id = instance_id
        self.presence_ttl_ms = int(presence_ttl_s * 1000)
        self.window_s = window_ms / 1000
        # The command client (a bounded pool; a command that meets a connection the network left
        # dead is sent once more at once, on a new one), a factory of subscriber clients, and the
        # names: all from what the URL names (one Redis, or a master found through Sentinel).
        self.redis, self._sub_client, self.naming, self._others = clients(url)
        self._pool = getattr(self.redis, "connection_pool", None)  # a cluster has one per node
        self._pending: dict[str, list[LiveItem]] = {}
        self._pending_count = 0
        self._send_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.probe_channel = f"trk:probe:{instance_id}"
        self._probe_sent = 0.0
        self.live = False
        self.on_live: Callable[[str, bytes], None] = lambda org, payload: None
        self.on_ctl: Callable[[list[str]], None] = lambda parts: None
        self.on_status: Callable[[bool], None] = lambda live: None
        self.max_pending = 200_000
        self.flushes = 0  # windows sent (one round trip each)
        self.sub = Subscriber(
            self._sub_client,
            self.naming,
            self.probe_channel,
            self._publish_probe,
            kick_channel=self.naming.kick_channel(instance_id),  # kicks of the connections registered here
            on_live=lambda org, msg: self.on_live(org, msg),
            on_ctl=lambda parts: self.on_ctl(parts),
            set_live=self._set_live,
        )

    async def _run(self, script: Lua, calls: list[Call], *, also: Callable[[Any], Any] | None = None) -> list[Any]:
        """Every call of `script` in one round trip (with `also`'s commands first, in the same
        pipeline); the script is loaded only if Redis does not have it yet."""
        for attempt in (0, 1):
            try:
                if self.naming.cluster:  # no EVALSHA in a cluster pipeline: each to its node, all at once
                    extra = [also(self.redis)] if also is not None else []
                    run = (self.redis.evalsha(script.sha, len(k), *k, *a) for k, a in calls)
                    done: list[Any] = await asyncio.gather(*extra, *run)
                    return done[len(extra) :]
                if len(calls) == 1 and also is None:
                    keys, args = calls[0]
                    return [await self.redis.evalsha(script.sha, len(keys), *keys, *args)]  # type: ignore[misc]
                async with self.redis.pipeline(transaction=False) as pipe:
                    if also is not None:
                        also(pipe)
                    for keys, args in calls:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    out: list[Any] = await pipe.execute()
                return out[len(out) - len(calls) :]
            except NoScriptError:
                if attempt:
                    raise
                await self.redis.script_load(script.text)  # type: ignore[no-untyped-call]
        raise AssertionError("unreachable")

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, org: str, items: list[LiveItem]) -> None:
        """Queue live frames of one org; sent with the rest of their window. Never awaits."""
        if self._pending_count > self.max_pending:  # Redis is slow or gone: live is best effort
            metrics.LIVE_FAILED.inc(len(items))
            return
        self._pending.setdefault(org, []).extend(items)
        self._pending_count += len(items)
        self._send_wake.set()

    async def _sender(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._send_wake.wait()
            self._send_wake.clear()
            started = loop.time()
            pending, self._pending, self._pending_count = self._pending, {}, 0
            await self._send(pending)
            rest = self.window_s - (loop.time() - started)
            if rest > 0:  # what arrives meanwhile waits for the next window: one call for all of it
                await asyncio.sleep(rest)

    async def _send(self, pending: dict[str, list[LiveItem]]) -> None:
        n = sum(len(v) for v in pending.values())
        calls = live_calls(self.naming, pending)
        for attempt in (0, 1):
            try:
                await self._run(LIVE_LUA, calls)
                metrics.LIVE_PUBLISHED.inc(n)
                self.flushes += 1
                return
            except RedisConnectionError as exc:
                if attempt == 0:  # a dead pooled connection: the others died with it; once more
                    log.debug("live publish met a dead connection (%s): sending again", exc)
                    if self._pool is not None:
                        await self._pool.disconnect(inuse_connections=False)
                    continue
                error: Exception = exc
            except (RedisError, OSError) as exc:
                error = exc
            metrics.LIVE_FAILED.inc(n)
            log.debug("live publish failed: %s", error)
            self._set_live(False)
            await asyncio.sleep(0.2)
            return

    # -- presence -----------------------------------------------------------------------------

    def _add_orgs(self, orgs: list[str]) -> Callable[[Any], Any]:
        return lambda pipe: pipe.sadd(ORGS_KEY, *orgs)

    @unavailable
    async def drivers_online(self, conns: list[Online]) -> list[Registered]:
        """Mark connections (org, driver, conn id, name, presence line) online, in order, each
        replacing any other of the same driver (lua/presence_on.lua: Redis's order is "newest")."""
        exp = int(time.time() * 1000) + self.presence_ttl_ms
        naming = self.naming
        groups = _by_org(conns)
        calls: list[Call] = []
        for org, idx in groups.items():
            args: list[Any] = [exp, naming.publish_command, naming.live_channel(org), naming.control_channel(org)]
            args += (org, self.sub.kick_channel)
            for i in idx:
                _, driver, conn, name, line = conns[i]
                args += (driver, conn, name or "", line)
            calls.append((naming.presence_keys(org), args))
        outs = await self._run(PRESENCE_ON_LUA, calls, also=self._add_orgs(list(groups)))
        answers: list[Registered | None] = [None] * len(conns)
        for idx, out in zip(groups.values(), outs, strict=True):
            for i, last, gen, current in zip(idx, out[0::3], out[1::3], out[2::3], strict=True):
                answers[i] = Registered(int(last.split(b"\t", 1)[0]) if last else 0, int(gen), bool(current))
        return answers  # type: ignore[return-value]

    def _presence3(self, org: str) -> list[str]:
        return [self.naming.key("pconn", org), self.naming.key("pstamp", org), self.naming.key("presence", org)]

    @unavailable
    async def drivers_offline(self, conns: list[Offline]) -> list[bool]:
        """Offline only where that connection is still the one that set the driver online."""
        naming = self.naming
        groups = _by_org(conns)
        calls: list[Call] = []
        for org, idx in groups.items():
            args: list[Any] = [naming.publish_command, naming.live_channel(org)]
            for i in idx:
                args += conns[i][1:]
            calls.append((self._presence3(org), args))
        answers = [False] * len(conns)
        for idx, out in zip(groups.values(), await self._run(PRESENCE_OFF_LUA, calls), strict=True):
            for i, went in zip(idx, out, strict=True):
                answers[i] = bool(went)
        return answers

    @unavailable
    async def refresh_presence(self, conns: list[Held], *, spread_s: float = 1.0) -> None:
        """Keep (org, driver, conn id, stamp) online for another TTL.

        In small calls spread over `spread_s`: Redis runs one script at a time, and a call for
        5,000 connections held every window's live publish and the subscriber for ~40 ms."""
        exp = int(time.time() * 1000) + self.presence_ttl_ms
        chunks = range(0, len(conns), REFRESH_CHUNK)
        pause = spread_s / max(1, len(chunks))
        for start in chunks:
            part = conns[start : start + REFRESH_CHUNK]
            groups = _by_org(part)
            calls: list[Call] = []
            for org, idx in groups.items():
                args: list[Any] = [exp]
                for i in idx:
                    args += part[i][1:]
                calls.append((self._presence3(org), args))
            await self._run(REFRESH_LUA, calls, also=self._add_orgs(list(groups)))
            await asyncio.sleep(pause)

    @unavailable
    async def sweep(self) -> int:
        """Per org, one atomic script: each expiry is published once however many instances sweep."""
        naming = self.naming
        members: set[bytes] = await self.redis.smembers(ORGS_KEY)  # type: ignore[misc,assignment]
        orgs = sorted(o.decode() for o in members)
        if not orgs:
            return 0
        now = int(time.time() * 1000)
        calls = [(self._presence3(o), [now, naming.publish_command, naming.live_channel(o)]) for o in orgs]
        return sum(int(n) for n in await self._run(SWEEP_LUA, calls))

    # -- snapshot reads -----------------------------------------------------------------------

    @unavailable
    async def live_state(self, org: str) -> LiveState:
        """(driver -> (live ts, newest pos frame), driver -> name, drivers online) of one org."""
        key = self.naming.key
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(key("lastpos", org))
            pipe.hgetall(key("names", org))
            pipe.zrangebyscore(key("presence", org), int(time.time() * 1000), "+inf")
            lastpos, names, online = await pipe.execute()
        positions = {}
        for driver, value in lastpos.items():
            lts, _stamp, frame = value.split(b"\t", 2)
            positions[driver.decode()] = (int(lts), frame)
        return (positions, {k.decode(): v.decode() for k, v in names.items()}, {d.decode() for d in online})

    @unavailable
    async def latest(self, org: str, driver: str) -> tuple[int, bytes, bytes] | None:
        value: bytes | None = await self.redis.hget(self.naming.key("lastpos", org), driver)  # type: ignore[misc,assignment]
        if value is None:
            return None
        lts, stamp, frame = value.split(b"\t", 2)
        return int(lts), stamp, frame

    # On a cluster the mark is a key in the org's slot: a restarted node loses it with the positions.
    @unavailable
    async def is_synced(self, org: str) -> bool:
        if self.naming.cluster:
            return bool(await self.redis.exists(self.naming.key("pgsynced", org)))
        return bool(await self.redis.hexists(SYNCED_KEY, org))  # type: ignore[misc]

    @unavailable
    async def mark_synced(self, org: str) -> None:
        if self.naming.cluster:
            await self.redis.set(self.naming.key("pgsynced", org), 1)
        else:
            await self.redis.hset(SYNCED_KEY, org, 1)  # type: ignore[misc]

    @unavailable
    async def publish_control(self, org: str, kind: str, payload: bytes) -> None:
        """To the instances holding drivers of `org` (on a cluster: the org's node only)."""
        publish = self.redis.spublish if self.naming.cluster else self.redis.publish
        await publish(self.naming.control_channel(org), kind.encode() + b"\t" + payload)

    @unavailable
    async def restore_positions(self, org: str, items: list[tuple[str, int, bytes]]) -> None:
        """Write back positions read from PostgreSQL (newest-only, never over a newer one)."""
        if items:
            # Published too: a dashboard that already has a newer one keeps it (hub checks ts).
            await self._run(LIVE_LUA, live_calls(self.naming, {org: [("p", d, lts, b"", f) for d, lts, f in items]}))

    # -- following ----------------------------------------------------------------------------

    async def follow(self, org: str) -> None:
        """Receive `org`'s live messages from now on; returns once Redis confirmed the subscription."""
        await self.sub.follow(self.naming.live_channel(org))

    def unfollow(self, org: str) -> None:
        """Stop receiving `org`'s live messages. Never awaits."""
        self.sub.unfollow(self.naming.live_channel(org))

    async def follow_control(self, org: str) -> None:
        """Receive `org`'s control messages from now on; returns once Redis confirmed it."""
        await self.sub.follow(self.naming.control_channel(org))

    def unfollow_control(self, org: str) -> None:
        """Stop receiving `org`'s control messages. Never awaits."""
        self.sub.unfollow(self.naming.control_channel(org))

    # -- lifecycle, status and probe ----------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sender(), name="broker-sender"),
            asyncio.create_task(self.sub.run(), name="broker-subscriber"),
            asyncio.create_task(self._prober(), name="broker-probe"),
        ]

    async def close(self) -> None:
        self._closing = True  # the feed ending now is the shutdown, not an interruption
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.redis.aclose(), 3)
        if self._pool is not None:
            await self._pool.disconnect()  # a pool we made is not closed by the client
        await asyncio.gather(*(asyncio.wait_for(o.aclose(), 3) for o in self._others), return_exceptions=True)

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
            return bool(await self.redis.ping())  # type: ignore[misc]
        except (RedisError, OSError):
            return False

    async def _publish_probe(self) -> None:
        await self.redis.publish(self.probe_channel, b"%f" % time.monotonic())

    async def _prober(self) -> None:
        """Loop-back probe: publish to our own channel; the subscriber must see it."""
        sub = self.sub
        while True:
            try:
                self._probe_sent = time.monotonic()
                await self._publish_probe()
            except (RedisError, OSError):
                self._set_live(False)
            await asyncio.sleep(1.0)
            # Deaf: published fine, yet nothing came back for a while (a busy loop is not deaf).
            if sub.subscribed and self._probe_sent - sub.probe_seen > 8.0 and sub.probe_seen:
                self._set_live(False)

    @property
    def receiving(self) -> bool:
        """Subscribed, and a probe published after this subscription was received back recently:
        a subscription that was only sent (not proven to deliver) is not receiving."""
        sub = self.sub
        return sub.subscribed and sub.probe_seen > 0 and time.monotonic() - sub.probe_seen < 8.5


def default_instance_id() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
