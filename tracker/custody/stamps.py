"""Who may see a driver live: the stamp on its positions and presence (`DriverConn.stamp`), the
JSON list of the clients whose packages it holds (PROTOCOL.md, "Who sees what"), and a mark
(`SHARE_MARK` + package id) for each of those packages that has a tracking link (tracker/share):
only shared packages, so a stamp stays as small as its clients otherwise.

The stamp is recomputed from PostgreSQL after every change, here or on another instance (which
says so with a `stamp` control message), by one task whose queries run one after the other, so a
newer answer is never overwritten by an older one.

A window closes at the *receipt* of the scan that closes it, on whichever instance: the receiving
instance notes it at once and tells the others (one control message per tick, through the broker
and by PostgreSQL NOTIFY, notify.py: also when this instance has lost Redis). From then until
that scan is chained and the stamps recomputed, the package counts as held by nobody, so no
position sent after a delivery or a handover reaches the client.

Fail closed: while this instance's live feed is down (and from its start until the feed is first
up) it may miss other instances' notices, so it stamps nothing for clients. When the feed is back
it recomputes every stamp from PostgreSQL before stamping again, tells the others again every scan
received here and not chained yet, and asks them for theirs (`resync`).

A window opens at the *receipt* of a pickup or handover too, when the package's client is known
here (its consignment is cached: a client never changes once consigned): the positions the
driver sends right after it, even in the same frame, carry the new stamp. Until that scan is
chained and the stamps recomputed from PostgreSQL, it counts as held by its scanner; a later
scan of the package by anyone else, or the scanner's own deliver, fail or return, ends that.
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
from .notify import Notifier, per_org

if TYPE_CHECKING:
    from ..conn import DriverConn
    from ..extension import Core

log = logging.getLogger("tracker.packages")

PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
CTL_KIND = "stamp"  # control messages of this layer (Broker.publish_control)
CLOSING_TTL_MS = 120_000  # a closing scan never chained (refused by the writer) stops counting
DriverKey = tuple[str, str]
Chained = tuple[str, str, str, int]  # (org, package, driver, seq) of a scan
# A stamp entry "\x01<package>": the holder's frames may reach that package's tracking links
# (tracker/share). A client id is printable, so no client's needle ever matches one.
SHARE_MARK = "\x01"


def share_needle(package: str) -> bytes:
    """What a stamp holds, as JSON, when its driver's frames may reach the package's tracking links."""
    return orjson.dumps(SHARE_MARK + package)


class Stamps:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.held: dict[DriverKey, dict[str, str]] = {}  # this instance's drivers: package -> client
        self.holder_of: dict[tuple[str, str], DriverKey] = {}
        # (org, package) -> {(driver, seq): received}: scans that may end the holder's window,
        # received (here or elsewhere) and not chained yet.
        self.closing: dict[tuple[str, str], dict[tuple[str, int], int]] = {}
        # (org, package) -> (driver, seq, received): the latest pickup or handover received (here
        # or elsewhere) and not chained yet, of a package whose client is known.
        self.opening: dict[tuple[str, str], tuple[str, int, int]] = {}
        self.client_of: dict[tuple[str, str], str] = {}  # consigned packages' clients (immutable)
        self.shared: set[tuple[str, str]] = set()  # packages with a tracking link: marked in stamps
        self._orgs: dict[str, asyncio.Future[None]] = {}  # orgs whose open consignments are cached
        self._keys: set[DriverKey] = set()
        self._clears: list[Chained] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._notices: list[list[Any]] = []
        # Scans received here and not chained yet: (org, package, driver, seq) -> (notice, received).
        # Told again whenever the live feed comes back (here, or on an instance that asks).
        self._recent: dict[Chained, tuple[list[Any], int]] = {}
        # Closing notices heard from other instances (by either way, broker or NOTIFY): a second
        # copy is ignored, so that a notice heard again cannot undo a newer one.
        self._heard: dict[tuple[str, str, str, int, str], int] = {}
        self.notifier = Notifier(core, self.on_stamp_ctl)
        # Fail closed: while the live feed is down (and from the start until it is first up), this
        # instance may miss other instances' notices, so no frame is stamped for a client until
        # the feed is back and every stamp was recomputed from PostgreSQL.
        self.uncertain = True
        self._feed = 0  # counts the feed's changes: a recompute counts only if no change came since
        self._generation = 0
        self._applied: dict[DriverKey, int] = {}
        self._hello: TickBatcher[DriverKey, list[asyncpg.Record]] = TickBatcher(self._query, max_batch=2000)

    # -- hooks ----------------------------------------------------------------------------------

    def on_scan_received(self, conn: DriverConn, scan: Scan) -> None:
        """At receipt (never awaits): close the holder's window here, and tell the other instances."""
        org, driver = conn.key
        self._closing(org, scan.package, driver, scan.seq, scan.event)
        notice = [org, scan.package, driver, scan.seq, scan.event]
        self._recent[(org, scan.package, driver, scan.seq)] = (notice, now_ms())
        # Told even while the feed is down (publishing may still work); if it does not, the notice
        # is told again when the feed is back (on_feed): never lost.
        if not self._notices:
            asyncio.get_running_loop().call_soon(self._send_notices)
        self._notices.append(notice)

    def _closing(self, org: str, package: str, driver: str, seq: int, event: str, *, opens: bool = True) -> None:
        opened = self.opening.get((org, package))
        if opened is not None and (opened[0] != driver or event in custody.CLOSING_EVENTS):
            del self.opening[(org, package)]  # a later scan ends the window its receipt opened
            self.apply((org, opened[0]))
        if opens and event in custody.OPENING_EVENTS and (org, package) in self.client_of:
            self.opening[(org, package)] = (driver, seq, now_ms())
            self.apply((org, driver))
        holder = self.holder_of.get((org, package))
        if holder is None or (holder[1] == driver and event not in custody.CLOSING_EVENTS):
            return  # nobody holds it here, or its holder goes on holding it
        self.closing.setdefault((org, package), {})[(driver, seq)] = now_ms()
        self.apply(holder)

    def _send_notices(self) -> None:
        notices, self._notices = self._notices, []
        self.core.spawn(self._tell({"closing": notices}, notify=True))

    def on_feed(self, live: bool) -> None:
        """The live feed went down (False) or came back (True). Down: stamp nothing for clients
        (fail closed). Back: recompute every stamp from PostgreSQL, tell the others again every
        scan received here and not chained yet, and ask them for theirs; stamps return only once
        the recompute is applied and the feed has not gone down again meanwhile."""
        self._feed += 1
        feed = self._feed
        if not live:
            self._set_uncertain(True)
            return
        self.refresh(list(self.core.drivers)).add_done_callback(
            lambda _: self._set_uncertain(False) if feed == self._feed and self.core.broker.live else None
        )
        self.core.spawn(self._tell({"resent": self._pending_notices(), "resync": 1}))

    def _set_uncertain(self, uncertain: bool) -> None:
        if uncertain != self.uncertain:
            self.uncertain = uncertain
            for k in list(self.core.drivers):
                self.apply(k)

    def _pending_notices(self) -> list[list[Any]]:
        limit = now_ms() - CLOSING_TTL_MS
        for key in [k for k, (_, received) in self._recent.items() if received <= limit]:
            del self._recent[key]
        return [notice for notice, _ in self._recent.values()]

    def share(self, org: str, package: str) -> None:
        """A tracking link of the package was made here: from now on (on every instance, once it
        hears of it) its holder's stamp carries the package's mark (`share_needle`)."""
        self._mark(org, package)
        self.core.spawn(self._tell({"shared": [[org, package]]}))

    def needle(self, package: str) -> bytes:
        return share_needle(package)

    def _mark(self, org: str, package: str) -> None:
        if (org, package) in self.shared:
            return
        self.shared.add((org, package))
        holder = self.holder_of.get((org, package))
        if holder is not None:
            self.apply(holder)
        opened = self.opening.get((org, package))
        if opened is not None:
            self.apply((org, opened[0]))

    def consigned(self, org: str, package: str, client: str) -> None:
        """A package was consigned here: every instance learns its client (one control message)."""
        self.client_of[(org, package)] = client
        self.core.spawn(self._tell({"clients": [[org, package, client]]}))

    async def _known_clients(self, org: str) -> None:
        """Cache the clients of the org's consigned packages not delivered yet (once per org; new
        consignments come by control message)."""
        loading = self._orgs.get(org)
        if loading is None:
            loading = self._orgs[org] = asyncio.get_running_loop().create_future()
            try:
                for row in await ps.open_consignments(self.core.pool, org):
                    self.client_of[(org, row["package_id"])] = row["client"]
            except PG_ERRORS as exc:
                del self._orgs[org]
                log.warning("clients of %s unknown (PostgreSQL: %s); windows open after chaining", org, exc)
            finally:
                loading.set_result(None)
            await self._load_shared(org)
        await asyncio.shield(loading)

    async def _load_shared(self, org: str) -> None:
        """The org's packages with a live tracking link (also every sweep: links made while this
        instance could not hear of them, its feed down). Without them a link shows no position."""
        try:
            rows = await ps.shared_packages(self.core.pool, org, now_ms())
        except PG_ERRORS as exc:
            log.warning("tracking links of %s unknown (PostgreSQL: %s); retried at the next sweep", org, exc)
            return
        for row in rows:
            self._mark(org, row["package_id"])

    async def on_driver_connected(self, conn: DriverConn) -> None:
        await self._known_clients(conn.key[0])
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
            for org, package, client in msg.get("clients", ()):
                self.client_of[(org, package)] = client
            for org, package in msg.get("shared", ()):
                self._mark(org, package)
            for org, package, driver, seq, event in msg.get("closing", ()):
                if self._first((org, package, driver, seq, event)):
                    self._closing(org, package, driver, seq, event)
            # Told again after an outage, maybe out of order with newer scans: such a notice may
            # close a window, never open one (a stale pickup must not reopen its driver's window).
            for org, package, driver, seq, event in msg.get("resent", ()):
                self._first((org, package, driver, seq, event))
                self._closing(org, package, driver, seq, event, opens=False)
            if msg.get("resync"):  # its feed was down: it may have missed what was received here
                self.core.spawn(self._tell({"resent": self._pending_notices()}))
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

    def _first(self, notice: tuple[str, str, str, int, str]) -> bool:
        """Whether a closing notice is heard here for the first time (and note it)."""
        if notice in self._heard:
            return False
        self._heard[notice] = now_ms()
        return True

    async def _tell(self, msg: dict[str, Any], *, notify: bool = False) -> None:
        """To the instances holding drivers of its orgs, through the broker (one message per org);
        also to every instance by NOTIFY (notify.py) when `notify` (closing notices: always) or when
        publishing raised. Lost only if both fail: then the notices are told again when the feed
        is back, and the periodic refresh catches up. A resync asks for our drivers' orgs' notices."""
        msg["from"] = self.core.broker.instance_id
        resync = {org for org, _ in self.core.drivers} if msg.get("resync") else set()
        try:
            for org, part in per_org(msg, resync).items():
                await self.core.broker.publish_control(org, CTL_KIND, orjson.dumps(part))
        except OSError as exc:
            log.debug("stamp control message not published (Redis: %s); sending it by NOTIFY", exc)
            notify = True
        if notify:
            await self.notifier.send(msg)

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
        self._pending_notices()  # forgets the expired ones
        for notice in [n for n, heard in self._heard.items() if heard <= limit]:
            del self._heard[notice]
        for pk, (_, _, received) in list(self.opening.items()):
            if received <= limit:
                del self.opening[pk]
        for pk in list(self.closing):
            waiting = {c: t for c, t in self.closing[pk].items() if t > limit}
            if waiting:
                self.closing[pk] = waiting
            else:
                del self.closing[pk]
        gone = [k for k in self.held.keys() | self._applied.keys() if k not in self.core.drivers]
        self.refresh([*self.core.drivers, *gone])
        self.core.spawn(self._reload_shared())

    async def _reload_shared(self) -> None:
        for org in list(self._orgs):
            await self._load_shared(org)

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
                self._recent.pop((org, package, driver, seq), None)
                opened = self.opening.get((org, package))
                if opened is not None and opened[:2] == (driver, seq):
                    del self.opening[(org, package)]
                    touched.add((org, driver))
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
        if self.uncertain:
            return b""  # the feed is (or was just) down: who may see this driver is not known
        org = k[0]
        held = [p for p in self.held.get(k, {}) if (org, p) not in self.closing]
        opened = [pk for pk, o in self.opening.items() if pk[0] == org and o[0] == k[1]]
        entries = {self.held[k][p] for p in held}
        entries.update(self.client_of[pk] for pk in opened)
        if self.shared:
            entries.update(SHARE_MARK + p for p in held if (org, p) in self.shared)
            entries.update(SHARE_MARK + pk[1] for pk in opened if pk in self.shared)
        return orjson.dumps(sorted(entries)) if entries else b""

    def apply(self, k: DriverKey) -> None:
        conn = self.core.drivers.get(k)
        if conn is not None:
            conn.stamp = self.stamp(k)
