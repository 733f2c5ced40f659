"""The subscriber's view of a Redis Cluster: what redis-py's `PubSub` offers the subscriber
(tracker/redis_sub.py), over sharded pub/sub.

Classic channels (the probe, the previous release's `trk:ctl`) are subscribed on one node: a
classic PUBLISH reaches every node. Each org's live and control channels (`trk:live:{<org>}`,
`trk:ctl:{<org>}`: hash-tagged) are SSUBSCRIBEd on the node that owns the org's slot, so a message
crosses no cluster bus and reaches only the instances that follow the org. Every
node's connection is read by a task of its own into one queue (no node waits behind another's
read timeout). Any failure (a node down, a slot moved away: Redis then unsubscribes its channels
itself) ends this view: the subscriber reconnects, with the cluster's slot map read again, and
subscribes every followed org on its current owner; dashboards get a fresh snapshot then.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError


def sharded(channel: bytes) -> bool:
    """An org's channel (live or control): hash-tagged, in the org's slot."""
    return channel.endswith(b"}") and b"{" in channel


class ClusterSubscribing:
    """What the subscriber's `connect` returns on a cluster: `.pubsub()` and `.aclose()`."""

    def __init__(self, nodes: list[tuple[str, int]], auth: dict[str, Any]) -> None:
        self.auth = auth
        self.cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes], socket_connect_timeout=2, **auth
        )

    def pubsub(self) -> ShardedPubSub:
        return ShardedPubSub(self)

    async def aclose(self) -> None:
        await self.cluster.aclose()


class ShardedPubSub:
    def __init__(self, owner: ClusterSubscribing) -> None:
        self.owner = owner
        self.cluster = owner.cluster
        self._queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._pubsubs: dict[str, Any] = {}  # node name ("" for the classic channels) -> PubSub
        self._clients: list[aioredis.Redis] = []
        self._readers: list[asyncio.Task[None]] = []
        self._where: dict[bytes, str] = {}  # org channel -> the node it is subscribed on
        self._leaving: set[bytes] = set()  # org channels we unsubscribed (their reply is ours)
        self._ready = False

    async def _pubsub(self, name: str, host: str, port: Any) -> Any:
        pubsub = self._pubsubs.get(name)
        if pubsub is None:
            # No silent reconnection: a lost node must end this view, so that the feed is reported
            # interrupted and every dashboard gets a fresh snapshot once it is back.
            client = aioredis.Redis(
                host=host, port=port, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0), **self.owner.auth
            )
            self._clients.append(client)
            pubsub = self._pubsubs[name] = client.pubsub()
        return pubsub

    async def subscribe(self, *channels: str) -> None:
        if not self._ready:  # the slot map as it is now (after a failure: as it is after it)
            await self.cluster.initialize()
            await self.cluster.nodes_manager.initialize()
            self._ready = True
        for channel in channels:
            raw = channel.encode()
            if not sharded(raw):
                node = self.cluster.get_default_node() or self.cluster.get_random_node()
                new = "" not in self._pubsubs
                pubsub = await self._pubsub("", node.host, node.port)
                await pubsub.subscribe(channel)
            else:
                owner = self.cluster.get_node_from_key(channel)
                if owner is None:
                    raise RedisConnectionError(f"no node owns the slot of {channel!r}")
                node = owner
                new = node.name not in self._pubsubs
                pubsub = await self._pubsub(node.name, node.host, node.port)
                self._leaving.discard(raw)
                self._where[raw] = node.name
                await pubsub.ssubscribe(channel)
            if new:
                self._readers.append(asyncio.create_task(self._reader(pubsub), name="broker-cluster-reader"))

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            raw = channel.encode()
            name = self._where.pop(raw, None)
            if name is not None and name in self._pubsubs:
                self._leaving.add(raw)
                await self._pubsubs[name].sunsubscribe(channel)

    async def _reader(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None:
                    continue
                kind = msg["type"]
                if kind == "smessage":
                    msg["type"] = "message"
                elif kind == "ssubscribe":
                    msg["type"] = "subscribe"
                elif kind == "sunsubscribe":
                    channel = msg["channel"]
                    if channel not in self._leaving:  # Redis moved the slot away: read the map again
                        raise RedisConnectionError(f"the slot of {channel!r} moved")
                    self._leaving.discard(channel)
                    msg["type"] = "unsubscribe"
                self._queue.put_nowait(msg)
        except (RedisError, OSError) as exc:
            self._queue.put_nowait(exc)

    async def get_message(self, timeout: float = 1.0, **_: Any) -> dict[str, Any] | None:
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives while the
        # queue has just handed it an item (it returns the item), and the subscriber, cancelled by
        # RedisBroker.close, read on: close waited for it forever (the conformance suite on a
        # cluster hung in teardown). asyncio.timeout re-raises the cancellation.
        try:
            async with asyncio.timeout(timeout):
                item = await self._queue.get()
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for pubsub in self._pubsubs.values():
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
        for client in self._clients:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
