"""Running the app under uvicorn with the service's explicit, safe websocket settings."""

from __future__ import annotations

import gc
import logging
from typing import Any

import uvicorn
from starlette.applications import Starlette

from .config import Settings


def uvicorn_config(app: Starlette, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """Not uvicorn's defaults: 64 KiB frames, no compression unless configured, keepalive pings."""
    options: dict[str, Any] = dict(
        host=settings.host, port=settings.port, ws="websockets-sansio", http="httptools", loop="uvloop",
        ws_max_size=settings.max_frame, ws_per_message_deflate=settings.ws_deflate,
        ws_ping_interval=settings.ping_interval_s, ws_ping_timeout=settings.ping_timeout_s,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5, log_config=None,
        log_level=settings.log_level, lifespan="on", backlog=4096,
    )
    options.update(overrides)
    from .app import asgi

    return uvicorn.Config(asgi(app), **options)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections. The hot path allocates many short-lived, acyclic
    objects (frames, events) that reference counting frees at once; with CPython's default
    thresholds the cyclic collector still runs every 700 allocations and, with tens of thousands
    of connections' objects alive, a full collection costs milliseconds. Objects alive after
    start-up are frozen out of collection altogether."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class Server(uvicorn.Server):
    """uvicorn, but a shutdown (SIGTERM: a rolling deploy) first drains the node: stop accepting,
    commit and ack what is buffered, close connections with 1012, and only then let uvicorn go."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: Any = None) -> None:
        for server in self.servers:
            server.close()
        node = getattr(self.app.state, "node", None)
        if node is not None and not node.draining:
            logging.getLogger("tracker").info("draining: committing buffered events, closing with 1012")
            await node.drain()
        await super().shutdown(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        tune_gc()

    @property
    def port(self) -> int:
        return int(self.servers[0].sockets[0].getsockname()[1])
