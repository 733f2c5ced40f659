"""The packages layer's live side: chaining stored scans in the background, and who may see whom.

Scans reach this layer after their commit (`on_stored_scans`); one task chains them in batches
(`package_process.process`) and then publishes, per package, the scan frames, the package change
and the alerts, stamped with the package's client. A crash between the commit and the chaining
loses nothing: a periodic sweep chains stored scans that no instance chained.

A driver's live frames carry a stamp: the clients whose packages it holds (`DriverConn.stamp`).
It is recomputed from PostgreSQL after every change (here, or on another instance, which says so
with a `stamp` control message), by one task whose queries run one after the other, so a newer
answer is never overwritten by an older one. A window closes at the *receipt* of the scan that
closes it (`on_scan_received`): until that scan is chained and the stamp recomputed, the package
counts as not held, so no position sent after a delivery reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from . import custody
from . import package_store as ps
from .batching import TickBatcher
from .package_process import Item, Outcome, process
from .protocol.events import Scan
from .store import Pending
from .writer import DATA_ERRORS, now_ms

if TYPE_CHECKING:
    from .auth import Principal
    from .hub import Dashboard
    from .node import DriverConn, Node

log = logging.getLogger("tracker.packages")

PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
DriverKey = tuple[str, str]
QUEUE_MAX = 200_000  # beyond it, scans are left to the sweep
CLOSING_TTL_MS = 120_000  # a closing scan never chained (refused by the writer) stops counting
FOREVER = 2**62


class PackageLayer:
    def __init__(self, node: Node, key: bytes) -> None:
        self.node = node
        self.key = key
        s = node.settings
        self.max_delivery_m = s.delivery_max_m
        self.batch_max = s.custody_batch_max
        self._queue: list[Item] = []
        self._wake = asyncio.Event()
        # Stamps: for this instance's driver sessions, the packages each holds (-> client).
        self.held: dict[DriverKey, dict[str, str]] = {}
        self.holder_of: dict[tuple[str, str], DriverKey] = {}
        # (org, package) -> {(driver, seq): received}: a scan that may end its holder's window, received
        # here and not chained yet. While any is there, the package counts as not held.
        self.closing: dict[tuple[str, str], dict[tuple[str, int], int]] = {}
        self._refresh_keys: set[DriverKey] = set()
        self._refresh_clears: list[tuple[str, str, str, int]] = []
        self._refresh_wake = asyncio.Event()
        self._refresh_waiters: list[asyncio.Future[None]] = []
        self._generation = 0
        self._applied: dict[DriverKey, int] = {}
        self._held_batch: TickBatcher[DriverKey, list[asyncpg.Record]] = TickBatcher(self._held_rows_many,
                                                                                       max_batch=2000)

    # -- hooks ----------------------------------------------------------------------------------

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._processor(), name="custody"),
                asyncio.create_task(self._refresher(), name="stamps")]

    def on_stored_scans(self, stored: list[Pending]) -> None:
        """After a commit (never awaits): queue the scans for chaining, in the order stored."""
        if len(self._queue) > QUEUE_MAX:
            return  # PostgreSQL is failing us for long: the sweep chains them later
        self._queue.extend(Item(p.org, p.driver, p.event.seq, p.event.package) for p in stored)  # type: ignore[union-attr]
        self._wake.set()

    def on_scan_received(self, conn: DriverConn, scan: Scan) -> None:
        """At receipt: a scan by another driver, or a deliver/fail/return by the holder, ends the
        holder's window now (if the holder is connected here)."""
        org, driver = conn.key
        pk = (org, scan.package)
        holder = self.holder_of.get(pk)
        if holder is None or (holder[1] == driver and scan.event not in custody.CLOSING_EVENTS):
            return
        self.closing.setdefault(pk, {})[(driver, scan.seq)] = now_ms()
        self._apply_stamp(holder)

    async def on_driver_connected(self, conn: DriverConn) -> None:
        self._generation += 1
        generation = self._generation
        try:
            rows = await self._held_batch.get(conn.key)
        except PG_ERRORS as exc:
            log.warning("stamp of %s/%s unknown (PostgreSQL: %s); retrying", *conn.key, exc)
            self.request_refresh([conn.key])
            return
        self._set_held(conn.key, rows, generation)
        self._apply_stamp(conn.key)

    def on_stamp_ctl(self, payload: str) -> None:
        """Another instance changed which packages these drivers hold."""
        try:
            keys = [(org, d) for org, d in orjson.loads(payload)]
        except (orjson.JSONDecodeError, TypeError, ValueError):
            log.warning("malformed stamp control message")
            return
        self.request_refresh(k for k in keys if k in self.node.sessions)

    async def snapshot_extras(self, node: Node, dash: Dashboard) -> tuple[set[str] | None, list[Any], list[Any]]:
        p, flt = dash.principal, dash.flt
        client = p.client if p.role == "client" else None
        packages, drivers = sorted(flt.packages or ()), sorted(flt.drivers or ())
        recent = now_ms() - int(node.settings.package_recent_s * 1000)
        try:
            rows = await ps.scope_packages(node.pool, p.org, client=client, follow_all=flt.follows_all,
                                           packages=packages, drivers=drivers, recent_since=recent)
            alerts = await ps.scope_alerts(node.pool, p.org, client=client, follow_all=flt.follows_all,
                                           packages=packages, drivers=drivers)
            visible = None
            if client is not None:
                visible = {r["holder"] for r in await ps.client_holders(node.pool, p.org, client)}
            carriers = set(await ps.holders_of(node.pool, p.org, packages, client)) if packages else set()
        except PG_ERRORS as exc:
            log.warning("snapshot without packages (PostgreSQL: %s)", exc)
            return (set() if client is not None else None), [], []
        dash.carriers.clear()
        dash.carriers.update(carriers)
        out_packages = [{"package": r["package_id"], "state": r["state"], "driver": r["holder"], "client": r["client"],
                         "ts": r["ts"]} for r in rows]
        out_alerts = [{"type": "alert", "id": a["id"], "kind": a["kind"], "state": a["state"], "ts": a["ts"],
                       "driver": a["driver_id"], "package": a["package_id"], "message": a["message"]} for a in alerts]
        return visible, out_packages, out_alerts

    async def trail_windows(self, principal: Principal, driver: str) -> list[tuple[int, int]]:
        """When `driver` held one of the client's packages, from the scans' ts ([from, to))."""
        if principal.role != "client" or principal.client is None:
            return [(0, FOREVER)]
        by_package: dict[str, list[custody.Fact]] = {}
        for row in await ps.client_scans_with(self.node.pool, principal.org, principal.client, driver):
            by_package.setdefault(row["package"], []).append(
                custody.Fact(row["driver_id"], row["seq"], row["ts"], row["event"]))
        windows: list[tuple[int, int]] = []
        for facts in by_package.values():
            replayed = custody.replay(custody.Terms(), facts)
            windows += [(a, FOREVER if b is None else b) for a, b in custody.holding_windows(replayed, driver)]
        return sorted(windows)

    # -- chaining -------------------------------------------------------------------------------

    async def _processor(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            delay = next_sweep - loop.time()
            if not self._queue and delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
            self._wake.clear()
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + self.node.settings.custody_sweep_s
                await self._sweep()
            while self._queue:
                batch, self._queue = self._queue[: self.batch_max], self._queue[self.batch_max:]
                if not await self._run(batch):
                    self._queue[:0] = batch
                    await asyncio.sleep(1.0)  # PostgreSQL is away: retry, the scans are safe
                    break

    async def _run(self, batch: list[Item]) -> bool:
        """Chain one batch and publish; False if PostgreSQL is unavailable (retry later)."""
        try:
            async with self.node.pool.acquire() as conn:
                out = await process(conn, self.key, batch, max_delivery_m=self.max_delivery_m)
        except DATA_ERRORS as exc:
            if len(batch) == 1:
                log.error("cannot chain scan %s: %s (left to the sweep)", batch[0], exc)
                return True
            half = len(batch) // 2
            return await self._run(batch[:half]) and await self._run(batch[half:])
        except PG_ERRORS as exc:
            log.warning("chaining %d scans failed (%s: %s); retrying", len(batch), type(exc).__name__, exc)
            return False
        await self.publish(out, [(it.org, it.package, it.driver, it.seq) for it in batch])
        return True

    async def publish(self, out: Outcome, processed: list[tuple[str, str, str, int]]) -> None:
        """After a commit: recompute the stamps of the drivers whose packages changed, then publish
        the frames. In that order: once a client sees "picked_up", it sees the driver (if connected
        here; elsewhere, as soon as that instance hears of it)."""
        local = [k for k in out.holders if k in self.node.sessions]
        done = self.request_refresh(local, processed)
        try:
            await asyncio.wait_for(asyncio.shield(done), 2.0)
        except TimeoutError:
            log.debug("stamps not refreshed in time (PostgreSQL slow); publishing anyway")
        for org, item in out.live:
            self.node.publish(org, item)
        if out.holders:
            self.node.spawn(self._tell_others(sorted(out.holders)))

    async def _tell_others(self, keys: list[DriverKey]) -> None:
        try:
            await self.node.broker.redis.publish("trk:ctl", b"stamp\t" + orjson.dumps(keys))
        except (RedisError, OSError) as exc:
            log.debug("stamp control message not sent (Redis: %s); the periodic refresh catches up", exc)

    async def _sweep(self) -> None:
        s = self.node.settings
        now = now_ms()
        try:
            rows = await ps.unchained_since(self.node.pool, now - int(s.custody_lookback_s * 1000),
                                            now - int(s.custody_grace_s * 1000), 10 * self.batch_max)
        except PG_ERRORS as exc:
            log.debug("custody sweep skipped: %s", exc)
            rows = []
        if rows:
            log.warning("chaining %d stored scans that no instance chained", len(rows))
            self._queue.extend(Item(r["org"], r["driver_id"], r["seq"], r["package"], recovered=True) for r in rows)
            self._wake.set()
        # The periodic catch-up of stamps (a lost control message) and of forgotten closing scans.
        limit = now - CLOSING_TTL_MS
        for pk in list(self.closing):
            waiting = {c: t for c, t in self.closing[pk].items() if t > limit}
            if waiting:
                self.closing[pk] = waiting
            else:
                del self.closing[pk]
        self.request_refresh(list(self.node.sessions) + [k for k in self.held if k not in self.node.sessions])

    # -- stamps ---------------------------------------------------------------------------------

    def request_refresh(self, keys: Iterable[DriverKey],
                        clears: Iterable[tuple[str, str, str, int]] = ()) -> asyncio.Future[None]:
        """Recompute these drivers' stamps from PostgreSQL (a query started from now on); then forget
        the closing scans `clears`, which are chained. The future is done when that is applied."""
        self._refresh_keys.update(keys)
        self._refresh_clears.extend(clears)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refresh_waiters.append(waiter)
        self._refresh_wake.set()
        return waiter

    async def _refresher(self) -> None:
        while True:
            await self._refresh_wake.wait()
            self._refresh_wake.clear()
            keys, self._refresh_keys = self._refresh_keys, set()
            clears, self._refresh_clears = self._refresh_clears, []
            waiters, self._refresh_waiters = self._refresh_waiters, []
            live = sorted(k for k in keys if k in self.node.sessions)
            self._generation += 1
            generation = self._generation
            try:
                rows = await self._held_rows_many(live)
            except PG_ERRORS as exc:
                log.debug("stamp refresh failed (%s); retrying", exc)
                self.request_refresh(keys, clears)
                self._refresh_waiters += waiters
                await asyncio.sleep(1.0)
                continue
            touched = set(live)
            for k in keys - set(live):
                self._set_held(k, [], generation)
            for k, held in zip(live, rows, strict=True):
                self._set_held(k, held, generation)
            for org, package, driver, seq in clears:  # only now: the answer above postdates their commit
                waiting = self.closing.get((org, package))
                if waiting is not None and waiting.pop((driver, seq), None) is not None:
                    if not waiting:
                        del self.closing[(org, package)]
                    holder = self.holder_of.get((org, package))
                    if holder is not None:
                        touched.add(holder)
            for k in touched:
                self._apply_stamp(k)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _held_rows_many(self, keys: list[DriverKey]) -> list[list[asyncpg.Record]]:
        if not keys:
            return []
        by_key: dict[DriverKey, list[asyncpg.Record]] = {}
        for row in await ps.held_by(self.node.pool, keys):
            by_key.setdefault((row["org"], row["holder"]), []).append(row)
        return [by_key.get(k, []) for k in keys]

    def _set_held(self, k: DriverKey, rows: list[asyncpg.Record], generation: int) -> None:
        if self._applied.get(k, -1) > generation:
            return  # an answer to a query started before the one already applied
        old = self.held.pop(k, {})
        for package in old:
            if self.holder_of.get((k[0], package)) == k:
                del self.holder_of[(k[0], package)]
        if k not in self.node.sessions:
            self._applied.pop(k, None)
            return
        self._applied[k] = generation
        held = {r["package_id"]: r["client"] for r in rows}
        if held:
            self.held[k] = held
            for package in held:
                self.holder_of[(k[0], package)] = k

    def stamp_of(self, k: DriverKey) -> bytes:
        org = k[0]
        clients = {c for p, c in self.held.get(k, {}).items() if (org, p) not in self.closing}
        return orjson.dumps(sorted(clients)) if clients else b""

    def _apply_stamp(self, k: DriverKey) -> None:
        conn = self.node.sessions.get(k)
        if conn is not None:
            conn.stamp = self.stamp_of(k)
