"""One conformance suite for every `Broker` (tracker/broker.py): RedisBroker on a real Redis and
MemoryBroker, through the public interface only.

Each test gets a factory of started brokers ("instances") sharing one store: for Redis, the
session's Redis (TRACKER_TEST_REDIS_URL or the embedded one) and a fresh org, whose keys are
deleted afterwards; for memory, a fresh `MemoryBus`. `lose_state` is the one back door: what a
restarted store forgets. The outage test runs Redis on a private redis-server that it kills and
starts again. Nothing here sleeps to wait for an effect: effects are waited on with a deadline,
and "was not published" is proven by a marker published after it, on the same channel.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from harness.redis_ha import RedisClusterSet
from harness.servers import RedisServer
from harness.wait import wait_until
from tracker.broker import Broker, BrokerUnavailable, LiveItem
from tracker.memory_broker import MemoryBroker, MemoryBus
from tracker.protocol.events import Position, Scan
from tracker.protocol.live import pos_frame, presence_frame, scan_frame
from tracker.redis_broker import RedisBroker

DEADLINE = 5.0
TTL_S = 0.8  # presence TTL of the expiry tests: short, yet eight refresh periods long


async def until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> None:
    await wait_until(predicate, timeout, what, interval=0.002)


@dataclass
class Peer:
    """One started broker and everything its callbacks were given."""

    broker: Broker
    live: list[tuple[str, bytes]] = field(default_factory=list)
    ctl: list[list[str]] = field(default_factory=list)
    status: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.broker.on_live = lambda org, msg: self.live.append((org, msg))
        self.broker.on_ctl = self._ctl
        self.broker.on_status = self.status.append

    def _ctl(self, parts: list[str]) -> None:
        # Pub/sub channels are server-wide, not per Redis database: other tests' instances on the
        # session's Redis publish their custody `stamp` messages on the same control channel.
        # This suite never sends that kind.
        if parts[0] != "stamp":
            self.ctl.append(parts)

    def messages(self, org: str) -> list[bytes]:
        return [msg for o, msg in self.live if o == org]

    def lines(self, org: str) -> list[bytes]:
        """Every `<stamp>\\t<frame>` line received for `org`, publish-time headers left out."""
        return [line for msg in self.messages(org) for line in msg.split(b"\n") if not line.startswith(b"#")]

    def frames(self, org: str) -> list[dict[str, Any]]:
        return [orjson.loads(line.partition(b"\t")[2]) for line in self.lines(org)]

    def offline(self, org: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Offline presence frames received (of every org if `org` is None)."""
        out = []
        for o, msg in self.live:
            for line in msg.split(b"\n"):
                if line.startswith(b"#") or (org is not None and o != org):
                    continue
                frame = orjson.loads(line.partition(b"\t")[2])
                if frame.get("type") == "presence" and frame["online"] is False:
                    out.append((o, frame))
        return out


