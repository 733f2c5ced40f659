"""Issue 17: each instance receives from Redis only what its dashboards and drivers need.

Two `tracker serve` processes on one private Redis. Three orgs' fleets send through instance b;
the only dashboard (org A) is on instance a. Each instance's `tracker_live_received_bytes_total`
(its own /metrics) is compared with what Redis carried per org, counted by a test subscriber on
every live channel over the same seconds.

Control messages go only where needed too: a driver moving between two instances is still
replaced at once (the kick goes to the instance of the replaced connection), and a third instance,
holding only another org's drivers, receives none of them (`tracker_control_received_messages_total`),
on one Redis and on a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from harness.clients import Dash, Phone, pos
from harness.fleet import Fleet
from harness.http import request
from harness.redis_ha import RedisClusterSet
from harness.servers import RedisServer
from harness.tokens import SECRET, token
from harness.wait import wait_until

WINDOW_S = 3.0


async def _metric(port: int, name: str) -> float:
    status, _, body = await request(port, "GET", "/metrics")
    assert status == 200
    match = re.search(rb"^" + name.encode() + rb" ([0-9.e+]+)$", body, re.M)
    assert match is not None, f"the metric {name} is missing"
    return float(match.group(1))


async def _received(port: int) -> float:
    return await _metric(port, "tracker_live_received_bytes_total")


async def _control(port: int) -> float:
    return await _metric(port, "tracker_control_received_messages_total")


async def _count(url: str, per_org: dict[str, int], stop: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.psubscribe("trk:live:*")
    try:
        while not stop.is_set():
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if msg is not None:
                org = msg["channel"].decode()[len("trk:live:") :]
                per_org[org] = per_org.get(org, 0) + len(msg["data"])
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def test_an_instance_receives_only_its_dashboards_orgs(
    spawn: Any, database_url: str, private_redis: RedisServer, org: str
) -> None:
    a = await spawn(database_url, private_redis.url)
    b = await spawn(database_url, private_redis.url)
    orgs = [f"{org}-a", f"{org}-b", f"{org}-c"]
    dash = await Dash(a.url, token("dispatcher", "u-1", orgs[0])).start()
    fleets = [Fleet([b.url], SECRET, o, 3, interval=0.05) for o in orgs]
    try:
        for fleet in fleets:
            await fleet.__aenter__()
        await wait_until(lambda: len(dash.positions) == 3, 10, "org A's positions live on instance a")
        per_org: dict[str, int] = {}
        stop = asyncio.Event()
        counter = asyncio.create_task(_count(private_redis.url, per_org, stop))
        await asyncio.sleep(0.3)  # the counter's subscription is in place (its own traffic proves it)
        before = await asyncio.gather(_received(a.port), _received(b.port))
        await asyncio.sleep(WINDOW_S)  # traffic flowing for a measured window, not a wait for an effect
        after = await asyncio.gather(_received(a.port), _received(b.port))
        stop.set()
        await counter
        got_a, got_b = after[0] - before[0], after[1] - before[1]
        total = sum(per_org.values())
        share_a = per_org.get(orgs[0], 0)
        assert total > 10_000 and share_a < 0.5 * total, per_org  # three orgs of about equal traffic
        assert got_b <= 0.01 * total, f"instance b (no dashboard) received {got_b:.0f} of {total} live bytes"
        assert 0.75 * share_a <= got_a <= 1.25 * share_a, f"instance a received {got_a:.0f}; org A had {share_a}"

        # The last dashboard of org A leaves: instance a stops receiving org A.
        await dash.close()
        client = aioredis.Redis.from_url(private_redis.url)
        try:
            channel = f"trk:live:{orgs[0]}"
            await wait_until(lambda: _numsub(client, channel, 0), 5, "instance a to unsubscribe from org A's channel")
        finally:
            await client.aclose()
        quiet = await _received(a.port)
        await asyncio.sleep(0.5)  # a window of traffic: nothing of it may reach instance a
        assert await _received(a.port) == quiet
    finally:
        for fleet in fleets:
            await fleet.__aexit__(None, None, None)
        await dash.close()


async def _numsub(client: aioredis.Redis, channel: str, want: int) -> bool:
    [(_, n)] = await client.pubsub_numsub(channel)  # type: ignore[misc]
    return int(n) == want


@pytest.fixture(params=["redis", "cluster"])
async def redis_url_of(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A private Redis, or a private three-master Redis Cluster."""
    if request.param == "redis":
        server = await RedisServer().start()
        yield server.url
        server.close()
    else:
        cluster = await RedisClusterSet().start()
        yield cluster.url
        cluster.close()


async def test_control_messages_reach_only_the_instances_holding_the_orgs_drivers(
    spawn: Any, database_url: str, redis_url_of: str, org: str
) -> None:
    a = await spawn(database_url, redis_url_of)
    b = await spawn(database_url, redis_url_of)
    c = await spawn(database_url, redis_url_of)
    other = f"{org}-y"
    phones: list[Phone] = []
    async with Fleet([c.url], SECRET, other, 3, interval=0.2) as fleet:  # c: another org's drivers only
        await wait_until(lambda: all(fleet.acked().values()), 10, "the other org's drivers sending through c")
        before = await asyncio.gather(*(_control(x.port) for x in (a, b, c)))
        try:
            phones.append(await Phone.connect(a.url, token("driver", "d-1", org)))
            for n in range(4):  # d-1 moves a -> b -> a -> b -> a: each connection replaces the last
                there = (b, a)[n % 2]
                started = time.monotonic()
                phones.append(await Phone.connect(there.url, token("driver", "d-1", org)))
                assert await phones[-2].closed(timeout=5.0) == 4001, f"move {n}: the old connection not replaced"
                took = time.monotonic() - started
                assert took < 3.0, f"move {n}: replaced after {took:.1f} s"
            await phones[-1].send(pos(1))
            await phones[-1].until(lambda p: p.acked == {1})
            after = await asyncio.gather(*(_control(x.port) for x in (a, b, c)))
        finally:
            for phone in phones:
                await phone.close()
    got = [y - x for x, y in zip(before, after, strict=True)]
    assert got[0] >= 2 and got[1] >= 2, f"the kicks did not reach a and b: {got}"
    assert got[2] == 0, f"instance c (no driver of {org}) received {got[2]:.0f} control messages of it"
