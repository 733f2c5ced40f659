"""Where the phones run: in this process, or spread over spawned worker processes.

With ``--processes P`` the phones are spread over P worker processes (spawned, each with its
own event loop, talking to this one over pipes); dashboards, the progress line and the report
stay in the parent. Also the per-process tuning both kinds need: the fd limit, the cyclic GC
and the event loop (uvloop when installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from tracker.sim import SimError, SimOptions
from tracker.sim.fleet import Fleet


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed, else None (asyncio's default)."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None


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


class GcGuard:
    """The GC settings before :func:`quiet_gc`; ``close()`` puts them back."""

    def __init__(self, threshold: tuple[int, int, int]) -> None:
        self.threshold = threshold

    def close(self) -> None:
        gc.unfreeze()
        gc.set_threshold(*self.threshold)


def quiet_gc() -> GcGuard:
    """Keep the cyclic GC from rescanning 20,000 phones' objects every few hundred events.

    Measured: with the default thresholds, recording an event cost ~20 us, 80 % of it in
    collections; frozen setup objects and a larger first generation bring it to ~3 us.
    Cycles (links and futures) are still collected. ``close()`` restores the settings.
    """
    guard = GcGuard(gc.get_threshold())
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    return guard


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


class Phones(Protocol):
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


class LocalPhones:
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


class WorkerPhones:
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
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_worker(conn, opts, indices, epoch_ms, rate))
    conn.close()


async def _worker(conn: Connection, opts: SimOptions, indices: list[int], epoch_ms: float, rate: float) -> None:
    raise_fd_limit(len(indices) + 64)
    cpu0 = time.process_time()
    fleet = Fleet(opts, indices, epoch_ms=epoch_ms, connect_rate=rate)
    await fleet.prepare()
    setup = time.process_time() - cpu0
    quiet_gc()
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
