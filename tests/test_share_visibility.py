"""A tracking link never shows anything outside its window, live or by polling: a property over
random journeys, in the style of tests/test_visibility.py.

One org, one client, two drivers on two instances that reconnect to the other at random; four
consigned packages, three of them with a link made before any custody (the fourth never shared,
so a driver also carries packages that are not the link's). Random pickups, handovers,
deliveries, failures and returns (fitting or not), positions, polls of every link on either
instance, and one link revoked halfway. Every link is followed live (server-sent events) on both
instances all along. A model says, for every position sent, which links may show it: those of the
packages its driver held when it was sent (a position sent right behind a delivery or a handover,
before its ack, is already outside). Then:

- no view, polled or live, shows a position its link may not show; the view is of the link's
  package; no driver and no ETA unless the package is `picked_up`;
- once revoked, polls answer 410 and every live feed of the link ends with `gone`;
- and the property is not vacuous: while a link's window is steadily open its newest position is
  shown, and positions were sent outside every window.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from harness.clients import Phone, acked, now_ms, pos, scan
from harness.http import consign, http, pkg_path, request
from harness.instances import Instance
from harness.sse import EventStream
from harness.tokens import token
from harness.wait import eventually

DRIVERS = ("d1", "d2")
CLOSING = ("deliver", "fail")
FAST = {"share_live_s": 0.2, "share_rate_per_s": 1000.0, "share_ip_rate_per_s": 1000.0, "share_burst": 1000}


@dataclass
class Sent:
    driver: str
    seq: int
    ts: int
    allowed: frozenset[str]  # packages whose links may show it
    required: frozenset[str]  # ... and must, if nothing newer is sent


@dataclass
class Feed:
    package: str
    stream: EventStream
    events: list[tuple[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def read(self) -> None:
        with contextlib.suppress(Exception):
            while (event := await self.stream.next(3600)) is not None:
                self.events.append(event)


class World:
    def __init__(self, a: Instance, b: Instance, org: str, rnd: random.Random) -> None:
        self.a, self.b, self.org, self.rnd = a, b, org, rnd
        self.disp = token("dispatcher", "disp", org)
        self.clock = 0
        self.holder: dict[str, str | None] = {}
        self.finished: set[str] = set()
        self.count = 0
        self.links: dict[str, str] = {}
        self.revoked: set[str] = set()
        self.phones: dict[str, Phone] = {}
        self.where: dict[str, Instance] = {}
        self.seqs: dict[str, int] = dict.fromkeys(DRIVERS, 0)
        self.sent: list[Sent] = []
        self.polls: list[tuple[str, bool, int, Any]] = []  # package, revoked then, status, body
        self.feeds: list[Feed] = []
        self.required_seen = 0

    def ts(self) -> int:
        """The phone's time: the real one (custody orders scans by it), never twice the same ms."""
        self.clock = max(now_ms(), self.clock + 1)
        return self.clock

    def allowed(self, driver: str) -> frozenset[str]:
        return frozenset(p for p in self.links if self.holder[p] == driver)

    def next_seq(self, driver: str) -> int:
        self.seqs[driver] += 1
        return self.seqs[driver]

    async def setup(self) -> None:
        for i, d in enumerate(DRIVERS):
            self.where[d] = (self.a, self.b)[i]
            self.phones[d] = await Phone.connect(self.where[d].url, token("driver", d, self.org))
        for linked in (True, True, True, False):  # links made before any custody
            await self.add_package(linked)

    # -- steps --------------------------------------------------------------------------------

    async def send_pos(self, driver: str, required: frozenset[str] | None = None) -> Sent:
        seq, ts = self.next_seq(driver), self.ts()
        allowed = self.allowed(driver)
        s = Sent(driver, seq, ts, allowed, allowed if required is None else required)
        self.sent.append(s)
        lat = -1.3 + self.rnd.random() / 10
        await self.phones[driver].send(pos(seq, ts=ts, lat=lat, lon=36.8, spd=8.0 + self.rnd.random() * 4))
        return s

    async def send_scan(self) -> None:
        """A fitting scan of an unfinished package: a pickup, a handover to the other driver, or its
        holder's delivery or failure (which finish it: a fresh package, shared like it, replaces it)."""
        rnd = self.rnd
        package = rnd.choice([p for p in self.holder if p not in self.finished])
        holder = self.holder[package]
        if holder is None:
            driver, event = rnd.choice(DRIVERS), "pickup"
        elif rnd.random() < 0.4:
            driver, event = holder, rnd.choice(CLOSING)
        else:
            driver, event = next(d for d in DRIVERS if d != holder), "handover"
        before = self.allowed(driver)
        self.holder[package] = driver if event in ("pickup", "handover") else None
        seq = self.next_seq(driver)
        phone = self.phones[driver]
        await phone.send(scan(seq, package, event, ts=self.ts()))
        # Right behind it on the same connection: already outside a window it closes.
        await self.send_pos(driver, required=before & self.allowed(driver))
        await acked(phone, seq)
        if holder is not None and holder != driver:
            await self.send_pos(holder)  # the previous holder, once the handover is received
        await self.settled(package)
        if event in CLOSING:
            self.finished.add(package)
            await self.add_package(package in self.links)

    async def add_package(self, linked: bool) -> None:
        self.count += 1
        package = f"P{self.count}"
        await consign(self.a, self.org, package, "c1", destination={"name": package, "lat": -1.25, "lon": 36.8})
        self.holder[package] = None
        if not linked:
            return
        status, made = await http(self.rnd.choice((self.a, self.b)), "POST", pkg_path(package, "/share"), self.disp)
        assert status == 201, made
        self.links[package] = urlsplit(made["url"]).fragment
        for inst in (self.a, self.b):
            feed = Feed(package, await EventStream.open(inst.port, "/v1/share/events", self.links[package]))
            assert feed.stream.status == 200
            feed.task = asyncio.create_task(feed.read())
            self.feeds.append(feed)

    async def settled(self, package: str) -> None:
        """Wait until the package's state is chained as the model says, and every driver's stamp
        carries exactly the marks of the linked packages it holds (on whichever instance)."""
        want = self.holder[package]

        async def state() -> Any:
            return (await http(self.a, "GET", pkg_path(package), self.disp))[1]

        await eventually(state, lambda p: (p["driver"] if p["state"] == "picked_up" else None) == want)

        def marks(d: str) -> set[str]:
            conn = self.where[d].node.drivers.sessions.get((self.org, d))
            stamp = orjson.loads(conn.stamp) if conn is not None and conn.stamp else []
            return {e[1:] for e in stamp if e.startswith("\x01")}

        async def probe() -> dict[str, set[str]]:
            return {d: marks(d) for d in DRIVERS}

        await eventually(probe, lambda got: got == {d: set(self.allowed(d)) for d in DRIVERS})

    async def poll(self, package: str | None = None) -> tuple[int, Any]:
        package = package or self.rnd.choice(sorted(self.links))
        inst = self.rnd.choice((self.a, self.b))
        status, _, body = await request(inst, "GET", "/v1/share", self.links[package])
        out = orjson.loads(body) if body else None
        self.polls.append((package, package in self.revoked, status, out))
        return status, out

    async def pos_and_see(self) -> None:
        """A position in a steadily open window: its links show it, by polling (not vacuous)."""
        driver = self.rnd.choice(DRIVERS)
        s = await self.send_pos(driver)
        await acked(self.phones[driver], s.seq)
        for package in s.required - self.revoked:

            async def shown(p: str = package) -> tuple[int, Any]:
                return await self.poll(p)

            await eventually(shown, lambda r: r[0] == 200 and (r[1]["driver"] or {}).get("ts") == s.ts)
            self.required_seen += 1

    async def reconnect(self) -> None:
        driver = self.rnd.choice(DRIVERS)
        await self.phones[driver].close()
        self.where[driver] = self.b if self.where[driver] is self.a else self.a
        self.phones[driver] = await Phone.connect(self.where[driver].url, token("driver", driver, self.org))
        for p in self.holder:
            await self.settled(p)

    async def revoke(self) -> None:
        package = self.rnd.choice(sorted(set(self.links) - self.revoked))
        status, out = await http(self.b, "DELETE", pkg_path(package, "/share"), self.disp)
        assert (status, out["revoked"]) == (200, 1)
        self.revoked.add(package)
        for feed in self.feeds:
            if feed.package == package:
                assert feed.task is not None
                await asyncio.wait_for(feed.task, 10)  # the feed ends...
                assert feed.events and feed.events[-1][0] == "gone", feed.events[-3:]  # ... with `gone`

    # -- the end ------------------------------------------------------------------------------

    async def stop(self) -> None:
        for feed in self.feeds:
            if feed.task is not None:
                feed.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed.task
            await feed.stream.close()

    def check_view(self, package: str, v: dict[str, Any], where: str) -> None:
        by_ts = {s.ts: s for s in self.sent}
        assert v["package"] == package, f"{where}: a view of another package {v}"
        d = v["driver"]
        if v["state"] != "picked_up":
            assert d is None and v["eta"] is None, f"{where}: a driver or an ETA outside custody {v}"
        if d is None:
            assert v["eta"] is None, f"{where}: an ETA without the driver {v}"
            return
        assert set(d) == {"lat", "lon", "ts"}, f"{where}: more than where and when {v}"
        s = by_ts.get(d["ts"])
        assert s is not None, f"{where}: a position nobody sent {v}"
        assert package in s.allowed, f"{where}: {package}'s link showed {s} outside its window"

    def check(self) -> None:
        for package, revoked, status, body in self.polls:
            if revoked:
                assert status == 410 and body["error"]["code"] == "gone", (package, status, body)
            else:
                assert status == 200, (package, status, body)
                self.check_view(package, body, "poll")
        for feed in self.feeds:
            names = [name for name, _ in feed.events]
            assert "gone" not in names[:-1], f"{feed.package}: events after gone"
            for name, v in feed.events:
                if name == "view":
                    self.check_view(feed.package, v, "live")
            assert (names[-1:] == ["gone"]) == (feed.package in self.revoked), (feed.package, names[-3:])


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_link_never_shows_anything_outside_its_window(start_instance: Any, org: str, seed: int) -> None:
    a, b = await start_instance(**FAST), await start_instance(**FAST)
    world = World(a, b, org, random.Random(seed))
    try:
        await world.setup()
        for step in range(45):
            if step == 25:
                await world.revoke()
            roll = world.rnd.random()
            if roll < 0.4:
                await world.send_scan()
            elif roll < 0.6:
                await world.send_pos(world.rnd.choice(DRIVERS))
            elif roll < 0.75:
                await world.pos_and_see()
            elif roll < 0.9:
                await world.poll()
            else:
                await world.reconnect()
        for p in world.links:
            await world.poll(p)
    finally:
        await world.stop()
    world.check()
    # The journeys opened and closed windows, and links showed what they had to: it proves something.
    assert any(s.allowed for s in world.sent) and any(not s.allowed for s in world.sent)
    assert any(s.required != s.allowed for s in world.sent)
    shown = [v for f in world.feeds for n, v in f.events if n == "view" and v["driver"]]
    assert world.required_seen > 0 and shown
