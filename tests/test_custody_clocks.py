"""Custody windows against the phones' clocks (issue 11, items 2 and 10), over real sockets.

Phones' clocks are wrong by minutes in the field. A client's live view of a driver closes when
the service *receives* a scan that ends the client's custody, whatever its ts says, and opens at
the receipt of a pickup (positions in the same frame right after it reach the client); the
package's state and holder follow the real order of events, as corrected by each connection's
clock offset (estimated from its fixes), and stay a pure function of the stored scans.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.clients import Dash, Phone, acked, frames_of, now_ms, pos, scan
from harness.http import consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token
from harness.wait import wait_until
from tracker.custody.state import PICKED_UP, Fact, Terms, replay


class Watch:
    """A dashboard whose live frames a background task reads into `frames`."""

    def __init__(self, dash: Dash) -> None:
        self.dash = dash
        self.frames: list[dict[str, Any]] = []
        self.more = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, inst: Instance, tok: str) -> Watch:
        return cls(await Dash.connect(inst.url, tok, subscribe={}))

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                self.frames += await self.dash.live(3600)
                self.more.set()

    async def until(self, ftype: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while not (found := frames_of(self.frames, ftype, **match)):
                self.more.clear()
                await self.more.wait()
        return found[0]

    def positions(self, driver: str) -> set[int]:
        return {f["seq"] for f in frames_of(self.frames, "pos", driver=driver)}

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Skewed:
    """A phone whose clock is `skew` ms off the server's."""

    def __init__(self, phone: Phone, skew: int, seqs: itertools.count[int]) -> None:
        self.phone, self.skew, self.seqs = phone, skew, seqs
        self.last = 0

    def set_clock(self, skew: int) -> None:
        self.skew, self.last = skew, 0

    def ts(self) -> int:
        """The phone's clock, never the same ms twice (a position no newer than the last one
        never goes live)."""
        self.last = max(now_ms() + self.skew, self.last + 1)
        return self.last

    @classmethod
    async def connect(cls, inst: Instance, org: str, driver: str, skew: int) -> Skewed:
        phone = await Phone.connect(inst.url, token("driver", driver, org))
        return cls(phone, skew, itertools.count(phone.welcome["last_seq"] + 1))

    async def fix(self) -> int:
        """A position, acknowledged (so that the next one is received in a later ms: with a clock
        over 2 minutes fast, a position's live time is its receipt)."""
        seq = next(self.seqs)
        await self.phone.send(pos(seq, ts=self.ts()))
        await acked(self.phone, seq)
        return seq

    async def scan(self, package: str, event: str) -> int:
        seq = next(self.seqs)
        await self.phone.send(scan(seq, package, event, ts=self.ts()))
        await acked(self.phone, seq)
        return seq


async def visible_drivers(inst: Instance, org: str, client: str) -> set[str]:
    _, out = await http(inst, "GET", "/v1/drivers", token("client", "adm", org, client=client))
    return {d["driver"] for d in out["drivers"]}


async def package_of(inst: Instance, org: str, package: str) -> tuple[str, str | None]:
    _, out = await http(inst, "GET", pkg_path(package), token("dispatcher", "u", org))
    return out["state"], out["driver"]


# -- item 10: positions right after a pickup ---------------------------------------------------


