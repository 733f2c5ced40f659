"""Starlette websockets <-> the protocol sessions and the core. Only I/O and timers live here:
every decision is made by the sans-I/O sessions (tracker/protocol/driver.py, viewer.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import metrics
from ..auth import Principal, TokenVerifier
from ..clock import now_ms
from ..config import Settings
from ..conn import DriverConn
from ..hub import Dashboard
from ..node import Node
from ..protocol.driver import DriverSession
from ..protocol.resume import HELLO
from ..protocol.session import Session
from ..protocol.subscribe import Filter
from ..protocol.viewer import ViewerSession
from .admission import Admission
from .channel import Channel

log = logging.getLogger("tracker.endpoints")


def _bearer(ws: WebSocket) -> str | None:
    value = ws.headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    """Browsers send Origin; phones don't. A browser page must come from this host or the allow-list
    (cross-site websocket hijacking)."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    host = ws.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def _receive(ws: WebSocket, *, binary: bool = False) -> str | bytes:
    """The next text frame (a str). A binary frame closes 1003 (no encoding that uses them was
    negotiated, PROTOCOL.md) and ends the connection like a disconnect; with `binary`, it is
    returned as bytes instead, for the session to decide."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        if binary and message.get("bytes") is not None:
            return message["bytes"]  # type: ignore[no-any-return]
        with contextlib.suppress(Exception):  # already closing: the disconnect below ends it alike
            await ws.close(1003, "binary frames are not accepted")
        raise WebSocketDisconnect(1003)
    return text  # type: ignore[no-any-return]


def flush(session: Session, channel: Channel) -> bool:
    """Write what the session decided to send; True if it decided to close (then close it)."""
    for frame in session.data_to_send():
        channel.write(frame)
    return session.close_code is not None


async def _hello(
    ws: WebSocket, session: Session, channel: Channel, timeout: float, *, binary: bool = False
) -> Principal | None:
    """The first frame must be `hello` within `timeout`; returns the principal, or None (closed).
    At most `max_pending` sockets of the instance wait for their hello at once; beyond: 1013.
    With `binary` (drivers), a binary first frame goes to the session (a resume hello)."""
    admission: Admission = ws.app.state.admission
    if not admission.begin_hello():
        await channel.close(1013, "too many connections waiting for hello")
        return None
    try:
        try:
            data = await asyncio.wait_for(_receive(ws, binary=binary), timeout)
        except TimeoutError:
            session.hello_timeout()
            data = None
        except WebSocketDisconnect:
            return None
        if data is None:
            principal = None
        elif isinstance(data, bytes) and isinstance(session, DriverSession):
            principal = session.receive_hello(data, binary=True)
            if data[:1] == bytes((HELLO,)):
                metrics.RESUMES.labels("resumed" if principal is not None else "refused").inc()
        else:
            principal = session.receive_hello(data, bearer=_bearer(ws))
        if flush(session, channel):
            await channel.close(session.close_code or 1011, session.close_reason)
        return principal
    finally:
        admission.end_hello()


class Expiry:
    """The timer behind a session's `expires_at`: at expiry the session decides the close (4003)."""

    __slots__ = ("at", "handle", "on_close", "session")

    def __init__(self, session: Session, on_close: Any) -> None:
        self.session = session
        self.on_close = on_close
        self.at = 0.0
        self.handle: asyncio.TimerHandle | None = None

    def update(self) -> None:
        at = self.session.expires_at
        if at == self.at:
            return
        self.cancel()
        self.at = at
        self.handle = asyncio.get_running_loop().call_later(max(0.0, at - time.time()), self._fire)

    def _fire(self) -> None:
        self.session.expire()
        self.on_close()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


# -- drivers ------------------------------------------------------------------------------------


