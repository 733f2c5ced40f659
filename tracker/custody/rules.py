"""Time-based alert rules: what a periodic check finds, as pure functions (no I/O, no clock).

The replay (`state.py`) judges each scan when it is chained; these rules judge what only time
reveals: no fix for a while, a delivery window that ended, a temperature out of range for too
long, a long stop, an arrival at the destination. `now` is a parameter; fixes and readings come in
as tuples, oldest first. The caller (custody/watch.py) diffs what they find against the stored
alerts by id, so a rule that stops holding resolves its alert and one found again keeps its id.

Thresholds are per org with documented defaults (`Thresholds`, docs/PROTOCOL.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from .state import distance_m

DATA_GAP: Final = "data_gap"
WINDOW_MISSED: Final = "delivery_window_missed"
TEMP_CONSECUTIVE: Final = "temperature_consecutive"
TEMP_CUMULATIVE: Final = "temperature_cumulative"
LONG_STOP: Final = "long_stop"
KINDS: Final = (DATA_GAP, WINDOW_MISSED, TEMP_CONSECUTIVE, TEMP_CUMULATIVE, LONG_STOP)

Fix = tuple[int, float, float]  # (ts, lat, lon)
Reading = tuple[int, float, str, int]  # (corrected time, temp_c, driver, seq) of a chained scan


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Per-org thresholds (seconds, metres). The defaults are the documented ones."""

    data_gap_s: float = 900.0  # no fix for 15 min while carrying packages (the dwell: tunnels do not flap)
    arrival_radius_m: float = 150.0  # within this of the destination ...
    arrival_dwell_s: float = 60.0  # ... for this long: arrived (and outside as long after: departed)
    temp_consecutive_s: float = 1800.0  # one excursion beyond the cold-chain range for 30 min
    temp_cumulative_s: float = 3600.0  # excursions adding up to 60 min over the journey
    long_stop_s: float = 1200.0  # stopped 20 min while carrying cold-chain goods ...
    stop_radius_m: float = 100.0  # ... within this radius

    def merged(self, overrides: Mapping[str, Any]) -> Thresholds:
        known = {f.name for f in fields(self)}
        return replace(self, **{k: float(v) for k, v in overrides.items() if k in known})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LIMITS: Final = {f.name: (1.0, 7 * 86_400.0) for f in fields(Thresholds)} | {
    "arrival_radius_m": (10.0, 50_000.0),
    "stop_radius_m": (10.0, 50_000.0),
    "arrival_dwell_s": (0.0, 86_400.0),
}


@dataclass(frozen=True, slots=True)
class Finding:
    """An alert a rule finds: `kind`, the driver and number that key it, what to tell, its details."""

    kind: str
    driver: str | None
    n: int  # what makes the occurrence distinct: a gap's start, a window's end, an excursion's first reading
    message: str
    details: dict[str, Any]


def _minutes(ms: int) -> str:
    return f"{ms / 60_000:.0f} min" if ms >= 60_000 else f"{ms / 1000:.0f} s"


# -- data gap -----------------------------------------------------------------------------------


def data_gap(now: int, since: int, last_fix: int | None, driver: str, held: int, t: Thresholds) -> Finding | None:
    """No fix for `data_gap_s` while carrying `held` packages since `since` (the newest pickup)."""
    start = max(since, last_fix) if last_fix is not None else since
    if now - start < t.data_gap_s * 1000:
        return None
    what = f"{held} package{'s' if held != 1 else ''}"
    return Finding(
        DATA_GAP,
        driver,
        start,
        f"no fix from {driver} for {_minutes(now - start)} while carrying {what}",
        {"start": start},
    )


def gap_closed(start: int, fixes: Sequence[int], t: Thresholds) -> tuple[str, dict[str, Any]] | None:
    """Whether a gap that opened at `start` is over (fixes after it: ts, sorted), and how: the
    resolution's reason and the gap's real extent (the longest span without a fix since `start`).
    A backlog upload that fills the gap resolves it as "data recovered"."""
    after = [ts for ts in fixes if ts > start]
    if not after:
        return None
    points = [start, *after]
    a, b = max(itertools.pairwise(points), key=lambda ab: ab[1] - ab[0])
    extent = {"start": a, "end": b, "duration_ms": b - a}
    if b - a < t.data_gap_s * 1000:
        return f"automatic: data recovered (backlog uploaded; longest span without a fix {_minutes(b - a)})", extent
    return f"automatic: data returned (no fix for {_minutes(b - a)})", extent


# -- delivery window ----------------------------------------------------------------------------


def window_missed(
    now: int, window_to: int | None, state: str, state_ts: int | None, holder: str | None
) -> Finding | None:
    """The window ended and the package was not delivered within it (a delivery uploaded late that
    happened in time makes it not hold any more)."""
    if window_to is None or now < window_to:
        return None
    if state == "delivered" and state_ts is not None and state_ts <= window_to:
        return None
    return Finding(
        WINDOW_MISSED, holder, window_to, "the delivery window ended without a delivery", {"window_to": window_to}
    )


