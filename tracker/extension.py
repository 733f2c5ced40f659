"""The one interface through which the core calls a domain layer (the chain of custody).

The core (ingest, drivers, snapshot, node) never names custody: `app.py` builds the extension
with the node as its `Core` and registers it once (`Node.register`). Without one, the core
behaves as a plain tracker: scans are fanned out at receipt and a client admin sees no driver.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    from .auth import Principal
    from .broker import Broker, LiveItem
    from .config import Settings
    from .conn import DriverConn, DriverKey
    from .hub import Dashboard
    from .protocol.events import Scan
    from .store import Pending

Tx: TypeAlias = "asyncpg.Connection | PoolConnectionProxy"  # a connection, in a transaction where it says so

# What a snapshot may show a dashboard: the drivers it may see (None: all), packages, open alerts.
Scope = tuple[set[str] | None, list[Any], list[Any]]


class Registry(Protocol):
    """This instance's driver connections (tracker/drivers.py), as an extension sees them."""

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[DriverKey]: ...

    def get(self, key: DriverKey) -> DriverConn | None: ...


class Core(Protocol):
    """What the core offers an extension (the `Node` implements it)."""

    settings: Settings
    pool: asyncpg.Pool
    broker: Broker

    @property
    def drivers(self) -> Registry:
        """This instance's driver connections."""

    def publish(self, org: str, item: LiveItem) -> None:
        """Queue a live frame for this tick (package change, alert, stored scan). Never awaits."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background task the node keeps a reference to."""


class Extension(Protocol):
    control_kind: str
    """The kind of the control messages (`Broker.publish_control`) routed to `control`."""
    fans_out_scans: bool
    """True: scans are published by the extension after their commit (stamped with whom they
    concern), not by the core at receipt."""

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        """Long-running work, started by `Node.start` and cancelled by `Node.close`."""

    def scan_received(self, conn: DriverConn, scan: Scan) -> None:
        """At a scan's receipt, before the connection's next event. Never awaits."""

    def seal(self, item: Pending) -> bytes | None:
        """A MAC of an accepted scan as it will be stored (every other column of its row set),
        with a key the database never sees; the core stores it beside the scan (`scans.seal`), so
        that the extension can tell rows the service wrote from rows written behind its back.
        None: not sealed. Never awaits."""

    def scans_stored(self, stored: list[Pending]) -> None:
        """After the commit that stored these scans, before their acks. Never awaits."""

    async def driver_connected(self, conn: DriverConn) -> None:
        """Before the driver goes online; may set `conn.stamp` (who may see its live frames)."""

    def control(self, payload: str) -> None:
        """A control message of `control_kind` from any instance (this one included)."""

    def feed_changed(self, live: bool) -> None:
        """The live feed went down (False: control messages may be missed from now on) or is back
        (True). Called by the node from `Broker.on_status`. Never awaits."""

    async def snapshot_scope(self, dash: Dashboard) -> Scope:
        """What a dashboard's snapshot may show; may fill `dash.carriers`."""

    async def trail_windows(self, principal: Principal, driver: str) -> list[tuple[int, int]]:
        """The [from, to) spans of a driver's trail that `principal` may read."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A fact to tell the org's integrations (webhooks), written with the fact itself."""

    org: str
    type: str  # package.state_changed, alert.opened, custody.checkpoint, ... (docs/PROTOCOL.md)
    key: str  # ordering key (the package): one endpoint receives one key's events in the order written
    ts: int  # when the fact happened (ms since the Unix epoch)
    data: dict[str, Any]


class Outbox(Protocol):
    """Where a domain layer writes the events its facts raise (tracker/webhooks/ implements it)."""

    async def write(self, conn: Tx, events: Sequence[OutboxEvent]) -> None:
        """Inside the caller's open transaction, before it commits: the events are committed or
        rolled back with the facts they report. Nothing is sent before the commit."""


class NoOutbox:
    """No integrations: events are dropped."""

    async def write(self, conn: Tx, events: Sequence[OutboxEvent]) -> None:
        pass


NO_OUTBOX: Outbox = NoOutbox()


class NoExtension:
    """The core alone: nothing to chain, clients see no driver."""

    control_kind = ""
    fans_out_scans = False

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return []

    def scan_received(self, conn: DriverConn, scan: Scan) -> None:
        pass

    def seal(self, item: Pending) -> bytes | None:
        return None

    def scans_stored(self, stored: list[Pending]) -> None:
        pass

    async def driver_connected(self, conn: DriverConn) -> None:
        pass

    def control(self, payload: str) -> None:
        pass

    def feed_changed(self, live: bool) -> None:
        pass

    async def snapshot_scope(self, dash: Dashboard) -> Scope:
        return (set() if dash.principal.role == "client" else None), [], []

    async def trail_windows(self, principal: Principal, driver: str) -> list[tuple[int, int]]:
        return [] if principal.role == "client" else [(0, 2**62)]