async def driver_endpoint(ws: WebSocket) -> None:
    node: Node = ws.app.state.node
    settings: Settings = node.settings
    full = len(node.drivers) >= settings.max_connections
    await ws.accept()
    channel = Channel(ws._send, fast=settings.ws_fast_path)
    if full:  # accepted first: closed before accept, the phone would see HTTP 403, not 1013 (PROTOCOL.md)
        await channel.close(1013, "too many connections")
        return
    keepalive = ws.app.state.keepalive
    reader = channel.fast.take_over(settings.max_frame, keepalive) if channel.fast is not None else None
    session = DriverSession(
        ws.app.state.verifier,
        max_frame=settings.max_frame,
        max_batch=settings.max_batch,
        leeway_s=settings.jwt_leeway_s,
        ack_delay_ms=settings.ack_delay_ms,
        resume_tokens=ws.app.state.resume_tokens,
    )
    principal = await _hello(ws, session, channel, settings.hello_timeout_s, binary=True)
    if principal is None:
        return
    conn = DriverConn(principal, channel)
    adapter: DriverAdapter | None = None
    try:
        last_seq = await node.drivers.connected(conn)
        if conn.closed:  # superseded before its welcome: closed 4001 (Drivers.replace), never welcomed
            while True:
                await _receive(ws)
        conn.seq_high = last_seq  # above it, an event cannot name a stored one: it may go live at receipt
        session.welcome(last_seq, now_ms(), conn.bucket)
        conn.acks = session.acks  # cumulative acks, if the phone asked for them
        flush(session, channel)
        conn.welcomed = True
        if channel.fast is not None:
            channel.fast.release_handshake()
        adapter = DriverAdapter(node, session, conn)
        # Frames now go straight from the transport to the session where the server allows it; then
        # this loop only sees frames that were queued before the switch, and the end of the connection.
        if reader is not None:
            reader.deliver_to(adapter.on_frame, adapter.on_binary)
            await reader.disconnected()  # one future for the connection's life: no receive coroutines
            return
        if channel.fast is not None:
            channel.fast.receive_directly(adapter.on_frame, adapter.on_binary)
        while True:
            data = await _receive(ws, binary=True)
            if isinstance(data, str):
                adapter.on_frame(data)
            else:
                adapter.on_binary(data)
    except WebSocketDisconnect:
        pass
    except Exception:  # a bug during connect: 1011 (PROTOCOL.md), undone below; the details stay in the log
        log.exception("driver %s/%s: internal error while connecting", principal.org, principal.sub)
        await channel.close(1011, "internal error")
    finally:
        if adapter is not None:
            adapter.expiry.cancel()
        await node.drivers.disconnected(conn)  # registration, presence and the gauge: once, whatever happened


class DriverAdapter:
    """Moves one driver's frames to its session and the session's decisions to the core.
    `on_frame` never awaits: it runs per frame, straight from the transport's callback."""

    __slots__ = ("conn", "done", "expiry", "node", "session", "submit")

    def __init__(self, node: Node, session: DriverSession, conn: DriverConn) -> None:
        self.node = node
        self.session = session
        self.conn = conn
        self.submit = node.ingest.submit
        self.done = False
        self.expiry = Expiry(session, self._close)
        self.expiry.update()

    def on_frame(self, data: str | bytes) -> None:
        """A text frame (bytes from the fast path, str from the portable one)."""
        self._on_data(data, False)

    def on_binary(self, data: bytes) -> None:
        """A binary frame: the session decides (a compact batch, or close 1003)."""
        self._on_data(data, True)

    def _on_data(self, data: str | bytes, binary: bool) -> None:
        if self.done:
            return
        session, conn = self.session, self.conn
        try:
            received = now_ms()
            if binary:
                events = session.receive_binary(data, received, time.monotonic())  # type: ignore[arg-type]
            else:
                events = session.receive(data, received, time.monotonic())
            if session.refused:
                for code in session.refused:
                    metrics.EVENTS_REFUSED.labels(code).inc()
                session.refused.clear()
            for frame in session.data_to_send():
                conn.channel.write(frame)
            if events:
                self.submit(conn, events, received)
            if session.close_code is not None:
                self._close()
            elif session.principal is not conn.principal:  # refreshed
                conn.principal = session.principal  # type: ignore[assignment]
                self.expiry.update()
        except Exception:  # a bug: close with 1011 (PROTOCOL.md); the details stay in the log
            log.exception("driver %s/%s: internal error", conn.principal.org, conn.principal.sub)
            session.fail(1011, "internal error")
            self._close()

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        for frame in self.session.data_to_send():
            self.conn.channel.write(frame)
        self.node.spawn(self.conn.channel.close(self.session.close_code or 1011, self.session.close_reason))


