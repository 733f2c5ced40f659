"""A TCP proxy in front of one server that a test may cut, reset, throttle or mute: the network
between tracker and Redis (or a dashboard and tracker) failing in the ways real networks do."""

from __future__ import annotations

import asyncio
import contextlib
import socket

RECORD_MAX = 1 << 20


class _Pipe:
    """One proxied connection: two pumps, and what the client has said so far (for `mute`)."""

    def __init__(
        self,
        proxy: Proxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client, self.server = client, server
        self.said = b""
        self.muted = False
        self.up = self.down = 0  # bytes carried each way (a byte-counting proxy, for wire measurements)
        # Everything carried each way, when the proxy records (bench/mobile.py's breakdown by frame kind).
        self.log_up: bytearray | None = bytearray() if proxy.record else None
        self.log_down: bytearray | None = bytearray() if proxy.record else None
        self.tasks = [
            asyncio.create_task(self._pump(client[0], server[1], up=True)),
            asyncio.create_task(self._pump(server[0], client[1], up=False)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while True:
                rate = self.proxy.rate_up if up else self.proxy.rate_down
                data = await reader.read(max(64, rate // 10) if rate else 65_536)
                if not data:
                    break
                if up and len(self.said) < 4096:
                    self.said += data[: 4096 - len(self.said)]
                    if any(marker in self.said for marker in self.proxy.muting):
                        self.muted = True
                if not up and self.muted:
                    continue  # green but deaf: the connection stays up, nothing gets through
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                log = self.log_up if up else self.log_down
                if log is not None and len(log) < RECORD_MAX:
                    log += data
                writer.write(data)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(data) / rate)  # holding the link to its rate (not a wait)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.abort(rst=False)

    def abort(self, *, rst: bool) -> None:
        for _, writer in (self.client, self.server):
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.transport.abort()
            else:
                writer.close()
        if self in self.proxy.pipes:
            self.proxy.pipes.discard(self)
            self.proxy.done.append(self)


class Proxy:
    """A TCP proxy in front of one server, listening on a port of its own (bound to port 0).

    `cut()` resets every connection and refuses new ones until `restore()`; `reset()` resets the
    open connections once; `slow(bytes_per_s)` throttles (with backpressure: it reads no faster
    than it writes); `mute(marker)` silently drops what the server sends on open connections whose
    client sent `marker` (a subscriber that is connected but receives nothing)."""

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, buffer: int = 65_536, record: bool = False
    ) -> None:
        self.target = (target_host, target_port)
        self.record = record  # keep each pipe's bytes (up to RECORD_MAX each way) in log_up / log_down
        self.buffer = buffer
        self.pipes: set[_Pipe] = set()
        self.done: list[_Pipe] = []  # connections that ended, with what they carried (`said`, `up`, `down`)
        self.rate_up = 0
        self.rate_down = 0
        self.refusing = False
        self.muting: set[bytes] = set()  # markers that mute connections opened later, too
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=self.buffer)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up = await asyncio.open_connection(sock=await self._connect(), limit=self.buffer)
        except OSError:
            writer.transport.abort()
            return
        self.pipes.add(_Pipe(self, (reader, writer), up))

    async def _connect(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        if self.buffer < 65_536:
            # A small window upstream too, so the server feels the slow link; and a mobile link's
            # segment size: with loopback's 64 KB MSS a small window never reopens by a full
            # segment, and the sender falls back to zero-window probes seconds apart.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.buffer)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.target)
        except OSError:
            sock.close()
            raise
        return sock

    def cut(self) -> None:
        self.refusing = True
        self.reset()

    def restore(self) -> None:
        self.refusing = False
        self.rate_up = self.rate_down = 0

    def reset(self) -> None:
        for pipe in list(self.pipes):
            pipe.abort(rst=True)

    def slow(self, bytes_per_s: int, *, down: bool = True, up: bool = False) -> None:
        self.rate_down = bytes_per_s if down else 0
        self.rate_up = bytes_per_s if up else 0

    def mute(self, marker: bytes, *, also_new: bool = False) -> int:
        """Mute the open connections whose client sent `marker`; with `also_new`, also those
        opened later as soon as their client sends it (until `unmute`). Returns how many now."""
        if also_new:
            self.muting.add(marker)
        n = 0
        for pipe in self.pipes:
            if marker in pipe.said:
                pipe.muted = True
                n += 1
        return n

    def unmute(self) -> None:
        """What the server sends gets through again, on every connection."""
        self.muting.clear()
        for pipe in self.pipes:
            pipe.muted = False

    async def close(self) -> None:
        self.reset()
        tasks = [t for pipe in list(self.pipes) for t in pipe.tasks]
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