async def test_positions_in_the_pickup_frame_reach_the_client(start_instance: Any, org: str) -> None:
    """A batch [pickup, pos, pos]: the client receives both positions (the window opens at the
    pickup's receipt), for a package consigned before the driver connected and one after (on
    another instance)."""
    a, b = await start_instance(), await start_instance()
    await consign(a, org, "P-1", "c1")
    client = await Watch.open(a, token("client", "adm", org, client="c1"))
    phone = await Phone.connect(b.url, token("driver", "d-1", org))
    try:
        t = now_ms()
        await phone.send({"type": "batch", "items": [scan(1, "P-1", ts=t), pos(2, ts=t + 1), pos(3, ts=t + 2)]})
        await acked(phone, 1, 2, 3)
        await client.until("package", package="P-1", state="picked_up")
        await phone.send(pos(4, ts=t + 3))  # sent once the window is surely open: a marker
        await client.until("pos", driver="d-1", seq=4)
        assert client.positions("d-1") == {2, 3, 4}

        await consign(a, org, "P-2", "c2")  # consigned after the driver connected, on the other instance
        stamps = b.node.extension.layer.stamps

        await wait_until(lambda: (org, "P-2") in stamps.client_of, 10, "instance b to learn P-2's client")
        other = await Watch.open(b, token("client", "adm", org, client="c2"))
        t = now_ms()
        await phone.send({"type": "batch", "items": [scan(5, "P-2", ts=t), pos(6, ts=t + 1), pos(7, ts=t + 2)]})
        await acked(phone, 5, 6, 7)
        await other.until("package", package="P-2", state="picked_up")
        await phone.send(pos(8, ts=t + 3))
        await other.until("pos", driver="d-1", seq=8)
        assert other.positions("d-1") == {6, 7, 8}
        await other.stop()
    finally:
        await client.stop()


# -- item 2: skewed clocks -------------------------------------------------------------------------


async def test_a_fast_phone_loses_the_package_it_handed_over(start_instance: Any, org: str) -> None:
    """d-1's phone runs 90 s fast: it picks up client A's package, d-2 (right clock) takes it
    over, d-1 picks up client B's package and drives on. A never sees d-1 again; the package is
    d-2's."""
    a, b = await start_instance(), await start_instance()
    await consign(a, org, "PA", "A")
    await consign(a, org, "PB", "B")
    disp = await Watch.open(a, token("dispatcher", "u", org))
    watch_a = await Watch.open(a, token("client", "adm", org, client="A"))
    watch_b = await Watch.open(a, token("client", "adm", org, client="B"))
    d1 = await Skewed.connect(b, org, "d-1", 90_000)
    d2 = await Skewed.connect(a, org, "d-2", 0)
    try:
        for _ in range(3):
            await d1.fix()
            await d2.fix()
        await d1.scan("PA", "pickup")
        await watch_a.until("package", package="PA", state="picked_up", driver="d-1")
        seen = await d1.fix()
        await watch_a.until("pos", driver="d-1", seq=seen)  # A's window on d-1 is open

        handover = await d2.scan("PA", "handover")
        await disp.until("scan", driver="d-2", seq=handover)
        await disp.until("package", package="PA", state="picked_up", driver="d-2")
        await d1.scan("PB", "pickup")
        await disp.until("package", package="PB", state="picked_up", driver="d-1")
        after = [await d1.fix() for _ in range(3)]
        await watch_b.until("pos", driver="d-1", seq=after[-1])  # B sees d-1: its positions flow
        await disp.until("pos", driver="d-1", seq=after[-1])

        assert not watch_a.positions("d-1") & set(after), "client A saw d-1 after the handover"
        assert await package_of(b, org, "PA") == ("picked_up", "d-2")
        assert await visible_drivers(b, org, "A") == {"d-2"}
        assert await visible_drivers(a, org, "B") == {"d-1"}
        fresh = await Dash.connect(b.url, token("client", "adm", org, client="A"), subscribe={})
        assert {d["driver"] for d in fresh.snapshot["drivers"]} == {"d-2"}
    finally:
        for w in (disp, watch_a, watch_b):
            await w.stop()


async def test_a_phone_set_back_delivers_before_its_pickup(start_instance: Any, org: str) -> None:
    """d-3 picks up client C's package; its clock is then set back 5 minutes and its deliver
    carries a ts before its pickup: the package is delivered and C no longer sees d-3."""
    a, b = await start_instance(), await start_instance()
    await consign(a, org, "PC", "C")
    disp = await Watch.open(a, token("dispatcher", "u", org))
    d3 = await Skewed.connect(b, org, "d-3", 0)
    await d3.fix()
    await d3.scan("PC", "pickup")
    await disp.until("package", package="PC", state="picked_up", driver="d-3")
    assert await visible_drivers(a, org, "C") == {"d-3"}
    d3.set_clock(-300_000)
    for _ in range(10):  # the connection's offset follows its last fixes
        await d3.fix()
    deliver = await d3.scan("PC", "deliver")
    await disp.until("scan", driver="d-3", seq=deliver)
    await disp.until("package", package="PC", state="delivered")
    try:
        assert await package_of(a, org, "PC") == ("delivered", "d-3")
        assert await visible_drivers(a, org, "C") == set()
        assert b.node.drivers.sessions[(org, "d-3")].stamp == b""
    finally:
        await disp.stop()


