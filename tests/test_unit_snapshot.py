"""Snapshots (tracker/snapshot.py) on a MemoryBroker: content, filters, chunks, the hand-over to
live frames, and the PostgreSQL fallback when the broker is away or has lost its state.

Tests that must not touch PostgreSQL get no pool at all (`None`): reading it would fail them.
The fallback tests use the real test database (`database_url`), never a mock of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from harness.fakes import FakeChannel, next_iteration, until
from tracker import store
from tracker.auth import Principal
from tracker.eventstore import DriverKeys, insert_events
from tracker.extension import NoExtension
from tracker.hub import Dashboard, Hub
from tracker.memory_broker import MemoryBroker, MemoryBus
from tracker.protocol.events import Position
from tracker.protocol.live import pos_frame, presence_frame
from tracker.protocol.subscribe import Filter
from tracker.snapshot import Snapshots
from tracker.store import Pending

T0 = 1_750_000_000_000
NO_POSTGRESQL: Any = None


def position(seq: int, ts: int, lat: float = 1.0, lon: float = 2.0) -> Position:
    return Position(seq, ts, lat, lon)


class Setup:
    """One org's broker (started, on its own bus), hub and snapshot builder."""

    def __init__(self, org: str, pool: Any = NO_POSTGRESQL, chunk: int = 2_000) -> None:
        self.org = org
        self.bus = MemoryBus()
        self.broker = MemoryBroker(self.bus, instance_id="a")
        self.hub = Hub(flush_ms=1)
        self.broker.on_live = self.hub.deliver
        self.snapshots = Snapshots(pool, self.broker, NoExtension(), chunk=chunk)
        self.dashboards: list[Dashboard] = []

    async def start(self) -> Setup:
        self.broker.start()
        await until(lambda: self.broker.live, "the broker to be live")
        return self

    async def close(self) -> None:
        for dash in self.dashboards:
            await self.hub.stop(dash)
        await self.broker.close()

    async def positions(self, *items: tuple[str, Position]) -> None:
        await self.broker.restore_positions(self.org, [(d, ev.ts, pos_frame(d, ev)) for d, ev in items])

    async def online(self, driver: str, name: str | None = None) -> None:
        line = b"\t" + presence_frame(driver, True, T0, name)
        await self.broker.drivers_online([(self.org, driver, f"c-{driver}", name, line)])

    def dashboard(self, flt: Filter | None = None, client: str | None = None) -> tuple[Dashboard, FakeChannel]:
        """Registered in the hub before its snapshot, as the live endpoint does."""
        channel = FakeChannel()
        role = "client" if client else "dispatcher"
        dash = Dashboard(Principal(role, "u-1", self.org, exp=2**40, client=client), channel, self.hub)
        dash.flt = flt or Filter()
        dash.live = False
        self.hub.add(dash)
        self.dashboards.append(dash)
        return dash, channel

    async def snapshot(self, flt: Filter | None = None, client: str | None = None) -> list[dict[str, Any]]:
        """The snapshot frames a new dashboard is sent (status frames included)."""
        dash, channel = self.dashboard(flt, client)
        await self.snapshots.send(dash)
        return channel.frames


@pytest.fixture
async def setup(org: str) -> AsyncIterator[Setup]:
    s = await Setup(org).start()
    yield s
    await s.close()


def drivers(frames: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["driver"]: d for f in frames if f["type"] == "snapshot" for d in f["drivers"]}


# -- from the broker --------------------------------------------------------------------------


async def test_snapshot_from_the_broker(setup: Setup) -> None:
    await setup.positions(("d-1", position(3, T0 + 3, 48.5, 2.25)), ("d-2", position(1, T0 + 1)))
    await setup.online("d-1", "Ann")
    await setup.online("d-3")  # online, no position yet
    await setup.broker.mark_synced(setup.org)
    [frame] = await setup.snapshot()
    assert frame == {
        "type": "snapshot",
        "drivers": [
            {"driver": "d-1", "seq": 3, "ts": T0 + 3, "lat": 48.5, "lon": 2.25, "name": "Ann", "online": True},
            {"driver": "d-2", "seq": 1, "ts": T0 + 1, "lat": 1.0, "lon": 2.0, "name": None, "online": False},
            {"driver": "d-3", "name": None, "online": True},
        ],
        "packages": [],
        "alerts": [],
    }


async def test_snapshot_follows_the_filter(setup: Setup) -> None:
    await setup.positions(("d-1", position(1, T0, 5.0, 5.0)), ("d-2", position(1, T0, 50.0, 50.0)))
    await setup.positions(("d-3", position(1, T0, 6.0, 6.0)))
    await setup.online("d-4")
    await setup.broker.mark_synced(setup.org)
    assert drivers(await setup.snapshot(Filter(drivers=frozenset({"d-1", "d-4"})))).keys() == {"d-1", "d-4"}
    assert drivers(await setup.snapshot(Filter(packages=frozenset({"pk-1"})))) == {}, "no carrier without custody"
    in_box = await setup.snapshot(Filter(bbox=(0.0, 0.0, 10.0, 10.0)))
    assert drivers(in_box).keys() == {"d-1", "d-3"}, "a bbox lists positions inside it, nothing else"
    assert setup.dashboards[-1].inside == {"d-1", "d-3"}, "so that a first move outside is still sent"
    assert drivers(await setup.snapshot(client="c-1")) == {}, "without custody a client sees no driver"


