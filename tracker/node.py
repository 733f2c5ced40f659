"""The node wires this process's pieces: drivers, ingest, the writer, the broker, the hub,
snapshots, and the extension (the chain of custody) registered once. Wiring only: each job lives
in its own module.

    transport -> Drivers (registry, presence) -> Ingest (per tick) -> Writer -> PostgreSQL
                                                   |                  `-> Ingest.answered (acks)
                                                   `-> Broker -> every instance's Hub -> dashboards
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import asyncpg

from .broker import Broker, LiveItem
from .config import Settings
from .drivers import Drivers
from .extension import Extension, NoExtension
from .hub import Dashboard, Hub
from .ingest import Ingest
from .partitions import maintain
from .protocol.live import status_frame
from .snapshot import Snapshots
from .store import drivers_hello
from .writer import Writer


class Node:
    """Implements `extension.Core`: what an extension may use."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, broker: Broker, hub: Hub) -> None:
        self.settings = settings
        self.pool = pool
        self.broker = broker
        self.hub = hub
        self.extension: Extension = NoExtension()
        self.drivers = Drivers(settings, broker, self._hello_batch, self.extension)
        self.ingest = Ingest(self.drivers, broker, self.extension)
        s = settings
        self.writer = Writer(
            pool,
            self.ingest.answered,
            flush_interval_ms=s.flush_interval_ms,
            flush_max_events=s.flush_max_events,
            concurrency=s.writer_concurrency,
            buffer_max=s.writer_buffer_max,
            answer_deadline_s=s.answer_deadline_s,
        )
        self.ingest.writer_submit = self.writer.submit
        self.snapshots = Snapshots(pool, broker, self.extension, chunk=s.snapshot_chunk)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        broker.on_live = hub.deliver
        broker.on_ctl = self._on_ctl
        broker.on_status = self._on_status
        hub.on_empty = broker.unfollow  # an org's last dashboard here left: stop receiving it

    def register(self, extension: Extension) -> None:
        """Install the one extension, before `start`."""
        self.extension = extension
        self.drivers.extension = extension
        self.ingest.extension = extension
        self.snapshots.extension = extension

    @property
    def draining(self) -> bool:
        return self.ingest.draining

    # -- Core -----------------------------------------------------------------------------------

    def publish(self, org: str, item: LiveItem) -> None:
        self.ingest.publish(org, item)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()
        self.broker.start()
        self._tasks.append(asyncio.create_task(self.drivers.presence_loop(), name="presence"))
        self._tasks.append(
            asyncio.create_task(maintain(self.pool, retention_days=self.settings.retention_days), name="partitions")
        )
        for coro in self.extension.tasks():
            self._tasks.append(asyncio.create_task(coro))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.writer.close()
        await self.broker.close()

    async def drain(self) -> None:
        """Rolling deploy: stop taking events, commit and ack what is buffered, close with 1012."""
        self.ingest.draining = True
        await self.writer.drain(self.settings.shutdown_grace_s)
        closes = [c.channel.close(1012, "the instance is restarting") for c in list(self.drivers.sessions.values())]
        closes += [d.channel.close(1012, "the instance is restarting") for d in self.hub.dashboards()]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*closes, return_exceptions=True), 3.0)

    # -- wiring ---------------------------------------------------------------------------------

    async def _hello_batch(self, keys: list[tuple[str, str, str | None]]) -> list[int]:
        return await drivers_hello(self.pool, keys)

    def _on_ctl(self, parts: list[str]) -> None:
        if len(parts) == 5 and parts[0] == "kick" and parts[4].isdigit():
            self.drivers.kick(parts[1], parts[2], parts[3], int(parts[4]))
        elif len(parts) == 4 and parts[0] == "kick":  # from an instance of the previous release
            self.drivers.kick(parts[1], parts[2], parts[3])
        elif len(parts) == 2 and parts[0] and parts[0] == self.extension.control_kind:
            self.extension.control(parts[1])

    def _on_status(self, live: bool) -> None:
        self.extension.feed_changed(live)  # first: who may see what is uncertain while the feed is down
        frame = status_frame(live)
        for dash in self.hub.dashboards():
            dash.channel.write(frame)
        if live:  # what was missed while the feed was down: a fresh snapshot for everyone
            for dash in self.hub.dashboards():
                self.resnapshot(dash)

    def resnapshot(self, dash: Dashboard) -> None:
        dash.live = False
        dash.take()
        self.spawn(self.snapshots.send(dash))
