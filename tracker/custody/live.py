"""The packages layer's live side: chaining stored scans in the background, snapshots, trail windows.

Scans reach this layer after their commit (`on_stored_scans`); one task chains them in batches
(`package_process.process`, one transaction each) and then publishes, per package, the scan
frames, the package change and the alerts, stamped with the package's client. One task keeps
the order of scans per package on this instance; row locks keep it across instances. A crash
between the commit and the chaining loses nothing: a periodic sweep chains stored scans that no
instance chained (their records say `recovered`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from ..clock import now_ms
from ..extension import NO_OUTBOX, Outbox
from ..store import Pending
from ..writer import DATA_ERRORS
from . import state as custody
from . import store as ps
from .checkpoints import Checkpoints
from .process import Item, Outcome, fact, process
from .stamps import PG_ERRORS, Chained, Stamps
from .watch import Watch

if TYPE_CHECKING:
    from ..auth import Principal
    from ..extension import Core
    from ..hub import Dashboard

log = logging.getLogger("tracker.packages")

QUEUE_MAX = 200_000  # beyond it, scans are left to the sweep
# A scan is committed within the writer's answer deadline of its receipt, or not at all: a sweep
# of what was received before `now - custody_grace_s` sees every such scan that will ever exist.
SWEEP_OVERLAP_MS = 60_000
FOREVER = 2**62


class PackageLayer:
    def __init__(self, core: Core, key: bytes, outbox: Outbox = NO_OUTBOX) -> None:
        self.core = core
        self.key = key
        self.outbox = outbox  # webhook events, written in the transactions of their facts
        self.max_delivery_m = core.settings.delivery_max_m
        self.batch_max = core.settings.custody_batch_max
        self.stamps = Stamps(core)
        self._queue: list[Item] = []
        self._wake = asyncio.Event()
        self._swept_until: int | None = None  # every scan received before it was found chained (or queued)
        s = core.settings
        folder = s.custody_checkpoint_dir or s.data_dir.expanduser() / "checkpoints"
        self.checkpoints = Checkpoints(folder, key, core.broker.instance_id)
        self.watch = Watch(core, outbox)

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        tasks = [self._processor(), self.stamps.run(), self._checkpointer(), self.stamps.notifier.listen()]
        return tasks + self.watch.tasks()

    def on_stored_scans(self, stored: list[Pending]) -> None:
        """After a commit (never awaits): queue the scans for chaining, in the order stored."""
        if len(self._queue) > QUEUE_MAX:
            return  # PostgreSQL has failed us for long: the sweep chains them later
        self._queue.extend(Item(p.org, p.driver, p.event.seq, p.event.package) for p in stored)  # type: ignore[union-attr]
        self._wake.set()

    # -- chaining -------------------------------------------------------------------------------

    async def _processor(self) -> None:
        loop = asyncio.get_running_loop()
        # The first sweep (the whole lookback) waits for the reconnection storm that follows a deploy.
        next_sweep = loop.time() + min(5.0, self.core.settings.custody_sweep_s)
        while True:
            delay = next_sweep - loop.time()
            if not self._queue and delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):  # not wait_for: see tracker/redis_cluster.py
                        await self._wake.wait()
            self._wake.clear()
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + self.core.settings.custody_sweep_s
                await self._sweep()
                self.stamps.expire()
            while self._queue:
                batch, self._queue = self._queue[: self.batch_max], self._queue[self.batch_max :]
                if not await self._run(batch):
                    self._queue[:0] = batch
                    await asyncio.sleep(1.0)  # PostgreSQL is away: retry, the scans are safe
                    break

    async def _run(self, batch: list[Item]) -> bool:
        """Chain one batch and publish; False if PostgreSQL is unavailable (retry later)."""
        try:
            async with self.core.pool.acquire() as conn:
                out = await process(conn, self.key, batch, max_delivery_m=self.max_delivery_m, outbox=self.outbox)
        except DATA_ERRORS as exc:
            if len(batch) == 1:
                log.error("cannot chain scan %s: %s (left to the sweep)", batch[0], exc)
                return True
            half = len(batch) // 2
            return await self._run(batch[:half]) and await self._run(batch[half:])
        except PG_ERRORS as exc:
            log.warning("chaining %d scans failed (%s: %s); retrying", len(batch), type(exc).__name__, exc)
            return False
        self.checkpoints.note(out.heads)
        await self.publish(out, [(it.org, it.package, it.driver, it.seq) for it in batch])
        return True

    async def _checkpointer(self) -> None:
        """Every `custody_checkpoint_s`, anchor the heads chained since outside PostgreSQL
        (checkpoints.py); at shutdown, the last ones."""
        try:
            while True:
                await asyncio.sleep(self.core.settings.custody_checkpoint_s)  # a period, not a wait for an effect
                await self.checkpoints.flush()
        except asyncio.CancelledError:
            try:
                self.checkpoints.write(self.checkpoints.take(), now_ms())
            except OSError as exc:
                log.error("custody checkpoints not written at shutdown: %s", exc)
            raise

    async def publish(self, out: Outcome, processed: list[Chained]) -> None:
        """After a commit: recompute the stamps of the drivers whose packages changed, then publish
        the frames. In that order: once a client sees "picked_up", it sees the driver (if connected
        here; elsewhere, as soon as that instance hears of it)."""
        local = [k for k in out.holders if k in self.core.drivers]
        done = self.stamps.refresh(local, processed)
        try:
            await asyncio.wait_for(asyncio.shield(done), 2.0)
        except TimeoutError:
            log.debug("stamps not refreshed in time (PostgreSQL slow); publishing anyway")
        for org, item in out.live:
            self.core.publish(org, item)
        if out.holders:
            self.stamps.changed(out.holders, [c for c in processed if (c[0], c[1]) in out.changed])

    async def _sweep(self) -> None:
        s = self.core.settings
        now = now_ms()
        since = now - int(s.custody_lookback_s * 1000)
        if self._swept_until is not None:  # after the first sweep, only what came since (with a margin)
            since = max(since, self._swept_until - SWEEP_OVERLAP_MS)
        before = now - int(s.custody_grace_s * 1000)
        limit = 10 * self.batch_max
        try:
            rows = await ps.unchained_since(self.core.pool, since, before, limit)
        except PG_ERRORS as exc:
            log.debug("custody sweep skipped: %s", exc)
            return
        if len(rows) < limit:
            self._swept_until = before
        if rows:
            log.warning("chaining %d stored scans that no instance chained", len(rows))
            self._queue.extend(Item(r["org"], r["driver_id"], r["seq"], r["package"], recovered=True) for r in rows)
            self._wake.set()

    # -- reads for the core ---------------------------------------------------------------------

    async def snapshot_scope(self, dash: Dashboard) -> tuple[set[str] | None, list[Any], list[Any]]:
        """A dashboard's scope: the drivers it may see (None: all), its packages, its open alerts;
        fills `dash.carriers` with the holders of the packages it follows."""
        node, p, flt = self.core, dash.principal, dash.flt
        client = p.client if p.role == "client" else None
        packages, drivers = sorted(flt.packages or ()), sorted(flt.drivers or ())
        recent = now_ms() - int(node.settings.package_recent_s * 1000)
        try:
            rows = await ps.scope_packages(
                node.pool,
                p.org,
                client=client,
                follow_all=flt.follows_all,
                packages=packages,
                drivers=drivers,
                recent_since=recent,
            )
            alerts = await ps.scope_alerts(
                node.pool, p.org, client=client, follow_all=flt.follows_all, packages=packages, drivers=drivers
            )
            visible = None
            if client is not None:
                visible = {r["holder"] for r in await ps.client_holders(node.pool, p.org, client)}
            carriers = set(await ps.holders_of(node.pool, p.org, packages, client)) if packages else set()
        except PG_ERRORS as exc:
            log.warning("snapshot without packages (PostgreSQL: %s)", exc)
            return (set() if client is not None else None), [], []
        dash.carriers.clear()
        dash.carriers.update(carriers)
        out_packages = [
            {
                "package": r["package_id"],
                "state": r["state"],
                "driver": r["holder"],
                "client": r["client"],
                "ts": r["ts"],
            }
            for r in rows
        ]
        out_alerts = [_snapshot_alert(a) for a in alerts]
        return visible, out_packages, out_alerts

    async def trail_windows(self, principal: Principal, driver: str) -> list[tuple[int, int]]:
        """When `driver` held one of the client's packages, from the scans' ts ([from, to))."""
        if principal.role != "client" or principal.client is None:
            return [(0, FOREVER)]
        by_package: dict[str, list[custody.Fact]] = {}
        for row in await ps.client_scans_with(self.core.pool, principal.org, principal.client, driver):
            by_package.setdefault(row["package"], []).append(fact(row))
        windows: list[tuple[int, int]] = []
        for facts in by_package.values():
            replayed = custody.replay(custody.Terms(), facts)
            windows += [(a, FOREVER if b is None else b) for a, b in custody.holding_windows(replayed, driver)]
        return sorted(windows)


def _snapshot_alert(a: Any) -> dict[str, Any]:
    """An open alert as a snapshot lists it: the live frame's fields, its acknowledgement included
    (a dashboard that reconnects keeps seeing who acknowledged it)."""
    out: dict[str, Any] = {
        "type": "alert",
        "id": a["id"],
        "kind": a["kind"],
        "state": a["state"],
        "ts": a["ts"],
        "driver": a["driver_id"],
        "package": a["package_id"],
        "message": a["message"],
    }
    if a["acknowledged_at"] is not None:
        out["acknowledged_by"], out["acknowledged_at"] = a["acknowledged_by"], a["acknowledged_at"]
    if a["details"] is not None:
        out["details"] = orjson.loads(a["details"])
    return out
