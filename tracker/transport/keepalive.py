"""Keepalive pings for the connections whose frames `FrameReader` reads: only the silent ones.

uvicorn pings every connection every `ping_interval_s`, with two timers per connection and a
ping, a pong, two syscalls and a parse each time, whether or not the connection is talking. A
phone sending a fix every 5 s proves it is alive four times per interval: at 10,000 drivers those
pings were ~8% of the server's CPU for nothing (BENCHMARKS.md, issue 13). Here one timer serves
the whole process:

- every frame read stamps its connection's `heard` (one clock read per read, no timer);
- a sweep visits every connection once per half interval, in slices spread over that time (no
  burst of 10,000 pings at once): one silent for `ping_interval_s` or more gets a ping;
- a pinged connection that has not been heard from (a pong or anything else) within
  `ping_timeout_s` is closed 1011 "keepalive ping timeout", as uvicorn does (PROTOCOL.md).

So a silent connection is pinged after 1 to 1.5 intervals of silence and a dead one closed at most
one sweep slice after its timeout; a talking one is never pinged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Pingable(Protocol):
    """What the sweep needs of a connection (tracker/transport/uvicorn_fast.py's FrameReader)."""

    heard: float  # time.monotonic() of the last bytes read from the peer
    closed: bool

    def ping(self) -> None:
        """Write a ping frame; never awaits."""

    def expire(self) -> None:
        """No answer to the ping: close 1011 "keepalive ping timeout", without waiting for the peer."""


class Keepalive:
    """One per process (app.state.keepalive). Its timer runs only while connections are registered."""

    def __init__(self, interval_s: float, timeout_s: float, *, tick_s: float = 0.05) -> None:
        self.interval = interval_s
        self.timeout = timeout_s
        # A round (every connection visited once) is half an interval, in slices one tick apart: at
        # 10,000 silent connections and 20 s, 50 pings per 50 ms tick. In ten slices (1,000 pings
        # at once) the loop stalled 150 ms on a loaded machine (tracker.looplag caught it).
        self.slices = max(4, round(interval_s / 2 / tick_s))
        self.tick = interval_s / 2 / self.slices
        self.conns: dict[Pingable, None] = {}  # an insertion-ordered set
        self.pinged: dict[Pingable, float] = {}  # connection -> when its ping was sent
        self._round: list[Pingable] = []
        self._pos = 0
        self._handle: asyncio.TimerHandle | None = None
        self.pings = 0  # sent, and closed for no answer: for tests and benchmarks
        self.timeouts = 0

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def add(self, conn: Pingable) -> None:
        """Watch `conn` from now on (it counts as heard now)."""
        conn.heard = time.monotonic()
        self.conns[conn] = None
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.tick, self._sweep)

    def discard(self, conn: Pingable) -> None:
        self.conns.pop(conn, None)
        self.pinged.pop(conn, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        self._deadlines(now)
        if self._pos >= len(self._round):
            self._round = list(self.conns)
            self._pos = 0
        end = self._pos + -(-len(self._round) // self.slices)
        silent_for = now - self.interval
        for conn in self._round[self._pos : end]:
            if conn.heard <= silent_for and not conn.closed and conn not in self.pinged and conn in self.conns:
                self.pinged[conn] = now
                self.pings += 1
                conn.ping()
        self._pos = end
        if self.conns or self.pinged:
            self._handle = asyncio.get_running_loop().call_later(self.tick, self._sweep)
        else:
            self._handle = None
            self._round = []

    def _deadlines(self, now: float) -> None:
        """Pinged connections: heard from since (alive: forget the ping), or past the timeout (close)."""
        for conn, at in list(self.pinged.items()):
            if conn.closed:
                del self.pinged[conn]
            elif conn.heard >= at:
                del self.pinged[conn]
            elif now - at >= self.timeout:
                del self.pinged[conn]
                self.timeouts += 1
                conn.expire()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
