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


async def test_two_databases_on_one_server_do_not_hear_each_other(private_redis: RedisServer, org: str) -> None:
    """Keys belong to a database, pub/sub channels to the whole server: two deployments on one
    Redis with different /<db> numbers (or a test suite beside a running service) must not receive
    each other's live frames or control messages. Each database's own instances still do."""
    base = f"redis://127.0.0.1:{private_redis.port}"
    brokers = {
        name: RedisBroker(f"{base}/{db}", instance_id=f"{name}-{uuid.uuid4().hex[:6]}")
        for name, db in (("a1", 0), ("a2", 0), ("b", 3))
    }
    live: dict[str, list[bytes]] = {name: [] for name in brokers}
    ctl: dict[str, list[list[str]]] = {name: [] for name in brokers}
    for name, b in brokers.items():
        b.on_live = lambda o, msg, name=name: live[name].append(msg) if o == org else None
        b.on_ctl = lambda parts, name=name: ctl[name].append(parts) if parts[-1] == org else None
        b.start()
    try:
        await wait_until(lambda: all(b.receiving for b in brokers.values()), 10, "every broker to receive")
        for b in brokers.values():
            await _follow(b, org)
            await b.follow_control(org)
        brokers["a1"].publish(org, [_pos("d-1", 1_000)])
        await brokers["a1"].publish_control(org, "kick", f"x\t{org}".encode())
        await wait_until(lambda: live["a2"] and ctl["a2"], 5, "database 0's other instance to hear both")
        brokers["b"].publish(org, [_pos("d-2", 2_000)])
        await wait_until(lambda: any(b'"ts":2000' in m for m in live["b"]), 5, "database 3's own frame")
        await asyncio.sleep(0.3)  # room for a stray message to arrive
        assert not any(b'"ts":1000' in m for m in live["b"]) and ctl["b"] == [], "database 3 heard database 0"
        assert not any(b'"ts":2000' in m for m in live["a2"]), "database 0 heard database 3"
    finally:
        await asyncio.gather(*(b.close() for b in brokers.values()))
