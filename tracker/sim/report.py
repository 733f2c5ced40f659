"""The run's verdict: loss, duplicates, latency, throughput and the simulator's own cost.

Loss is counted over ``(driver, seq)`` sets: an event the simulator generated and never got
acknowledged is lost (refused ones included: the simulator only makes valid events), and so
is an acknowledged event missing from PostgreSQL (when a DSN is given).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import orjson

from tracker.sim.dashboard import View
from tracker.sim.records import KIND_SCAN, Records

STORED_SQL = (
    "SELECT driver_id, array_agg(seq) FROM ("
    "SELECT driver_id, seq FROM positions WHERE org=$1 UNION ALL SELECT driver_id, seq FROM scans WHERE org=$1"
    ") s GROUP BY driver_id"
)


class Sample(NamedTuple):
    """Counters once per second, summed over processes."""

    t: float  # seconds since the start
    generated: int
    acked: int
    started: int  # drivers welcomed at least once
    cpu_s: float  # simulator CPU so far, every process


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
    duplicate_sample: list[str]
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
    samples: list[Sample]
    elapsed_s: float
    gen_s: float
    drain_s: float
    cpu_phones_s: float
    cpu_dashboards_s: float
    cpu_other_s: float = 0.0
    cpu_sys_s: float = 0.0  # kernel share of the run's CPU (socket writes and reads, mostly)


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
    bytes_in: int  # read by phones at their sockets (the handshake's answer, welcome, acks, errors, pings)
    up_per_position: float  # bytes phones wrote, and read, per position generated (everything: handshakes...)
    down_per_position: float
    events_per_s: float
    steady_events_per_s: float
    steady_acked_per_s: float
    cpu_s: float
    cpu_phones_s: float
    cpu_dashboards_s: float
    cpu_sys_s: float
    cpu_us_per_event: float  # phone-side CPU per generated event over the whole run, ramp included
    steady_cpu_us_per_event: float  # all simulator CPU per event once every phone is connected
    skipped_ticks: int  # > 0: the simulator could not keep its schedule (it was the bottleneck)
    connects: int
    never_connected: int  # phones that were never welcomed (bad token? server full?): they generated nothing
    dashboard_results: list[DashboardResult] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing lost, and every phone took part (the exit code of ``tracker simulate``)."""
        return self.lost == 0 and self.never_connected == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2).decode()

    def format_table(self) -> str:
        """A readable summary for a terminal."""
        rows: list[tuple[str, str]] = [
            ("run", f"org {self.org}  seed {self.seed}  {self.url}"),
            (
                "load",
                f"{self.drivers} drivers every {self.interval_s:g} s, {self.dashboards} dashboards, "
                f"{self.duration_s:g} s, {self.processes} process(es)"
                + (", flaky" if self.flaky else "")
                + (", batch mode" if self.batch_mode else ""),
            ),
            ("events", f"generated {self.generated}  sent {self.sent}  acked {self.acked}  refused {self.refused}"),
            ("stored", "not checked (no --dsn)" if self.stored is None else f"{self.stored} rows in PostgreSQL"),
            (
                "LOST",
                f"{self.lost}  (unacked {self.lost_unacked}, acked but not stored {self.lost_unstored})"
                + (f"  e.g. {', '.join(self.lost_sample[:5])}" if self.lost_sample else ""),
            ),
            ("phone->ack", _lat(self.ack_latency_ms)),
            ("phone->dashboard", _lat(self.live_latency_ms)),
            (
                "throughput",
                f"{self.events_per_s:.0f} events/s overall, steady {self.steady_events_per_s:.0f} sent/s "
                f"{self.steady_acked_per_s:.0f} acked/s",
            ),
            ("wire", f"bytes per position (sockets): up {self.up_per_position} down {self.down_per_position}"),
            (
                "simulator cpu",
                f"{self.cpu_s:.1f} s (phones {self.cpu_phones_s:.1f}, dashboards {self.cpu_dashboards_s:.1f}; "
                f"kernel {self.cpu_sys_s:.1f}), "
                f"{self.cpu_us_per_event:.1f} us per event ({self.steady_cpu_us_per_event:.1f} steady), "
                f"skipped ticks {self.skipped_ticks}",
            ),
            (
                "timing",
                f"elapsed {self.elapsed_s:.1f} s, ramp {'-' if self.ramp_s is None else f'{self.ramp_s:.1f} s'}, "
                f"drain {self.drain_s:.1f} s ({'complete' if self.drained else 'TIMED OUT'}), "
                f"{self.connects} connections",
            ),
        ]
        for d in self.dashboard_results:
            rows.append(
                (
                    f"dashboard {d.index}",
                    f"{d.frames} frames, {d.events} events ({d.pos} pos, {d.scans} scans, {d.presence} presence), "
                    f"dup {d.duplicates}, missing scans {d.missing_scans}, pos seen {d.pos_seen:.1%}, "
                    f"connects {d.connects}"
                    + (f", errors {d.errors}" if d.errors else "")
                    + (f", e.g. dup {', '.join(d.duplicate_sample[:3])}" if d.duplicate_sample else ""),
                )
            )
        if self.errors:
            rows.append(("server errors", ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))))
        if self.counts:
            rows.append(("connections", ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))))
        if self.stopped:
            rows.append(("gave up", f"{len(self.stopped)} phones: {sorted(set(self.stopped.values()))}"))
        if self.skipped_ticks:
            rows.append(
                (
                    "WARNING",
                    "the simulator fell behind its schedule (skipped ticks): it was the bottleneck, so the load "
                    "was lower than asked and latencies include its own delay; use --processes",
                )
            )
        if self.never_connected:
            rows.append(("NEVER CONNECTED", f"{self.never_connected} phones (check --secret, --url, server limits)"))
        verdict = "OK: nothing lost" if self.ok else "FAILED: " + ("events lost" if self.lost else "phones missing")
        rows.append(("verdict", verdict))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _lat(lat: Latency) -> str:
    if not lat.count:
        return "no samples"
    return f"p50 {lat.p50:.1f} ms  p95 {lat.p95:.1f}  p99 {lat.p99:.1f}  max {lat.max:.1f}  (n={lat.count})"


