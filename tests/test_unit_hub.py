"""Dashboards and the hub (tracker/hub.py) with fake channels: routing by scope and filter, capped
queues, conflation, slow consumers and the snapshot hand-over, in milliseconds.

Messages are given to `Hub.deliver` exactly as a broker hands them over (`#<ms>` then lines of
`<stamp>\\t<frame>`). "Not delivered" is proven by a frame the dashboard does want, delivered
after it: flushes keep the order, so once that one is out, the other would have been too. A
peer that stops reading is a `FakeChannel` whose `writable` event is cleared.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from harness.fakes import FakeChannel, next_iteration, until
from tracker.auth import Principal
from tracker.hub import Dashboard, Hub
from tracker.protocol.events import Position, Scan
from tracker.protocol.live import pos_frame, presence_frame, scan_frame
from tracker.protocol.subscribe import Filter

T0 = 1_750_000_000_000


def pos(driver: str, ts: int = T0, lat: float = 1.0, lon: float = 2.0) -> bytes:
    return pos_frame(driver, Position(ts - T0 + 1, ts, lat, lon))


def scan(driver: str, package: str = "pk-1", ts: int = T0) -> bytes:
    return scan_frame(driver, Scan(ts - T0 + 1, ts, package, "pickup"))


def presence(driver: str, online: bool = True) -> bytes:
    return presence_frame(driver, online, T0)


def package(pk: str, state: str, driver: str | None) -> bytes:
    return orjson.dumps({"type": "package", "package": pk, "state": state, "driver": driver, "client": None, "ts": T0})


def message(*frames: bytes, stamp: bytes = b"") -> bytes:
    """One broker message: the publish time, then one line per frame."""
    return b"\n".join([b"#%d" % T0, *(stamp + b"\t" + f for f in frames)])


def seen(channel: FakeChannel) -> list[tuple[Any, ...]]:
    """What a dashboard was sent, in order, as (type, driver, ts or package or online)."""
    out: list[tuple[Any, ...]] = []
    for f in channel.items:
        detail = {"pos": "ts", "scan": "package", "package": "state", "presence": "online"}.get(f["type"], "code")
        out.append((f["type"], f.get("driver"), f.get(detail)))
    return out


class Dashboards:
    """Dashboards of one hub, each on a fake channel; all stopped at the end."""

    def __init__(self, hub: Hub, org: str) -> None:
        self.hub = hub
        self.org = org
        self.all: list[Dashboard] = []

    def open(
        self, flt: Filter | None = None, *, client: str | None = None, live: bool = True
    ) -> tuple[Dashboard, FakeChannel]:
        channel = FakeChannel()
        role = "client" if client else "dispatcher"
        principal = Principal(role, f"u-{len(self.all)}", self.org, exp=2**40, client=client)
        dash = Dashboard(principal, channel, self.hub, flt=flt or Filter())
        dash.live = live  # True: as if its snapshot were written already
        self.hub.add(dash)
        self.all.append(dash)
        return dash, channel


@pytest.fixture
async def hub() -> Hub:
    return Hub(flush_ms=1, backlog=2_000, queue_max=10_000)


@pytest.fixture
async def dashes(hub: Hub, org: str) -> AsyncIterator[Dashboards]:
    d = Dashboards(hub, org)
    yield d
    for dash in d.all:
        await hub.stop(dash)


# -- routing ----------------------------------------------------------------------------------


async def test_a_client_sees_only_frames_stamped_for_its_client(hub: Hub, dashes: Dashboards, org: str) -> None:
    _, c1 = dashes.open(client="c-1")
    _, c10 = dashes.open(client="c-10")
    _, dispatcher = dashes.open()
    hub.deliver(org, message(pos("d-1"), stamp=b'["c-2","c-1"]'))
    hub.deliver(org, message(pos("d-2"), stamp=b'["c-10"]'))  # "c-1" is a prefix of it: not c-1's
    hub.deliver(org, message(pos("d-3")))  # unstamped: nobody's client
    hub.deliver(org, message(presence("d-4"), stamp=b'["c-10","c-1"]'))
    for channel in (c1, c10, dispatcher):
        await until(lambda ch=channel: ("presence", "d-4", True) in seen(ch), "the last frame")
    assert [d for _, d, _ in seen(c1)] == ["d-1", "d-4"]
    assert [d for _, d, _ in seen(c10)] == ["d-2", "d-4"]
    assert [d for _, d, _ in seen(dispatcher)] == ["d-1", "d-2", "d-3", "d-4"]


async def test_a_filter_follows_its_drivers_and_the_carriers_of_its_packages(
    hub: Hub, dashes: Dashboards, org: str
) -> None:
    _, channel = dashes.open(Filter(drivers=frozenset({"d-1"}), packages=frozenset({"pk-1"})))
    for frame in [
        pos("d-1"),  # followed driver
        pos("d-2"),
        scan("d-2", "pk-1"),  # followed package, whoever scans it
        scan("d-2", "pk-2"),
        presence("d-2"),
        package("pk-1", "picked_up", "d-3"),  # d-3 now carries a followed package...
        pos("d-3"),
        presence("d-3"),
        package("pk-2", "picked_up", "d-4"),
        pos("d-4"),
        package("pk-1", "delivered", "d-3"),  # ...and no more
        pos("d-3", T0 + 1),
        presence("d-1", False),
    ]:
        hub.deliver(org, message(frame))
    await until(lambda: ("presence", "d-1", False) in seen(channel), "the last frame")
    assert seen(channel) == [
        ("pos", "d-1", T0),
        ("scan", "d-2", "pk-1"),
        ("package", "d-3", "picked_up"),
        ("pos", "d-3", T0),
        ("presence", "d-3", True),
        ("package", "d-3", "delivered"),
        ("presence", "d-1", False),
    ]


async def test_a_bbox_sends_one_last_position_outside(hub: Hub, dashes: Dashboards, org: str) -> None:
    dash, channel = dashes.open(Filter(bbox=(0.0, 0.0, 10.0, 10.0)))
    for ts, driver, lat in [(1, "d-1", 5.0), (2, "d-1", 20.0), (3, "d-1", 21.0), (4, "d-2", 20.0), (5, "d-1", 6.0)]:
        hub.deliver(org, message(pos(driver, T0 + ts, lat=lat, lon=lat)))
    hub.deliver(org, message(presence("d-2")))  # presence is not a place: a bbox does not filter it
    await until(lambda: ("presence", "d-2", True) in seen(channel), "the last frame")
    assert seen(channel) == [("pos", "d-1", T0 + 1), ("pos", "d-1", T0 + 2), ("pos", "d-1", T0 + 5), seen(channel)[-1]]
    assert dash.inside == {"d-1"}


async def test_frames_go_out_as_published_one_batch_per_flush(hub: Hub, dashes: Dashboards, org: str) -> None:
    _, channel = dashes.open()
    frames = [pos("d-1", lat=1.1234567890123), scan("d-1"), presence("d-2")]
    hub.deliver(org, message(*frames[:2]))
    hub.deliver(org, message(frames[2]))
    await until(lambda: channel.raw, "a flush")
    assert channel.raw == [b'{"type":"batch","items":[' + b",".join(frames) + b"]}"], "bytes as published"
    hub.deliver(org, message(frames[0]))
    await until(lambda: len(channel.raw) == 2, "a second flush")
    assert channel.raw[1] == frames[0], "a lone frame is not wrapped"


async def test_bad_lines_are_dropped_and_other_orgs_never_seen(hub: Hub, dashes: Dashboards, org: str) -> None:
    _, channel = dashes.open()
    hub.deliver(org + "-other", message(pos("d-9")))
    hub.deliver(org, b'#1\n\tnot json\n\t{"driver":"d-1"}\n\t[1]\n' + b"\t" + pos("d-1"))
    await until(lambda: channel.items, "the good frame")
    assert seen(channel) == [("pos", "d-1", T0)]


# -- capped queues ----------------------------------------------------------------------------


def _positions_burst(hub: Hub, org: str, drivers: int, per_driver: int, scans_every: int) -> list[bytes]:
    """Deliver interleaved positions (ts rising) and scans; returns the scans in order."""
    scans: list[bytes] = []
    for i in range(per_driver):
        for d in range(drivers):
            hub.deliver(org, message(pos(f"d-{d}", T0 + i)))
        if i % scans_every == 0:
            scans.append(scan("d-0", f"pk-{i}"))
            hub.deliver(org, message(scans[-1]))
    return scans


async def test_beyond_the_backlog_positions_are_conflated_and_nothing_else(dashes: Dashboards, org: str) -> None:
    hub = dashes.hub
    hub.backlog = 10
    _, channel = dashes.open()
    channel.writable.clear()  # the peer stopped reading
    scans = _positions_burst(hub, org, drivers=3, per_driver=40, scans_every=7)
    channel.writable.set()
    await until(lambda: channel.raw, "the flush")
    got = channel.items
    positions = [f for f in got if f["type"] == "pos"]
    assert [orjson.dumps(f) for f in got if f["type"] == "scan"] == scans, "every scan, in order"
    assert len(positions) <= hub.backlog + 3, "waiting positions are capped by the backlog"
    for d in range(3):
        assert max(f["ts"] for f in positions if f["driver"] == f"d-{d}") == T0 + 39, "each driver's newest"


async def test_conflation_never_sends_an_older_position_after_a_newer_one(dashes: Dashboards, org: str) -> None:
    hub = dashes.hub
    hub.backlog = 3
    _, channel = dashes.open()
    channel.writable.clear()
    for i in range(1, 6):  # the 4th is conflated (queue full); the 5th finds room in the queue again
        hub.deliver(org, message(pos("d-1", T0 + i)))
    channel.writable.set()
    await until(lambda: channel.raw, "the flush")
    ts = [f["ts"] - T0 for f in channel.items]
    assert ts == sorted(ts) and ts[-1] == 5, f"sent in this order: {ts}"


async def test_a_slow_consumer_is_closed_1013_beyond_queue_max(dashes: Dashboards, org: str) -> None:
    hub = dashes.hub
    hub.queue_max = 3
    hub.backlog = 5
    _, slow = dashes.open()
    slow.writable.clear()
    _, positions_only = dashes.open(Filter(drivers=frozenset({"d-1"})))
    positions_only.writable.clear()
    for i in range(200):  # positions alone never make a slow consumer: they are conflated
        hub.deliver(org, message(pos("d-1", T0 + i)))
    for i in range(3):
        hub.deliver(org, message(scan("d-2", f"pk-{i}")))
    assert slow.closes == [] and len(hub) == 2, "at queue_max: still there"
    hub.deliver(org, message(scan("d-2", "pk-3")))
    await until(lambda: slow.closes, "the close")
    assert slow.closes == [(1013, "slow consumer")]
    assert [(f["type"], f["code"]) for f in slow.frames] == [("error", "slow_consumer")], "told why, nothing else"
    assert len(hub) == 1 and positions_only.closes == []
    positions_only.writable.set()
    await until(lambda: positions_only.raw, "the conflated positions")
    assert [f["ts"] for f in positions_only.items][-1] == T0 + 199


# -- snapshot hand-over -----------------------------------------------------------------------


async def test_the_hand_over_replays_only_what_the_snapshot_does_not_hold(dashes: Dashboards, org: str) -> None:
    hub = dashes.hub
    dash, channel = dashes.open(live=False)  # its snapshot is being built
    for frame in [pos("d-1", T0 + 100), pos("d-1", T0 + 200), scan("d-1", "pk-1", T0 + 50), pos("d-2", T0 + 10)]:
        hub.deliver(org, message(frame))
    hub.deliver(org, message(pos("d-1", T0 + 300)))
    await next_iteration()
    assert channel.raw == [], "nothing goes out before the snapshot"
    dash.finish_snapshot({"d-1": T0 + 200, "d-3": T0})  # the snapshot holds d-1 at ts 200
    await until(lambda: channel.raw, "the replay")
    assert seen(channel) == [("scan", "d-1", "pk-1"), ("pos", "d-2", T0 + 10), ("pos", "d-1", T0 + 300)]
    assert dash.live and dash.pre == []
    hub.deliver(org, message(pos("d-1", T0 + 150)))  # live now: the hub forwards, the page orders
    await until(lambda: len(channel.items) == 4, "a live frame")
