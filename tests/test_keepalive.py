"""Keepalive pings, observed at the socket (tracker/transport/keepalive.py): a driver that talks is
never pinged; a silent one is pinged and kept while it answers; one that never answers (a phone gone
without a FIN: a half-open connection) is closed 1011 within the ping timeout."""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from typing import Any

import orjson

from harness.clients import now_ms, pos
from harness.tokens import token
from harness.wait import wait_until
from tracker.protocol.wscodec import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameCollector, encode_frame, parse_close

INTERVAL = 0.4
TIMEOUT = 0.4
RUN = uuid.uuid4().hex[:8]  # the database outlives a run: fresh drivers, fresh seqs


class RawDriver:
    """A driver over a bare TCP socket: every frame the server sends is recorded with its opcode, and
    pings are answered only if `answer_pings`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer_pings: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.answer_pings = answer_pings
        self.frames: list[tuple[float, int, bytes]] = []
        self.eof_at: float | None = None
        self.collector = FrameCollector(masked=False)
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, port: int, sub: str, *, answer_pings: bool) -> RawDriver:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /v1/driver HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        driver = cls(reader, writer, answer_pings)
        driver.send({"type": "hello", "token": token("driver", sub, "acme"), "device": "raw", "app": "raw/1"})
        await driver.wait_for(lambda: driver.texts("welcome"), 5)
        return driver

    def send(self, frame: dict[str, Any]) -> None:
        self.writer.write(encode_frame(OP_TEXT, orjson.dumps(frame), os.urandom(4)))

    async def _read(self) -> None:
        while data := await self.reader.read(65_536):
            for opcode, payload in self.collector.feed(data):
                self.frames.append((time.monotonic(), opcode, payload))
                if opcode == OP_PING and self.answer_pings:
                    self.writer.write(encode_frame(OP_PONG, payload, os.urandom(4)))
        self.eof_at = time.monotonic()

    def texts(self, ftype: str) -> list[dict[str, Any]]:
        decoded = (orjson.loads(p) for _, op, p in self.frames if op == OP_TEXT)
        return [f for f in decoded if f.get("type") == ftype]

    def pings(self) -> list[float]:
        return [at for at, op, _ in self.frames if op == OP_PING]

    def close_code(self) -> int | None:
        return next((parse_close(p)[0] for _, op, p in self.frames if op == OP_CLOSE), None)

    async def wait_for(self, predicate: Any, timeout: float) -> None:
        await wait_until(predicate, timeout, "the raw driver's frames", interval=0.01)

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def test_talking_driver_is_not_pinged_silent_one_is(start_instance: Any) -> None:
    inst = await start_instance(ping_interval_s=INTERVAL, ping_timeout_s=TIMEOUT)
    talker = await RawDriver.connect(inst.port, f"ka-talker-{RUN}", answer_pings=True)
    quiet = await RawDriver.connect(inst.port, f"ka-quiet-{RUN}", answer_pings=True)
    try:
        # Six intervals: the talker sends a fix every half interval, the quiet one nothing.
        seq = 0
        end = time.monotonic() + 6 * INTERVAL
        while time.monotonic() < end:
            seq += 1
            talker.send(pos(seq, now_ms()))
            await asyncio.sleep(INTERVAL / 2)
        acked = lambda: any(seq in range(a, b + 1) for f in talker.texts("ack") for a, b in f["ranges"])  # noqa: E731
        await talker.wait_for(acked, 5)
        assert talker.pings() == [], "a driver that talks was pinged"
        assert len(quiet.pings()) >= 2, f"a silent driver was pinged {len(quiet.pings())} times in 6 intervals"
        # It answered every ping: still open, never closed.
        assert quiet.eof_at is None and quiet.close_code() is None
        assert talker.eof_at is None and talker.close_code() is None
    finally:
        await talker.close()
        await quiet.close()


async def test_silent_half_open_driver_is_closed(start_instance: Any) -> None:
    inst = await start_instance(ping_interval_s=INTERVAL, ping_timeout_s=TIMEOUT)
    dead = await RawDriver.connect(inst.port, f"ka-dead-{RUN}", answer_pings=False)
    started = time.monotonic()
    try:
        # Silent 1-1.5 intervals -> pinged; no answer within the timeout -> closed 1011.
        await dead.wait_for(lambda: dead.eof_at is not None, 2 * INTERVAL + TIMEOUT + 3)
        assert dead.pings(), "closed without a ping"
        assert dead.close_code() == 1011
        assert dead.eof_at - dead.pings()[0] >= TIMEOUT * 0.9
        assert dead.eof_at - started <= 1.5 * INTERVAL + TIMEOUT + 1.0
        conn = inst.node.drivers.get(("acme", f"ka-dead-{RUN}"))
        assert conn is None or conn.closed
    finally:
        await dead.close()
