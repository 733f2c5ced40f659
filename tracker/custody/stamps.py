"""Who may see a driver live: the stamp on its positions and presence (`DriverConn.stamp`), the
JSON list of the clients whose packages it holds (PROTOCOL.md, "Who sees what").

The stamp is recomputed from PostgreSQL after every change, here or on another instance (which
says so with a `stamp` control message), by one task whose queries run one after the other, so a
newer answer is never overwritten by an older one.

A window closes at the *receipt* of the scan that closes it, on whichever instance: the receiving
instance notes it at once and tells the others (one control message per tick). From then until
that scan is chained and the stamps recomputed, the package counts as held by nobody, so no
position sent after a delivery or a handover reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from ..batching import TickBatcher
from ..clock import now_ms
from ..protocol.events import Scan
from . import state as custody
from . import store as ps

if TYPE_CHECKING:
    from ..conn import DriverConn
    from ..extension import Core

log = logging.getLogger("tracker.packages")

PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
CTL_KIND = "stamp"  # control messages of this layer (Broker.publish_control)
CLOSING_TTL_MS = 120_000  # a closing scan never chained (refused by the writer) stops counting
DriverKey = tuple[str, str]
Chained = tuple[str, str, str, int]  # (org, package, driver, seq) of a scan


class Stamps:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.held: dict[DriverKey, dict[str, str]] = {}  # this instance's drivers: package -> client
        self.holder_of: dict[tuple[str, str], DriverKey] = {}
        # (org, package) -> {(driver, seq): received}: scans that may end the holder's window,
        # received (here or elsewhere) and not chained yet.
        self.closing: dict[tuple[str, str], dict[tuple[str, int], int]] = {}
        self._keys: set[DriverKey] = set()
        self._clears: list[Chained] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._notices: list[list[Any]] = []
        self._generation = 0
        self._applied: dict[DriverKey, int] = {}
        self._hello: TickBatcher[DriverKey, list[asyncpg.Record]] = TickBatcher(self._query, max_batch=2000)

    # -- hooks ----------------------------------------------------------------------------------

    def on_scan_received(self, conn: DriverConn, scan: Scan) -> None:
        """At receipt (never awaits): close the holder's window here, and tell the other instances."""
        org, driver = conn.key
        self._closing(org, scan.package, driver, scan.seq, scan.event)
        if not self.core.broker.live:
            return  # no live feed to leak through (and no Redis to tell the others through)
        if not self._notices:
            asyncio.get_running_loop().call_soon(self._send_notices)
        self._notices.append([org, scan.package, driver, scan.seq, scan.event])

    def _closing(self, org: str, package: str, driver: str, seq: int, event: str) -> None:
        holder = self.holder_of.get((org, package))
        if holder is None or (holder[1] == driver and event not in custody.CLOSING_EVENTS):
            return  # nobody holds it here, or its holder goes on holding it
        self.closing.setdefault((org, package), {})[(driver, seq)] = now_ms()
        self.apply(holder)

    def _send_notices(self) -> None:
        notices, self._notices = self._notices, []
        self.core.spawn(self._tell({"closing": notices}))

    async def on_driver_connected(self, conn: DriverConn) -> None:
        self._generation += 1
        generation = self._generation
        try:
            rows = await self._hello.get(conn.key)
        except PG_ERRORS as exc:
            log.warning("stamp of %s/%s unknown (PostgreSQL: %s); retrying", *conn.key, exc)
            self.refresh([conn.key])
            return
        self._set_held(conn.key, rows, generation)
        self.apply(conn.key)

    def on_stamp_ctl(self, payload: str) -> None:
        """A control message from an instance (this one included): scans received, or stamps to redo."""
        try:
            msg = orjson.loads(payload)
            if msg.get("from") == self.core.broker.instance_id:
                return  # this instance did it already
            for org, package, driver, seq, event in msg.get("closing", ()):
                self._closing(org, package, driver, seq, event)
            keys = [(org, d) for org, d in msg.get("drivers", ())]
            chained = [(org, p, d, seq) for org, p, d, seq in msg.get("chained", ())]
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            log.warning("malformed stamp control message")
            return
        if keys or chained:
            self.refresh([k for k in keys if k in self.core.drivers], chained)

    def changed(self, holders: Iterable[DriverKey], chained: list[Chained]) -> None:
        """After a commit elsewhere in this instance: tell the others whose stamps changed."""
        self.core.spawn(self._tell({"drivers": sorted(holders), "chained": chained}))

    async def _tell(self, msg: dict[str, Any]) -> None:
        try:
            msg["from"] = self.core.broker.instance_id
            await self.core.broker.publish_control(CTL_KIND, orjson.dumps(msg))
        except OSError as exc:
            log.debug("stamp control message not sent (Redis: %s); the periodic refresh catches up", exc)

    # -- recomputing ----------------------------------------------------------------------------

    def refresh(self, keys: Iterable[DriverKey], clears: Iterable[Chained] = ()) -> asyncio.Future[None]:
        """Recompute these drivers' stamps from PostgreSQL (a query started from now on); then forget
        the closing scans `clears`, which are chained. The future is done when that is applied."""
        self._keys.update(keys)
        self._clears.extend(clears)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    def expire(self) -> None:
        """Forget closing scans that were never chained, and drivers gone; redo every stamp."""
        limit = now_ms() - CLOSING_TTL_MS
        for pk in list(self.closing):
            waiting = {c: t for c, t in self.closing[pk].items() if t > limit}
            if waiting:
                self.closing[pk] = waiting
            else:
                del self.closing[pk]
        gone = [k for k in self.held.keys() | self._applied.keys() if k not in self.core.drivers]
        self.refresh([*self.core.drivers, *gone])

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            keys, self._keys = self._keys, set()
            clears, self._clears = self._clears, []
            waiters, self._waiters = self._waiters, []
            live = sorted(k for k in keys if k in self.core.drivers)
            self._generation += 1
            generation = self._generation
            try:
                rows = await self._query(live)
            except PG_ERRORS as exc:
                log.debug("stamp refresh failed (%s); retrying", exc)
                self._keys |= keys
                self._clears += clears
                self._waiters += waiters
                await asyncio.sleep(1.0)
                self._wake.set()
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
                self.apply(k)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _query(self, keys: list[DriverKey]) -> list[list[asyncpg.Record]]:
        if not keys:
            return []
        by_key: dict[DriverKey, list[asyncpg.Record]] = {}
        for row in await ps.held_by(self.core.pool, keys):
            by_key.setdefault((row["org"], row["holder"]), []).append(row)
        return [by_key.get(k, []) for k in keys]

    def _set_held(self, k: DriverKey, rows: list[asyncpg.Record], generation: int) -> None:
        if self._applied.get(k, -1) > generation:
            return  # the answer to a query started before the one already applied
        for package in self.held.pop(k, {}):
            if self.holder_of.get((k[0], package)) == k:
                del self.holder_of[(k[0], package)]
        if k not in self.core.drivers:
            self._applied.pop(k, None)
            return
        self._applied[k] = generation
        held = {r["package_id"]: r["client"] for r in rows}
        if held:
            self.held[k] = held
            for package in held:
                self.holder_of[(k[0], package)] = k

    def stamp(self, k: DriverKey) -> bytes:
        org = k[0]
        clients = {c for p, c in self.held.get(k, {}).items() if (org, p) not in self.closing}
        return orjson.dumps(sorted(clients)) if clients else b""

    def apply(self, k: DriverKey) -> None:
        conn = self.core.drivers.get(k)
        if conn is not None:
            conn.stamp = self.stamp(k)
