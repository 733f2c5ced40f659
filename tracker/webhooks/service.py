"""`Webhooks`: the room as app.py wires it: the outbox custody writes through, the delivery
worker (started and stopped by the app's lifespan), the client and its address policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import asyncpg

from ..clock import now_ms
from ..config import Settings
from . import store
from .client import Client
from .policy import AllowList
from .store import Outbox
from .worker import Deliverer

log = logging.getLogger("tracker.webhooks")
PRUNE_EVERY_S: Final = 600.0  # retention runs this often on every instance
PRUNE_BATCH: Final = 1000  # events deleted per transaction


class Webhooks:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool, self.settings = pool, settings
        self.client = Client(
            AllowList.parse(settings.webhook_allow),
            connect_s=settings.webhook_connect_timeout_s,
            response_s=settings.webhook_timeout_s,
        )
        self.outbox = Outbox(now_ms)
        self.deliverer = Deliverer(pool, settings, self.client)
        self._task: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.webhook_concurrency > 0:  # 0: this instance delivers nothing (others do)
            self._task = asyncio.create_task(self.deliverer.run(), name="webhooks")
        if self.settings.webhook_retention_days > 0:
            self._pruner = asyncio.create_task(self._prune_every(PRUNE_EVERY_S), name="webhooks-retention")

    async def close(self) -> None:
        for task in (self._task, self._pruner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def prune(self) -> int:
        """Delete the events older than the retention (in batches, each its own short transaction,
        so ingest never waits behind it); every instance may run it at once (SKIP LOCKED)."""
        if self.settings.webhook_retention_days <= 0:
            return 0  # 0: kept for ever
        before = now_ms() - self.settings.webhook_retention_days * 86_400_000
        deleted = 0
        while (n := await store.prune(self.pool, before, PRUNE_BATCH)) > 0:
            deleted += n
        if deleted:
            log.info("webhooks: deleted %d events older than %d days", deleted, self.settings.webhook_retention_days)
        return deleted

    async def _prune_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.prune()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("webhook retention failed (%s: %s); again in %.0f s", type(exc).__name__, exc, interval_s)
