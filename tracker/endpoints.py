"""Thin adapters: Starlette websockets <-> the node (drivers) and the hub (dashboards)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from . import metrics
from .auth import AuthError, Principal, TokenVerifier
from .hub import Dashboard, Filter
from .limits import Admission, Bucket
from .node import DriverConn, Node
from .protocol import frames
from .protocol.frames import ProtocolError
from .snapshot import send_snapshot
from .wire import take_over
from .writer import now_ms
from .wsio import Channel

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


async def _receive_text(ws: WebSocket) -> str | bytes:
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    return text if text is not None else message.get("bytes") or b""


async def _hello(ws: WebSocket, channel: Channel, verifier: TokenVerifier, timeout: float, *,
                 role_ok: tuple[str, ...]) -> tuple[Principal, dict[str, Any]] | None:
    """The first frame must be `hello` within `timeout`; returns the principal, or None (closed).
    At most `max_pending` sockets of the instance wait for their hello at once; beyond: 1013."""
    admission: Admission = ws.app.state.admission
    if not admission.begin_hello():
        await channel.close(1013, "too many connections waiting for hello")
        return None
    try:
        return await _await_hello(ws, channel, verifier, timeout, role_ok=role_ok)
    finally:
        admission.end_hello()


async def _await_hello(ws: WebSocket, channel: Channel, verifier: TokenVerifier, timeout: float, *,
                       role_ok: tuple[str, ...]) -> tuple[Principal, dict[str, Any]] | None:
    try:
        data = await asyncio.wait_for(_receive_text(ws), timeout)
    except TimeoutError:
        await channel.close(4000, "no hello in time")
        return None
    except WebSocketDisconnect:
        return None
    try:
        obj = frames.decode(data)
        if obj["type"] != "hello":
            raise ProtocolError("the first frame must be hello")
    except ProtocolError as exc:
        channel.write(frames.error("protocol", str(exc)))
        await channel.close(exc.close_code, str(exc))
        return None
    try:
        principal = verifier.verify(obj.get("token") or _bearer(ws))
        if principal.role not in role_ok:
            raise AuthError(f"role {principal.role} cannot use this endpoint")
    except AuthError as exc:
        channel.write(frames.error("unauthorized", str(exc)))
        await channel.close(4000, "unauthorized")
        return None
    return principal, obj


def _schedule_expiry(channel: Channel, exp: int, leeway_s: float) -> asyncio.TimerHandle:
    delay = max(0.0, exp + leeway_s - now_ms() / 1000)
    loop = asyncio.get_running_loop()
    return loop.call_later(delay, lambda: loop.create_task(channel.close(4003, "token expired")))


def _refresh(obj: dict[str, Any], current: Principal, verifier: TokenVerifier, channel: Channel) -> Principal | None:
    """A new token for the same identity on an open connection; None means: close."""
    try:
        fresh = verifier.verify(obj.get("token"))
    except AuthError as exc:
        channel.write(frames.error("unauthorized", str(exc)))
        return None
    if (fresh.role, fresh.sub, fresh.org, fresh.client) != (current.role, current.sub, current.org, current.client):
        channel.write(frames.error("forbidden", "a refresh must be for the same identity"))
        return None
    return fresh


async def driver_endpoint(ws: WebSocket) -> None:
    node: Node = ws.app.state.node
    settings = node.settings
    verifier: TokenVerifier = ws.app.state.verifier
    full = len(node.sessions) >= settings.max_connections
    await ws.accept()
    channel = Channel(ws._send)
    if full:  # accepted first: closed before accept, the phone would see HTTP 403, not 1013 (PROTOCOL.md)
        await channel.close(1013, "too many connections")
        return
    reader = take_over(ws._send, settings.max_frame)  # our own frame parser, where the server allows
    hello = await _hello(ws, channel, verifier, settings.hello_timeout_s, role_ok=("driver",))
    if hello is None:
        return
    principal, _ = hello
    conn = DriverConn(principal, channel)
    last_seq = await node.driver_connected(conn)
    channel.write(frames.encode({"type": "welcome", "driver": principal.sub, "last_seq": last_seq,
                                 "server_time": now_ms(), "max_frame": settings.max_frame,
                                 "max_batch": settings.max_batch}))
    conn.welcomed = True
    conn.expiry = _schedule_expiry(channel, principal.exp, settings.jwt_leeway_s)
    session = DriverSession(node, conn, verifier)
    # Frames now go straight from the transport to the session where the server allows it; then
    # this loop only sees frames that were queued before the switch, and the end of the connection.
    if reader is not None:
        reader.deliver_to(session.on_frame)
    else:
        channel.receive_directly(session.on_frame)
    try:
        while True:
            session.on_frame(await _receive_text(ws))
    except WebSocketDisconnect:
        pass
    finally:
        await node.driver_disconnected(conn)


class DriverSession:
    """Handles one driver's frames after `hello`. `on_frame` never awaits: it runs per frame,
    straight from the connection's transport when wsio can arrange it."""

    def __init__(self, node: Node, conn: DriverConn, verifier: TokenVerifier) -> None:
        self.node = node
        self.conn = conn
        self.verifier = verifier
        self.max_frame = node.settings.max_frame
        self.max_batch = node.settings.max_batch
        self.done = False

    def close(self, code: int, reason: str) -> None:
        self.done = True
        self.node.spawn(self.conn.channel.close(code, reason[:100]))

    def on_frame(self, data: str | bytes) -> None:
        if self.done:
            return
        conn, channel = self.conn, self.conn.channel
        try:
            if len(data) > self.max_frame:
                raise ProtocolError("frame too large", close_code=1009)
            obj = frames.decode(data)
            kind = obj["type"]
            if kind == "pos" or kind == "scan":
                self.node.ingest(conn, [obj])
            elif kind == "batch":
                self._batch(obj)
            elif kind == "refresh":
                self._refresh(obj)
            else:
                raise ProtocolError(f"unknown frame type {kind!r}")
        except ProtocolError as exc:
            channel.write(frames.error("protocol", str(exc)))
            self.close(exc.close_code, str(exc))
        except Exception:  # a bug: close with 1011 (PROTOCOL.md); the details stay in the log
            log.exception("driver %s/%s: internal error", conn.principal.org, conn.principal.sub)
            self.close(1011, "internal error")

    def _batch(self, obj: dict[str, Any]) -> None:
        items = obj.get("items")
        if type(items) is not list:
            self.conn.channel.write(frames.error("invalid", "batch: items must be an array"))
        elif len(items) > self.max_batch:
            seqs = [s for it in items if type(it) is dict and type(s := it.get("seq")) is int]
            self.conn.channel.write(frames.error("too_large", f"a batch carries at most {self.max_batch} items",
                                                 seqs=seqs))
        else:
            self.node.ingest(self.conn, items)

    def _refresh(self, obj: dict[str, Any]) -> None:
        conn = self.conn
        fresh = _refresh(obj, conn.principal, self.verifier, conn.channel)
        if fresh is None:
            self.close(4000, "refresh refused")
            return
        conn.principal = fresh
        if conn.expiry is not None:
            conn.expiry.cancel()
        settings = self.node.settings
        conn.expiry = _schedule_expiry(conn.channel, fresh.exp, settings.jwt_leeway_s)
        conn.channel.write(frames.encode({"type": "welcome", "driver": fresh.sub, "refreshed": True,
                                          "server_time": now_ms(), "max_frame": self.max_frame,
                                          "max_batch": self.max_batch}))