# -- temperature --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Excursion:
    start: int
    end: int
    low: float
    high: float
    driver: str
    seq: int  # the first reading beyond the range
    ongoing: bool = False  # no reading within the range since, and the package still travels

    def details(self) -> dict[str, Any]:
        d = {"start": self.start, "duration_ms": self.end - self.start, "min_c": self.low, "max_c": self.high}
        return d | {"ongoing": self.ongoing}


def excursions(
    readings: Sequence[Reading], lo: float | None, hi: float | None, end: int, *, ongoing: bool = False
) -> list[Excursion]:
    """Runs of readings beyond [lo, hi]: each lasts from its first reading beyond the range to the
    next reading within it, or to `end` (now while the package travels, its last scan after:
    `ongoing` says which). A reading holds until the next one (scans are the only readings)."""
    out: list[Excursion] = []
    run: list[Reading] = []
    for reading in sorted(readings):
        t, temp = reading[0], reading[1]
        beyond = (lo is not None and temp < lo) or (hi is not None and temp > hi)
        if beyond:
            run.append(reading)
        elif run:
            out.append(_excursion(run, t))
            run = []
    if run:
        out.append(_excursion(run, max(end, run[-1][0]), ongoing))
    return out


def _excursion(run: list[Reading], end: int, ongoing: bool = False) -> Excursion:
    temps = [r[1] for r in run]
    return Excursion(run[0][0], end, min(temps), max(temps), run[0][2], run[0][3], ongoing)


def temperature(
    readings: Sequence[Reading], lo: float | None, hi: float | None, end: int, t: Thresholds, *, ongoing: bool = False
) -> list[Finding]:
    """Consecutive rule: each excursion of `temp_consecutive_s` or more. Cumulative rule: all
    excursions adding up to `temp_cumulative_s` or more (one alert per package)."""
    found: list[Finding] = []
    runs = excursions(readings, lo, hi, end, ongoing=ongoing)
    rng = f"{'' if lo is None else f'{lo:g}'}..{'' if hi is None else f'{hi:g}'} °C"
    for x in runs:
        if x.end - x.start >= t.temp_consecutive_s * 1000:
            message = f"{_minutes(x.end - x.start)} beyond {rng} ({x.low:g} to {x.high:g} °C)"
            found.append(Finding(TEMP_CONSECUTIVE, x.driver, x.seq, message, x.details()))
    total = sum(x.end - x.start for x in runs)
    if runs and total >= t.temp_cumulative_s * 1000:
        low, high = min(x.low for x in runs), max(x.high for x in runs)
        details = {"start": runs[0].start, "duration_ms": total, "min_c": low, "max_c": high}
        details |= {"excursions": len(runs), "ongoing": runs[-1].ongoing}
        message = f"{_minutes(total)} beyond {rng} in {len(runs)} excursion{'s' if len(runs) > 1 else ''}"
        found.append(Finding(TEMP_CUMULATIVE, None, 0, message, details))
    return found


# -- stops and the destination ------------------------------------------------------------------


def stop_start(fixes: Sequence[Fix], radius_m: float) -> Fix | None:
    """The earliest fix of the trailing run that stays within `radius_m` of the newest fix."""
    if not fixes:
        return None
    _, lat, lon = fixes[-1]
    first = fixes[-1]
    for fix in reversed(fixes):
        if distance_m(fix[1], fix[2], lat, lon) > radius_m:
            break
        first = fix
    return first[0], lat, lon


def long_stop(now: int, fixes: Sequence[Fix], driver: str, t: Thresholds) -> Finding | None:
    start = stop_start(fixes, t.stop_radius_m)
    if start is None or now - start[0] < t.long_stop_s * 1000:
        return None
    ts, lat, lon = start
    details = {"start": ts, "duration_ms": now - ts, "lat": lat, "lon": lon}
    return Finding(
        LONG_STOP, driver, ts, f"{driver} stopped for {_minutes(now - ts)} carrying cold-chain goods", details
    )


def moved_from(fixes: Sequence[Fix], lat: float, lon: float, radius_m: float) -> bool:
    """Whether the newest fix is beyond `radius_m` of where a stop was."""
    return bool(fixes) and distance_m(fixes[-1][1], fixes[-1][2], lat, lon) > radius_m


def arrival(
    fixes: Sequence[Fix], dest: tuple[float, float], t: Thresholds, arrived: int | None
) -> tuple[int | None, int | None]:
    """(arrived_at, departed_at): the first fix of a run within `arrival_radius_m` of `dest` that
    lasts `arrival_dwell_s`, then the first fix of a run beyond it that lasts as long. A known
    arrival (`arrived`) stands; fixes before it are not looked at for the departure."""
    dwell = t.arrival_dwell_s * 1000

    def run_from(i: int, inside: bool) -> int | None:
        start = fixes[i][0]
        for ts, lat, lon in fixes[i:]:
            if (distance_m(lat, lon, *dest) <= t.arrival_radius_m) != inside:
                return None
            if ts - start >= dwell:
                return start
        return None

    if arrived is None:
        arrived = next((s for i in range(len(fixes)) if (s := run_from(i, True)) is not None), None)
        if arrived is None:
            return None, None
    later = [i for i, f in enumerate(fixes) if f[0] > arrived]
    departed = next((s for i in later if (s := run_from(i, False)) is not None), None)
    return arrived, departed
