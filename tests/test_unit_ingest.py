"""Ingest and Drivers (tracker/ingest.py, tracker/drivers.py) on MemoryBrokers, with fake channels
and a fake writer: no sockets, no PostgreSQL, no uvicorn; each test runs in milliseconds.

The fake writer is the writer's contract seen from ingest (`submit` returns what does not fit;
the outcome comes later through `Ingest.answered`), so "acks only after the commit" is tested by
calling `answered` ourselves, or not. `FakeChannel` and `until` are shared with the other unit
test modules (tests/test_unit_hub.py, tests/test_unit_snapshot.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from harness.fakes import FakeChannel, next_iteration, until
from tracker.auth import Principal
from tracker.broker import LiveItem
from tracker.config import Settings
from tracker.conn import DriverConn
from tracker.drivers import Drivers
from tracker.extension import NoExtension
from tracker.ingest import Ingest
from tracker.memory_broker import MemoryBroker, MemoryBus
from tracker.protocol.events import Event, Position, Scan
from tracker.protocol.live import pos_frame
from tracker.store import Pending

T0 = 1_750_000_000_000


class RecordingBroker(MemoryBroker):
    """A MemoryBroker that also records what ingest hands it, and every message it receives."""

    def __init__(self, bus: MemoryBus, instance_id: str) -> None:
        super().__init__(bus, instance_id=instance_id)
        self.published: list[tuple[str, list[LiveItem]]] = []
        self.received: list[tuple[str, bytes]] = []
        self.on_live = lambda org, msg: self.received.append((org, msg))

    def publish(self, org: str, items: list[LiveItem]) -> None:
        self.published.append((org, list(items)))
        super().publish(org, items)

    def live_frames(self, org: str) -> list[dict[str, Any]]:
        lines = [ln for o, m in self.received if o == org for ln in m.split(b"\n") if not ln.startswith(b"#")]
        return [orjson.loads(ln.partition(b"\t")[2]) for ln in lines]


class FakeWriter:
    """Takes up to `room` events; `Ingest.answered` is called by the test, as after a commit."""

    def __init__(self, room: int = 1_000_000) -> None:
        self.room = room
        self.items: list[Pending] = []

    def submit(self, items: list[Pending]) -> list[Pending]:
        took = items[: max(0, self.room - len(self.items))]
        self.items.extend(took)
        return items[len(took) :]


class Instance:
    """The core of one instance, as the node wires it, minus PostgreSQL and sockets."""

    def __init__(self, bus: MemoryBus, name: str) -> None:
        self.broker = RecordingBroker(bus, name)
        self.last_seq: dict[tuple[str, str], int] = {}
        self.hello_error: Exception | None = None
        self.welcomed_with: dict[str, int] = {}
        self.drivers = Drivers(Settings(), self.broker, self._hello, NoExtension())
        self.ingest = Ingest(self.drivers, self.broker, NoExtension())
        self.writer = FakeWriter()
        self.ingest.writer_submit = self.writer.submit
        self.broker.on_ctl = self._on_ctl  # Node._on_ctl, for kick
        self.broker.start()

    async def _hello(self, keys: list[tuple[str, str, str | None]]) -> list[int]:
        if self.hello_error is not None:
            raise self.hello_error
        return [self.last_seq.get((org, sub), 0) for org, sub, _ in keys]

    def _on_ctl(self, parts: list[str]) -> None:
        if parts[0] == "kick":
            self.drivers.kick(parts[1], parts[2], parts[3])

    async def connect(self, org: str, sub: str, *, name: str | None = None, welcome: bool = True) -> DriverConn:
        """What the driver endpoint does: register, then welcome (`welcomed_with` the last seq)."""
        conn = DriverConn(Principal("driver", sub, org, exp=2**40, name=name), FakeChannel())
        # The tests read the org's live feed here, as a dashboard on this instance would: an instance
        # receives only the orgs it follows (issue 17).
        await self.broker.follow(org)
        self.welcomed_with[conn.conn_id] = conn.seq_high = await self.drivers.connected(conn)
        conn.welcomed = welcome
        return conn

    async def submit(self, conn: DriverConn, events: list[Event], received: int = T0) -> list[Pending]:
        """One frame's events; returns what reached the writer (after this tick)."""
        n = len(self.writer.items)
        self.ingest.submit(conn, events, received)
        await until(lambda: len(self.writer.items) > n or self.ingest.draining, "the tick")
        return self.writer.items[n:]


