"""Running the app under uvicorn with the service's explicit, safe websocket settings."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from .config import Settings

HEAD_MAX = 65_536  # bytes of request line and headers


def uvicorn_config(app: Starlette, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """Not uvicorn's defaults: 64 KiB frames, no compression unless configured, keepalive pings."""
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        http=head_deadline_protocol(settings),
        loop="uvloop",
        ws_max_size=settings.max_frame,
        ws_per_message_deflate=settings.ws_deflate,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        log_config=None,
        log_level=settings.log_level,
        lifespan="on",
        backlog=4096,
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
    from .looplag import gc_callback

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    if gc_callback not in gc.callbacks:
        gc.callbacks.append(gc_callback)  # every pause as a metric; a long one named in the stall's log line


def head_deadline_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, with what it lacks against slowloris: a connection must send a
    complete request head (request line and headers, a websocket upgrade included) within
    `handshake_timeout_s` of opening, or of its first byte after a previous response, else it is
    closed; a head over HEAD_MAX bytes is refused (400). uvicorn itself waits for a head forever."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    timeout = settings.handshake_timeout_s

    class HeadDeadline(HttpToolsProtocol):
        head_timer: asyncio.TimerHandle | None = None
        head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.head_timer = self.loop.call_later(timeout, self._head_expired)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head_bytes = 0
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(timeout, self._head_expired)

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _count(self, n: int) -> None:
            self.head_bytes += n
            if self.head_bytes > HEAD_MAX:
                raise ValueError("request head too large")  # the parser answers 400 and closes

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_expired(self) -> None:
            self.head_timer = None
            self.transport.close()

    return HeadDeadline


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound before anything else starts: a busy port is an OSError here, at
    once, never after the embedded servers started. With `reuse_port`, the other workers of
    `serve --workers N` (tracker/workers.py) listen on the same port and the kernel spreads
    connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn, but a shutdown (SIGTERM: a rolling deploy) first drains the node: stop accepting,
    commit and ack what is buffered, close connections with 1012, and only then let uvicorn go.

    A second SIGINT/SIGTERM, or a shutdown still running `hard_exit_s` after the first, stops the
    embedded servers and exits at once (130 after SIGINT, 143 after SIGTERM): a stop is never
    ignored. `on_started` runs once the socket accepts (the banner)."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: Starlette,
        *,
        on_started: Callable[[Server], None] | None = None,
        hard_exit_s: float | None = None,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.on_started = on_started
        self.hard_exit_s = hard_exit_s
        self._signals = 0

    # uvicorn looks at should_exit every 100 ms; a stop here wakes its loop at once instead.
    _wake: Callable[[], object] | None = None
    _exit = False

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._exit = value
        if value and self._wake is not None:
            self._wake()  # thread-safe: a signal handler or the test's loop may set it

    async def main_loop(self) -> None:
        loop, woken = asyncio.get_running_loop(), asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(woken.set)
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await woken.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals >= 2:
            self._hard_exit(sig, "a second stop signal")
        super().handle_exit(sig, frame)
        if self._signals == 1 and self.hard_exit_s is not None:
            timer = threading.Timer(
                self.hard_exit_s, self._hard_exit, (sig, f"still stopping after {self.hard_exit_s:g} s")
            )
            timer.daemon = True
            timer.start()

    def _hard_exit(self, sig: int, why: str) -> None:
        from .embedded import stop_all

        logging.getLogger("tracker").error("%s: stopping the embedded servers and exiting now", why)
        stop_all()
        logging.shutdown()
        os._exit(128 + int(sig) if sig in (signal.SIGINT, signal.SIGTERM) else 1)

    async def shutdown(self, sockets: Any = None) -> None:
        for server in self.servers:
            server.close()
        node = getattr(self.app.state, "node", None)
        if node is not None and not node.draining:
            logging.getLogger("tracker").info("draining: committing buffered events, closing with 1012")
            await node.drain()
        # uvicorn's own shutdown from here, but it waits in steps of 10 ms, not 100 (a fixed 100 ms
        # sleep, then 100 ms polls): the same order, limits and lifespan shutdown.
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                # uvicorn's own sets of connections and tasks: there is no event to wait for.
                while (state.connections or state.tasks) and not self.force_exit:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                for server in self.servers:
                    await server.wait_closed()
        except TimeoutError:
            logging.getLogger("uvicorn.error").error(
                "cancelling %d task(s): graceful shutdown too long", len(state.tasks)
            )
            for task in state.tasks:
                task.cancel()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        tune_gc()
        if self.started and self.on_started is not None:
            self.on_started(self)

    @property
    def port(self) -> int:
        return int(self.servers[0].sockets[0].getsockname()[1])
