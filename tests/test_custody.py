"""The package state machine (tracker/custody/state.py): pure, no event loop."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.custody.state import (
    DELIVERED,
    FAILED,
    FAR_DELIVERY,
    PICKED_UP,
    RETURNED,
    SCAN_ANOMALY,
    TEMPERATURE,
    AlertKey,
    Fact,
    Terms,
    distance_m,
    holding_windows,
    in_window,
    plan_alerts,
    replay,
)

T0 = 1_764_240_000_000
COLD = Terms(temp_min=2.0, temp_max=8.0, dest_lat=-1.3, dest_lon=36.8)


def f(driver: str, seq: int, ts: int, event: str, **kw: float) -> Fact:
    return Fact(driver, seq, T0 + ts, event, **kw)  # type: ignore[arg-type]


def reasons(facts: list[Fact], terms: Terms = COLD) -> set[tuple[str, str, str, int]]:
    return {a.key for a in replay(terms, facts).anomalies}


def test_a_clean_journey_has_no_anomaly() -> None:
    facts = [
        f("d1", 1, 10, "pickup", temp_c=5.0),
        f("d1", 2, 20, "handover"),
        f("d2", 1, 20, "handover"),
        f("d2", 2, 30, "deliver", lat=-1.3001, lon=36.8001, temp_c=4.0),
    ]
    # d1 scanning "handover" of a package it holds is a duplicate; the receiver scans a handover.
    assert reasons(facts) == {(SCAN_ANOMALY, "duplicate", "d1", 2)}
    good = [facts[0], facts[2], facts[3]]
    r = replay(COLD, good)
    assert (r.state, r.holder, r.ts, r.anomalies) == (DELIVERED, "d2", T0 + 30, frozenset())
    assert r.windows == (("d1", T0 + 10, T0 + 20), ("d2", T0 + 20, T0 + 30))


def test_states_follow_scans() -> None:
    assert replay(COLD, []).state == "created"
    assert replay(COLD, [f("d1", 1, 1, "pickup")]).state == PICKED_UP
    fail = [f("d1", 1, 1, "pickup"), f("d1", 2, 2, "fail")]
    assert (replay(COLD, fail).state, reasons(fail)) == (FAILED, set())
    back = [*fail, f("d1", 3, 3, "return")]
    assert (replay(COLD, back).state, reasons(back)) == (RETURNED, set())
    again = [*back, f("d2", 1, 4, "pickup"), f("d2", 2, 5, "deliver")]
    assert (replay(COLD, again).state, reasons(again)) == (DELIVERED, set())
    retry = [*fail, f("d1", 3, 3, "deliver")]
    assert (replay(COLD, retry).state, reasons(retry)) == (DELIVERED, set())


def test_scans_that_do_not_fit_are_anomalies_but_still_facts() -> None:
    twice = [f("d1", 1, 1, "pickup"), f("d1", 2, 2, "deliver"), f("d1", 3, 3, "deliver")]
    assert reasons(twice) == {(SCAN_ANOMALY, "already_delivered", "d1", 3)}
    stranger = [f("d1", 1, 1, "pickup"), f("d2", 1, 2, "deliver")]
    r = replay(COLD, stranger)
    assert (r.state, r.holder) == (DELIVERED, "d2")  # delivered, by whoever scanned it
    assert reasons(stranger) == {(SCAN_ANOMALY, "not_holder", "d2", 1)}
    assert reasons([f("d1", 1, 1, "deliver")]) == {(SCAN_ANOMALY, "not_picked_up", "d1", 1)}
    assert reasons([f("d1", 1, 1, "pickup"), f("d2", 1, 2, "pickup")]) == {(SCAN_ANOMALY, "held_by_other", "d2", 1)}
    unknown = replay(Terms(consigned=False), [f("d1", 1, 1, "pickup"), f("d1", 2, 2, "deliver")])
    assert {a.key for a in unknown.anomalies} == {
        (SCAN_ANOMALY, "unknown_package", "d1", 1),
        (SCAN_ANOMALY, "unknown_package", "d1", 2),
    }


def test_temperature_and_distance() -> None:
    facts = [f("d1", 1, 1, "pickup", temp_c=9.5), f("d1", 2, 2, "deliver", lat=-1.31, lon=36.8, temp_c=1.9)]
    r = replay(COLD, facts)
    assert {a.key for a in r.anomalies} == {
        (TEMPERATURE, "", "d1", 1),
        (TEMPERATURE, "", "d1", 2),
        (FAR_DELIVERY, "", "d1", 2),
    }
    far = next(a for a in r.anomalies if a.kind == FAR_DELIVERY)
    assert far.message == "delivered 1.1 km from the destination"
    assert 1100 < distance_m(-1.3, 36.8, -1.31, 36.8) < 1125
    near = [f("d1", 1, 1, "pickup"), f("d1", 2, 2, "deliver", lat=-1.3040, lon=36.8)]  # ~445 m
    assert reasons(near) == set()
    assert reasons(near, Terms(dest_lat=-1.3, dest_lon=36.8, max_delivery_m=400)) == {(FAR_DELIVERY, "", "d1", 2)}
    assert reasons([f("d1", 1, 1, "pickup", temp_c=30.0)], Terms()) == set()  # no cold chain


def test_a_late_scan_explains_an_anomaly() -> None:
    pickup, deliver = f("d1", 1, 10, "pickup"), f("d2", 5, 30, "deliver")
    before = replay(COLD, [pickup, deliver])
    assert {a.key for a in before.anomalies} == {(SCAN_ANOMALY, "not_holder", "d2", 5)}
    stored: dict[AlertKey, str] = {a.key: "open" for a in before.anomalies}
    after = replay(COLD, [pickup, deliver, f("d2", 4, 20, "handover")])  # uploaded after an offline period
    to_open, to_resolve = plan_alerts(stored, after.anomalies)
    assert (to_open, to_resolve) == ([], [(SCAN_ANOMALY, "not_holder", "d2", 5)])
    assert holding_windows(after, "d2") == [(T0 + 20, T0 + 30)]
    assert in_window(holding_windows(after, "d1"), T0 + 15) and not in_window(holding_windows(after, "d1"), T0 + 20)


def test_plan_alerts_reopens_and_ignores_what_is_already_open() -> None:
    a = replay(COLD, [f("d1", 1, 1, "deliver")]).anomalies
    key = next(iter(a)).key
    assert plan_alerts({key: "open"}, a) == ([], [])
    assert [x.key for x in plan_alerts({key: "resolved"}, a)[0]] == [key]
    assert plan_alerts({key: "resolved"}, frozenset()) == ([], [])


# -- properties --------------------------------------------------------------------------------

EVENTS = ("pickup", "handover", "deliver", "fail", "return")


@st.composite
def journeys(draw: st.DrawFn) -> tuple[Terms, list[Fact]]:
    n = draw(st.integers(0, 12))
    seqs = {"d1": 0, "d2": 0, "d3": 0}
    facts = []
    for _ in range(n):
        driver = draw(st.sampled_from(sorted(seqs)))
        seqs[driver] += 1
        facts.append(
            Fact(
                driver,
                seqs[driver],
                T0 + draw(st.integers(0, 6)) * 1000,  # ties are common
                draw(st.sampled_from(EVENTS)),
                lat=draw(st.sampled_from([None, -1.3, -1.4])),
                lon=36.8,
                temp_c=draw(st.sampled_from([None, 5.0, 12.0])),
            )
        )
    terms = draw(st.sampled_from([COLD, Terms(consigned=False), Terms()]))
    return terms, facts


@settings(max_examples=150, deadline=None)
@given(journeys(), st.randoms(use_true_random=False))
def test_any_permutation_gives_the_same_state_and_anomalies(
    journey: tuple[Terms, list[Fact]], rnd: random.Random
) -> None:
    terms, facts = journey
    expected = replay(terms, facts)
    shuffled = facts[:]
    rnd.shuffle(shuffled)
    got = replay(terms, shuffled)
    assert (got.state, got.holder, got.ts, got.windows) == (
        expected.state,
        expected.holder,
        expected.ts,
        expected.windows,
    )
    assert {(a.key, a.message) for a in got.anomalies} == {(a.key, a.message) for a in expected.anomalies}


@settings(max_examples=150, deadline=None)
@given(journeys(), st.randoms(use_true_random=False))
def test_alerts_converge_whatever_order_scans_arrive_in(journey: tuple[Terms, list[Fact]], rnd: random.Random) -> None:
    """Process scans one arrival at a time, as the service does (replay all, diff the alerts):
    the open alerts end up exactly the anomalies of the whole set, and only opened ones resolve."""
    terms, facts = journey
    arrival = facts[:]
    rnd.shuffle(arrival)
    stored: dict[AlertKey, str] = {}
    for i in range(1, len(arrival) + 1):
        to_open, to_resolve = plan_alerts(stored, replay(terms, arrival[:i]).anomalies)
        for key in to_resolve:
            assert stored[key] == "open"
            stored[key] = "resolved"
        for anomaly in to_open:
            stored[anomaly.key] = "open"
    final = {a.key for a in replay(terms, facts).anomalies}
    assert {k for k, s in stored.items() if s == "open"} == final


@settings(max_examples=100, deadline=None)
@given(journeys())
def test_windows_are_exactly_the_picked_up_spans(journey: tuple[Terms, list[Fact]]) -> None:
    """A driver's window covers a ts iff replaying the scans up to that ts leaves it holding."""
    terms, facts = journey
    r = replay(terms, facts)
    for ts in range(T0 - 1, T0 + 7001, 500):
        upto = replay(terms, [x for x in facts if x.ts <= ts])
        for driver in ("d1", "d2", "d3"):
            holds = upto.state == PICKED_UP and upto.holder == driver
            assert in_window(holding_windows(r, driver), ts) == holds
