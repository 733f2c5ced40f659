"""RedisBroker's own behaviour on a real network that fails: what the conformance suite
(tests/test_broker_conformance.py) cannot say for every broker.

Each test runs a private redis-server, and the broker under test reaches it through a TCP proxy the
test may cut (harness/proxy.py); a second broker, connected directly, is the receiving instance.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from harness.proxy import Proxy
from harness.servers import RedisServer
from harness.wait import wait_until
from tracker.memory_broker import MemoryBroker
from tracker.protocol.events import Position
from tracker.protocol.live import pos_frame
from tracker.redis_broker import RedisBroker

assert MemoryBroker  # the conformance suite's other broker: nothing here applies to it


def _pos(driver: str, lts: int) -> tuple[str, str, int, bytes, bytes]:
    return ("p", driver, lts, b"", pos_frame(driver, Position(lts % 1000 + 1, lts, 1.0, 2.0)))


@pytest.fixture
async def proxied(private_redis: RedisServer) -> AsyncIterator[tuple[Proxy, RedisServer]]:
    proxy = await Proxy(private_redis.port).start()
    yield proxy, private_redis
    await proxy.close()


async def test_first_tick_after_a_partition_heals_is_delivered(proxied: tuple[Proxy, RedisServer], org: str) -> None:
    """A cut leaves the publisher's pooled connections dead. The first tick published after the
    network heals must still reach the other instance, and the feed must not flap: the sender
    keeps the tick when a pooled connection fails and sends it once more on a fresh one."""
    proxy, server = proxied
    pub = RedisBroker(f"redis://127.0.0.1:{proxy.port}/0", instance_id=f"pub-{uuid.uuid4().hex[:6]}")
    sub = RedisBroker(server.url, instance_id=f"sub-{uuid.uuid4().hex[:6]}")
    got: list[bytes] = []
    statuses: list[bool] = []
    sub.on_live = lambda o, msg: got.append(msg) if o == org else None
    pub.on_status = statuses.append
    for b in (pub, sub):
        b.start()
    try:
        await wait_until(lambda: pub.receiving and sub.receiving, 10, "both brokers to receive")
        await _follow(sub, org)
        # Several pooled connections in use at once, as under load: all of them die in the cut.
        await asyncio.gather(*(pub.live_state(org) for _ in range(6)))
        pub.publish(org, [_pos("d-1", 1_000)])
        await wait_until(lambda: len(got) == 1, 5, "the tick before the cut")

        proxy.cut()
        await wait_until(lambda: not pub.live, 10, "the publisher to notice the cut")
        pub.publish(org, [_pos("d-1", 1_500)])  # lost (live is best effort), as ticks during a cut are
        await asyncio.gather(*(pub.ping() for _ in range(6)))
        proxy.restore()
        await wait_until(lambda: pub.live and pub.receiving, 15, "the publisher's feed to come back")
        flips = len(statuses)
        pub.publish(org, [_pos("d-1", 2_000)])
        await wait_until(lambda: len(got) == 2, 5, "the first tick after the partition healed")
        assert b'"ts":2000' in got[1]
        assert statuses[flips:] == [], "the live feed flapped on the first publish after healing"
    finally:
        await asyncio.gather(pub.close(), sub.close())


async def _follow(broker: RedisBroker, org: str) -> None:
    follow = getattr(broker, "follow", None)  # before issue 17, every instance received every org
    if follow is not None:
        await follow(org)
