"""Redis Cluster (issue 17): `REDIS_URL=redis+cluster://host:port,...`, a local three-master
cluster (harness/redis_ha.py). Phones send through one instance, a dashboard watches on another,
while the org's slot is moved to another node (keys and all) and then that node is restarted:
nothing acknowledged is lost or stored twice, and live resumes by itself after each.
The broker conformance suite (tests/test_broker_conformance.py) runs on a cluster too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from harness.clients import Dash
from harness.fleet import Fleet
from harness.loss import check_stored
from harness.redis_ha import RedisClusterSet
from harness.tokens import SECRET, token
from harness.wait import wait_until
from tracker.redis_cluster import ClusterSubscribing


@pytest.fixture
async def cluster() -> AsyncIterator[RedisClusterSet]:
    c = await RedisClusterSet().start()
    yield c
    c.close()


async def test_slot_move_and_node_restart_while_phones_and_dashboards_run(
    start_instance: Any, org: str, database_url: str, cluster: RedisClusterSet
) -> None:
    a = await start_instance(redis_url=cluster.url, presence_refresh_s=0.5)
    b = await start_instance(redis_url=cluster.url, presence_refresh_s=0.5)
    watcher = await Dash(a.url, token("dispatcher", "u-1", org)).start()

    async def live_again(what: str) -> None:
        frames = len(watcher.pos_times)
        await wait_until(lambda: len(watcher.pos_times) > frames + 20, 20, what)

    try:
        async with Fleet([b.url], SECRET, org, 4, interval=0.05) as fleet:
            await wait_until(lambda: len(watcher.positions) == 4, 15, "live positions through the cluster")
            slot = await cluster.slot("{" + org + "}")
            target = (await cluster.owner(slot) + 1) % len(cluster.nodes)
            await cluster.migrate(slot, target)
            assert await cluster.owner(slot) == target
            await live_again("live positions after the org's slot moved")

            restarted = time.monotonic()
            await cluster.restart(target)  # no persistence: the org's live state is gone with it
            await live_again("live positions after the org's node restarted")
            snaps = [s for t, s in watcher.snapshots if t >= restarted]
            assert snaps and len(snaps[-1]["drivers"]) == 4, "a fresh snapshot with every driver"
            await fleet.drain(20)
            check = await check_stored(database_url, org, fleet.acked())
        check.assert_exactly_once()
        assert check.acked >= 100
    finally:
        await watcher.close()


async def test_a_cancelled_read_of_the_cluster_subscriber_ends(cluster: RedisClusterSet) -> None:
    """RedisBroker.close cancels the subscriber; a cancellation that arrives in the same loop step
    as a message must end the read, not return the message (asyncio.wait_for on Python 3.11 did:
    the subscriber read on and close waited for it forever, a hang in the conformance suite)."""
    owner = ClusterSubscribing([("127.0.0.1", node.port) for node in cluster.nodes], {})
    pubsub = owner.pubsub()
    try:
        read = asyncio.create_task(pubsub.get_message(timeout=5.0))
        await asyncio.sleep(0)  # waiting on the queue
        pubsub._queue.put_nowait({"type": "message", "channel": b"trk:probe:x", "data": b"1"})
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
    finally:
        await pubsub.aclose()
        await owner.aclose()