def parse_subscribe(obj: dict[str, Any], *, max_ids: int = 10_000) -> Filter:
    """A subscription's filters; malformed values are a protocol error, ids are just strings.
    `drivers` and `packages` together name at most `max_ids` ids."""
    def ids(key: str) -> frozenset[str] | None:
        value = obj.get(key)
        if value is None:
            return None
        if type(value) is not list or len(value) > 10_000 or not all(type(v) is str and len(v) <= 64 for v in value):
            raise ProtocolError(f"subscribe: {key} must be an array of ids")
        return frozenset(value)

    named = sum(len(v) for v in (obj.get("drivers"), obj.get("packages")) if type(v) is list)
    if named > max_ids:
        raise ProtocolError(f"subscribe: at most {max_ids} drivers and packages")

    bbox = obj.get("bbox")
    if bbox is not None:
        if (type(bbox) is not list or len(bbox) != 4 or not all(type(v) in (int, float) for v in bbox)
                or not (-180 <= bbox[0] <= 180 and -180 <= bbox[2] <= 180 and -90 <= bbox[1] <= bbox[3] <= 90)):
            raise ProtocolError("subscribe: bbox must be [west, south, east, north] in degrees")
        bbox = tuple(float(v) for v in bbox)
    return Filter(drivers=ids("drivers"), packages=ids("packages"), bbox=bbox)


