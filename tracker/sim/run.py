"""``tracker simulate``: drive a tracker service with simulated phones and dashboards.

Wiring for ``tracker/cli.py``::

    sub = subparsers.add_parser("simulate", help="load-test a running service")
    simulate.add_arguments(sub)
    sub.set_defaults(func=simulate.run)      # run(args) -> exit code

Programmatic use (tests, benchmarks): ``report = await simulate(SimOptions(...))``.
With ``--processes P`` the phones are spread over P worker processes (spawned, each with
its own event loop); dashboards, the progress line and the report stay in this process.

Cost and limits (measured on the 2-vCPU development VM, uvloop, against a raw-asyncio ack
server): about 85-95 us of simulator CPU per event at one frame and one ack per event, a
quarter of it in the kernel (loopback send and receive), about 45-50 us in ``--batch-mode``.
One process tops out near 10,000 events/s there; past that ``skipped ticks`` appear in the
report and ``--processes`` is the remedy (each process is an independent event loop).
Against a loopback server, connections are spread over 127.0.1.x source addresses so that
20,000 phones plus the previous run's TIME_WAITs do not exhaust one address's ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any, Protocol

from tracker.sim import SimOptions, mint_token
from tracker.sim.dashboard import Dashboard
from tracker.sim.flaky import WsError, open_link
from tracker.sim.phone import Fleet
from tracker.sim.report import STORED_SQL, Report, RunData, Sample, build

__all__ = ["Report", "SimError", "SimOptions", "add_arguments", "run", "simulate"]


class SimError(Exception):
    """The run could not start or finish (service unreachable, bad secret, ...)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tracker simulate``'s options to ``parser``."""
    d = SimOptions()
    a = parser.add_argument
    a("--url", default=d.url, help="service base URL, ws://host:port (default %(default)s)")
    a("--drivers", type=int, default=d.drivers, help="simulated phones (default %(default)s)")
    a("--interval", type=float, default=d.interval, help="seconds between a driver's fixes (default %(default)s)")
    a("--dashboards", type=int, default=d.dashboards, help="dispatcher dashboards (default %(default)s)")
    a("--duration", type=float, default=d.duration, help="seconds of traffic, ramp included (default %(default)s)")
    a("--flaky", action="store_true", help="mobile networks: drops, offline periods, slow links, reordering")
    a("--seed", type=int, default=None, help="make routes, scans and faults reproducible")
    a("--json", action="store_true", help="print the report as JSON")
    a("--secret", default=None, help="HS256 secret for tokens (default: $TRACKER_JWT_SECRET)")
    a("--org", default=None, help="tenant to use (default: a fresh sim-<hex>, so runs never mix)")
    a("--dsn", default=None, help="PostgreSQL DSN: check that every acknowledged event was stored")
    a("--processes", type=int, default=d.processes, help="spread phones over P processes (default %(default)s)")
    a("--batch-mode", action="store_true", help="phones upload every --batch-window s in batch frames")
    a("--batch-window", type=float, default=d.batch_window, help="seconds between uploads in batch mode")
    a("--connect-rate", type=float, default=d.connect_rate, help="new connections/s (default %(default)s)")
    a("--drain-timeout", type=float, default=d.drain_timeout, help="max seconds to get everything acked")
    a("--resend-after", type=float, default=d.resend_after, help="resend unanswered events after S seconds")
    a("--consign", action="store_true", help="consign each driver's packages first (POST /v1/packages as a dispatcher)")
    a("--no-progress", action="store_true", help="no live progress line on stderr")