class Harness:
    """Brokers of one implementation sharing one store, for one test on one org."""

    name = ""

    def __init__(self, org: str) -> None:
        self.org = org
        self.peers: list[Peer] = []

    def make(self, ttl_s: float) -> Broker:
        raise NotImplementedError

    async def peer(self, *, ttl_s: float = 30.0, follow: bool = True) -> Peer:
        """A started broker, proven to receive, following the live and control messages of the
        test's org and `<org>-other` (as an instance with dashboards and drivers of both does)
        unless `follow` is False."""
        peer = Peer(self.make(ttl_s))
        self.peers.append(peer)
        peer.broker.start()
        await until(lambda: peer.broker.receiving, f"{self.name} broker to receive")
        if follow:
            for org in (self.org, self.org + "-other"):
                await peer.broker.follow(org)
                await peer.broker.follow_control(org)
        return peer

    async def peers2(self, *, ttl_s: float = 30.0) -> tuple[Peer, Peer]:
        a, b = await asyncio.gather(self.peer(ttl_s=ttl_s), self.peer(ttl_s=ttl_s))
        return a, b

    async def lose_state(self) -> None:
        """The store forgets everything of this org (a restarted Redis)."""
        raise NotImplementedError

    async def outage(self) -> None:
        raise NotImplementedError

    async def recover(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        await asyncio.gather(*(p.broker.close() for p in self.peers))


class MemoryHarness(Harness):
    name = "memory"

    def __init__(self, org: str) -> None:
        super().__init__(org)
        self.bus = MemoryBus()

    def make(self, ttl_s: float) -> Broker:
        return MemoryBroker(self.bus, instance_id=f"mem-{len(self.peers)}", presence_ttl_s=ttl_s)

    async def lose_state(self) -> None:
        self.bus.wipe()

    async def outage(self) -> None:
        self.bus.down()

    async def recover(self) -> None:
        self.bus.up()


class RedisHarness(Harness):
    name = "redis"

    def __init__(self, org: str, url: str, server: RedisServer | None = None) -> None:
        super().__init__(org)
        self.url = url
        self.server = server

    def make(self, ttl_s: float) -> Broker:
        return RedisBroker(self.url, instance_id=f"conf-{uuid.uuid4().hex[:8]}", presence_ttl_s=ttl_s)

    async def lose_state(self) -> None:
        org = self.org
        client = aioredis.Redis.from_url(self.url)
        try:
            keys = [f"trk:{k}:{org}" for k in ("lastpos", "names", "pconn", "pstamp", "presence", "pgen", "pinst")]
            await client.delete(*keys)
            await client.hdel("trk:pgsynced", org)
            await client.srem("trk:orgs", org)
        finally:
            await client.aclose()

    async def outage(self) -> None:
        assert self.server is not None, "the outage test needs a private redis-server"
        self.server.kill()

    async def recover(self) -> None:
        assert self.server is not None
        await self.server.start()

    async def close(self) -> None:
        await super().close()
        if self.server is None:
            await self.lose_state()  # leave nothing that a later test's sweep would find


class ClusterHarness(RedisHarness):
    """RedisBroker on a three-master Redis Cluster (keys and channels hash-tagged per org)."""

    name = "cluster"

    async def lose_state(self) -> None:
        org = "{" + self.org + "}"
        host, port = self.url.removeprefix("redis+cluster://").split(",")[0].split(":")
        client = RedisCluster(host=host, port=int(port))
        try:
            for kind in ("lastpos", "names", "pconn", "pstamp", "presence", "pgen", "pinst", "pgsynced"):
                await client.delete(f"trk:{kind}:{org}")
            await client.srem("trk:orgs", self.org)  # type: ignore[misc]
        finally:
            await client.aclose()


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    """One three-master cluster for the module's cluster tests (each on a fresh org). Started from
    a thread of its own: the fixture is first asked for inside a test's running event loop."""
    with ThreadPoolExecutor(1) as pool:
        cluster = pool.submit(asyncio.run, RedisClusterSet().start()).result()
    yield cluster.url
    cluster.close()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def impl(request: pytest.FixtureRequest, org: str) -> AsyncIterator[Harness]:
    harness: Harness
    if request.param == "memory":
        harness = MemoryHarness(org)
    elif request.param == "redis":
        harness = RedisHarness(org, request.getfixturevalue("redis_url"))
    else:
        harness = ClusterHarness(org, request.getfixturevalue("cluster_url"))
    yield harness
    await harness.close()


@pytest.fixture(params=["memory", "redis"])
async def outage_impl(request: pytest.FixtureRequest, org: str) -> AsyncIterator[Harness]:
    """Like `impl`, on a store the test may take down: Redis is a private redis-server."""
    harness: Harness
    server: RedisServer | None = None
    if request.param == "memory":
        harness = MemoryHarness(org)
    else:
        server = await RedisServer().start()
        harness = RedisHarness(org, server.url, server)
    yield harness
    await harness.close()
    if server is not None:
        server.close()


# -- helpers ----------------------------------------------------------------------------------


def pos(driver: str, ts: int, lat: float = 1.0) -> bytes:
    return pos_frame(driver, Position(ts % 1000 + 1, ts, lat, 2.0))


def p_item(driver: str, lts: int, stamp: bytes = b"", lat: float = 1.0) -> LiveItem:
    return ("p", driver, lts, stamp, pos(driver, lts, lat))


def a_item(driver: str, ts: int, package: str = "pk-1", stamp: bytes = b"") -> LiveItem:
    return ("a", driver, ts, stamp, scan_frame(driver, Scan(ts % 1000 + 1, ts, package, "pickup")))


def line(item: LiveItem) -> bytes:
    return item[3] + b"\t" + item[4]


def marker() -> LiveItem:
    """An always-published item to publish after something that must *not* arrive."""
    return a_item("marker", 1_700_000_000_000, package=uuid.uuid4().hex)


async def publish_and_wait(peers: tuple[Peer, ...], publisher: Peer, org: str, items: list[LiveItem]) -> list[bytes]:
    """Publish one tick's items followed by nothing else, and wait until every peer has received
    a message ending with a fresh marker; returns that message's lines (header left out)."""
    mark = marker()
    before = [len(p.messages(org)) for p in peers]
    publisher.broker.publish(org, [*items, mark])
    for p, n in zip(peers, before, strict=True):
        await until(lambda p=p, n=n: len(p.messages(org)) > n and line(mark) in p.lines(org), "the tick's message")
    msgs = publisher.messages(org)[before[peers.index(publisher)] :]
    assert len(msgs) == 1, f"one tick of one org must be one message, got {len(msgs)}"
    return [ln for ln in msgs[0].split(b"\n") if not ln.startswith(b"#") and ln != line(mark)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- publishing -------------------------------------------------------------------------------


async def test_message_format_one_message_per_org_per_tick(impl: Harness) -> None:
    a, b = await impl.peers2()
    org, other = impl.org, impl.org + "-other"
    stamp = b'["c-1"]'
    pos_item, scan_item = p_item("d-1", 1_000, stamp=stamp), a_item("d-1", 900)
    t0 = now_ms()
    a.broker.publish(org, [pos_item])
    a.broker.publish(org, [scan_item])  # same tick, same org: the same message
    a.broker.publish(other, [p_item("d-9", 5)])
    for p in (a, b):
        await until(lambda p=p: p.messages(org) and p.messages(other), "both orgs' messages")
    for p in (a, b):  # the publisher receives its own messages too
        [msg] = p.messages(org)
        head, *rest = msg.split(b"\n")
        assert head.startswith(b"#") and t0 - 1000 <= int(head[1:]) <= now_ms() + 1000, head
        assert rest == [line(pos_item), line(scan_item)]
        assert p.messages(other) == [p.messages(other)[0]] and p.lines(other) == [line(p_item("d-9", 5))]
        stamp_part, tab, frame = rest[0].partition(b"\t")
        assert (stamp_part, tab, orjson.loads(frame)["type"]) == (stamp, b"\t", "pos")


async def test_position_published_only_if_newest_by_live_ts(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    first = p_item("d-1", 2_000)
    assert await publish_and_wait((a, b), a, org, [first]) == [line(first)]
    # Older and equal live ts: neither stored nor published, whichever instance publishes them.
    late, same = p_item("d-1", 1_000, lat=5.0), p_item("d-1", 2_000, lat=6.0)
    assert await publish_and_wait((a, b), b, org, [late, same]) == []
    positions, _, _ = await b.broker.live_state(org)
    assert positions == {"d-1": (2_000, first[4])}
    # In one tick: the newer wins whatever the order; another driver is independent.
    newer, between, other = p_item("d-1", 3_000), p_item("d-1", 2_500), p_item("d-2", 10)
    assert await publish_and_wait((a, b), a, org, [newer, between, other]) == [line(newer), line(other)]
    positions, _, _ = await a.broker.live_state(org)
    assert positions == {"d-1": (3_000, newer[4]), "d-2": (10, other[4])}


async def test_latest_keeps_the_stamp_of_the_newest_position(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    assert await b.broker.latest(org, "d-1") is None
    first = p_item("d-1", 2_000, stamp=b'["c1","\\u0001P-1"]')
    await publish_and_wait((a, b), a, org, [first])
    assert await b.broker.latest(org, "d-1") == (2_000, first[3], first[4])
    # An older position changes nothing; a newer one brings its own stamp (here: none).
    await publish_and_wait((a, b), b, org, [p_item("d-1", 1_000, stamp=b'["c2"]')])
    newer = p_item("d-1", 3_000)
    await publish_and_wait((a, b), b, org, [newer])
    assert await a.broker.latest(org, "d-1") == (3_000, b"", newer[4])
    assert await a.broker.latest(org, "d-2") is None


async def test_always_items_published_whatever_their_ts(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    newest = p_item("d-1", 5_000)
    await publish_and_wait((a, b), a, org, [newest])
    old_scan = a_item("d-1", 1_000)
    got = await publish_and_wait((a, b), b, org, [old_scan, old_scan, ("a", "", 0, b"", b'{"type":"package"}')])
    assert got == [line(old_scan), line(old_scan), b'\t{"type":"package"}']
    positions, _, _ = await a.broker.live_state(org)
    assert positions == {"d-1": (5_000, newest[4])}, "an always item is not a position"


async def test_only_followed_orgs_are_received(impl: Harness) -> None:
    """Issue 17: an instance receives the live messages of the orgs it follows (those with a
    dashboard there), and nothing of the others."""
    a = await impl.peer()
    b = await impl.peer(follow=False)
    org, other = impl.org, impl.org + "-other"
    await publish_and_wait((a,), a, org, [p_item("d-1", 1_000)])
    await publish_and_wait((a,), a, other, [p_item("d-2", 1_000)])
    assert b.live == [], "an instance that follows no org received live messages"
    # Following takes effect when `follow` returns: the next message arrives, nothing before it.
    await b.broker.follow(other)
    second = p_item("d-2", 2_000)
    assert await publish_and_wait((a, b), a, other, [second]) == [line(second)]
    assert len(b.messages(other)) == 1 and b.messages(org) == []


async def test_unfollow_stops_an_orgs_messages(impl: Harness) -> None:
    a, b = await impl.peers2()
    org, other = impl.org, impl.org + "-other"
    await publish_and_wait((a, b), a, org, [p_item("d-1", 1_000)])
    b.broker.unfollow(org)
    # A new subscription, confirmed after the unsubscribe that was sent before it (following
    # `other` again proves nothing: it is followed already, so that returns at once; the test failed
    # 1 run in 6 so, the org's next message published before b's unsubscribe reached Redis).
    await b.broker.follow(org + "-third")
    n = len(b.messages(org))
    await publish_and_wait((a,), a, org, [p_item("d-1", 2_000)])
    await publish_and_wait((a, b), a, other, [p_item("d-2", 2_000)])  # b receives this one...
    assert len(b.messages(org)) == n, "...and nothing of the org it no longer follows"
    await b.broker.follow(org)  # following again: received again
    third = p_item("d-1", 3_000)
    assert await publish_and_wait((a, b), a, org, [third]) == [line(third)]


async def test_follow_before_a_read_misses_nothing(impl: Harness) -> None:
    """Snapshot-then-live: whatever is published after `follow` returns either arrives live or
    was in the state read after it; a publisher going on throughout never falls in between."""
    a = await impl.peer()
    b = await impl.peer(follow=False)
    org = impl.org
    ts = 1_000
    for _ in range(20):
        ts += 1
        a.broker.publish(org, [p_item("d-1", ts)])
        await asyncio.sleep(0)
    await b.broker.follow(org)
    positions, _, _ = await b.broker.live_state(org)
    seen = positions["d-1"][0] if positions else 0
    last = ts + 20
    for _ in range(20):
        ts += 1
        a.broker.publish(org, [p_item("d-1", ts)])
        await asyncio.sleep(0)
    await until(lambda: any(f'"ts":{last}'.encode() in ln for ln in b.lines(org)), "the last position live")
    got = sorted({orjson.loads(ln.partition(b"\t")[2])["ts"] for ln in b.lines(org)})
    assert set(range(seen + 1, last + 1)) <= set(got), "a position fell between the read and live"


# -- presence ---------------------------------------------------------------------------------


def online_line(driver: str, name: str | None = None, stamp: bytes = b"") -> bytes:
    return stamp + b"\t" + presence_frame(driver, True, now_ms(), name)


def offline_line(driver: str, stamp: bytes = b"") -> bytes:
    return stamp + b"\t" + presence_frame(driver, False, now_ms())


async def test_presence_online_then_offline(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    on1, on2 = online_line("d-1", "Ann", b'["c-1"]'), online_line("d-2")
    answers = await a.broker.drivers_online([(org, "d-1", "c1", "Ann", on1), (org, "d-2", "c2", None, on2)])
    assert [(r.live_ts, r.current) for r in answers] == [(0, True), (0, True)]
    for p in (a, b):
        await until(lambda p=p: p.lines(org) == [on1, on2], "both presence lines, as given")
    assert all(not m.startswith(b"#") for m in a.messages(org)), "presence lines are published as they are"
    positions, names, online = await b.broker.live_state(org)
    assert (positions, names, online) == ({}, {"d-1": "Ann"}, {"d-1", "d-2"})

    off1 = offline_line("d-1", b'["c-1"]')
    assert await b.broker.drivers_offline([(org, "d-1", "c1", off1)]) == [True]  # any instance may
    for p in (a, b):
        await until(lambda p=p: p.lines(org)[-1:] == [off1], "the offline line")
    _, names, online = await a.broker.live_state(org)
    assert online == {"d-2"} and names == {"d-1": "Ann"}, "a name outlives the connection"
    assert await a.broker.drivers_offline([(org, "d-1", "c1", off1)]) == [False], "offline twice"


async def test_online_returns_each_drivers_newest_live_ts(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    await publish_and_wait((a, b), a, org, [p_item("d-1", 7_000), p_item("d-1", 6_000)])
    lasts = await b.broker.drivers_online(
        [(org, "d-1", "c1", None, online_line("d-1")), (org, "d-2", "c2", None, online_line("d-2"))]
    )
    assert [r.live_ts for r in lasts] == [7_000, 0]


async def test_stale_offline_never_hides_the_newer_connection(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    await a.broker.drivers_online([(org, "d-1", "old", None, online_line("d-1"))])
    await b.broker.drivers_online([(org, "d-1", "new", None, online_line("d-1"))])
    assert await a.broker.drivers_offline([(org, "d-1", "old", offline_line("d-1"))]) == [False]
    await publish_and_wait((a, b), a, org, [])  # whatever the stale offline published came before this
    assert not a.offline(org) and not b.offline(org)
    _, _, online = await a.broker.live_state(org)
    assert online == {"d-1"}
    assert await b.broker.drivers_offline([(org, "d-1", "new", offline_line("d-1"))]) == [True]
    await until(lambda: len(a.offline(org)) == 1, "the newer connection's offline")


async def test_kick_reaches_the_replaced_connections_instance(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    await a.broker.drivers_online([(org, "d-1", "c1", None, online_line("d-1"))])
    [c2] = await b.broker.drivers_online([(org, "d-1", "c2", None, online_line("d-1"))])  # a newer one
    await b.broker.drivers_online([(org, "d-1", "c2", None, online_line("d-1"))])  # the same connection again
    kick = ["kick", org, "d-1", "c2", str(c2.gen)]
    await until(lambda: kick in a.ctl, "kick on the replaced connection's instance")
    await a.broker.publish_control(org, "mark", b"")
    for p in (a, b):
        await until(lambda p=p: ["mark", ""] in p.ctl, "the marker control message")
    assert a.ctl == [kick, ["mark", ""]], "no kick for a first connection or the same connection"
    assert b.ctl == [["mark", ""]], "the kick went to the replaced connection's instance only"


async def test_a_kick_goes_to_no_other_instance(impl: Harness) -> None:
    """Issue 17: a kick reaches the instance that registered the replaced connection, not every
    instance holding the org's drivers; only when the store does not know that instance (the
    record re-created by a refresh after it lost its state) every instance following the org's
    control messages, and still no other."""
    a, b = await impl.peers2()  # both hold drivers of the org (follow its control messages)
    c = await impl.peer(follow=False)
    await c.broker.follow_control(impl.org + "-other")  # drivers of another org only
    org = impl.org
    await a.broker.drivers_online([(org, "d-1", "c1", None, online_line("d-1"))])
    [c2] = await c.broker.drivers_online([(org, "d-1", "c2", None, online_line("d-1"))])
    kick = ["kick", org, "d-1", "c2", str(c2.gen)]
    await until(lambda: kick in a.ctl, "kick on the replaced connection's instance")
    await a.broker.publish_control(org, "mark", b"")
    await a.broker.publish_control(org + "-other", "mark", b"")
    for p in (a, b, c):
        await until(lambda p=p: ["mark", ""] in p.ctl, "a marker")
    assert kick not in b.ctl and kick not in c.ctl, "a kick reached an instance without the replaced connection"

    await impl.lose_state()
    await c.broker.refresh_presence([(org, "d-1", "c2", b"")], spread_s=0)  # re-created: its instance unknown
    [c3] = await a.broker.drivers_online([(org, "d-1", "c3", None, online_line("d-1"))])
    kick3 = ["kick", org, "d-1", "c3", str(c3.gen)]
    for p in (a, b):
        await until(lambda p=p: kick3 in p.ctl, "the kick on the org's control channel")
    await a.broker.publish_control(org + "-other", "mark2", b"")
    await until(lambda: ["mark2", ""] in c.ctl, "the other org's second marker")
    assert kick3 not in c.ctl, "an instance not following the org's control messages heard its kick"


async def test_follow_control_takes_effect_when_it_returns_and_unfollow_stops_it(impl: Harness) -> None:
    """Issue 17: an org's control messages reach the instances following them (those holding its
    drivers) from when `follow_control` returns, and no longer after `unfollow_control`."""
    a = await impl.peer()
    c = await impl.peer(follow=False)
    org = impl.org
    await c.broker.follow_control(org + "-other")
    await a.broker.publish_control(org, "before", b"")
    await a.broker.publish_control(org + "-other", "mark", b"")
    await until(lambda: ["mark", ""] in c.ctl, "the other org's marker")
    await c.broker.follow_control(org)
    await a.broker.publish_control(org, "after", b"")
    await until(lambda: ["after", ""] in c.ctl, "the org's message once followed")
    c.broker.unfollow_control(org)
    await c.broker.follow_control(org + "-third")  # in order after the unfollow, on the same subscription
    await a.broker.publish_control(org, "gone", b"")
    await a.broker.publish_control(org + "-other", "mark2", b"")
    await until(lambda: ["mark2", ""] in c.ctl, "the other org's second marker")
    await until(lambda: ["gone", ""] in a.ctl, "the org's message on a")
    assert ["before", ""] not in c.ctl and ["gone", ""] not in c.ctl, "an org's control message while not followed"


async def test_online_orders_connections_by_registration(impl: Harness) -> None:
    """The store is the one serialisation point of a reconnect storm: in one call and across calls
    and instances, generations grow in registration order, only the last connection of a driver
    in a call is current, every kick names the newest with its generation, and the generations
    keep growing after the store lost its state."""
    a, b = await impl.peers2()
    org = impl.org
    burst = await a.broker.drivers_online([(org, "d-1", f"a{i}", None, online_line("d-1")) for i in range(3)])
    assert [r.current for r in burst] == [False, False, True]
    later = await b.broker.drivers_online(
        [(org, "d-1", "b0", None, online_line("d-1")), (org, "d-2", "x", None, online_line("d-2"))]
    )
    assert [r.current for r in later] == [True, True]
    gens = [r.gen for r in burst] + [later[0].gen]
    assert gens == sorted(gens) and len(set(gens)) == 4
    kicks = [["kick", org, "d-1", c, str(g)] for c, g in zip(["a1", "a2", "b0"], gens[1:], strict=True)]
    # Each replaced connection was registered by a: the kicks go to a, in order, and not to b.
    await until(lambda: [k for k in a.ctl if k[0] == "kick"] == kicks, "a kick per replacement, in order")
    await a.broker.publish_control(org, "mark", b"")
    await until(lambda: ["mark", ""] in b.ctl, "the marker on b")
    assert [k for k in b.ctl if k[0] == "kick"] == [], "kicks of a's connections on b"
    await impl.lose_state()
    [after] = await a.broker.drivers_online([(org, "d-1", "c9", None, online_line("d-1"))])
    assert after.current and after.gen > gens[-1], "a restarted store still orders after what it forgot"


async def test_receiving_only_once_a_probe_came_back(impl: Harness) -> None:
    """/readyz's subscriber check: `start` (or a subscription merely sent) proves nothing; only a
    loop-back that came back does, and then the feed is live too."""
    peer = Peer(impl.make(30.0))
    impl.peers.append(peer)
    assert not peer.broker.receiving
    peer.broker.start()
    assert not peer.broker.receiving, "receiving before anything came back"
    await until(lambda: peer.broker.receiving, "the loop-back to come back")
    assert peer.broker.live and peer.status == [True]


async def test_refresh_keeps_online_and_expiry_is_swept_once(impl: Harness) -> None:
    a, b = await impl.peers2(ttl_s=TTL_S)
    org = impl.org
    kept_stamp, lapsed_stamp = b'["c-7"]', b'["c-8"]'
    await a.broker.drivers_online(
        [
            (org, "kept", "c1", None, online_line("kept", stamp=kept_stamp)),
            (org, "lapsed", "c2", None, online_line("lapsed", stamp=b"")),
        ]
    )
    # The sweep publishes with the stamp of the last refresh (who may see that driver now).
    await a.broker.refresh_presence([(org, "lapsed", "c2", lapsed_stamp)], spread_s=0)
    started = time.monotonic()
    swept: list[int] = []
    # Only `kept` is refreshed, well within its TTL, while both instances sweep at once.
    while not b.offline(org) and time.monotonic() - started < DEADLINE:
        await a.broker.refresh_presence([(org, "kept", "c1", kept_stamp)], spread_s=0)
        swept += await asyncio.gather(a.broker.sweep(), b.broker.sweep())
        _, _, online = await b.broker.live_state(org)
        if time.monotonic() - started > TTL_S * 1.5:  # `lapsed` expired: online no more, swept or not
            assert online == {"kept"}
        await asyncio.sleep(TTL_S / 8)  # the refresh period, not a wait for an effect
    await until(lambda: a.offline(org) and b.offline(org), "the expiry on both instances")
    assert time.monotonic() - started >= TTL_S * 0.9, "expired before its TTL"
    await publish_and_wait((a, b), a, org, [])  # a second publication would have arrived by now
    for p in (a, b):
        assert [f["driver"] for _, f in p.offline(org)] == ["lapsed"], "one offline per expiry, kept stays"
        [offline] = [ln for ln in p.lines(org) if b'"online":false' in ln]
        assert offline.partition(b"\t")[0] == lapsed_stamp
    # The sweeps' count is what they published, in every org. An instance receives only the orgs
    # it follows, and the session's Redis holds other tests' orgs: exact on a store of our own.
    if isinstance(impl, MemoryHarness):
        assert sum(swept) == len(a.offline()) == len(b.offline())
    else:
        assert sum(swept) >= len(a.offline(org)) == len(b.offline(org)) == 1

    # `kept` stops being refreshed: past its TTL it is online no more, even before a sweep...
    started = time.monotonic()
    await until(lambda: _online(a.broker, org, set()), "kept no longer online once its TTL passed")
    assert time.monotonic() - started >= TTL_S * 0.5 and not a.offline(org)[1:]
    # ...and the sweep publishes its offline, once.
    assert sum(await asyncio.gather(a.broker.sweep(), b.broker.sweep())) >= 1
    await until(lambda: len(b.offline(org)) == 2, "kept's expiry")
    assert [f["driver"] for _, f in a.offline(org)] == ["lapsed", "kept"]
    assert (await a.broker.live_state(org))[2] == set()


async def _online(broker: Broker, org: str, expected: set[str]) -> bool:
    return (await broker.live_state(org))[2] == expected


async def test_refresh_recreates_what_the_store_lost(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    await a.broker.drivers_online([(org, "d-1", "c1", None, online_line("d-1"))])
    await impl.lose_state()
    assert (await b.broker.live_state(org))[2] == set()
    await a.broker.refresh_presence([(org, "d-1", "c1", b"")], spread_s=0)
    assert (await b.broker.live_state(org))[2] == {"d-1"}
    # A refresh from a connection that is not the driver's current one takes nothing over.
    await b.broker.refresh_presence([(org, "d-1", "stale", b"")], spread_s=0)
    assert await b.broker.drivers_offline([(org, "d-1", "stale", offline_line("d-1"))]) == [False]
    assert await a.broker.drivers_offline([(org, "d-1", "c1", offline_line("d-1"))]) == [True]


# -- shared state -----------------------------------------------------------------------------


async def test_live_state_of_one_org(impl: Harness) -> None:
    a, b = await impl.peers2()
    org, other = impl.org, impl.org + "-other"
    stamped = p_item("d-1", 4_000, stamp=b'["c-1"]')
    await publish_and_wait((a, b), a, org, [stamped, a_item("d-2", 4_000)])
    await a.broker.drivers_online([(org, "d-3", "c3", "Cleo", online_line("d-3", "Cleo"))])
    await a.broker.drivers_online([(other, "d-1", "c9", "Other", online_line("d-1", "Other"))])
    positions, names, online = await b.broker.live_state(org)
    assert positions == {"d-1": (4_000, stamped[4])}, "the frame without its stamp; a scan is no position"
    assert names == {"d-3": "Cleo"} and online == {"d-3"}
    assert await b.broker.live_state(org + "-empty") == ({}, {}, set())


async def test_restore_positions_never_over_a_newer_one(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    newer = p_item("d-1", 5_000)
    await publish_and_wait((a, b), a, org, [newer])
    restored = ("d-2", 3_000, pos("d-2", 3_000))
    n = len(a.messages(org))
    await b.broker.restore_positions(org, [("d-1", 4_000, pos("d-1", 4_000, lat=9.0)), restored])
    positions, _, _ = await a.broker.live_state(org)
    assert positions == {"d-1": (5_000, newer[4]), "d-2": (3_000, restored[2])}
    # What became newest is published too (dashboards get it), and nothing else.
    await until(lambda: len(a.messages(org)) > n, "the restored position's message")
    assert a.lines(org)[-1:] == [b"\t" + restored[2]]
    await b.broker.restore_positions(org, [])
    late = p_item("d-2", 2_000)
    assert await publish_and_wait((a, b), a, org, [late]) == [], "a restored position is newest-only too"
    assert len([ln for ln in a.lines(org) if b'"d-1"' in ln]) == 1


async def test_synced_flag_per_org_until_the_store_loses_its_state(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    assert await a.broker.is_synced(org) is False
    await a.broker.mark_synced(org)
    assert await b.broker.is_synced(org) is True
    assert await b.broker.is_synced(org + "-other") is False
    await impl.lose_state()
    assert await a.broker.is_synced(org) is False


async def test_control_messages_reach_every_instance_following_the_org_including_the_sender(
    impl: Harness,
) -> None:
    a, b = await impl.peers2()
    c = await impl.peer(follow=False)
    await c.broker.follow_control(impl.org + "-other")
    await a.broker.publish_control(impl.org, "custody", b"a\tb")
    await b.broker.publish_control(impl.org, "custody", b"")
    await c.broker.publish_control(impl.org + "-other", "mark", b"")  # sent by one that does not follow it
    for p in (a, b):
        await until(lambda p=p: len(p.ctl) == 3, "three control messages")
        assert p.ctl == [["custody", "a", "b"], ["custody", ""], ["mark", ""]]
    await until(lambda: c.ctl == [["mark", ""]], "only its org's control message on c")


async def test_a_closed_instance_receives_nothing(impl: Harness) -> None:
    a, b = await impl.peers2()
    org = impl.org
    await b.broker.close()
    await publish_and_wait((a,), a, org, [p_item("d-1", 1)])
    await a.broker.publish_control(org, "mark", b"")
    await until(lambda: ["mark", ""] in a.ctl, "the marker")
    assert b.live == [] and b.ctl == []


# -- status -----------------------------------------------------------------------------------


def every_coroutine_method(broker: Broker, org: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "live_state": lambda: broker.live_state(org),
        "drivers_online": lambda: broker.drivers_online([(org, "d-1", "c", None, online_line("d-1"))]),
        "drivers_offline": lambda: broker.drivers_offline([(org, "d-1", "c", offline_line("d-1"))]),
        "refresh_presence": lambda: broker.refresh_presence([(org, "d-1", "c", b"")], spread_s=0),
        "sweep": broker.sweep,
        "restore_positions": lambda: broker.restore_positions(org, [("d-1", 1, pos("d-1", 1))]),
        "is_synced": lambda: broker.is_synced(org),
        "mark_synced": lambda: broker.mark_synced(org),
        "publish_control": lambda: broker.publish_control(org, "mark", b""),
    }


async def _unavailable(call: Callable[[], Awaitable[Any]]) -> bool:
    """The call raised `BrokerUnavailable`. Anything else (a backend's own error type, which the
    core does not catch) fails the test."""
    try:
        await call()
    except BrokerUnavailable:
        return True
    return False


async def test_status_flips_on_an_outage_and_back(outage_impl: Harness) -> None:
    impl = outage_impl
    a, b = await impl.peers2()
    org = impl.org
    for p in (a, b):
        await until(lambda p=p: p.broker.live and p.status == [True], "live after start")
    assert await a.broker.ping() is True

    await impl.outage()
    for p in (a, b):
        await until(lambda p=p: p.status == [True, False] and not p.broker.live, "status False")
        await until(lambda p=p: not p.broker.receiving, "not receiving")
        assert await p.broker.ping() is False, "ping says so and never raises"
        for name, call in every_coroutine_method(p.broker, org).items():
            assert await _unavailable(call), f"{name} must raise BrokerUnavailable"
    a.broker.publish(org, [p_item("d-1", 1)])  # best effort: dropped, never raises

    await impl.recover()
    for p in (a, b):
        await until(lambda p=p: p.status == [True, False, True] and p.broker.live, "status True again")
        assert p.broker.receiving and await p.broker.ping() is True
    fresh = p_item("d-2", 2)
    assert await publish_and_wait((a, b), b, org, [fresh]) == [line(fresh)]
    assert not [ln for ln in a.lines(org) if b'"d-1"' in ln], "a frame published while down arrived later"
