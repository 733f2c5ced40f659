"""A reconnect storm leaves exactly one connection (issue 11, item 3): whatever the burst of hellos
of one driver, on one instance or spread over two, the newest connection (the one Redis's presence
script registered last) is welcomed and stays alive; every other one is closed 4001."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from harness.clients import pos
from harness.instances import Instance
from harness.tokens import token
from harness.wait import wait_until


class Hello:
    """One raw driver socket of the burst: its frames and its close code, read in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.code: int | None = None
        self.done = False
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                self.frames.append(orjson.loads(data))
        except ConnectionClosed:
            pass
        self.code = self.ws.close_code
        self.done = True

    @property
    def welcomed(self) -> bool:
        return any(f["type"] == "welcome" for f in self.frames)


async def storm(instances: list[Instance], org: str, n: int, *, at_once: bool = True) -> list[Hello]:
    """Open n sockets (round robin over the instances), then send the n hellos: all at once, or one
    after the other (each sent once the previous one is written: spread over several ticks)."""
    wss = await asyncio.gather(
        *(connect(instances[i % len(instances)].url + "/v1/driver", compression=None) for i in range(n))
    )
    hello = orjson.dumps({"type": "hello", "token": token("driver", "d-1", org), "device": "t", "app": "t/1"})
    hellos = []
    if at_once:
        await asyncio.gather(*(ws.send(hello.decode()) for ws in wss))
        return [Hello(ws) for ws in wss]
    for ws in wss:
        await ws.send(hello.decode())
        hellos.append(Hello(ws))
    return hellos


@pytest.mark.parametrize(
    ("n", "at_once"), [(3, True), (20, True), (200, True), (20, False)], ids=["3", "20", "200", "20-one-by-one"]
)
@pytest.mark.parametrize("spread", [1, 2], ids=["one-instance", "two-instances"])
async def test_reconnect_storm_leaves_exactly_the_newest_connection(
    start_instance: Any, org: str, redis_url: str, n: int, at_once: bool, spread: int
) -> None:
    instances = [await start_instance() for _ in range(spread)]
    hellos = await storm(instances, org, n, at_once=at_once)
    try:
        await wait_until(
            lambda: sum(h.done for h in hellos) >= n - 1 and any(h.welcomed and not h.done for h in hellos),
            20,
            lambda: (
                f"{n - 1} of {n} closed and one welcomed; closed {sum(h.done for h in hellos)}, "
                f"welcomed and open {sum(h.welcomed and not h.done for h in hellos)}"
            ),
        )
        alive = [h for h in hellos if not h.done]
        assert len(alive) == 1, f"{len(alive)} connections alive"
        assert sorted({h.code for h in hellos if h.done}) == [4001]
        survivor = alive[0]
        assert survivor.welcomed
        # The survivor can send and is acked: it is the registered connection, not a zombie.
        await survivor.ws.send(orjson.dumps(pos(1)).decode())
        await wait_until(lambda: any(f["type"] == "ack" for f in survivor.frames), 10, "the survivor's ack")
        assert not survivor.done
        # It is the newest: the connection Redis registered last is the one alive on its instance.
        r = aioredis.Redis.from_url(redis_url)
        try:
            newest = (await r.hget(f"trk:pconn:{org}", "d-1")).decode()  # type: ignore[misc]
        finally:
            await r.aclose()
        held = [c.conn_id for i in instances if (c := i.node.drivers.get((org, "d-1"))) is not None]
        assert held == [newest]
    finally:
        for h in hellos:
            h.task.cancel()
            h.ws.transport.abort()
