"""The simulator's network link: a minimal RFC 6455 client, and mobile-network faults.

Why hand-written: one simulator process must hold ~20,000 phones at ~50,000 events/s.
The ``websockets`` client costs a task, a reader stream and several layers of Python per
frame; here a phone's link is one :class:`asyncio.Protocol` whose ``data_received`` parses
frames and calls the phone synchronously, and a send is one masked-frame encode and one
``transport.write``. Only what the simulator needs is supported: text frames out, text,
ping and close in, no extensions (so no compression), fragmented messages reassembled.

The codec half (``encode_frame``, ``FrameDecoder``, the handshake helpers, ``FaultPlan``)
is pure and tested without a network; :class:`Link` is the thin asyncio layer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

_c_apply_mask: Callable[[bytes, bytes], bytes] | None
try:  # the websockets package ships a C masking routine; fall back to big-int XOR
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - depends on the installed wheel
    _c_apply_mask = None

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsError(Exception):
    """The peer broke the WebSocket protocol (bad handshake, bad frame, frame too large)."""


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 section 5.3)."""
    if _c_apply_mask is not None:
        return bytes(_c_apply_mask(data, mask))
    n = len(data)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final client frame: FIN, ``opcode``, masked ``payload``."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + apply_mask(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


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


class FrameDecoder:
    """Incremental decoder of server-to-client frames; reassembles fragmented messages.

    ``feed(data)`` returns the complete messages as ``(opcode, payload)``, control frames
    included, in order. Raises :class:`WsError` on masked server frames or oversize messages.
    """

    __slots__ = ("buf", "frag", "frag_op", "max_size")

    def __init__(self, max_size: int = 1 << 26) -> None:
        self.buf = b""
        self.frag: list[bytes] = []
        self.frag_op = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf + data if self.buf else data
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                raise WsError("server frames must not be masked")
            n, hl = b1 & 0x7F, 2
            if n == 126:
                if end - pos < 4:
                    break
                n, hl = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, hl = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if n > self.max_size:
                raise WsError(f"frame of {n} bytes over the limit")
            if end - pos < hl + n:
                break
            payload = buf[pos + hl : pos + hl + n]
            pos += hl + n
            self._frame(b0 & 0x80 != 0, b0 & 0x0F, payload, out)
        self.buf = buf[pos:] if pos < end else b""
        return out

    def _frame(self, fin: bool, op: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if op >= OP_CLOSE:  # control frames may come between fragments
            out.append((op, payload))
        elif op == OP_CONT:
            if not self.frag:
                raise WsError("continuation without a first fragment")
            self.frag.append(payload)
            if sum(map(len, self.frag)) > self.max_size:
                raise WsError("message over the limit")
            if fin:
                out.append((self.frag_op, b"".join(self.frag)))
                self.frag = []
        elif fin:
            out.append((op, payload))
        else:
            self.frag, self.frag_op = [payload], op


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) >= 2:
        return struct.unpack_from("!H", payload)[0], payload[2:].decode("utf-8", "replace")
    return 1005, ""


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
        self.decoder = FrameDecoder(max_size)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.open = False
        self.closed = False
        self.bytes_out = 0
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
            messages = self.decoder.feed(data)
        except WsError as exc:
            self._fail(exc, 1002)
            return
        for op, payload in messages:
            if op == OP_TEXT or op == OP_BINARY:
                self.on_message(payload)
            elif op == OP_PING:
                self._write(encode_frame(OP_PONG, payload, _mask()))
            elif op == OP_CLOSE:
                code, reason = parse_close(payload)
                if not self.closed:
                    self._write(encode_frame(OP_CLOSE, payload[:2], _mask()))
                self._finish(code, reason)
                if self.transport is not None:
                    self.transport.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(1006, str(exc or "connection lost"))

    # the phone's side
    def send(self, payload: bytes) -> None:
        """Queue one text message; never awaits. Dropped silently once the link is closed."""
        if self.open and not self.closed:
            frame = encode_frame(OP_TEXT, payload, _mask())
            if self.delay > 0 or self._held:
                self._hold(frame)
            else:
                self._write(frame)

    def send_many(self, payloads: list[bytes]) -> None:
        """Queue several text messages with one write (one syscall) when the link is fast."""
        if len(payloads) == 1:
            self.send(payloads[0])
        elif self.open and not self.closed and payloads:
            data = b"".join([encode_frame(OP_TEXT, p, _mask()) for p in payloads])
            if self.delay > 0 or self._held:
                self._hold(data)
            else:
                self._write(data)

    def close(self, code: int = 1000) -> None:
        if self.transport is None or self.closed:
            return
        if self.open:
            self._write(encode_frame(OP_CLOSE, close_payload(code), _mask()))
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


# --- mobile-network faults --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """One episode of trouble: ``at`` seconds into the run, lasting ``length`` seconds.

    ``kind`` is ``drop`` (connection reset, reconnect at once), ``offline`` (no network for
    ``length``), or ``slow`` (writes delayed by ``delay`` seconds for ``length``).
    """

    at: float
    kind: str
    length: float
    delay: float = 0.0


class FaultPlan:
    """A phone's deterministic schedule of faults over a run of ``duration`` seconds.

    Offline periods run from seconds to minutes, scaled down with short runs
    (``scale = min(1, duration / 600)``), and end before the run does, so the drain phase
    starts with every phone able to connect.
    """

    def __init__(self, rng: random.Random, duration: float, *, mean_gap: float | None = None) -> None:
        scale = min(1.0, duration / 600.0)
        gap = mean_gap if mean_gap is not None else max(5.0, 120.0 * scale)
        self.faults: list[Fault] = []
        t = rng.expovariate(1.0 / gap)
        while t < duration:
            r = rng.random()
            if r < 0.4:
                fault = Fault(t, "drop", 0.0)
            elif r < 0.75:
                # log-uniform between 2 s and 3 min, then scaled: seconds to minutes
                length = max(1.0, math.exp(rng.uniform(math.log(2.0), math.log(180.0))) * scale)
                fault = Fault(t, "offline", min(length, duration - t))
            else:
                fault = Fault(t, "slow", rng.uniform(5.0, 60.0) * scale, delay=rng.uniform(0.2, 3.0))
            self.faults.append(fault)
            t += fault.length + rng.expovariate(1.0 / gap)
        self.reorder_seed = rng.getrandbits(32)