def options_from_args(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        url=args.url,
        drivers=args.drivers,
        interval=args.interval,
        dashboards=args.dashboards,
        duration=args.duration,
        flaky=args.flaky,
        seed=args.seed,
        secret=args.secret,
        org=args.org,
        dsn=args.dsn,
        processes=args.processes,
        batch_mode=args.batch_mode,
        batch_window=args.batch_window,
        connect_rate=args.connect_rate,
        drain_timeout=args.drain_timeout,
        resend_after=args.resend_after,
        consign=args.consign,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run a simulation from parsed arguments; print the report. 0 only if nothing was lost."""
    try:
        report = _run_loop(simulate(options_from_args(args)))
    except (SimError, ValueError) as exc:
        print(f"tracker simulate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(report.to_json() if args.json else report.format_table())
    return 0 if report.ok else 1


def _run_loop(coro: Coroutine[Any, Any, Report]) -> Report:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def raise_fd_limit(needed: int) -> None:
    """Lift RLIMIT_NOFILE to cover ``needed`` sockets (the hard limit too, when privileged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed > hard:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            soft, hard = needed, needed
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise SimError(f"{needed} sockets needed in one process but the fd limit is {soft}: use --processes")


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
    phones: _Phones = _LocalPhones(opts, epoch_ms) if opts.processes == 1 else _WorkerPhones(opts, epoch_ms)
    gc_guard = _quiet_gc()
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


class _GcGuard:
    def __init__(self, threshold: tuple[int, int, int]) -> None:
        self.threshold = threshold

    def close(self) -> None:
        gc.unfreeze()
        gc.set_threshold(*self.threshold)


def _quiet_gc() -> _GcGuard:
    """Keep the cyclic GC from rescanning 20,000 phones' objects every few hundred events.

    Measured: with the default thresholds, recording an event cost ~20 us, 80 % of it in
    collections; frozen setup objects and a larger first generation bring it to ~3 us.
    Cycles (links and futures) are still collected. ``close()`` restores the settings.
    """
    guard = _GcGuard(gc.get_threshold())
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    return guard


# --- where the phones run: this process, or spawned workers --------------------------------


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the workers' results (records are disjoint: each worker has its own drivers)."""
    out: dict[str, Any] = {"records": {}, "stats": {}, "counts": {}, "errors": {}, "stopped": {}, "cpu": 0.0}
    out["cpu_setup"] = 0.0
    for part in parts:
        out["records"].update(part.get("records", {}))
        out["stopped"].update(part.get("stopped", {}))
        for key in ("stats", "counts", "errors"):
            for k, v in part.get(key, {}).items():
                out[key][k] = out[key].get(k, 0) + v
        out["cpu"] += part.get("cpu", 0.0)
        out["cpu_setup"] += part.get("cpu_setup", 0.0)
        out["cpu_sys"] = out.get("cpu_sys", 0.0) + part.get("cpu_sys", 0.0)
    return out


class _Phones(Protocol):
    """Where the phones run. ``results`` is valid after ``go`` returns."""

    results: dict[str, Any]

    async def ready(self) -> None:
        """Return once every phone is built (tokens minted) and waiting for ``go``."""

    async def go(self, gen_until: float, drain_until: float) -> None:
        """Run the phones: generate until ``gen_until``, drain until all is acked or ``drain_until``."""

    def stats(self) -> dict[str, int]:
        """The latest counters, summed over processes; never awaits."""

    async def close(self) -> None:
        """Release processes and pipes; safe after a failure."""


class _LocalPhones:
    def __init__(self, opts: SimOptions, epoch_ms: float) -> None:
        self.fleet = Fleet(opts, list(range(opts.drivers)), epoch_ms=epoch_ms, connect_rate=opts.connect_rate)
        self.results: dict[str, Any] = {}

    async def ready(self) -> None:
        await self.fleet.prepare()

    async def go(self, gen_until: float, drain_until: float) -> None:
        await self.fleet.run(gen_until, drain_until)
        self.results = _merge([self.fleet.results()])

    def stats(self) -> dict[str, int]:
        return self.fleet.stats()

    async def close(self) -> None:
        return None


class _WorkerPhones:
    """Phones spread over ``opts.processes`` spawned processes, talking over pipes."""

    def __init__(self, opts: SimOptions, epoch_ms: float) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with a running loop
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.latest: list[dict[str, int]] = []
        self.results: dict[str, Any] = {}
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        rate = opts.connect_rate / opts.processes
        for w in range(opts.processes):
            parent, child = ctx.Pipe()
            indices = list(range(w, opts.drivers, opts.processes))
            proc = ctx.Process(target=_worker_main, args=(child, opts, indices, epoch_ms, rate), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            self.latest.append({})
        # One reader thread per worker: a result can be megabytes, and add_reader would make the
        # pipe non-blocking under uvloop, breaking Connection.recv() mid-message.
        loop = asyncio.get_running_loop()
        for w in range(opts.processes):
            threading.Thread(target=self._pump, args=(loop, w), name=f"sim-worker-{w}", daemon=True).start()

    def _pump(self, loop: asyncio.AbstractEventLoop, w: int) -> None:
        conn = self.conns[w]
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = ("dead", None)
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (w, msg))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return
            if msg[0] in ("dead", "done"):
                return

    async def _each(self, kind: str) -> list[Any]:
        got: dict[int, Any] = {}
        while len(got) < len(self.conns):
            w, (k, payload) = await self.queue.get()
            if k == "stats":
                self.latest[w] = payload
            elif k == "dead":
                raise SimError(f"simulator worker {w} died (exit code {self.procs[w].exitcode})")
            elif k == kind:
                got[w] = payload
        return [got[w] for w in range(len(self.conns))]

    async def ready(self) -> None:
        await self._each("ready")

    async def go(self, gen_until: float, drain_until: float) -> None:
        for conn in self.conns:
            conn.send(("go", (gen_until, drain_until)))
        self.results = _merge(await self._each("done"))

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for st in self.latest:
            for k, v in st.items():
                total[k] = total.get(k, 0) + v
        return total

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for proc in self.procs:
            await loop.run_in_executor(None, proc.join, 10)
            if proc.is_alive():
                proc.terminate()
        for conn in self.conns:
            conn.close()


def _worker_main(conn: Connection, opts: SimOptions, indices: list[int], epoch_ms: float, rate: float) -> None:
    """Entry point of a worker process: build its fleet, wait for go, run, send results back."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_worker(conn, opts, indices, epoch_ms, rate))
    conn.close()


async def _worker(conn: Connection, opts: SimOptions, indices: list[int], epoch_ms: float, rate: float) -> None:
    raise_fd_limit(len(indices) + 64)
    cpu0 = time.process_time()
    fleet = Fleet(opts, indices, epoch_ms=epoch_ms, connect_rate=rate)
    await fleet.prepare()
    setup = time.process_time() - cpu0
    _quiet_gc()
    conn.send(("ready", setup))
    loop = asyncio.get_running_loop()
    _kind, (gen_until, drain_until) = await loop.run_in_executor(None, conn.recv)
    cpu1, sys1 = time.process_time(), os.times().system

    async def report_stats() -> None:
        while True:  # twice per sample of the monitor, so no second shows a stale zero
            conn.send(("stats", fleet.stats()))
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report_stats())
    try:
        await fleet.run(gen_until, drain_until)
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    result = fleet.results()
    result["cpu"] = time.process_time() - cpu1
    result["cpu_sys"] = os.times().system - sys1
    result["cpu_setup"] = setup
    conn.send(("done", result))


# --- the live progress line ---------------------------------------------------------------


class _Monitor:
    """Samples counters once per second for the report and prints the progress line."""

    def __init__(self, opts: SimOptions, phones: _Phones, dashboards: list[Dashboard], start: float) -> None:
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