async def test_a_closing_scan_closes_the_view_whatever_its_ts(start_instance: Any, org: str) -> None:
    """Without any fix to estimate its clock, a phone 5 minutes slow takes over a package: the
    previous holder's live view closes at the handover's receipt and stays closed after the
    chaining (its ts puts it before the pickup)."""
    a, b = await start_instance(), await start_instance()
    await consign(a, org, "PD", "D")
    disp = await Watch.open(a, token("dispatcher", "u", org))
    watch = await Watch.open(b, token("client", "adm", org, client="D"))
    d1 = await Skewed.connect(a, org, "d-1", 0)
    d2 = await Skewed.connect(b, org, "d-2", -300_000)
    try:
        await d1.fix()
        await d1.scan("PD", "pickup")
        await watch.until("package", package="PD", state="picked_up", driver="d-1")
        seen = await d1.fix()
        await watch.until("pos", driver="d-1", seq=seen)
        handover = await d2.scan("PD", "handover")  # no fix before it on d-2's connection
        await disp.until("scan", driver="d-2", seq=handover)
        await disp.until("alert", driver="d-2", package="PD")  # chained and replayed: before the pickup
        after = [await d1.fix() for _ in range(3)]
        await disp.until("pos", driver="d-1", seq=after[-1])
        assert not watch.positions("d-1") & set(after), "client D saw d-1 after the handover was received"
        assert "d-1" not in await visible_drivers(a, org, "D")
    finally:
        await disp.stop()
        await watch.stop()


# -- property: random skews, random interleavings ---------------------------------------------------

NETWORK = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DRIVERS = ("d1", "d2", "d3")
PACKAGES = {"P1": "c1", "P2": "c2", "P3": "c1"}
skews = st.integers(-300_000, 300_000)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("pos"), st.sampled_from(DRIVERS)),
        st.tuples(
            st.just("scan"),
            st.sampled_from(DRIVERS),
            st.sampled_from(sorted(PACKAGES)),
            st.sampled_from(("pickup", "pickup", "handover", "deliver", "fail", "return")),
        ),
    ),
    min_size=4,
    max_size=14,
)


@pytest.fixture
async def two(start_instance: Any) -> tuple[Instance, Instance]:
    return await start_instance(), await start_instance()


EXAMPLES = itertools.count()


