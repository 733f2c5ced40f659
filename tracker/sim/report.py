"""The run's verdict: loss, duplicates, latency, throughput and the simulator's own cost.

Loss is counted over ``(driver, seq)`` sets: an event the simulator generated and never got
acknowledged is lost (refused ones included: the simulator only makes valid events), and so
is an acknowledged event missing from PostgreSQL (when a DSN is given).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from tracker.sim.dashboard import View
from tracker.sim.phone import KIND_SCAN, Records

STORED_SQL = (
    "SELECT driver_id, array_agg(seq) FROM ("
    "SELECT driver_id, seq FROM positions WHERE org=$1 UNION ALL SELECT driver_id, seq FROM scans WHERE org=$1"
    ") s GROUP BY driver_id"
)


@dataclass(frozen=True, slots=True)
class Latency:
    """Percentiles in milliseconds over ``count`` samples (all zero when there are none)."""

    count: int = 0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0

    @classmethod
    def of(cls, samples: list[float]) -> Latency:
        if not samples:
            return cls()
        samples.sort()
        n = len(samples)

        def pick(q: float) -> float:
            return round(samples[min(n - 1, max(0, math.ceil(q * n) - 1))], 2)

        return cls(n, pick(0.50), pick(0.95), pick(0.99), round(samples[-1], 2))


@dataclass(frozen=True, slots=True)
class DashboardResult:
    index: int
    frames: int
    events: int  # pos + scan items, batches unpacked
    pos: int
    scans: int
    presence: int
    duplicates: int
    missing_scans: int  # acknowledged scans never seen live (scans are always fanned out)
    pos_seen: float  # fraction of acknowledged positions seen live (late ones are not fanned out)
    connects: int
    errors: list[str]


@dataclass(slots=True)
class RunData:
    """The raw material, gathered from every process of the run."""

    records: dict[str, Records]
    views: list[View]
    dashboard_connects: list[int]
    stored: dict[str, list[int]] | None  # driver -> seqs found in PostgreSQL, None without a DSN
    stats: dict[str, int]  # summed fleet counters
    counts: dict[str, int]
    errors: dict[str, int]
    stopped: dict[str, str]
    samples: list[tuple[float, int, int, int]]  # (elapsed s, generated, acked, connected)
    elapsed_s: float
    gen_s: float
    drain_s: float
    cpu_phones_s: float
    cpu_dashboards_s: float
    cpu_other_s: float = 0.0


@dataclass(slots=True)
class Report:
    org: str
    url: str
    seed: int
    drivers: int
    dashboards: int
    processes: int
    interval_s: float
    duration_s: float
    flaky: bool
    batch_mode: bool
    elapsed_s: float
    ramp_s: float | None  # until every driver had connected once
    drain_s: float
    drained: bool
    generated: int
    sent: int
    acked: int
    refused: int
    stored: int | None
    stored_duplicates: int | None
    lost: int
    lost_unacked: int
    lost_unstored: int
    lost_sample: list[str]
    ack_latency_ms: Latency
    live_latency_ms: Latency
    bytes_out: int
    bytes_per_event: float
    events_per_s: float
    steady_events_per_s: float
    steady_acked_per_s: float
    cpu_s: float
    cpu_phones_s: float
    cpu_dashboards_s: float
    cpu_us_per_event: float  # phone-side CPU per generated event: the simulator's own cost
    skipped_ticks: int  # > 0: the simulator could not keep its schedule (it was the bottleneck)
    connects: int
    dashboard_results: list[DashboardResult] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing lost (the exit code of ``tracker simulate``)."""
        return self.lost == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2).decode()
