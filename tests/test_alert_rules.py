"""The time-based alert rules (tracker/custody/rules.py): pure, no loop, no sleep."""

from __future__ import annotations

from tracker.custody import rules

T = rules.Thresholds(data_gap_s=600, temp_consecutive_s=60, temp_cumulative_s=100, long_stop_s=300, arrival_dwell_s=60)
NOW = 1_800_000_000_000
DEST = (-1.3, 36.8)
FAR = (-1.2, 36.9)


def test_data_gap_needs_the_dwell() -> None:
    # A tunnel shorter than the threshold opens nothing; the gap starts at the last fix or pickup.
    assert rules.data_gap(NOW, NOW - 900_000, NOW - 599_000, "d-1", 2, T) is None
    found = rules.data_gap(NOW, NOW - 900_000, NOW - 600_000, "d-1", 2, T)
    assert found is not None and (found.kind, found.n, found.details) == (
        "data_gap",
        NOW - 600_000,
        {"start": NOW - 600_000},
    )
    assert "2 packages" in found.message
    assert rules.data_gap(NOW, NOW - 700_000, None, "d-1", 1, T) is not None  # picked up, never a fix since


def test_gap_closed_tells_returned_from_recovered() -> None:
    start = NOW - 900_000
    assert rules.gap_closed(start, [start - 5, start], T) is None  # nothing after the gap's start
    reason, extent = rules.gap_closed(start, [NOW], T)  # type: ignore[misc]
    assert reason.startswith("automatic: data returned") and extent == {
        "start": start,
        "end": NOW,
        "duration_ms": 900_000,
    }
    backlog = list(range(start + 60_000, NOW + 1, 60_000))  # the phone uploads a fix a minute
    reason, extent = rules.gap_closed(start, backlog, T)  # type: ignore[misc]
    assert reason.startswith("automatic: data recovered") and extent["duration_ms"] == 60_000


def test_window_missed() -> None:
    assert rules.window_missed(NOW, NOW + 1, "picked_up", None, "d-1") is None  # not over yet
    found = rules.window_missed(NOW, NOW - 1, "picked_up", NOW - 10, "d-1")
    assert found is not None and found.n == NOW - 1 and found.driver == "d-1"
    assert rules.window_missed(NOW, NOW - 1, "delivered", NOW - 2, "d-1") is None  # delivered in time (late upload)
    assert rules.window_missed(NOW, NOW - 1, "delivered", NOW, "d-1") is not None  # delivered after it ended


def test_temperature_consecutive_and_cumulative() -> None:
    s = 1000
    readings = [
        (NOW - 300 * s, 9.5, "d-1", 1),
        (NOW - 200 * s, 10.5, "d-2", 1),
        (NOW - 150 * s, 6.0, "d-1", 2),
        (NOW - 100 * s, 9.0, "d-2", 2),
        (NOW - 50 * s, 5.0, "d-2", 3),
    ]
    found = rules.temperature(readings, 2, 8, NOW - 50 * s, T)
    cons = [f for f in found if f.kind == rules.TEMP_CONSECUTIVE]
    assert [(f.driver, f.n, f.details) for f in cons] == [
        ("d-1", 1, {"start": NOW - 300 * s, "duration_ms": 150 * s, "min_c": 9.5, "max_c": 10.5, "ongoing": False})
    ]
    (cum,) = [f for f in found if f.kind == rules.TEMP_CUMULATIVE]
    assert cum.details == {
        "start": NOW - 300 * s,
        "duration_ms": 200 * s,
        "min_c": 9.0,
        "max_c": 10.5,
        "excursions": 2,
        "ongoing": False,
    }
    # Still out of range and travelling: the excursion lasts until now.
    ongoing = rules.temperature(readings[:4], 2, 8, NOW, T, ongoing=True)
    assert sorted(f.details["duration_ms"] for f in ongoing if f.kind == rules.TEMP_CONSECUTIVE) == [100 * s, 150 * s]
    assert rules.temperature(readings[2:3], 2, 8, NOW, T) == []  # within range: nothing
    assert rules.temperature(readings[:1], None, 8.0, NOW - 200 * s, T)[0].kind == rules.TEMP_CONSECUTIVE


def test_long_stop_and_moving_on() -> None:
    near = [(NOW - 400_000 + i * 10_000, DEST[0] + 0.0001 * (i % 2), DEST[1]) for i in range(40)]
    found = rules.long_stop(NOW, near, "d-1", T)
    assert found is not None and found.n == NOW - 400_000 and found.details["duration_ms"] == 400_000
    assert rules.long_stop(NOW, [(NOW - 1000 * 1000, *FAR), *near[-10:]], "d-1", T) is None  # stopped 100 s only
    assert not rules.moved_from(near, DEST[0], DEST[1], 100)
    assert rules.moved_from([*near, (NOW, *FAR)], DEST[0], DEST[1], 100)


def test_arrival_and_departure_need_the_dwell() -> None:
    s = 1000
    fixes = [(NOW - 500 * s, *FAR), (NOW - 400 * s, *DEST), (NOW - 380 * s, *FAR)]  # passing by: no arrival
    assert rules.arrival(fixes, DEST, T, None) == (None, None)
    fixes += [(NOW - 300 * s, *DEST), (NOW - 250 * s, *DEST), (NOW - 200 * s, *DEST)]
    assert rules.arrival(fixes, DEST, T, None) == (NOW - 300 * s, None)
    fixes += [(NOW - 100 * s, *FAR), (NOW - 30 * s, *FAR)]
    assert rules.arrival(fixes, DEST, T, None) == (NOW - 300 * s, NOW - 100 * s)
    assert rules.arrival(fixes[-2:], DEST, T, NOW - 300 * s) == (NOW - 300 * s, NOW - 100 * s)


def test_thresholds_merge() -> None:
    t = rules.Thresholds().merged({"data_gap_s": 60, "bogus": 1})
    assert t.data_gap_s == 60.0 and t.long_stop_s == 1200.0
