"""A simulation run: simulated phones and dashboards against a live service, and its report.

Programmatic use (tests, benchmarks, ``tracker demo``)::

    report = await simulate(SimOptions(url=..., drivers=..., secret=...))

The command line is :mod:`tracker.sim.cli`; where the phones run (this process or
``--processes P`` workers) is :mod:`tracker.sim.workers`.

Cost and limits (measured on the 2-vCPU development VM, uvloop, against a raw-asyncio ack
server): about 85-95 us of simulator CPU per event at one frame and one ack per event, a
quarter of it in the kernel (loopback send and receive), about 45-50 us in ``--batch-mode``.
One process tops out near 10,000 events/s there; past that ``skipped ticks`` appear in the
report and ``--processes`` is the remedy (each process is an independent event loop).
Against a loopback server, connections are spread over 127.0.1.x source addresses so that
20,000 phones plus the previous run's TIME_WAITs do not exhaust one address's ports.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from tracker.auth import mint_token
from tracker.sim import SimError, SimOptions
from tracker.sim.dashboard import Dashboard
from tracker.sim.link import WsError, open_link
from tracker.sim.report import STORED_SQL, Report, RunData, Sample, build
from tracker.sim.workers import LocalPhones, Phones, WorkerPhones, quiet_gc, raise_fd_limit

__all__ = ["Report", "SimError", "SimOptions", "simulate"]


async def simulate(options: SimOptions) -> Report:
    """Run one simulation against a live service and return its report."""
    opts = options.resolved()
    assert opts.secret is not None and opts.org is not None
    per_process = -(-opts.drivers // opts.processes)
    raise_fd_limit(per_process + opts.dashboards + 64)
    await _probe(opts.url)
    epoch_ms = time.time() * 1000.0
    cpu0 = time.process_time()
    ttl = opts.duration + opts.drain_timeout + 3600
    dashboards = [
        Dashboard(
            opts.url,
            mint_token(opts.secret, sub=f"sim-dispatcher-{k}", role="dispatcher", org=opts.org, ttl_s=ttl),
            epoch_ms=epoch_ms,
            index=k,
        )
        for k in range(opts.dashboards)
    ]
    dash_tasks = [asyncio.create_task(d.run()) for d in dashboards]
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(d.ready for d in dashboards))
    except (TimeoutError, ConnectionError, OSError, WsError) as exc:
        for d in dashboards:
            d.stop()
        await asyncio.gather(*dash_tasks, return_exceptions=True)
        raise SimError(f"dashboards could not subscribe: {exc!r}") from exc
    phones: Phones = LocalPhones(opts, epoch_ms) if opts.processes == 1 else WorkerPhones(opts, epoch_ms)
    gc_guard = quiet_gc()
    try:
        await phones.ready()
        cpu_setup = time.process_time() - cpu0
        sys1 = os.times().system
        start = time.time()
        gen_until = start + opts.duration
        monitor = _Monitor(opts, phones, dashboards, start)
        progress = asyncio.create_task(monitor.loop())
        await phones.go(gen_until, gen_until + opts.drain_timeout)
        drained_at = time.time()
        await _settle(dashboards, opts.settle)
        monitor.sample()
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
        monitor.done()
    finally:
        gc_guard.close()
        await phones.close()
        for d in dashboards:
            d.stop()
        await asyncio.gather(*dash_tasks, return_exceptions=True)
    cpu_here = time.process_time() - cpu0 - cpu_setup
    sys_here = os.times().system - sys1
    dash_cpu = sum(d.cpu_s for d in dashboards)
    res = phones.results
    stored = await fetch_stored(opts.dsn, opts.org) if opts.dsn else None
    data = RunData(
        records=res["records"],
        views=[d.view for d in dashboards],
        dashboard_connects=[d.connects for d in dashboards],
        stored=stored,
        stats=res["stats"],
        counts=res["counts"],
        errors=res["errors"],
        stopped=res["stopped"],
        samples=monitor.samples,
        elapsed_s=time.time() - start,
        gen_s=opts.duration,
        drain_s=drained_at - gen_until,
        cpu_phones_s=res["cpu"] if opts.processes > 1 else max(0.0, cpu_here - dash_cpu),
        cpu_dashboards_s=dash_cpu if opts.processes == 1 else cpu_here,
        cpu_other_s=cpu_setup + res.get("cpu_setup", 0.0),
        cpu_sys_s=sys_here + res.get("cpu_sys", 0.0),
    )
    return build(opts, data)


async def _probe(url: str) -> None:
    """Fail fast, with a clear message, when nothing answers WebSocket upgrades at ``url``."""
    try:
        link = await open_link(url, "/v1/live", lambda _m: None, lambda _c, _r: None, connect_timeout=10.0)
    except (OSError, TimeoutError, WsError, ConnectionError) as exc:
        raise SimError(f"cannot open a WebSocket at {url}/v1/live: {exc!r}") from exc
    link.close()


async def _settle(dashboards: list[Dashboard], limit: float) -> None:
    """Give dashboards up to ``limit`` s for the last live frames: until 0.5 s pass without one."""
    deadline = time.monotonic() + limit
    last = -1
    while time.monotonic() < deadline:
        now = sum(d.view.frames for d in dashboards)
        if now == last:
            return
        last = now
        await asyncio.sleep(0.5)


async def fetch_stored(dsn: str, org: str) -> dict[str, list[int]]:
    """``driver -> seqs`` stored in PostgreSQL for ``org``, positions and scans together."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(STORED_SQL, org)
    finally:
        await conn.close()
    return {row[0]: list(row[1]) for row in rows}


# --- the live progress line ---------------------------------------------------------------


class _Monitor:
    """Samples counters once per second for the report and prints the progress line."""

    def __init__(self, opts: SimOptions, phones: Phones, dashboards: list[Dashboard], start: float) -> None:
        self.opts, self.phones, self.dashboards, self.start = opts, phones, dashboards, start
        self.samples: list[Sample] = []
        self.local = opts.processes == 1
        self.tty = sys.stderr.isatty()
        self.prev = (0.0, 0, 0, 0)  # elapsed, generated, acked, dashboard frames

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sample()

    def sample(self) -> None:
        st = self.phones.stats()
        t = time.time() - self.start
        gen, acked, conn = st.get("generated", 0), st.get("acked", 0), st.get("connected", 0)
        frames = sum(d.view.frames for d in self.dashboards)
        # Local: cpu_ms is this whole process. Workers: theirs, plus ours (dashboards, monitor).
        cpu = st.get("cpu_ms", 0) / 1000 + (0.0 if self.local else time.process_time())
        self.samples.append(Sample(t, gen, acked, st.get("started", 0), cpu))
        pt, pg, pa, pf = self.prev
        dt = max(1e-6, t - pt)
        self.prev = (t, gen, acked, frames)
        if not self.opts.progress:
            return
        line = (
            f"[{t:6.1f}s] drivers {conn}/{self.opts.drivers}  sent/s {(gen - pg) / dt:8.0f}  "
            f"acked/s {(acked - pa) / dt:8.0f}  unacked {st.get('unacked', 0):7d}  "
            f"dashboard frames/s {(frames - pf) / dt:7.0f}"
        )
        print(("\r" + line + "\x1b[K") if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.opts.progress and self.tty:
            print(file=sys.stderr)
