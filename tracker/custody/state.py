"""A package's state from its scans: a pure state machine (no I/O, no clock).

`replay(terms, scans)` applies the scans in corrected-time order (`Fact.t`: the phone's ts plus
the clock offset stored with the scan at its receipt, never later than that receipt), ties broken
by driver then seq, so the outcome depends on the *set* of stored scans, never on the order they
arrived in: a late scan uploaded after an offline period lands where it belongs and the result is
recomputed from all.

A client's *live* view of the holder (`Replay.live`) follows receipt instead: it is closed once a
scan that ends the holder's custody (any scan of the package by another driver, or the holder's
deliver, fail or return) was received after the holder's latest pickup or handover, whatever the
ts say, and only a later-received pickup or handover by the holder opens it again.

A scan is a physical fact: it always takes effect (a `deliver` by a driver who did not hold the
package still means the package was delivered, by that driver). A scan that does not fit the
state it lands on is an anomaly; so is a temperature outside the package's cold-chain range and a
delivery far from the destination. Anomalies are keyed by (kind, reason, driver, seq), so that the
caller can diff the anomaly set of a replay against the alerts it stored (`plan_alerts`): an
anomaly that a late scan explains disappears from the set and its alert is resolved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

CREATED: Final = "created"
PICKED_UP: Final = "picked_up"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
RETURNED: Final = "returned"
STATES: Final = (CREATED, PICKED_UP, DELIVERED, FAILED, RETURNED)

SCAN_ANOMALY: Final = "scan_anomaly"
TEMPERATURE: Final = "temperature_excursion"
FAR_DELIVERY: Final = "delivery_far_from_destination"

# The state each event leads to, whether or not it fits.
EFFECT: Final[Mapping[str, str]] = {
    "pickup": PICKED_UP,
    "handover": PICKED_UP,
    "deliver": DELIVERED,
    "fail": FAILED,
    "return": RETURNED,
}
# Events after which the driver who scanned no longer holds the package for a client's view.
CLOSING_EVENTS: Final = frozenset({"deliver", "fail", "return"})
# Events after which the driver who scanned holds the package.
OPENING_EVENTS: Final = frozenset({"pickup", "handover"})
EARTH_RADIUS_M: Final = 6_371_008.8


@dataclass(frozen=True, slots=True)
class Fact:
    """One stored scan, as the state machine needs it."""

    driver: str
    seq: int
    ts: int
    event: str
    lat: float | None = None
    lon: float | None = None
    temp_c: float | None = None
    received: int | None = None  # the server's clock at receipt (None: unknown, ts alone)
    offset: int | None = None  # the connection's clock offset at receipt (None: no fix before it)

    @property
    def t(self) -> int:
        """When it happened, on the server's clock as best known: ts corrected by the offset, and
        never after its receipt (the scan's own ts bounds the offset as a fix's does)."""
        t = self.ts if self.offset is None else self.ts + self.offset
        return t if self.received is None else min(t, self.received)

    @property
    def order(self) -> tuple[int, str, int]:
        return (self.t, self.driver, self.seq)

    @property
    def arrival(self) -> tuple[int, int]:
        """The order the service received it in (one phone's scans of one receipt: by seq)."""
        return (self.t if self.received is None else self.received, self.seq)


@dataclass(frozen=True, slots=True)
class Terms:
    """What the consignment says; `consigned=False` for a package scanned but never consigned."""

    consigned: bool = True
    dest_lat: float | None = None
    dest_lon: float | None = None
    temp_min: float | None = None
    temp_max: float | None = None
    max_delivery_m: float = 500.0


@dataclass(frozen=True, slots=True, order=True)
class Anomaly:
    kind: str
    reason: str
    driver: str
    seq: int
    ts: int = field(compare=False)
    message: str = field(compare=False)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.kind, self.reason, self.driver, self.seq)


@dataclass(frozen=True, slots=True)
class Replay:
    state: str
    holder: str | None  # picked_up: who holds it; otherwise who last handled it; None if nobody
    ts: int | None  # the ts of the scan that led to `state` (None: no scan yet)
    anomalies: frozenset[Anomaly]
    windows: tuple[tuple[str, int, int | None], ...]  # (driver, from ts, to ts or None: still holds)
    live: bool = False  # picked_up and the holder's live view open (module docstring)


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine), in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def misfit(state: str, holder: str | None, event: str, driver: str) -> tuple[str, str] | None:
    """Why `event` by `driver` does not fit a package in `state` held by `holder`: (reason,
    message), or None when it fits."""
    if event == "pickup":
        if state in (CREATED, RETURNED):
            return None
        if state == DELIVERED:
            return "already_delivered", f"{driver} scanned pickup of a package already delivered"
        if holder == driver:
            return "duplicate", f"{driver} scanned pickup of a package it already holds"
        return "held_by_other", f"{driver} scanned pickup while {holder} holds the package"
    if event == "handover":
        if state in (PICKED_UP, FAILED) and holder != driver:
            return None
        if state == DELIVERED:
            return "already_delivered", f"{driver} took over a package already delivered"
        if state in (CREATED, RETURNED):
            return "not_picked_up", f"{driver} took over a package nobody had picked up"
        return "duplicate", f"{driver} took over a package it already holds"
    # deliver, fail, return: only by the holder of a package on its way
    if state == PICKED_UP and holder == driver:
        return None
    if state == FAILED and holder == driver and event != "fail":
        return None  # a second attempt succeeded, or the package goes back after a failed one
    if state == DELIVERED:
        return "already_delivered", f"{driver} scanned {event} of a package already delivered"
    if state in (CREATED, RETURNED):
        return "not_picked_up", f"{driver} scanned {event} of a package nobody had picked up"
    if holder != driver:
        return "not_holder", f"{driver} scanned {event} of a package {holder} holds"
    return "duplicate", f"{driver} scanned {event} twice"


