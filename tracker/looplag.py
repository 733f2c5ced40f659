"""The process watching itself: how late its event loop runs, and what /readyz would answer.

Loop lag: a `call_later` timer is due every `interval_s` (0.5 s); how late the loop runs it is
the loop's lag, observed into `tracker_loop_lag_seconds`. Every connection of this process waits
as long: a blocking call, a long GC pause or a CPU-bound burst shows here first. The timer is a
plain callback, not a task, so measuring costs one handle per interval and never awaits.

The same tick sets `tracker_writer_buffered_events` (what waits for PostgreSQL), and every
`probe_every_s` (5 s) a probe runs the checks of /readyz (PostgreSQL `SELECT 1`, Redis PING, the
subscriber's loop-back proof, the writer, draining) into `tracker_ready`; a failed PostgreSQL or
Redis probe counts in `tracker_backend_errors_total{backend}`. Probing on a clock, not only on
traffic, tells an idle instance with its database gone from a healthy one.
"""

from __future__ import annotations

import asyncio
import logging

from . import metrics
from .node import Node

log = logging.getLogger("tracker.looplag")


class LoopLag:
    """Started and stopped by the application's lifespan (`start`, `await stop()`)."""

    def __init__(self, node: Node, *, interval_s: float = 0.5, probe_every_s: float = 5.0) -> None:
        self.node = node
        self.interval_s = interval_s
        self.probe_every = max(1, round(probe_every_s / interval_s))  # in ticks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._ticks = 0
        self._probe: asyncio.Task[bool] | None = None

    def start(self) -> LoopLag:
        self._loop = asyncio.get_running_loop()
        metrics.WRITER_BUFFER_MAX.set(self.node.settings.writer_buffer_max)
        self._schedule()
        self._probe = asyncio.create_task(self.probe(), name="readiness-probe")
        return self

    async def stop(self) -> None:
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
        metrics.LOOP_LAG.observe(max(0.0, self._loop.time() - due))
        metrics.WRITER_BUFFERED.set(self.node.writer.buffered)
        self._ticks += 1
        if self._ticks % self.probe_every == 0 and (self._probe is None or self._probe.done()):
            self._probe = asyncio.create_task(self.probe(), name="readiness-probe")
        self._schedule()  # the next one is due an interval after this one ran: lag never accumulates

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
