"""`CustodyExtension`: the chain of custody, as the core sees it (tracker/extension.py)."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..auth import Principal, new_secret
from ..config import Settings
from ..extension import NO_OUTBOX, Outbox
from ..store import Migration, Pending, load_migrations
from . import chain
from .live import PackageLayer
from .stamps import CTL_KIND

if TYPE_CHECKING:
    from ..conn import DriverConn
    from ..extension import Core, Scope
    from ..hub import Dashboard
    from ..protocol.events import Scan

log = logging.getLogger("tracker.custody")

SQL_DIR: Final = Path(__file__).parent / "sql"


def migrations() -> list[Migration]:
    """The custody schema, applied after the core's (store.migrate)."""
    return load_migrations(SQL_DIR)


def custody_key(settings: Settings) -> bytes:
    """TRACKER_CUSTODY_KEY, or a key generated once for the data folder: development only (no DATABASE_URL;
    a deployment without the key is a ConfigError, Settings.check). Never in the database."""
    if settings.custody_key:
        return settings.custody_key.encode()
    settings.check()  # with DATABASE_URL (a deployment) the key is required: never a file
    path = settings.data_dir.expanduser() / "custody-key"
    if path.exists():
        return path.read_text().strip().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_secret()
    path.write_text(key + "\n")
    path.chmod(0o600)
    log.warning("no TRACKER_CUSTODY_KEY: generated one in %s; keep it (without it no chain verifies)", path)
    return key.encode()


class CustodyExtension:
    """Scans are chained after their commit and then published, stamped with the package's
    client; a client's view of a driver closes at the receipt of the scan that ends it."""

    control_kind = CTL_KIND
    fans_out_scans = True

    def __init__(self, core: Core, key: bytes, outbox: Outbox = NO_OUTBOX) -> None:
        self.layer = PackageLayer(core, key, outbox)

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return self.layer.tasks()

    def scan_received(self, conn: DriverConn, scan: Scan) -> None:
        self.layer.stamps.on_scan_received(conn, scan)

    def seal(self, item: Pending) -> bytes | None:
        scan: Scan = item.event  # type: ignore[assignment]
        content = chain.Content(
            scan.package,
            item.driver,
            scan.seq,
            scan.ts,
            item.received_at,
            scan.event,
            chain.as_stored(scan.lat),
            chain.as_stored(scan.lon),
            chain.as_stored(scan.temp_c, real=True),
            scan.note,
            scan.recipient,
            scan.pod,
            item.offset_ms,
        )
        try:
            return chain.seal(self.layer.key, item.org, content)
        except (TypeError, ValueError):  # a string PostgreSQL would not store either (a lone surrogate)
            return None

    def scans_stored(self, stored: list[Pending]) -> None:
        self.layer.on_stored_scans(stored)

    async def driver_connected(self, conn: DriverConn) -> None:
        await self.layer.stamps.on_driver_connected(conn)

    def control(self, payload: str) -> None:
        self.layer.stamps.on_stamp_ctl(payload)

    def feed_changed(self, live: bool) -> None:
        self.layer.stamps.on_feed(live)

    async def snapshot_scope(self, dash: Dashboard) -> Scope:
        return await self.layer.snapshot_scope(dash)

    async def trail_windows(self, principal: Principal, driver: str) -> list[tuple[int, int]]:
        return await self.layer.trail_windows(principal, driver)
