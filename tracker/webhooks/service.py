"""`Webhooks`: the room as app.py wires it: the outbox custody writes through, the delivery
worker (started and stopped by the app's lifespan), the client and its address policy."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from ..clock import now_ms
from ..config import Settings
from .client import Client
from .policy import AllowList
from .store import Outbox
from .worker import Deliverer


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

    def start(self) -> None:
        if self.settings.webhook_concurrency > 0:  # 0: this instance delivers nothing (others do)
            self._task = asyncio.create_task(self.deliverer.run(), name="webhooks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