def chan(conn: DriverConn) -> FakeChannel:
    channel = conn.channel
    assert isinstance(channel, FakeChannel)
    return channel


def p(seq: int, ts: int = 0) -> Position:
    return Position(seq, ts or T0 + seq, 1.0, 2.0)


def s(seq: int, package: str = "pk-1") -> Scan:
    return Scan(seq, T0 + seq, package, "pickup")


def acked(channel: FakeChannel) -> list[list[list[int]]]:
    return [f["ranges"] for f in channel.of_type("ack")]


@pytest.fixture
async def bus() -> MemoryBus:
    return MemoryBus()


@pytest.fixture
async def node(bus: MemoryBus) -> AsyncIterator[Instance]:
    inst = Instance(bus, "a")
    yield inst
    await inst.broker.close()


# -- acks -------------------------------------------------------------------------------------


async def test_acks_only_after_the_commit(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    pending = await node.submit(conn, [p(1), p(2), s(3)])
    assert [it.event.seq for it in pending] == [1, 2, 3] and all(it.owner is conn for it in pending)
    await until(lambda: len(node.broker.live_frames(org)) == 4, "presence, two positions, a scan")
    assert chan(conn).of_type("ack") == [], "no ack before the commit"
    node.ingest.answered(pending, [])
    assert acked(chan(conn)) == [[[1, 3]]]


async def test_one_ack_per_driver_per_commit(node: Instance, org: str) -> None:
    one, two = await node.connect(org, "d-1"), await node.connect(org, "d-2")
    node.ingest.submit(one, [p(1)], T0)
    node.ingest.submit(two, [p(7)], T0)
    node.ingest.submit(one, [p(2), p(4)], T0)  # another frame of the same connection, same tick
    await until(lambda: len(node.writer.items) == 4, "one tick to the writer")
    node.ingest.answered(node.writer.items, [])
    assert acked(chan(one)) == [[[1, 2], [4, 4]]]
    assert acked(chan(two)) == [[[7, 7]]]


async def test_acks_go_to_the_connection_that_replaced_the_sender(node: Instance, org: str) -> None:
    old = await node.connect(org, "d-1")
    pending = await node.submit(old, [p(1), p(2)])
    new = await node.connect(org, "d-1", welcome=False)
    await until(lambda: chan(old).closes == [(4001, "replaced by a newer connection")], "4001 for the old one")
    node.ingest.answered(pending[:1], [])
    assert chan(new).raw == [] and chan(old).of_type("ack") == [], "nothing reaches a phone before its welcome"
    new.welcomed = True
    node.ingest.answered(pending[1:], [])
    assert acked(chan(new)) == [[[2, 2]]] and chan(old).of_type("ack") == []
    await node.drivers.disconnected(new)
    node.ingest.answered(pending, [])  # nobody to answer: the phone resends on its next connection
    assert acked(chan(new)) == [[[2, 2]]]


async def test_one_ack_per_driver_per_commit_across_a_replacement(node: Instance, org: str) -> None:
    old = await node.connect(org, "d-1")
    node.ingest.submit(old, [p(1)], T0)
    new = await node.connect(org, "d-1")
    node.ingest.submit(new, [p(2)], T0)
    await until(lambda: len(node.writer.items) == 2, "both events at the writer")
    node.ingest.answered(node.writer.items, [])  # one commit holds both
    assert acked(chan(new)) == [[[1, 2]]]


async def test_refusals_name_their_seqs_and_unavailable_ones_are_merged(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    pending = await node.submit(conn, [p(1), p(2), p(3), p(4), p(6), p(7)])
    by_seq = {it.event.seq: it for it in pending}
    node.ingest.answered(
        [by_seq[7]],
        [
            (by_seq[1], "conflict", "seq already names a different event"),
            (by_seq[2], "invalid", "the event cannot be stored"),
            (by_seq[3], "unavailable", "x"),
            (by_seq[4], "unavailable", "x"),
            (by_seq[6], "unavailable", "x"),
        ],
    )
    errors = chan(conn).of_type("error")
    assert [(e["code"], e.get("seq"), e.get("ranges")) for e in errors] == [
        ("conflict", 1, None),
        ("invalid", 2, None),
        ("unavailable", None, [[3, 4], [6, 6]]),
    ]
    assert errors[2]["retry_ms"] == 2000
    assert acked(chan(conn)) == [[[7, 7]]]


async def test_a_full_writer_buffer_answers_unavailable_at_once(node: Instance, org: str) -> None:
    node.writer.room = 2
    conn = await node.connect(org, "d-1")
    node.ingest.submit(conn, [p(1), p(2), p(3), p(4)], T0)
    await until(lambda: chan(conn).of_type("error"), "the refusal")
    [error] = chan(conn).of_type("error")
    assert (error["code"], error["ranges"]) == ("unavailable", [[3, 4]])
    assert [it.event.seq for it in node.writer.items] == [1, 2]


async def test_draining_refuses_every_event_and_stores_nothing(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    node.ingest.draining = True
    node.ingest.submit(conn, [p(1), s(2)], T0)
    errors = chan(conn).of_type("error")
    assert [(e["code"], e["seq"], e["retry_ms"]) for e in errors] == [
        ("unavailable", 1, 1000),
        ("unavailable", 2, 1000),
    ]
    await next_iteration()  # a tick scheduled by `submit` would have run by now
    assert node.writer.items == [] and node.broker.published == []


# -- live -------------------------------------------------------------------------------------


async def test_only_positions_newer_than_the_drivers_newest_go_live(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    await node.submit(conn, [p(1, T0 + 300), p(2, T0 + 100), p(3, T0 + 400), p(4, T0 + 400)])
    await node.submit(conn, [p(5, T0 + 350)])  # later, yet older than what went live
    handed = [(kind, lts) for _, items in node.broker.published for kind, _, lts, _, _ in items]
    assert handed == [("p", T0 + 300), ("p", T0 + 400)]
    # ...and every event goes to the writer, live or not.
    assert [it.event.seq for it in node.writer.items] == [1, 2, 3, 4, 5]
    await until(lambda: len(node.broker.live_frames(org)) >= 3, "presence and two positions")
    assert [f["seq"] for f in node.broker.live_frames(org) if f["type"] == "pos"] == [1, 3]


async def test_a_new_connection_starts_from_the_brokers_newest(bus: MemoryBus, node: Instance, org: str) -> None:
    other = Instance(bus, "b")
    try:
        first = await other.connect(org, "d-1")
        await other.submit(first, [p(1, T0 + 500)])
        await until(lambda: other.broker.received, "the position at the broker")
        conn = await node.connect(org, "d-1")  # on this instance, after the other
        assert conn.live_ts == T0 + 500
        await node.submit(conn, [p(2, T0 + 400), p(3, T0 + 600)])
        assert [lts for _, items in node.broker.published for _, _, lts, _, _ in items] == [T0 + 600]
    finally:
        await other.broker.close()


async def test_a_clock_far_ahead_ranks_by_receipt(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    await node.submit(conn, [p(1, T0 + 3_600_000)], received=T0)  # an hour ahead: ranks as T0
    await node.submit(conn, [p(2, T0 + 1_000)], received=T0 + 1_000)  # a fixed clock is newer
    assert [lts for _, items in node.broker.published for _, _, lts, _, _ in items] == [T0, T0 + 1_000]


async def test_scans_go_live_at_receipt_without_an_extension(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    conn.stamp = b'["c-1"]'
    await node.submit(conn, [s(1), s(2, "pk-2")])
    await until(lambda: len(node.broker.live_frames(org)) == 3, "presence and both scans")
    assert [(f["type"], f.get("package")) for f in node.broker.live_frames(org)] == [
        ("presence", None),
        ("scan", "pk-1"),
        ("scan", "pk-2"),
    ]
    [(_, items)] = node.broker.published
    assert [(kind, stamp) for kind, _, _, stamp, _ in items] == [("a", b'["c-1"]'), ("a", b'["c-1"]')]
    assert chan(conn).of_type("ack") == [], "live at receipt, acked only after the commit"


async def test_one_publish_per_org_per_tick(node: Instance, org: str) -> None:
    one, two = await node.connect(org, "d-1"), await node.connect(org, "d-2")
    node.ingest.submit(one, [p(1)], T0)
    node.ingest.submit(two, [p(1)], T0)
    node.ingest.publish(org, ("a", "", T0, b"", b'{"type":"package","package":"pk-1"}'))
    await until(lambda: len(node.writer.items) == 2, "the tick")
    assert [(o, len(items)) for o, items in node.broker.published] == [(org, 3)]


# -- presence and replacement -----------------------------------------------------------------


async def test_presence_online_and_offline_through_the_broker(node: Instance, org: str) -> None:
    node.last_seq[(org, "d-1")] = 41
    conn = await node.connect(org, "d-1", name="Ann")
    assert node.welcomed_with[conn.conn_id] == 41
    assert node.drivers.get((org, "d-1")) is conn and len(node.drivers) == 1
    await until(lambda: node.broker.live_frames(org), "presence online")
    [online] = node.broker.live_frames(org)
    assert (online["type"], online["online"], online["name"]) == ("presence", True, "Ann")
    assert (await node.broker.live_state(org))[1:] == ({"d-1": "Ann"}, {"d-1"})
    await node.drivers.disconnected(conn)
    await until(lambda: len(node.broker.live_frames(org)) == 2, "presence offline")
    assert node.broker.live_frames(org)[1]["online"] is False and (org, "d-1") not in node.drivers
    assert (await node.broker.live_state(org))[2] == set()


async def test_a_replaced_connection_closing_leaves_the_driver_online(node: Instance, org: str) -> None:
    old = await node.connect(org, "d-1")
    new = await node.connect(org, "d-1")
    assert old.closed and node.drivers.get((org, "d-1")) is new
    await node.drivers.disconnected(old)
    assert (await node.broker.live_state(org))[2] == {"d-1"}
    await node.broker.publish_control(org, "mark", b"")
    await until(lambda: len(node.broker.live_frames(org)) == 2, "both presence lines")
    assert [f["online"] for f in node.broker.live_frames(org)] == [True, True]


async def test_a_newer_connection_on_another_instance_kicks_this_one(bus: MemoryBus, node: Instance, org: str) -> None:
    other = Instance(bus, "b")
    try:
        here = await node.connect(org, "d-1")
        there = await other.connect(org, "d-1")
        await until(lambda: chan(here).closes, "the kick")
        assert chan(here).closes == [(4001, "replaced by a newer connection")]
        assert here.closed and (org, "d-1") not in node.drivers
        assert other.drivers.get((org, "d-1")) is there and not chan(there).closes
        pending = await node.submit(here, [p(9)])  # a frame that was in flight
        node.ingest.answered(pending, [])
        assert chan(here).of_type("ack") == [] and chan(there).of_type("ack") == []
    finally:
        await other.broker.close()


async def test_welcome_survives_an_absent_database_and_an_absent_broker(
    bus: MemoryBus, node: Instance, org: str
) -> None:
    node.hello_error = OSError("PostgreSQL is away")
    node.last_seq[(org, "d-1")] = 5
    conn = await node.connect(org, "d-1")
    assert node.welcomed_with[conn.conn_id] == 0, "welcome must not wait for PostgreSQL"
    node.hello_error = None
    bus.down()  # every broker call raises BrokerUnavailable
    conn = await node.connect(org, "d-2")
    assert node.welcomed_with[conn.conn_id] == 0 and conn.live_ts == 0
    await node.drivers.disconnected(conn)  # never raises: the presence expires instead
    assert node.drivers.get((org, "d-2")) is None


async def test_frames_are_encoded_once_per_position(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    ev = p(1, T0 + 5)
    await node.submit(conn, [ev])
    [(_, [(kind, driver, lts, stamp, frame)])] = node.broker.published
    assert (kind, driver, lts, stamp, frame) == ("p", "d-1", T0 + 5, b"", pos_frame("d-1", ev))


# -- only stored events are shown (issue 11, item 1) ------------------------------------------


def live_positions(node: Instance, org: str) -> list[tuple[int, float]]:
    return [(f["seq"], f["lat"]) for f in node.broker.live_frames(org) if f["type"] == "pos"]


async def test_an_event_under_a_stored_seq_goes_live_only_once_stored(node: Instance, org: str) -> None:
    node.last_seq[(org, "d-1")] = 5
    conn = await node.connect(org, "d-1")
    assert conn.seq_high == 5
    other = Position(5, T0 + 900, 50.0, 50.0)  # newer than anything, under a stored seq
    [refused] = await node.submit(conn, [other])
    assert refused.deferred and node.broker.published == [], "not live at receipt"
    node.ingest.answered([], [(refused, "conflict", "seq already names a different event")])
    await next_iteration()
    assert node.broker.published == [] and conn.live_ts == 0, "a refused event never goes live"
    [resent] = await node.submit(conn, [p(4, T0 + 800)])  # a stored seq again: this time the same event
    node.ingest.answered([resent], [])
    await until(lambda: live_positions(node, org), "the stored position, live after its commit")
    assert live_positions(node, org) == [(4, 1.0)] and conn.live_ts == T0 + 800


async def test_a_seq_above_the_highest_seen_goes_live_at_receipt_once(node: Instance, org: str) -> None:
    conn = await node.connect(org, "d-1")
    pending = await node.submit(conn, [p(1, T0 + 100), Position(1, T0 + 200, 9.0, 9.0), p(2, T0 + 50)])
    assert [it.deferred for it in pending] == [False, True, False] and conn.seq_high == 2
    await until(lambda: live_positions(node, org), "seq 1 at receipt")
    assert live_positions(node, org) == [(1, 1.0)], "the twin under seq 1 waits for its commit"
    node.ingest.answered([pending[0], pending[2]], [(pending[1], "conflict", "seq already names a different event")])
    await next_iteration()
    assert live_positions(node, org) == [(1, 1.0)]
    # A deferred position that is stored but no longer the newest stays off the map.
    [late] = await node.submit(conn, [p(2, T0 + 60)])
    node.ingest.answered([late], [])
    await next_iteration()
    assert live_positions(node, org) == [(1, 1.0)]


async def test_a_deferred_scan_goes_live_only_once_stored(node: Instance, org: str) -> None:
    node.last_seq[(org, "d-1")] = 3
    conn = await node.connect(org, "d-1")
    [bad, good] = await node.submit(conn, [Scan(3, T0, "pk-9", "deliver"), s(2)])
    await next_iteration()
    assert [f["type"] for f in node.broker.live_frames(org)] == ["presence"]
    node.ingest.answered([good], [(bad, "conflict", "seq already names a different event")])
    await until(lambda: len(node.broker.live_frames(org)) == 2, "the stored scan")
    assert [(f["type"], f.get("seq")) for f in node.broker.live_frames(org)] == [("presence", None), ("scan", 2)]


async def test_a_replaced_connection_starts_from_its_welcome(bus: MemoryBus, node: Instance, org: str) -> None:
    """The conflicting event reaches instance b after instance a stored seq 1: b's welcome says 1."""
    other = Instance(bus, "b")
    try:
        first = await node.connect(org, "d-1")
        [stored] = await node.submit(first, [p(1, T0 + 100)])
        node.ingest.answered([stored], [])
        other.last_seq[(org, "d-1")] = 1  # what PostgreSQL answers b's hello now
        conn = await other.connect(org, "d-1")
        [conflict] = await other.submit(conn, [Position(1, T0 + 900, 50.0, 50.0)])
        other.ingest.answered([], [(conflict, "conflict", "seq already names a different event")])
        await until(lambda: node.broker.live_frames(org), "presence")
        await other.broker.publish_control(org, "mark", b"")
        await until(lambda: len([f for f in node.broker.live_frames(org) if f["type"] == "presence"]) == 2, "b's")
        assert live_positions(node, org) == [(1, 1.0)]
        assert (await node.broker.live_state(org))[0]["d-1"][0] == T0 + 100
    finally:
        await other.broker.close()
