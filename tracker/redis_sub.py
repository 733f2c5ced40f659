"""RedisBroker's subscriber: one connection that receives what this instance needs, and proves it.

It is subscribed to its own probe and kick channels, to `trk:live:<org>` for each org that has a
dashboard here and to `trk:ctl:<org>` for each org that has a driver here (`follow` / `unfollow` of a
channel), never to every org: an instance without dashboards receives no live traffic, one with
one org's dashboards receives about that org's share, and an org's control messages (kicks,
stamps) reach only the instances holding its drivers (issue 17). It also listens to the previous
release's control channel `trk:ctl` (quiet once every instance runs this release). Subscription
changes are sent on the listening connection and confirmed by Redis's replies, in order; `follow`
returns only once its subscription is confirmed, so a message published after it returns is
received (a dashboard's snapshot is read after that; a driver's connection is registered after
that: nothing lost between).

The subscriber proves it receives with a loop-back probe; one that is connected but deaf is torn
down and made again, and every wanted channel is subscribed again on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from redis.exceptions import RedisError

from . import metrics
from .redis_keys import Naming

log = logging.getLogger("tracker.broker")

FOLLOW_TIMEOUT_S: Final = 3.0  # a subscription not confirmed by then: the deaf check takes over


class Subscriber:
    """Owns the subscribing connection. `connect` makes a fresh redis-py client for it."""

    def __init__(
        self,
        connect: Callable[[], Any],
        naming: Naming,
        probe_channel: str,
        publish_probe: Callable[[], Any],
        *,
        kick_channel: str,
        on_live: Callable[[str, bytes], None],
        on_ctl: Callable[[list[str]], None],
        set_live: Callable[[bool], None],
    ) -> None:
        self._connect = connect
        self.naming = naming
        self.probe_channel = probe_channel
        self.kick_channel = kick_channel
        self._publish_probe = publish_probe
        self.on_live = on_live
        self.on_ctl = on_ctl
        self._set_live = set_live
        self.wanted: set[str] = set()  # channels: orgs with a dashboard (live), or a driver (ctl) here
        self._sent: set[str] = set()  # channels subscribed (or being subscribed) on this connection
        self._inflight: dict[str, int] = {}  # channel -> subscribe commands sent, not confirmed yet
        self.confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._changed = asyncio.Event()
        self._pubsub: Any = None
        self.subscribed = False
        self.probe_seen = 0.0
        self.subscribed_at = 0.0
        self.received_bytes = 0  # live bytes received (messages of followed orgs), for /metrics
        self.received_messages = 0
        self.control_messages = 0  # control messages received (kicks, stamps), for /metrics

    # -- following ------------------------------------------------------------------------------

    async def follow(self, channel: str) -> None:
        """Subscribe to `channel`; return once Redis confirmed it (or at once while not subscribed:
        the feed's return resnapshots every dashboard, and subscribes every wanted channel)."""
        if channel in self.confirmed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        self.wanted.add(channel)
        self._changed.set()
        if not self.subscribed:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FOLLOW_TIMEOUT_S):  # not wait_for: see tracker/redis_cluster.py
                await asyncio.shield(waiter)

    def unfollow(self, channel: str) -> None:
        """Stop receiving `channel` (sent in order with later subscriptions). Never awaits."""
        self.wanted.discard(channel)
        self.confirmed.discard(channel)
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)
        self._changed.set()

    async def _sync(self, pubsub: Any) -> None:
        """Send what changed in `wanted` on this connection, in order, for as long as it lives."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            add = sorted(self.wanted - self._sent)
            drop = sorted(self._sent - self.wanted)
            if drop:
                self._sent.difference_update(drop)
                await pubsub.unsubscribe(*drop)
            if add:
                self._sent.update(add)
                for channel in add:
                    self._inflight[channel] = self._inflight.get(channel, 0) + 1
                await pubsub.subscribe(*add)

    def _confirm(self, kind: str, channel: str) -> None:
        if kind == "subscribe":
            left = self._inflight.get(channel, 1) - 1
            if left > 0:
                self._inflight[channel] = left
                return
            self._inflight.pop(channel, None)
            if channel in self._sent and channel in self.wanted:
                self.confirmed.add(channel)
                for waiter in self._waiters.pop(channel, ()):
                    if not waiter.done():
                        waiter.set_result(None)
        elif channel not in self._sent:  # an unsubscribe reply: a later subscribe may be in flight
            self.confirmed.discard(channel)

    # -- the connection ---------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.1
        while True:
            client = self._connect()
            pubsub = client.pubsub()
            sync: asyncio.Task[None] | None = None
            try:
                await pubsub.subscribe(self.naming.ctl_channel, self.probe_channel, self.kick_channel)
                self._sent, self._inflight, self.confirmed = set(), {}, set()
                self._pubsub = pubsub
                self.subscribed = True
                self.probe_seen = 0.0  # receiving only once a probe came back on this subscription
                self.subscribed_at = time.monotonic()
                self._changed.set()
                sync = asyncio.create_task(self._sync(pubsub), name="broker-subscriptions")
                with contextlib.suppress(RedisError, OSError):  # the first proof now, not in a second
                    await self._publish_probe()
                backoff = 0.1
                await self._listen(pubsub, sync)
            except (RedisError, OSError) as exc:
                log.debug("subscriber lost: %s", exc)
            finally:
                self.subscribed = False
                self._pubsub = None
                self.confirmed = set()
                self._set_live(False)
                if sync is not None:
                    sync.cancel()
                    with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                        await sync
                # Each closed on its own (the client even when the pubsub's close failed): a
                # connection left open is a socket leaked until the garbage collector finds it.
                for closing in (pubsub, client):
                    with contextlib.suppress(RedisError, OSError, TimeoutError, RuntimeError):
                        async with asyncio.timeout(2):  # closing a connection to a node gone must not hang
                            await closing.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _listen(self, pubsub: Any, sync: asyncio.Task[None]) -> None:
        probe = self.probe_channel.encode()
        ctl = self.naming.ctl_channel.encode()
        fixed = (probe, ctl, self.kick_channel.encode())  # subscribed with the connection, not followed
        org_of = self.naming.org_of
        is_control = self.naming.is_control
        while True:
            if sync.done():
                sync.result()  # a failed subscription change: this connection is done
            msg = await pubsub.get_message(timeout=1.0)
            if msg is None:
                if time.monotonic() - max(self.probe_seen, self.subscribed_at) > 10.0:
                    log.warning("subscriber is connected but receives nothing: reconnecting")
                    return
                continue
            channel: bytes = msg["channel"]
            kind = msg["type"]
            try:
                if kind == "message" and channel != probe and not is_control(channel):
                    data: bytes = msg["data"]
                    self.received_bytes += len(data)
                    self.received_messages += 1
                    metrics.LIVE_RECEIVED_BYTES.inc(len(data))
                    metrics.LIVE_RECEIVED_MESSAGES.inc()
                    self.on_live(org_of(channel), data)
                elif kind == "message" and channel == probe:
                    self.probe_seen = time.monotonic()
                    self._set_live(True)
                elif kind == "message":
                    self.control_messages += 1
                    metrics.CONTROL_RECEIVED_MESSAGES.inc()
                    self.on_ctl(msg["data"].decode().split("\t"))
                elif kind in ("subscribe", "unsubscribe") and channel not in fixed:
                    self._confirm(kind, channel.decode())
            except Exception:  # one bad message must not kill the subscriber
                log.exception("error while handling a message on %r", channel)
