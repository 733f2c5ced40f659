"""Issue 17: each instance receives from Redis only what its dashboards need.

Two `tracker serve` processes on one private Redis. Three orgs' fleets send through instance b;
the only dashboard (org A) is on instance a. Each instance's `tracker_live_received_bytes_total`
(its own /metrics) is compared with what Redis carried per org, counted by a test subscriber on
every live channel over the same seconds.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import redis.asyncio as aioredis

from harness.clients import Dash
from harness.fleet import Fleet
from harness.http import request
from harness.servers import RedisServer
from harness.tokens import SECRET, token
from harness.wait import wait_until

WINDOW_S = 3.0


async def _received(port: int) -> float:
    status, _, body = await request(port, "GET", "/metrics")
    assert status == 200
    match = re.search(rb"^tracker_live_received_bytes_total ([0-9.e+]+)$", body, re.M)
    assert match is not None, "the metric tracker_live_received_bytes_total is missing"
    return float(match.group(1))


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
