"""Batched, idempotent PostgreSQL writes; every event answered after the commit, never before.

`submit()` never awaits: the ingest path appends to a bounded buffer. A flush takes what is
buffered when `flush_interval_ms` (20 ms) has passed since the window's first event, or as soon
as `flush_max_events` (5,000) are waiting, whichever comes first, and stores them in one
statement, one round trip (`eventstore.insert_events`: array parameters, ON CONFLICT DO
NOTHING, no BEGIN/COMMIT round trips), then hands the outcome to `on_done`: stored (ack) or
refused (`conflict`, `invalid`, `unavailable`). Up to `writer_concurrency` flushes run at once,
each on its own pooled connection.

Latency budget (PostgreSQL healthy): an event waits at most `flush_interval_ms` for its window to
close, then one round trip of the statement (a few ms for a window of a fleet's traffic): its ack
leaves ~20-30 ms after receipt. What this costs is per window, not per event: at 2,000 events/s a
flush carries ~40 of them.

Faults: any failure of a flush (a connection or server failure, no writable host yet during a
switchover, a bug) puts the batch back and retries with backoff; events not stored within
`answer_deadline_s` of receipt are answered `unavailable` (the phone keeps and resends them), so
every event is answered within 30 s and memory stays bounded. A batch that fails on its *data* is
split in halves until the bad event is found and refused alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from . import metrics
from .clock import now_ms
from .eventstore import DriverKeys, Unsettled, insert_events
from .store import Pending, identity

log = logging.getLogger("tracker.writer")

# Errors that say "this data cannot be stored" rather than "the database is not there".
DATA_ERRORS: Final = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.UntranslatableCharacterError,
    asyncpg.ProgramLimitExceededError,
)

Outcome = Callable[[list[Pending], list[tuple[Pending, str, str]]], None]


class Writer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        on_done: Outcome,
        *,
        flush_interval_ms: int = 20,
        flush_max_events: int = 5_000,
        concurrency: int = 2,
        buffer_max: int = 200_000,
        answer_deadline_s: float = 25.0,
    ) -> None:
        self._pool = pool
        self._on_done = on_done
        self._interval = flush_interval_ms / 1000
        self._max_events = flush_max_events
        self._buffer_max = buffer_max
        self._deadline_ms = int(answer_deadline_s * 1000)
        self._buffer: deque[Pending] = deque()
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._full = asyncio.Event()  # flush_max_events are waiting: no need to wait out the window
        self._keys = DriverKeys()
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._backoff = 0.0
        self.healthy = True
        self.in_flight = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self.in_flight

    def submit(self, items: list[Pending]) -> list[Pending]:
        """Queue events for storage; returns those refused for lack of room. Never awaits."""
        room = self._buffer_max - self.buffered
        if room >= len(items):
            self._buffer.extend(items)
            rejected: list[Pending] = []
        else:
            self._buffer.extend(items[: max(room, 0)])
            rejected = items[max(room, 0) :]
        if self._buffer:
            self._wake.set()
            if len(self._buffer) >= self._max_events:
                self._full.set()
        return rejected

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="writer")

    async def drain(self, timeout: float) -> bool:
        """Flush everything buffered (for a graceful shutdown); True when nothing is left."""
        deadline = time.monotonic() + timeout
        while (self._buffer or self._flushes) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
        return not self._buffer and not self._flushes

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._flushes):
            task.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._buffer) < self._max_events:
                # Gather a window: at most one interval of delay, less when a full batch is waiting.
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._full.wait()
            if self._backoff:
                await asyncio.sleep(self._backoff)
            await self._slots.acquire()
            self._expire()
            if not self._buffer:
                self._wake.clear()
                self._slots.release()
                continue
            n = min(len(self._buffer), self._max_events)
            batch = [self._buffer.popleft() for _ in range(n)]
            if len(self._buffer) < self._max_events:
                self._full.clear()
            if not self._buffer:
                self._wake.clear()
            self.in_flight += n
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def _expire(self) -> None:
        """Answer `unavailable` for what waited too long, so every event is answered in time."""
        if not self._buffer:
            return
        limit = now_ms() - self._deadline_ms
        if self._buffer[0].received_at > limit:
            return
        expired = [it for it in self._buffer if it.received_at <= limit]
        kept = [it for it in self._buffer if it.received_at > limit]
        self._buffer = deque(kept)
        metrics.EVENTS_REFUSED.labels("unavailable").inc(len(expired))
        self._answer([], [(it, "unavailable", "the database is unavailable; resend later") for it in expired])

    async def _flush(self, batch: list[Pending]) -> None:
        started = time.perf_counter()
        try:
            stored, refused = await self._store(batch)
        except Exception as exc:
            # Whatever failed (the database unreachable or refusing writes during a failover, no
            # host of a multi-host DSN writable yet during a switchover: asyncpg's
            # TargetServerAttributeNotMatched, or a bug), the batch is kept: retried with backoff,
            # and answered `unavailable` at its deadline (`_expire`) if it still cannot be stored.
            await self._failed(exc, batch)
            return
        finally:
            self.in_flight -= len(batch)
            self._slots.release()
        if not self.healthy:
            log.info("PostgreSQL writes recovered")
        self.healthy = True
        self._backoff = 0.0
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.EVENTS_STORED.inc(len(stored))
        for _, code, _ in refused:
            metrics.EVENTS_REFUSED.labels(code).inc()
        self._answer(stored, refused)

    def _answer(self, stored: list[Pending], refused: list[tuple[Pending, str, str]]) -> None:
        """Hand an outcome to `on_done`; a failure there (a bug) is logged and never kills the
        writer's tasks (the phone resends what it was not told, and the resend is acked)."""
        try:
            self._on_done(stored, refused)
        except Exception:
            log.exception("answering %d stored and %d refused events failed", len(stored), len(refused))

    async def _failed(self, exc: Exception, batch: list[Pending]) -> None:
        """A flush failed: put its batch back first (never lost, never left unanswered); never raises."""
        self._buffer.extendleft(reversed(batch))
        self._wake.set()
        self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
        expected = isinstance(exc, TimeoutError | OSError | asyncpg.PostgresError | asyncpg.InterfaceError | Unsettled)
        if self.healthy or not expected:  # an unexpected failure is logged every time, with its traceback
            log.warning(
                "PostgreSQL write failed (%s: %s); retrying",
                type(exc).__name__,
                exc,
                exc_info=None if expected else exc,
            )
        self.healthy = False
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError | asyncpg.CannotConnectNowError):
            with contextlib.suppress(Exception):
                await self._pool.expire_connections()  # a failed-over primary: reconnect to the new one

    async def _store(self, batch: list[Pending]) -> tuple[list[Pending], list[tuple[Pending, str, str]]]:
        # Dedupe within the batch: a resend of the same event piggybacks on the first one; a
        # different event under the same key is a conflict straight away.
        first: dict[tuple[str, str, int], Pending] = {}
        unique: list[Pending] = []
        twins: list[tuple[Pending, Pending]] = []
        refused: list[tuple[Pending, str, str]] = []
        for it in batch:
            key = (it.org, it.driver, it.event.seq)
            seen = first.get(key)
            if seen is None:
                first[key] = it
                unique.append(it)
            elif identity(seen.event) == identity(it.event):
                twins.append((it, seen))
            else:
                refused.append((it, "conflict", "seq already names a different event"))
        stored: list[Pending] = []
        async with self._pool.acquire() as conn:
            ids = await self._keys.ids(conn, [(it.org, it.driver) for it in unique])
            await self._store_unique(conn, unique, ids, stored, refused)
        ok = {id(it) for it in stored}
        for it, seen in twins:
            if id(seen) in ok:
                stored.append(it)
            else:
                refused.append((it, "conflict", "seq already names a different event"))
        return stored, refused

    async def _store_unique(
        self,
        conn: Any,
        items: list[Pending],
        ids: list[int],
        stored: list[Pending],
        refused: list[tuple[Pending, str, str]],
    ) -> None:
        if not items:
            return
        try:
            verdicts = await insert_events(conn, items, ids)
        except DATA_ERRORS as exc:
            if len(items) == 1:
                log.warning(
                    "refusing an unstorable event of %s/%s seq %d: %s",
                    items[0].org,
                    items[0].driver,
                    items[0].event.seq,
                    exc,
                )
                refused.append((items[0], "invalid", "the event cannot be stored"))
                return
            half = len(items) // 2
            await self._store_unique(conn, items[:half], ids[:half], stored, refused)
            await self._store_unique(conn, items[half:], ids[half:], stored, refused)
            return
        for it, ok in zip(items, verdicts, strict=True):
            if ok:
                stored.append(it)
            else:
                refused.append((it, "conflict", "seq already names a different event"))