async def live_endpoint(ws: WebSocket) -> None:
    node: Node = ws.app.state.node
    settings = node.settings
    verifier: TokenVerifier = ws.app.state.verifier
    if not origin_allowed(ws, settings.allowed_origins):
        await ws.close(1008, "origin not allowed")
        return
    await ws.accept()
    channel = Channel(ws._send)
    hello = await _hello(ws, channel, verifier, settings.hello_timeout_s, role_ok=("dispatcher", "client"))
    if hello is None:
        return
    principal, _ = hello
    admission: Admission = ws.app.state.admission
    refused = admission.admit_dashboard(principal.key)
    if refused is not None:
        await channel.close(1013, refused)
        return
    try:
        await LiveSession(node, principal, channel, verifier).run(ws)
    finally:
        admission.release_dashboard(principal.key)


class LiveSession:
    """One dashboard after `hello`: subscriptions, refresh, and the token's expiry (4003).

    A subscribe costs a snapshot (PostgreSQL and Redis reads), so a dashboard gets at most
    `subscribe_rate_per_s` of them a second after a burst of `subscribe_burst`; a faster subscribe
    waits for its turn and the newest waiting one wins (the older ones get no snapshot of their own)."""

    def __init__(self, node: Node, principal: Principal, channel: Channel, verifier: TokenVerifier) -> None:
        self.node = node
        self.settings = node.settings
        self.channel = channel
        self.verifier = verifier
        self.dash = Dashboard(principal, channel, node.hub)
        self.welcome: dict[str, Any] = {"type": "welcome", "role": principal.role, "org": principal.org}
        if principal.client:
            self.welcome["client"] = principal.client
        self.bucket = Bucket(self.settings.subscribe_rate_per_s, self.settings.subscribe_burst)
        self.waiting: Filter | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.snapshotting: asyncio.Task[None] | None = None
        self.subscribed = False
        self.expiry: asyncio.TimerHandle | None = None

    async def run(self, ws: WebSocket) -> None:
        channel, settings, role = self.channel, self.settings, self.dash.principal.role
        channel.write(frames.encode(self.welcome))
        self.expiry = _schedule_expiry(channel, self.dash.principal.exp, settings.jwt_leeway_s)
        metrics.CONNECTIONS.labels(role).inc()
        try:
            while True:
                data = await _receive_text(ws)
                if len(data) > settings.max_frame:
                    raise ProtocolError("frame too large", close_code=1009)
                obj = frames.decode(data)
                kind = obj["type"]
                if kind == "subscribe":
                    self.subscribe(parse_subscribe(obj, max_ids=settings.subscribe_max_ids))
                elif kind == "refresh":
                    if not self.refresh(obj):
                        await channel.close(4000, "refresh refused")
                        return
                else:
                    raise ProtocolError(f"unknown frame type {kind!r}")
        except ProtocolError as exc:
            channel.write(frames.error("protocol", str(exc)))
            await channel.close(exc.close_code, str(exc)[:100])
        except WebSocketDisconnect:
            pass
        except Exception:  # a bug: 1011 (PROTOCOL.md), the details stay in the log
            log.exception("dashboard %s/%s: internal error", self.dash.principal.org, self.dash.principal.sub)
            await channel.close(1011, "internal error")
        finally:
            metrics.CONNECTIONS.labels(role).dec()
            await self.stop()

    def subscribe(self, flt: Filter) -> None:
        self.waiting = flt
        if self.timer is None:
            self._apply()

    def _apply(self) -> None:
        self.timer = None
        wait = self.bucket.take()
        if wait > 0:
            self.timer = asyncio.get_running_loop().call_later(wait, self._apply)
            return
        flt, self.waiting = self.waiting, None
        if flt is None:
            return
        dash = self.dash
        dash.flt = flt
        dash.live = False
        dash.pre.clear()
        dash.take()
        dash.inside.clear()
        if not self.subscribed:
            self.node.hub.add(dash)
            self.subscribed = True
        if self.snapshotting is not None:
            self.snapshotting.cancel()
        self.snapshotting = asyncio.create_task(send_snapshot(self.node, dash))

    def refresh(self, obj: dict[str, Any]) -> bool:
        """A new token for the same identity; False means: close."""
        fresh = _refresh(obj, self.dash.principal, self.verifier, self.channel)
        if fresh is None:
            return False
        self.dash.principal = fresh
        if self.expiry is not None:
            self.expiry.cancel()
        self.expiry = _schedule_expiry(self.channel, fresh.exp, self.settings.jwt_leeway_s)
        self.channel.write(frames.encode({**self.welcome, "refreshed": True}))
        return True

    async def stop(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.snapshotting is not None:
            self.snapshotting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.snapshotting
        await self.node.hub.stop(self.dash)