# -- dashboards ---------------------------------------------------------------------------------


async def live_endpoint(ws: WebSocket) -> None:
    node: Node = ws.app.state.node
    settings: Settings = node.settings
    verifier: TokenVerifier = ws.app.state.verifier
    if not origin_allowed(ws, settings.allowed_origins):
        await ws.close(1008, "origin not allowed")
        return
    await ws.accept()
    channel = Channel(ws._send, fast=settings.ws_fast_path)
    session = ViewerSession(
        verifier,
        max_frame=settings.max_frame,
        leeway_s=settings.jwt_leeway_s,
        subscribe_rate=settings.subscribe_rate_per_s,
        subscribe_burst=settings.subscribe_burst,
        max_ids=settings.subscribe_max_ids,
        now_s=time.monotonic(),
    )
    principal = await _hello(ws, session, channel, settings.hello_timeout_s)
    if principal is None:
        return
    admission: Admission = ws.app.state.admission
    refused = admission.admit_dashboard(principal.key)
    if refused is not None:
        await channel.close(1013, refused)
        return
    try:
        await LiveAdapter(node, session, Dashboard(principal, channel, node.hub)).run(ws)
    finally:
        admission.release_dashboard(principal.key)


class LiveAdapter:
    """One dashboard after `hello`: frames to its session, subscriptions to the hub and snapshots,
    and the timers the session asks for (subscribe pacing, the token's expiry)."""

    def __init__(self, node: Node, session: ViewerSession, dash: Dashboard) -> None:
        self.node = node
        self.session = session
        self.dash = dash
        self.channel: Channel = dash.channel  # type: ignore[assignment]
        self.timer: asyncio.TimerHandle | None = None
        self.snapshotting: asyncio.Task[None] | None = None
        self.subscribed = False
        self.closed = asyncio.Event()
        self.expiry = Expiry(session, self.closed.set)

    async def run(self, ws: WebSocket) -> None:
        session, channel, role = self.session, self.channel, self.dash.principal.role
        session.welcome()
        flush(session, channel)
        self.expiry.update()
        metrics.CONNECTIONS.labels(role).inc()
        reading = asyncio.ensure_future(self._read(ws))
        closing = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait((reading, closing), return_when=asyncio.FIRST_COMPLETED)
            if session.close_code is not None:
                flush(session, channel)
                await channel.close(session.close_code, session.close_reason)
        finally:
            for task in (reading, closing):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
            metrics.CONNECTIONS.labels(role).dec()
            await self.stop()

    async def _read(self, ws: WebSocket) -> None:
        session = self.session
        try:
            while session.close_code is None:
                session.receive(await _receive(ws))
                flush(self.session, self.channel)
                if session.principal is not self.dash.principal:  # refreshed
                    self.dash.principal = session.principal  # type: ignore[assignment]
                    self.expiry.update()
                if session.waiting is not None and self.timer is None:
                    self._apply()
        except WebSocketDisconnect:
            pass
        except Exception:  # a bug: 1011 (PROTOCOL.md), the details stay in the log
            log.exception("dashboard %s/%s: internal error", self.dash.principal.org, self.dash.principal.sub)
            session.fail(1011, "internal error")
        self.closed.set()

    def _apply(self) -> None:
        self.timer = None
        step = self.session.next_subscribe(time.monotonic())
        if step is None:
            return
        if not isinstance(step, Filter):
            self.timer = asyncio.get_running_loop().call_later(step, self._apply)
            return
        dash = self.dash
        dash.flt = step
        dash.live = False
        dash.pre.clear()
        dash.take()
        dash.inside.clear()
        if not self.subscribed:
            self.node.hub.add(dash)
            self.subscribed = True
        if self.snapshotting is not None:
            self.snapshotting.cancel()
        self.snapshotting = asyncio.create_task(self.node.snapshots.send(dash))

    async def stop(self) -> None:
        self.expiry.cancel()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.snapshotting is not None:
            self.snapshotting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.snapshotting
        await self.node.hub.stop(self.dash)