async def test_a_large_snapshot_comes_in_chunks(org: str) -> None:
    setup = await Setup(org, chunk=2).start()
    try:
        await setup.positions(*[(f"d-{i}", position(1, T0 + i)) for i in range(5)])
        await setup.broker.mark_synced(org)
        frames = await setup.snapshot()
        assert [len(f["drivers"]) for f in frames] == [2, 2, 1]
        assert [f.get("more") for f in frames] == [True, True, None]
        assert drivers(frames).keys() == {f"d-{i}" for i in range(5)}
    finally:
        await setup.close()


async def test_a_snapshot_while_the_feed_is_down_says_so_first(org: str) -> None:
    setup = Setup(org)  # never started: not live, yet the store answers
    try:
        await setup.positions(("d-1", position(1, T0)))
        await setup.broker.mark_synced(org)
        frames = await setup.snapshot()
        assert [f["type"] for f in frames] == ["status", "snapshot"]
        assert frames[0]["live"] is False and drivers(frames).keys() == {"d-1"}
    finally:
        await setup.close()


async def test_the_hand_over_sends_each_update_once(setup: Setup) -> None:
    org = setup.org
    await setup.positions(("d-1", position(1, T0 + 100)))
    await setup.broker.mark_synced(org)
    dash, channel = setup.dashboard()
    # Published while the snapshot is read: in the state read, and among the waiting frames.
    setup.broker.publish(org, [("p", "d-1", T0 + 300, b"", pos_frame("d-1", position(3, T0 + 300)))])
    await setup.snapshots.send(dash)
    assert drivers(channel.frames)["d-1"]["ts"] == T0 + 300, "the update is in the state read"
    setup.broker.publish(org, [("p", "d-2", T0, b"", pos_frame("d-2", position(1, T0)))])
    await until(lambda: any(f.get("driver") == "d-2" for f in channel.items), "the next live frame")
    assert [(f["type"], f.get("driver"), f.get("ts")) for f in channel.items] == [
        ("snapshot", None, None),
        ("pos", "d-2", T0),
    ], "the update is not sent again after the snapshot"


# -- the PostgreSQL fallback ------------------------------------------------------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    await store.migrate(p)
    yield p
    await p.close()


async def stored(pool: asyncpg.Pool, org: str, *events: tuple[str, str | None, Position]) -> None:
    """Positions as the writer stores them, drivers as hello records them."""
    await store.drivers_hello(pool, sorted({(org, d, name) for d, name, _ in events}))
    async with pool.acquire() as conn:
        ids = await DriverKeys().ids(conn, [(org, d) for d, _, _ in events])
        await insert_events(conn, [Pending(None, org, d, ev, ev.ts) for d, _, ev in events], ids)


async def test_a_broker_that_lost_its_state_is_refilled_from_postgresql(org: str, pool: asyncpg.Pool) -> None:
    await stored(
        pool,
        org,
        ("d-1", "Ann", position(1, T0 + 1)),
        ("d-1", "Ann", position(2, T0 + 2, 9.0)),
        ("d-2", None, position(1, T0)),
    )
    setup = await Setup(org, pool).start()
    try:
        entries = drivers(await setup.snapshot())
        assert {d: (e["seq"], e["name"], e["online"]) for d, e in entries.items()} == {
            "d-1": (2, "Ann", False),
            "d-2": (1, None, False),
        }
        positions, _, _ = await setup.broker.live_state(org)
        assert {d: lts for d, (lts, _) in positions.items()} == {"d-1": T0 + 2, "d-2": T0}
        assert await setup.broker.is_synced(org)
        await pool.close()  # from now on, the broker alone must do
        setup.snapshots.pool = NO_POSTGRESQL
        again = drivers(await setup.snapshot())
        assert {d: e["seq"] for d, e in again.items()} == {"d-1": 2, "d-2": 1}
    finally:
        await setup.close()


async def test_the_newer_of_broker_and_postgresql_wins(org: str, pool: asyncpg.Pool) -> None:
    await stored(pool, org, ("d-1", None, position(1, T0 + 1)), ("d-2", None, position(5, T0 + 50)))
    setup = await Setup(org, pool).start()
    try:
        # A restarted broker: d-1 sent since (newer than PostgreSQL's), d-2's is older than stored.
        await setup.positions(("d-1", position(2, T0 + 10)), ("d-2", position(4, T0 + 40)))
        entries = drivers(await setup.snapshot())
        assert {d: e["seq"] for d, e in entries.items()} == {"d-1": 2, "d-2": 5}
        positions, _, _ = await setup.broker.live_state(org)
        assert {d: lts for d, (lts, _) in positions.items()} == {"d-1": T0 + 10, "d-2": T0 + 50}
    finally:
        await setup.close()


async def test_with_the_broker_down_the_snapshot_comes_from_postgresql(org: str, pool: asyncpg.Pool) -> None:
    await stored(pool, org, ("d-1", "Ann", position(1, T0 + 1)))
    setup = await Setup(org, pool).start()
    try:
        setup.bus.down()
        await until(lambda: not setup.broker.live, "the broker to report the outage")
        frames = await setup.snapshot()
        assert [f["type"] for f in frames] == ["status", "snapshot"]
        assert {d: (e["seq"], e["name"]) for d, e in drivers(frames).items()} == {"d-1": (1, "Ann")}
        setup.bus.up()
        await next_iteration()
        assert await setup.broker.is_synced(org) is False, "nothing was merged into a broker that was away"
    finally:
        await setup.close()


async def test_with_both_down_the_snapshot_is_empty_but_sent(org: str, pool: asyncpg.Pool) -> None:
    await stored(pool, org, ("d-1", None, position(1, T0 + 1)))
    setup = await Setup(org, pool).start()
    try:
        setup.bus.down()
        await pool.close()
        frames = await setup.snapshot()
        assert [f["type"] for f in frames] == ["status", "snapshot"]
        assert frames[1]["drivers"] == []
    finally:
        await setup.close()