def build(opts: Any, data: RunData) -> Report:
    """Compute the report of a finished run. ``opts`` is the resolved SimOptions."""
    generated = sent = acked = refused = 0
    lost_unacked = lost_unstored = 0
    sample: list[str] = []
    ack_lat: list[float] = []
    stored_rows = stored_dups = 0
    for driver, rec in data.records.items():
        stored = None
        if data.stored is not None:
            seqs = data.stored.get(driver, [])
            stored = set(seqs)
            stored_rows += len(seqs)
            stored_dups += len(seqs) - len(stored)
        for seq, _kind, _created, first, last, ack in rec.events():
            generated += 1
            if first == first:
                sent += 1
            if ack != ack:  # NaN: never acknowledged
                lost_unacked += 1
                if len(sample) < 20:
                    sample.append(f"{driver}#{seq}" + (f"({rec.refused[seq]})" if seq in rec.refused else ""))
                continue
            acked += 1
            ack_lat.append(ack - last)
            if stored is not None and seq not in stored:
                lost_unstored += 1
                if len(sample) < 20:
                    sample.append(f"{driver}#{seq}(not stored)")
        refused += len(rec.refused)
    dashboards, live_lat = _dashboards(data)
    steady_sent, steady_acked, steady_cpu = _steady(data.samples, data.gen_s)
    cpu = data.cpu_phones_s + data.cpu_dashboards_s + data.cpu_other_s
    return Report(
        org=opts.org,
        url=opts.url,
        seed=opts.seed,
        drivers=opts.drivers,
        dashboards=opts.dashboards,
        processes=opts.processes,
        interval_s=opts.interval,
        duration_s=opts.duration,
        flaky=opts.flaky,
        batch_mode=opts.batch_mode,
        elapsed_s=round(data.elapsed_s, 2),
        ramp_s=_ramp(data.samples, opts.drivers),
        drain_s=round(data.drain_s, 2),
        drained=data.stats.get("unacked", 0) == 0,
        generated=generated,
        sent=sent,
        acked=acked,
        refused=refused,
        stored=stored_rows if data.stored is not None else None,
        stored_duplicates=stored_dups if data.stored is not None else None,
        lost=lost_unacked + lost_unstored,
        lost_unacked=lost_unacked,
        lost_unstored=lost_unstored,
        lost_sample=sample,
        ack_latency_ms=Latency.of(ack_lat),
        live_latency_ms=Latency.of(live_lat),
        bytes_out=data.stats.get("bytes_out", 0),
        bytes_per_event=data.stats.get("bytes_out", 0) / max(1, sent),
        bytes_in=data.stats.get("bytes_in", 0),
        up_per_position=round(data.stats.get("bytes_out", 0) / max(1, data.stats.get("positions", 0)), 2),
        down_per_position=round(data.stats.get("bytes_in", 0) / max(1, data.stats.get("positions", 0)), 2),
        events_per_s=round(generated / max(1e-9, data.gen_s), 1),
        steady_events_per_s=steady_sent,
        steady_acked_per_s=steady_acked,
        cpu_s=round(cpu, 2),
        cpu_phones_s=round(data.cpu_phones_s, 2),
        cpu_dashboards_s=round(data.cpu_dashboards_s, 2),
        cpu_sys_s=round(data.cpu_sys_s, 2),
        cpu_us_per_event=round(data.cpu_phones_s / max(1, generated) * 1e6, 1),
        steady_cpu_us_per_event=steady_cpu,
        skipped_ticks=data.stats.get("skipped_ticks", 0),
        connects=data.stats.get("connects", 0),
        never_connected=max(0, opts.drivers - data.stats.get("started", 0)),
        dashboard_results=dashboards,
        errors=dict(data.errors),
        counts=dict(data.counts),
        stopped=dict(data.stopped),
    )


