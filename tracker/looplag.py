"""The process watching itself: how late its event loop runs, and what /readyz would answer.

Loop lag: a `call_later` timer is due every `interval_s` (50 ms: any stall longer than that
contains a due time, so none goes unseen); how late the loop runs it is the loop's lag, observed
into `tracker_loop_lag_seconds`. Every connection of this process waits as long: a blocking call,
a long GC pause or a CPU-bound burst shows here first. The timer is a plain callback, not a task,
so measuring costs one handle per interval and never awaits.

What held it: a watchdog thread looks every 20 ms whether the timer ran lately; once the loop has
been held for `stall_s` (100 ms) it copies the loop thread's stack (`sys._current_frames`: the
code holding the loop, caught in the act, as CPython hands the GIL over every 5 ms). When the loop
runs again, a lag over `stall_s` is logged as one warning line with that stack, or, when the pause
was a cyclic garbage collection (the collector holds the GIL: no thread sees it in the act), with
the collection's generation, duration and the allocation that triggered it (`gc_callback`).

The same tick sets `tracker_writer_buffered_events` (what waits for PostgreSQL), and every
`probe_every_s` (5 s) a probe runs the checks of /readyz (PostgreSQL `SELECT 1`, Redis PING, the
subscriber's loop-back proof, the writer, draining) into `tracker_ready`; a failed PostgreSQL or
Redis probe counts in `tracker_backend_errors_total{backend}`. Probing on a clock, not only on
traffic, tells an idle instance with its database gone from a healthy one.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Final

from . import metrics
from .node import Node

log = logging.getLogger("tracker.looplag")
STACK_DEPTH: Final = 12  # innermost frames in a stall's log line


def stack_line(frame: FrameType | None) -> str:
    """A stack on one line, innermost call first: `file:line function <- ...`."""
    frames = traceback.extract_stack(frame, limit=STACK_DEPTH)
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))


class _GcWatch:
    """The last long cyclic collection (gc.callbacks; server.tune_gc registers `gc_callback`)."""

    started = 0.0
    long_at = 0.0  # time.monotonic() when the last collection over LONG_GC_S ended
    long_note = ""
    LONG_GC_S: Final = 0.05


def gc_callback(phase: str, info: dict[str, int]) -> None:
    """Every collection's pause into `tracker_gc_pause_seconds`; a long one is remembered, with the
    allocation that triggered it, for the stall's log line."""
    now = time.perf_counter()
    if phase == "start":
        _GcWatch.started = now
        return
    pause = now - _GcWatch.started
    metrics.GC_PAUSE.labels(str(info["generation"])).observe(pause)
    if pause >= _GcWatch.LONG_GC_S:
        here = sys._getframe()
        _GcWatch.long_at = time.monotonic()
        _GcWatch.long_note = (
            f"a generation-{info['generation']} garbage collection of {pause * 1000:.0f} ms "
            f"({info.get('collected', 0)} collected), triggered at: {stack_line(here.f_back or here)}"
        )


class LoopLag:
    """Started and stopped by the application's lifespan (`start`, `await stop()`)."""

    def __init__(
        self, node: Node, *, interval_s: float = 0.05, probe_every_s: float = 5.0, stall_s: float = 0.1
    ) -> None:
        self.node = node
        self.interval_s = interval_s
        self.stall_s = stall_s
        self.probe_every = max(1, round(probe_every_s / interval_s))  # in ticks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._ticks = 0
        self._probe: asyncio.Task[bool] | None = None
        self._beat = time.monotonic()  # when the timer last ran
        self._held: tuple[float, str] | None = None  # (when, stack) caught by the watchdog
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> LoopLag:
        self._loop = asyncio.get_running_loop()
        metrics.WRITER_BUFFER_MAX.set(self.node.settings.writer_buffer_max)
        self._beat = time.monotonic()
        self._schedule()
        self._probe = asyncio.create_task(self.probe(), name="readiness-probe")
        self._watchdog = threading.Thread(
            target=self._watch, args=(threading.get_ident(),), name="tracker-loop-watchdog", daemon=True
        )
        self._watchdog.start()
        return self

    def _watch(self, loop_thread: int) -> None:
        """The watchdog thread: copy the loop thread's stack once per stall, while it is held."""
        caught = 0.0
        while not self._stopping.wait(0.02):
            beat = self._beat
            if beat != caught and time.monotonic() - beat >= self.stall_s:
                frame = sys._current_frames().get(loop_thread)
                self._held = (time.monotonic(), stack_line(frame))
                caught = beat

    async def stop(self) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(1)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        metrics.READY.set(0)

    def _schedule(self) -> None:
        assert self._loop is not None
        due = self._loop.time() + self.interval_s
        self._handle = self._loop.call_at(due, self._fire, due)

    def _fire(self, due: float) -> None:
        assert self._loop is not None
        lag = max(0.0, self._loop.time() - due)
        metrics.LOOP_LAG.observe(lag)
        held_since = self._beat
        self._beat = time.monotonic()
        if lag >= self.stall_s:
            self._report(lag, held_since)
        metrics.WRITER_BUFFERED.set(self.node.writer.buffered)
        self._ticks += 1
        if self._ticks % self.probe_every == 0 and (self._probe is None or self._probe.done()):
            self._probe = asyncio.create_task(self.probe(), name="readiness-probe")
        self._schedule()  # the next one is due an interval after this one ran: lag never accumulates

    def _report(self, lag: float, held_since: float) -> None:
        """One warning line per stall: what held the loop."""
        held, self._held = self._held, None
        if _GcWatch.long_at >= held_since:
            what = _GcWatch.long_note
        elif held is not None and held[0] >= held_since:
            what = f"held at: {held[1]}"
        else:
            what = "no stack caught (no thread of the process ran: a C call held the GIL, or no CPU for it)"
        log.warning("event loop held %.0f ms: %s", lag * 1000, what)

    async def probe(self) -> bool:
        """The checks of /readyz, once: sets `tracker_ready`, counts failed backend probes."""
        node = self.node
        try:
            async with node.pool.acquire(timeout=2) as conn:
                postgres = await conn.fetchval("SELECT 1", timeout=2) == 1
        except Exception as exc:  # any failure is a failed probe, as for /readyz; the task must not die
            log.debug("PostgreSQL probe failed: %s: %s", type(exc).__name__, exc)
            postgres = False
        redis = await node.broker.ping()
        if not postgres:
            metrics.POSTGRES_ERRORS.inc()
        if not redis:
            metrics.REDIS_ERRORS.inc()
        ready = postgres and redis and node.broker.receiving and node.writer.healthy and not node.draining
        metrics.READY.set(1 if ready else 0)
        return ready
