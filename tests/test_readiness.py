"""Readiness tells the truth (issue 11, item 7): /readyz is never 200 before the instance's
subscriber has proven it receives, by a loop-back probe that came back on its subscription."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from pathlib import Path
from typing import Any

from harness.clients import Dash, Phone, acked, now_ms, pos, scan, until_frame
from harness.http import consign, ready
from harness.instances import Instance, serve
from harness.proxy import Proxy
from harness.servers import RedisServer
from harness.tokens import CUSTODY_KEY, SECRET, token
from harness.wait import wait_until
from tracker.config import Settings


async def test_never_ready_before_the_probe_came_back(
    database_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    """Many starts with the subscriber's replies held back (connected and subscribed, nothing
    delivered): /readyz answers, and never says ready, for longer than a probe period; once the
    replies flow, it does."""
    proxy = await Proxy(private_redis.port).start()
    try:
        for start in range(5):
            proxy.mute(b"SUBSCRIBE", also_new=True)
            settings = Settings(
                database_url=database_url,
                redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                jwt_secret=SECRET,
                custody_key=CUSTODY_KEY,
                port=0,
                data_dir=tmp_path,
                instance_id=f"test-{uuid.uuid4().hex[:8]}",
                log_level="warning",
            )
            server, task = await serve(settings)
            try:
                broker: Any = server.app.state.node.broker
                seen: list[dict[str, Any]] = []

                async def answered_for_a_while(
                    seen: list[dict[str, Any]] = seen, broker: Any = broker, port: int = server.port
                ) -> bool:
                    body = await ready(port)
                    if body is not None:
                        seen.append(body)
                    # long enough for the probes sent after the subscription (one per second)
                    return broker.sub.subscribed and time.monotonic() - broker.sub.subscribed_at > 1.5

                await wait_until(answered_for_a_while, 10, "the subscriber to be subscribed for 1.5 s", interval=0.01)
                assert seen, f"start {start}: /readyz never answered"
                wrong = [b for b in seen if b["ready"] or b["checks"]["subscriber"]]
                assert not wrong, f"start {start}: ready before any probe came back: {wrong[0]}"
                proxy.unmute()
                await wait_until(
                    functools.partial(_ready, server.port), 5, f"start {start}: ready once the probe comes back"
                )
            finally:
                server.should_exit = True
                await asyncio.wait_for(task, 30)
    finally:
        await proxy.close()


async def _ready(port: int) -> bool:
    body = await ready(port)
    return bool(body and body["ready"] and body["checks"]["subscriber"])


async def test_a_handover_missed_while_the_feed_was_down_never_reaches_the_old_client(
    start_instance: Any, org: str, private_redis: RedisServer
) -> None:
    """The old holder's instance loses Redis while another instance receives the handover: the
    closing notice and the stamp change are published while its subscriber cannot hear them. No
    position the old holder sends afterwards reaches the old client: not while the feed is down
    (fail closed: nothing stamped for clients), not after it is back (stamps recomputed first)."""
    proxy = await Proxy(private_redis.port).start()
    try:
        a = await start_instance(redis_url=private_redis.url)
        b = await start_instance(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        await consign(a, org, "PKG-1", "cl-a")
        client = await Dash.connect(a.url, token("client", "c", org, client="cl-a"), subscribe={})
        seen: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read_into(client, seen))
        disp = await Dash.connect(a.url, token("dispatcher", "u", org), subscribe={})
        d1 = await Phone.connect(b.url, token("driver", "d-1", org))
        await d1.send(scan(1, "PKG-1", "pickup"))
        await acked(d1, 1)
        await wait_until(lambda: _stamp(b, org, "d-1") == b'["cl-a"]', 10, "d-1's window for cl-a open on b")
        await d1.send(pos(2))
        await wait_until(lambda: _positions(seen, "d-1") == [2], 10, "cl-a to see d-1 while it holds PKG-1")

        proxy.cut()
        await wait_until(lambda: not b.node.broker.live, 10, "b's live feed to go down")
        d2 = await Phone.connect(a.url, token("driver", "d-2", org))
        await d2.send(scan(1, "PKG-1", "handover"))
        await acked(d2, 1)
        got: list[dict[str, Any]] = []
        await until_frame(disp, got, "package", package="PKG-1", driver="d-2")  # chained and published
        t = now_ms()
        await d1.send({"type": "batch", "items": [pos(3, ts=t), pos(4, ts=t + 1), pos(5, ts=t + 2)]})
        await acked(d1, 3, 4, 5)

        proxy.restore()
        await wait_until(lambda: b.node.broker.live, 15, "b's live feed to come back")
        # d-1 goes on sending until the dispatcher sees one of its positions: then everything d-1 sent
        # after the handover has gone out. (Live frames are best effort: the first publish after the
        # network heals can meet a pooled connection the cut left dead, and that tick is dropped.)
        seq = 6
        async with asyncio.timeout(15):
            while True:
                t = now_ms()
                await d1.send(
                    {"type": "batch", "items": [pos(seq, ts=t), pos(seq + 1, ts=t + 1), pos(seq + 2, ts=t + 2)]}
                )
                await acked(d1, seq, seq + 1, seq + 2)
                with contextlib.suppress(TimeoutError):
                    await until_frame(disp, got, "pos", timeout=1.0, driver="d-1", seq=seq + 2)
                    break
                seq += 3
        await d2.send(pos(2))
        await wait_until(lambda: _positions(seen, "d-2") == [2], 10, "cl-a to see d-2, its new holder")
        assert _positions(seen, "d-1") == [2], "a position d-1 sent after the handover reached cl-a"
        reader.cancel()
    finally:
        await proxy.close()


async def test_a_handover_received_without_redis_still_closes_the_old_holders_window(
    start_instance: Any, org: str, private_redis: RedisServer
) -> None:
    """The instance *receiving* a handover has lost Redis; the old holder's instance has not. The
    closing notice cannot go through the broker, so it goes through PostgreSQL (NOTIFY): the old
    holder's instance stops stamping its positions for the old client at once, not at its next
    stamp refresh (custody_sweep_s, set long here so that the refresh cannot close it instead)."""
    proxy = await Proxy(private_redis.port).start()
    try:
        a = await start_instance(redis_url=f"redis://127.0.0.1:{proxy.port}/0", custody_sweep_s=600.0)
        b = await start_instance(redis_url=private_redis.url, custody_sweep_s=600.0)
        await consign(a, org, "PKG-1", "cl-a")
        await consign(a, org, "PKG-2", "cl-a")
        client = await Dash.connect(b.url, token("client", "c", org, client="cl-a"), subscribe={})
        seen: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read_into(client, seen))
        d1 = await Phone.connect(b.url, token("driver", "d-1", org))
        await d1.send(scan(1, "PKG-1", "pickup"))
        await acked(d1, 1)
        await wait_until(lambda: _stamp(b, org, "d-1") == b'["cl-a"]', 10, "d-1's window for cl-a open on b")
        await d1.send(pos(2))
        await wait_until(lambda: _positions(seen, "d-1") == [2], 10, "cl-a to see d-1 while it holds PKG-1")
        d3 = await Phone.connect(b.url, token("driver", "d-3", org))  # a marker: cl-a sees it throughout
        await d3.send(scan(1, "PKG-2", "pickup"))
        await acked(d3, 1)
        await wait_until(lambda: _stamp(b, org, "d-3") == b'["cl-a"]', 10, "d-3's window for cl-a open on b")
        # The first sweep (5 s after the start) redoes every stamp: past it, none until custody_sweep_s.
        await wait_until(lambda: b.node.extension.layer._swept_until is not None, 15, "b's first custody sweep")

        proxy.cut()
        await wait_until(lambda: not a.node.broker.live, 10, "a's live feed to go down")
        d2 = await Phone.connect(a.url, token("driver", "d-2", org))
        await d2.send(scan(1, "PKG-1", "handover"))
        await acked(d2, 1)
        # The notice's way to b takes a moment (one NOTIFY); without it b would wait for its refresh.
        await wait_until(lambda: _stamp(b, org, "d-1") == b"", 5, "b to close d-1's window for cl-a")
        t = now_ms()
        await d1.send({"type": "batch", "items": [pos(3, ts=t), pos(4, ts=t + 1), pos(5, ts=t + 2)]})
        await acked(d1, 3, 4, 5)
        await d3.send(pos(2))  # goes out on b's feed after d-1's positions, in order
        await wait_until(lambda: _positions(seen, "d-3") == [2], 10, "cl-a to see d-3's position")
        assert _positions(seen, "d-1") == [2], "a position d-1 sent after the handover reached cl-a"
        reader.cancel()
    finally:
        await proxy.close()


async def _read_into(dash: Dash, frames: list[dict[str, Any]]) -> None:
    with contextlib.suppress(Exception):
        while True:
            frames += await dash.live(3600)


def _positions(frames: list[dict[str, Any]], driver: str) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "pos" and f["driver"] == driver]


def _stamp(inst: Instance, org: str, driver: str) -> bytes:
    conn = inst.node.drivers.get((org, driver))
    return conn.stamp if conn is not None else b"?"
