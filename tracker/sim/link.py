"""The simulator's network link: a minimal asyncio WebSocket client.

Why hand-written: one simulator process must hold ~20,000 phones at ~50,000 events/s.
The ``websockets`` client costs a task, a reader stream and several layers of Python per
frame; here a phone's link is one :class:`asyncio.Protocol` whose ``data_received`` feeds
the shared RFC 6455 parser (:mod:`tracker.protocol.wscodec`), which calls the phone
synchronously, and a send is one masked-frame encode and one ``transport.write``. Only what
the simulator needs is supported: text frames out, text, ping and close in, no extensions
(so no compression), fragmented messages reassembled.

The opening handshake's helpers are pure and tested without a network; :class:`Link` is the
thin asyncio layer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from tracker.protocol.wscodec import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    WsProtocolError,
    close_body,
    encode_frame,
    parse_close,
)

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsError(Exception):
    """The server refused or botched the opening handshake."""


def handshake_request(host: str, path: str, key: str) -> bytes:
    """The HTTP/1.1 upgrade request; ``key`` is the base64 of 16 random bytes."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: tracker-sim/1\r\n\r\n"
    ).encode()


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def check_handshake(head: bytes, key: str) -> None:
    """Validate the server's response head (without the final blank line); raise WsError if refused."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise WsError(f"handshake refused: {lines[0]}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != accept_value(key):
        raise WsError("handshake: bad Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions"):
        raise WsError("handshake: server imposed extensions we did not offer")


# --- asyncio layer ----------------------------------------------------------------------

_mask_rng = random.Random()  # masks need no reproducibility; kept off the scenario's seed


class Link(asyncio.Protocol):
    """One client WebSocket connection. Callbacks run inside ``data_received``: keep them short.

    ``on_message(payload)`` gets each text message; ``on_close(code, reason)`` runs once, for a
    close frame, a lost connection (1006) or :meth:`abort`. ``delay`` > 0 holds writes that long
    (a slow mobile link), in order.
    """

    def __init__(
        self,
        host: str,
        path: str,
        on_message: Callable[[bytes], None],
        on_close: Callable[[int, str], None],
        *,
        max_size: int = 1 << 26,
    ) -> None:
        self.host, self.path = host, path
        self.on_message, self.on_close = on_message, on_close
        self.key = base64.b64encode(_mask_rng.getrandbits(128).to_bytes(16, "big")).decode()
        self.parser = FrameParser(self._on_frame, max_size=max_size, masked=False)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.open = False
        self.closed = False
        self.bytes_out = 0  # at the socket: the handshake, every frame and its header, pongs, the close
        self.bytes_in = 0
        self.delay = 0.0
        self._held: deque[tuple[float, bytes]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        request = handshake_request(self.host, self.path, self.key)
        self.bytes_out += len(request)
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self.open:
            self.head += data
            head, sep, rest = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            try:
                check_handshake(head, self.key)
            except WsError as exc:
                self._fail(exc, 1002)
                return
            self.open, self.head = True, b""
            if self.opened.done():  # the opener gave up (timeout) just before: nobody wants us
                self.abort()
                return
            self.opened.set_result(None)
            if not rest:
                return
            data = rest
        try:
            self.parser.feed(data)  # calls _on_frame
        except WsProtocolError as exc:
            self._fail(exc, exc.code)

    def _on_frame(self, op: int, fin: bool, payload: bytes) -> None:
        if op == OP_TEXT or op == OP_BINARY:
            self.on_message(payload)
        elif op == OP_PING:
            self._write(encode_frame(OP_PONG, payload, _mask()))
        elif op == OP_CLOSE:  # the parser reads nothing after it
            code, reason = parse_close(payload)
            if not self.closed:
                self._write(encode_frame(OP_CLOSE, payload[:2], _mask()))
            self._finish(code, reason)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(1006, str(exc or "connection lost"))

    # the phone's side
    def send(self, payload: bytes) -> None:
        """Queue one message (text; binary for a compact-1 frame); never awaits. Dropped once the link is closed."""
        if self.open and not self.closed:
            frame = encode_frame(_opcode(payload), payload, _mask())
            if self.delay > 0 or self._held:
                self._hold(frame)
            else:
                self._write(frame)

    def send_many(self, payloads: list[bytes]) -> None:
        """Queue several text messages with one write (one syscall) when the link is fast."""
        if len(payloads) == 1:
            self.send(payloads[0])
        elif self.open and not self.closed and payloads:
            data = b"".join([encode_frame(_opcode(p), p, _mask()) for p in payloads])
            if self.delay > 0 or self._held:
                self._hold(data)
            else:
                self._write(data)

    def close(self, code: int = 1000) -> None:
        if self.transport is None or self.closed:
            return
        if self.open:
            self._write(encode_frame(OP_CLOSE, close_body(code), _mask()))
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection as a lost network would: no close frame, unsent bytes lost."""
        if self.transport is not None:
            self.transport.abort()
        self._finish(1006, "aborted")

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(frame)
            self.transport.write(frame)

    def _hold(self, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._held.append((loop.time() + self.delay, frame))
        if self._timer is None:
            self._timer = loop.call_at(self._held[0][0], self._release)

    def _release(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        now = loop.time()
        while self._held and self._held[0][0] <= now:
            self._write(self._held.popleft()[1])
        if self._held:
            self._timer = loop.call_at(self._held[0][0], self._release)

    def _fail(self, exc: Exception, code: int) -> None:
        if not self.opened.done():
            self.opened.add_done_callback(_retrieve)
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        self._finish(code, str(exc))

    def _finish(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.open = True, False
        if self._timer is not None:
            self._timer.cancel()
        self._held.clear()
        if not self.opened.done():
            self.opened.add_done_callback(_retrieve)
            self.opened.set_exception(ConnectionError(f"closed before the handshake: {code} {reason}"))
        self.on_close(code, reason)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark retrieved: the opener may have stopped waiting


def _opcode(payload: bytes) -> int:
    """JSON goes as text; a compact frame or a resume hello (0xC1, 0xC2, 0xC3, 0xA3: never the start
    of UTF-8 JSON) as binary."""
    return OP_BINARY if payload[:1] in (b"\xc1", b"\xc2", b"\xc3", b"\xa3") else OP_TEXT


def _mask() -> bytes:
    return _mask_rng.getrandbits(32).to_bytes(4, "little")


async def open_link(
    url: str,
    path: str,
    on_message: Callable[[bytes], None],
    on_close: Callable[[int, str], None],
    *,
    connect_timeout: float = 10.0,
    max_size: int = 1 << 26,
    source_ip: str | None = None,
) -> Link:
    """Connect to ``url`` (``ws://host:port``, optionally with a path prefix) + ``path``.

    ``source_ip`` binds the local end: against a loopback server, spreading phones over
    127.0.1.x gives each address its own 28k ephemeral ports (one address runs out near
    20k connections plus the TIME_WAITs of the previous run, and connect() then crawls).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// url: {url}")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    netloc = host if parts.port is None else f"{host}:{port}"
    full = parts.path.rstrip("/") + path
    loop = asyncio.get_running_loop()
    link = Link(netloc, full, on_message, on_close, max_size=max_size)
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(
                lambda: link,
                host,
                port,
                ssl=parts.scheme == "wss" or None,
                local_addr=(source_ip, 0) if source_ip else None,
            )
            await link.opened
    except BaseException:
        link.abort()
        raise
    return link


def loopback_sources(url: str, count: int = 32) -> list[str]:
    """Source addresses to spread connections over when ``url`` is on IPv4 loopback, else []."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.startswith("127."):
        return [f"127.0.1.{i}" for i in range(1, count + 1)]
    return []
