"""Who sees what (PROTOCOL.md, "Identity and tokens"), as a property over random journeys.

Two orgs (with the same driver and client ids), two clients each, three drivers on two instances,
packages consigned to either client and one never consigned. Random scans (fitting or not),
positions, reconnections; a simple model says at every moment which clients may see each driver.
Then: no dashboard ever received a frame outside its scope (live or in a snapshot), every position
a client was entitled to while its window was steadily open reached it, and the HTTP API (packages,
drivers, trails) agrees. Around pickups and deliveries: a position the driver sends right after
its delivery never reaches the client; one sent by the previous holder once a handover is received
(on either instance) neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from harness.clients import Dash, Phone, acked, now_ms, pos, scan
from harness.http import consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token
from harness.wait import eventually

from .schema_check import assert_frame_valid

CLIENTS = ("c1", "c2")
DRIVERS = ("d1", "d2", "d3")
CLOSING = ("deliver", "fail", "return")


@dataclass
class Sent:
    org: str
    driver: str
    seq: int
    ts: int
    allowed: frozenset[str]  # clients that may receive it
    required: frozenset[str]  # clients that must receive it


@dataclass
class Org:
    name: str
    tag: str
    seq_base: int
    phones: dict[str, Phone] = field(default_factory=dict)
    where: dict[str, Instance] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)
    client_of: dict[str, str | None] = field(default_factory=dict)
    holder: dict[str, str | None] = field(default_factory=dict)
    presence: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)  # client -> expected frames

    def allowed(self, driver: str) -> frozenset[str]:
        return frozenset(c for p, h in self.holder.items() if h == driver and (c := self.client_of[p]) is not None)

    def next_seq(self, driver: str) -> int:
        self.seqs[driver] = self.seqs.get(driver, self.seq_base) + 1
        return self.seqs[driver]


class Collector:
    """Reads a dashboard's live frames in the background."""

    def __init__(self, dash: Dash, name: str) -> None:
        self.dash, self.name = dash, name
        self.frames: list[dict[str, Any]] = []
        self.more = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                self.frames += await self.dash.live(3600)
                self.more.set()

    async def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.frames):
                self.more.clear()
                await self.more.wait()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class World:
    def __init__(self, a: Instance, b: Instance, base: str, rnd: random.Random) -> None:
        self.a, self.b, self.rnd = a, b, rnd
        self.orgs = [Org(base + "-1", "A", 0), Org(base + "-2", "B", 1_000_000)]
        self.clock = now_ms() - 1_800_000
        self.sent: list[Sent] = []
        self.collectors: dict[tuple[str, str], Collector] = {}

    def ts(self) -> int:
        self.clock += 1000
        return self.clock

    async def setup(self) -> None:
        for o in self.orgs:
            self.collectors[(o.name, "disp")] = Collector(
                await Dash.connect(self.a.url, token("dispatcher", "u", o.name), subscribe={}), "disp"
            )
            for c, inst in zip(CLIENTS, (self.b, self.a), strict=True):
                dash = await Dash.connect(inst.url, token("client", "adm-" + c, o.name, client=c), subscribe={})
                assert dash.snapshot == {"drivers": [], "packages": [], "alerts": []}
                self.collectors[(o.name, c)] = Collector(dash, c)
                o.presence[c] = []
            follow = {"packages": [f"{o.tag}-P1", f"{o.tag}-P2", f"MARK-{o.tag}-c1"]}  # P1 is c2's: ignored
            self.collectors[(o.name, "follow")] = Collector(
                await Dash.connect(self.a.url, token("client", "adm-f", o.name, client="c1"), subscribe=follow), "c1"
            )
            for i, d in enumerate(DRIVERS):
                o.where[d] = self.b if i == 1 else self.a
                o.phones[d] = await Phone.connect(o.where[d].url, token("driver", d, o.name))
            for i in range(1, 5):
                package = f"{o.tag}-P{i}"
                o.client_of[package] = CLIENTS[i % 2]
                o.holder[package] = None
                await consign(self.a, o.name, package, CLIENTS[i % 2])
            o.client_of[f"{o.tag}-P5"] = None  # scanned, never consigned
            o.holder[f"{o.tag}-P5"] = None

    # -- steps --------------------------------------------------------------------------------

    async def send_pos(self, o: Org, driver: str, required: frozenset[str] | None = None) -> None:
        seq, ts = o.next_seq(driver), self.ts()
        allowed = o.allowed(driver)
        self.sent.append(Sent(o.name, driver, seq, ts, allowed, allowed if required is None else required))
        await o.phones[driver].send(pos(seq, ts=ts, lat=-1.3 + self.rnd.random() / 10, lon=36.8))

    async def send_scan(self, o: Org) -> None:
        rnd = self.rnd
        package = rnd.choice(sorted(o.holder))
        holder = o.holder[package]
        others = [d for d in DRIVERS if d != holder]
        if holder is None:
            driver, event = rnd.choice(DRIVERS), ("pickup" if rnd.random() < 0.8 else rnd.choice(CLOSING))
        elif rnd.random() < 0.5:
            driver, event = holder, rnd.choice(CLOSING)
        elif rnd.random() < 0.7:
            driver, event = rnd.choice(others), "handover"
        else:
            driver, event = rnd.choice(DRIVERS), rnd.choice(("pickup", "handover", *CLOSING))
        before = {d: o.allowed(d) for d in DRIVERS}
        o.holder[package] = driver if event in ("pickup", "handover") else None  # a scan is a fact
        seq = o.next_seq(driver)
        phone = o.phones[driver]
        await phone.send(scan(seq, package, event, ts=self.ts(), temp_c=rnd.choice((None, 5.0, 12.0))))
        # Right after, on the same connection: the window is already closed, maybe not yet open.
        await self.send_pos(o, driver, required=before[driver] & o.allowed(driver))
        await acked(phone, seq)  # the server has received the scan: the previous holder's window is closed
        if holder is not None and holder != driver:
            await self.send_pos(o, holder)
        disp = self.collectors[(o.name, "disp")]
        await disp.wait(lambda fs: any(f["type"] == "scan" and f["driver"] == driver and f["seq"] == seq for f in fs))
        await self.settled()

    async def settled(self) -> None:
        """Wait until every connected driver's stamp is what the model says (on either instance)."""

        def stamps() -> dict[tuple[str, str], bytes]:
            return {
                (o.name, d): (conn.stamp if (conn := o.where[d].node.drivers.sessions.get((o.name, d))) else b"?")
                for o in self.orgs
                for d in DRIVERS
            }

        async def probe() -> dict[tuple[str, str], bytes]:
            return stamps()

        expected = {
            (o.name, d): orjson.dumps(sorted(o.allowed(d))) if o.allowed(d) else b"" for o in self.orgs for d in DRIVERS
        }
        await eventually(probe, lambda got: got == expected)

    async def reconnect(self, o: Org) -> None:
        driver = self.rnd.choice(DRIVERS)
        disp = self.collectors[(o.name, "disp")]
        allowed = o.allowed(driver)
        count = len(self._presence(disp.frames, driver))
        await o.phones[driver].close()
        await disp.wait(lambda fs: len(self._presence(fs, driver)) > count)
        for c in allowed:
            o.presence[c].append((driver, False))
        o.where[driver] = self.b if o.where[driver] is self.a else self.a
        o.phones[driver] = await Phone.connect(o.where[driver].url, token("driver", driver, o.name))
        await disp.wait(lambda fs: len(self._presence(fs, driver)) > count + 1)
        for c in allowed:
            o.presence[c].append((driver, True))
        await self.settled()

    @staticmethod
    def _presence(frames: list[dict[str, Any]], driver: str) -> list[dict[str, Any]]:
        return [f for f in frames if f["type"] == "presence" and f["driver"] == driver]

    async def check_snapshot(self, o: Org) -> None:
        """A fresh client dashboard's snapshot: exactly the drivers holding its packages, its packages."""
        c = self.rnd.choice(CLIENTS)
        inst = self.rnd.choice((self.a, self.b))
        dash = await Dash.connect(inst.url, token("client", "snap", o.name, client=c), subscribe={})
        snap = dash.snapshot
        assert_frame_valid({"type": "snapshot", **snap}, "snapshot")
        assert {d["driver"] for d in snap["drivers"]} == {d for d in DRIVERS if c in o.allowed(d)}
        assert {p["package"] for p in snap["packages"]} <= {p for p, cl in o.client_of.items() if cl == c}
        for p in snap["packages"]:
            assert p["client"] == c
            assert (p["state"] == "picked_up") == (o.holder[p["package"]] is not None)
            if p["state"] == "picked_up":
                assert p["driver"] == o.holder[p["package"]]
        for a in snap["alerts"]:
            assert a["kind"] != "scan_anomaly" and o.client_of[a["package"]] == c
        await dash.close()

    # -- the end ------------------------------------------------------------------------------

    async def drain(self) -> None:
        """A marker package per client, consigned last: once it arrives, everything before it has."""
        for o in self.orgs:
            for c in CLIENTS:
                await consign(self.a, o.name, f"MARK-{o.tag}-{c}", c)
                o.client_of[f"MARK-{o.tag}-{c}"] = c
            for who in ("disp", *CLIENTS, "follow"):
                col = self.collectors[(o.name, who)]
                mark = f"MARK-{o.tag}-{'c1' if who == 'follow' else 'c2' if who == 'disp' else who}"
                await col.wait(lambda fs, m=mark: any(f.get("package") == m for f in fs))
        for col in self.collectors.values():
            await col.stop()

    def check_live(self) -> None:
        sent = {(s.org, s.driver, s.seq): s for s in self.sent}
        for (org_name, who), col in self.collectors.items():
            o = next(x for x in self.orgs if x.name == org_name)
            client = None if who == "disp" else col.name
            got_pos = set()
            for f in col.frames:
                if f["type"] == "pos":
                    s = sent.get((org_name, f["driver"], f["seq"]))
                    assert s is not None, f"{org_name}/{who} received another org's position {f}"
                    assert client is None or client in s.allowed, f"{org_name}/{who} saw {f} outside its window"
                    got_pos.add((f["driver"], f["seq"]))
                elif f["type"] in ("scan", "package", "alert"):
                    assert f["package"] in o.client_of, f"{org_name}/{who} received another org's {f}"
                    if client is not None:
                        assert o.client_of[f["package"]] == client, f"{org_name}/{who} received {f}"
                        assert f["type"] != "alert" or f["kind"] != "scan_anomaly"
                    if who == "follow":
                        assert f["package"] in (f"{o.tag}-P2", f"MARK-{o.tag}-c1")
                    assert_frame_valid(f, {"scan": "live-scan"}.get(f["type"], f["type"]))
                elif f["type"] == "presence" and client is not None:
                    assert (f["driver"], f["online"]) in o.presence[client], f"{org_name}/{who} received {f}"
            mine = [s for s in self.sent if s.org == org_name]
            if client is None:
                assert got_pos == {(s.driver, s.seq) for s in mine}, "a dispatcher sees every position"
            elif who != "follow":
                missing = [s for s in mine if client in s.required and (s.driver, s.seq) not in got_pos]
                assert not missing, f"{org_name}/{who} missed positions in its window: {missing}"
                presence = [(f["driver"], f["online"]) for f in col.frames if f["type"] == "presence"]
                assert presence == o.presence[client]

    async def check_http(self) -> None:
        for o in self.orgs:
            for c in CLIENTS:
                tok = token("client", "adm-" + c, o.name, client=c)
                _, listed = await http(self.a, "GET", "/v1/packages", tok)
                assert {p["package"] for p in listed["packages"]} == {p for p, cl in o.client_of.items() if cl == c}
                for p, cl in o.client_of.items():
                    status, out = await http(self.b, "GET", pkg_path(p), tok)
                    assert status == (200 if cl == c else 404), (p, c, out)
                _, drivers = await http(self.b, "GET", "/v1/drivers", tok)
                assert {d["driver"] for d in drivers["drivers"]} == {d for d in DRIVERS if c in o.allowed(d)}
                for d in DRIVERS:
                    expected = sorted(s.ts for s in self.sent if s.org == o.name and s.driver == d and c in s.allowed)
                    status, trail = await http(self.a, "GET", f"/v1/drivers/{d}/trail", tok)
                    got = trail["properties"]["ts"] if status == 200 else []
                    assert got == expected, (o.name, c, d, status)


@pytest.mark.parametrize("seed", [1, 2])
async def test_no_principal_sees_outside_its_scope(start_instance: Any, org: str, seed: int) -> None:
    a, b = await start_instance(), await start_instance()
    world = World(a, b, org, random.Random(seed))
    try:
        await world.setup()
        for _ in range(70):
            o = world.rnd.choice(world.orgs)
            roll = world.rnd.random()
            if roll < 0.45:
                await world.send_scan(o)
            elif roll < 0.85:
                await world.send_pos(o, world.rnd.choice(DRIVERS))
            elif roll < 0.93:
                await world.reconnect(o)
            else:
                await world.check_snapshot(o)
        await world.drain()
    finally:
        for col in world.collectors.values():
            await col.stop()
    world.check_live()
    await world.check_http()
    # The journeys did open and close windows: the test proves something.
    assert any(s.allowed for s in world.sent) and any(not s.allowed for s in world.sent)
    assert any(s.required != s.allowed for s in world.sent)