def _temperature(terms: Terms, fact: Fact) -> Anomaly | None:
    t = fact.temp_c
    if t is None or (terms.temp_min is None and terms.temp_max is None):
        return None
    if (terms.temp_min is not None and t < terms.temp_min) or (terms.temp_max is not None and t > terms.temp_max):
        lo = "" if terms.temp_min is None else f"{terms.temp_min:g}"
        hi = "" if terms.temp_max is None else f"{terms.temp_max:g}"
        return Anomaly(TEMPERATURE, "", fact.driver, fact.seq, fact.ts, f"{t:.1f} °C, cold-chain range {lo}..{hi} °C")
    return None


def _far(terms: Terms, fact: Fact) -> Anomaly | None:
    if (
        fact.event != "deliver"
        or fact.lat is None
        or fact.lon is None
        or terms.dest_lat is None
        or terms.dest_lon is None
    ):
        return None
    d = distance_m(fact.lat, fact.lon, terms.dest_lat, terms.dest_lon)
    if d <= terms.max_delivery_m:
        return None
    where = f"{d / 1000:.1f} km" if d >= 1000 else f"{d:.0f} m"
    return Anomaly(FAR_DELIVERY, "", fact.driver, fact.seq, fact.ts, f"delivered {where} from the destination")


def replay(terms: Terms, scans: Iterable[Fact]) -> Replay:
    """The package's state, holder and anomalies after `scans`, whatever order they come in."""
    state, holder, ts = CREATED, None, None
    anomalies: set[Anomaly] = set()
    windows: list[tuple[str, int, int | None]] = []
    facts = sorted(scans, key=lambda f: f.order)
    for fact in facts:
        if not terms.consigned:
            anomalies.add(
                Anomaly(
                    SCAN_ANOMALY,
                    "unknown_package",
                    fact.driver,
                    fact.seq,
                    fact.ts,
                    f"{fact.driver} scanned {fact.event} of a package that was never consigned",
                )
            )
        else:
            why = misfit(state, holder, fact.event, fact.driver)
            if why is not None:
                anomalies.add(Anomaly(SCAN_ANOMALY, why[0], fact.driver, fact.seq, fact.ts, why[1]))
        for extra in (_temperature(terms, fact), _far(terms, fact)):
            if extra is not None:
                anomalies.add(extra)
        new_state = EFFECT[fact.event]
        was_held: str | None = holder if state == PICKED_UP else None
        now_held = fact.driver if new_state == PICKED_UP else None
        if was_held != now_held:
            if was_held is not None:
                d, start, _ = windows[-1]
                windows[-1] = (d, start, fact.ts)
            if now_held is not None:
                windows.append((now_held, fact.ts, None))
        state, holder, ts = new_state, fact.driver, fact.ts
    live = state == PICKED_UP and holder is not None and live_view(facts, holder)
    return Replay(state, holder, ts, frozenset(anomalies), tuple(windows), live)


def live_view(facts: Iterable[Fact], holder: str) -> bool:
    """Whether a client's live view of `holder` is open: no scan ending its custody was received
    after its latest-received pickup or handover (at the same receipt ms, another driver's scan
    counts as later: the view fails closed)."""
    facts = list(facts)
    opened = max((f.arrival for f in facts if f.driver == holder and f.event in OPENING_EVENTS), default=None)
    if opened is None:
        return False
    for f in facts:
        if f.driver != holder and f.arrival[0] >= opened[0]:
            return False
        if f.driver == holder and f.event in CLOSING_EVENTS and f.arrival > opened:
            return False
    return True


AlertKey = tuple[str, str, str, int]


def plan_alerts(stored: Mapping[AlertKey, str], anomalies: Iterable[Anomaly]) -> tuple[list[Anomaly], list[AlertKey]]:
    """Diff a replay's anomalies against the stored alerts (key -> "open" | "resolved").

    Returns (anomalies to open: new ones, or ones resolved before that are back; keys of open
    alerts to resolve: no longer an anomaly)."""
    current = {a.key: a for a in anomalies}
    to_open = sorted(a for key, a in current.items() if stored.get(key) != "open")
    to_resolve = sorted(key for key, state in stored.items() if state == "open" and key not in current)
    return to_open, to_resolve


def holding_windows(replayed: Replay, driver: str) -> list[tuple[int, int | None]]:
    """When `driver` held the package (a client's view of it over HTTP), from the scans' ts."""
    return [(start, end) for d, start, end in replayed.windows if d == driver]


def in_window(windows: Sequence[tuple[int, int | None]], ts: int) -> bool:
    return any(start <= ts and (end is None or ts < end) for start, end in windows)