def _dashboards(data: RunData) -> tuple[list[DashboardResult], list[float]]:
    """Per-dashboard results, and phone->dashboard latency samples over all dashboards.

    The latency of an event is measured from its last transmission before it was received
    (from its first one if it was received before being resent: the first copy got there).
    """
    results: list[DashboardResult] = []
    samples: list[float] = []
    acked_scans: set[tuple[str, int]] = set()
    acked_pos = 0
    for driver, rec in data.records.items():
        for seq, kind, _c, _f, _l, ack in rec.events():
            if ack == ack:  # not NaN
                if kind == KIND_SCAN:
                    acked_scans.add((driver, seq))
                else:
                    acked_pos += 1
    for i, view in enumerate(data.views):
        seen_scans = 0
        seen_pos = 0
        for driver, log in view.logs.items():
            mine = data.records.get(driver)
            if mine is None:
                continue
            for seq, t in log.items():
                j = seq - mine.base
                if not 0 <= j < len(mine.kind) or not mine.kind[j]:
                    continue
                first, last = mine.first[j], mine.last[j]
                sent = last if last <= t else first
                if sent == sent:
                    samples.append(t - sent)
                if (driver, seq) in acked_scans:
                    seen_scans += 1
                elif mine.kind[j] != KIND_SCAN:
                    seen_pos += 1
        results.append(
            DashboardResult(
                index=i,
                frames=view.frames,
                events=view.events,
                pos=view.counts["pos"],
                scans=view.counts["scan"],
                presence=view.counts["presence"],
                duplicates=view.duplicates,
                duplicate_sample=list(view.duplicate_sample),
                missing_scans=len(acked_scans) - seen_scans,
                pos_seen=round(seen_pos / acked_pos, 4) if acked_pos else 0.0,
                connects=data.dashboard_connects[i] if i < len(data.dashboard_connects) else 0,
                errors=list(view.errors),
            )
        )
    return results, samples


def _steady(samples: list[Sample], gen_s: float) -> tuple[float, float, float]:
    """Sent/s, acked/s and CPU us per event once every phone is connected, until generation stops."""
    window = [s for s in samples if s.t <= gen_s + 0.5]
    if len(window) < 2:
        return 0.0, 0.0, 0.0
    top = max(s.started for s in window)
    start = next((s for s in window if s.started >= top), window[0])
    if start is window[-1]:
        start = window[0]
    end = window[-1]
    span = end.t - start.t
    events = end.generated - start.generated
    if span <= 0 or events <= 0:
        return 0.0, 0.0, 0.0
    cpu = (end.cpu_s - start.cpu_s) / events * 1e6
    return round(events / span, 1), round((end.acked - start.acked) / span, 1), round(cpu, 1)


def _ramp(samples: list[Sample], drivers: int) -> float | None:
    for s in samples:
        if s.started >= drivers:
            return round(s.t, 2)
    return None