@NETWORK
@given(skew=st.tuples(skews, skews, skews), plan=steps)
async def test_no_frame_outside_a_window_whatever_the_clocks(
    two: tuple[Instance, Instance], org: str, skew: tuple[int, int, int], plan: list[tuple[str, ...]]
) -> None:
    """Three phones with random clock errors (minutes), on two instances, scan and drive in a
    random interleaving: no client ever receives a position sent outside its window (receipt
    order), and the packages end in the state and with the holder of the real order."""
    a, b = two
    org = f"{org}-{next(EXAMPLES)}"
    for package, client in PACKAGES.items():
        await consign(a, org, package, client)
    disp = await Watch.open(a, token("dispatcher", "u", org))
    watches = {c: await Watch.open(inst, token("client", "adm", org, client=c)) for c, inst in (("c1", a), ("c2", b))}
    phones = {d: await Skewed.connect((a, b, a)[i], org, d, skew[i]) for i, d in enumerate(DRIVERS)}
    holder: dict[str, str | None] = dict.fromkeys(PACKAGES)
    allowed: dict[tuple[str, int], frozenset[str]] = {}
    try:
        for d in DRIVERS:  # phones send fixes all the time: each connection's offset is known
            allowed[(d, await phones[d].fix())] = frozenset()
        for step in plan:
            if step[0] == "pos":
                d = step[1]
                may = frozenset(PACKAGES[p] for p, h in holder.items() if h == d)
                allowed[(d, await phones[d].fix())] = may
                continue
            _, d, package, event = step
            seq = await phones[d].scan(package, event)
            holder[package] = d if event in ("pickup", "handover") else None
            await disp.until("scan", driver=d, seq=seq)
        marks = {d: await phones[d].fix() for d in DRIVERS}
        for d, seq in marks.items():
            allowed[(d, seq)] = frozenset(PACKAGES[p] for p, h in holder.items() if h == d)
        mark = f"MARK-{next(EXAMPLES)}"
        for c, w in watches.items():  # a consignment published after everything above
            await consign(a, org, f"{mark}-{c}", c)
            await w.until("package", package=f"{mark}-{c}")
        await disp.until("package", package=f"{mark}-c2")
        assert {f["driver"] for f in frames_of(disp.frames, "pos")} == set(DRIVERS)
        for c, w in watches.items():
            for f in frames_of(w.frames, "pos"):
                assert c in allowed[(f["driver"], f["seq"])], f"{c} saw {f} outside its window"
        for package, h in holder.items():
            state, driver = await package_of(a, org, package)
            assert (state == "picked_up") == (h is not None), (package, state, driver, h)
            if h is not None:
                assert driver == h, (package, driver, h)
        for c in watches:
            expected = {d for d in DRIVERS if any(h == d and PACKAGES[p] == c for p, h in holder.items())}
            assert await visible_drivers(b, org, c) == expected
    finally:
        for w in (disp, *watches.values()):
            await w.stop()
            await w.dash.close()
        for p in phones.values():
            await p.phone.close()


# -- the pure rule (custody/state.py) ---------------------------------------------------------------


@st.composite
def stored_scans(draw: st.DrawFn) -> list[Fact]:
    """Scans as stored: one phone each with its clock error, received in order, with the offset
    its connection knew (or None)."""
    skew = {d: draw(skews) for d in DRIVERS}
    seqs = dict.fromkeys(DRIVERS, 0)
    facts, received = [], 1_796_000_000_000
    for _ in range(draw(st.integers(0, 10))):
        d = draw(st.sampled_from(DRIVERS))
        seqs[d] += 1
        received += draw(st.integers(0, 3000))
        delay = draw(st.integers(0, 50))
        known = draw(st.booleans())
        offset = -skew[d] + draw(st.integers(0, 50)) if known else None
        event = draw(st.sampled_from(("pickup", "handover", "deliver", "fail", "return")))
        facts.append(Fact(d, seqs[d], received - delay + skew[d], event, received=received, offset=offset))
    return facts


@settings(max_examples=300, deadline=None, database=None)
@given(stored_scans(), st.randoms(use_true_random=False))
def test_replay_is_a_function_of_the_stored_set(facts: list[Fact], rnd: Any) -> None:
    expected = replay(Terms(), facts)
    shuffled = facts[:]
    rnd.shuffle(shuffled)
    got = replay(Terms(), shuffled)
    assert (got.state, got.holder, got.windows, got.live) == (
        expected.state,
        expected.holder,
        expected.windows,
        expected.live,
    )


@settings(max_examples=300, deadline=None, database=None)
@given(stored_scans())
def test_the_live_view_closes_at_receipt_whatever_the_clocks(facts: list[Fact]) -> None:
    """Whatever the clocks and offsets: the live view is open only for the driver whose pickup or
    handover was received last, with no scan received after it (the receipt-order model), and the
    state follows the receipt order when every offset is known."""
    r = replay(Terms(), facts)
    last = max(facts, key=lambda f: f.arrival, default=None)
    model = last.driver if last is not None and last.event in ("pickup", "handover") else None
    if r.live:
        assert r.holder == model
    if facts and all(f.offset is not None for f in facts) and _apart(facts):
        assert (r.state == PICKED_UP) == (model is not None) and r.live == (model is not None)
        if model is not None:
            assert r.holder == model


def _apart(facts: list[Fact]) -> bool:
    """Receipts far enough apart that the offsets' error (network delay, <= 100 ms) cannot swap them."""
    times = sorted(f.received for f in facts if f.received is not None)
    return all(b - a > 100 for a, b in itertools.pairwise(times))
