"""This process's simulated phones over real connections: the asyncio side of the simulator.

:class:`SimPhone` joins a :class:`~tracker.sim.driver.DriverModel` (what happens), a
:class:`~tracker.sim.phone.Phone` (what to send) and a :class:`~tracker.sim.link.Link` (the
socket); :class:`Fleet` ticks them all from one scheduler and paces their (re)connections.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import orjson

from tracker.auth import mint_token
from tracker.protocol import resume
from tracker.sim import SimOptions, driver_id
from tracker.sim.consign import Consigner
from tracker.sim.driver import DriverModel, driver_name
from tracker.sim.faults import Fault, FaultPlan
from tracker.sim.http_phone import HttpSimPhone
from tracker.sim.link import Link, WsError, loopback_sources, open_link
from tracker.sim.phone import Phone
from tracker.sim.records import Records
from tracker.sim.resumption import decode_welcome, token_of, warm_token

TICK_S = 0.02  # the scheduler's resolution; each phone is ticked once per interval
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0
NO_RECONNECT = {4000: "unauthorized", 4001: "replaced"}


class SimPhone:
    """One simulated phone: a :class:`DriverModel`, a :class:`Phone` and its :class:`Link`."""

    def __init__(self, fleet: Fleet, index: int, name: str, token: str, model: DriverModel, phone: Phone) -> None:
        self.fleet, self.index, self.name, self.token = fleet, index, name, token
        self.model, self.phone = model, phone
        self.link: Link | None = None
        self.welcome: asyncio.Future[dict[str, Any]] | None = None
        self.closed: asyncio.Future[int] | None = None
        self.started = False  # generates events once it has been welcomed once
        self.stopped = ""  # why it gave up reconnecting (4000, 4001), or "" while alive
        self.offline_until = 0.0  # loop time
        self.delay = 0.0
        self.rng = random.Random(index)
        self.last_poll = 0.0
        self.resume_token: bytes | None = None  # from a welcome (or minted with --resume warm)
        self.resuming = False  # the last hello was a resume hello

    def tick(self, now: float, generate: bool) -> int:
        """Step the model (when generating) and write what the phone wants sent. Never awaits."""
        n = 0
        if generate and self.started:
            for body in self.model.step(self.fleet.interval):
                self.phone.record(body, now)
                n += 1
            if self.model.planned:  # a new load (with --consign): consign it before its pickups
                self.fleet.consign_later(self.index, self.model.planned)
                self.model.planned = []
        link = self.link
        if link is not None and link.open and self.phone.online:
            if self.fleet.batch_window and now - self.last_poll < self.fleet.batch_window and generate:
                return n
            self.last_poll = now
            frames = self.phone.poll(now)
            if frames:
                link.send_many(frames)
        return n

    async def life(self) -> None:
        """Connect, hello, welcome; on a close, back off (full jitter) and reconnect."""
        fleet, attempt = self.fleet, 0
        loop = asyncio.get_running_loop()
        while not fleet.stopping:
            if self.offline_until > loop.time():
                await asyncio.sleep(self.offline_until - loop.time())
                continue
            await fleet.connect_slot()
            try:
                await self._connect()
            except (OSError, TimeoutError, WsError, ConnectionError, ValueError) as exc:
                fleet.count("connect_failed:" + type(exc).__name__)
                attempt += 1
                await asyncio.sleep(self.rng.uniform(0, min(fleet.backoff_cap, BACKOFF_BASE_S * 2**attempt)))
                continue
            attempt = 0
            assert self.closed is not None
            code = await self.closed
            fleet.count(f"close:{code}")
            if fleet.stopping:
                return
            if code == 4000 and self.resuming:  # the resume token was refused: the JWT next time
                self.resume_token = None
                fleet.count("resume_refused")
            elif code in NO_RECONNECT:
                self.stopped = NO_RECONNECT[code]
                return
            if code == 4003:  # expired on an open connection: a fresh token, then reconnect
                self.token = fleet.token_for(self.index, self.name)
                self.resume_token = None  # it expired with the JWT it stood for
            if code == 1009:
                self.phone.split = max(1, min(self.phone.split, self.phone.max_batch) // 2)
            attempt += 1
            await asyncio.sleep(self.rng.uniform(0, min(fleet.backoff_cap, BACKOFF_BASE_S * 2**attempt)))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.welcome = loop.create_future()
        self.welcome.add_done_callback(_retrieved)  # may fail after we stopped waiting
        self.closed = loop.create_future()
        sources = self.fleet.sources
        link = await open_link(
            self.fleet.url,
            "/v1/driver",
            self._on_message,
            self._on_close,
            connect_timeout=15.0,
            source_ip=sources[self.index % len(sources)] if sources else None,
        )
        if self.offline_until > loop.time():  # the network went away while we were dialling
            link.abort()
            raise ConnectionError("offline")
        self.link = link
        link.delay = self.delay
        self.resuming = self.resume_token is not None
        if self.resume_token is not None:  # PROTOCOL.md "Resuming a session": no JWT
            link.send(bytes([resume.HELLO]) + self.resume_token)
        else:
            hello = {"type": "hello", "token": self.token, "device": f"sim-{self.index:06d}", "app": "sim/1"}
            link.send(orjson.dumps(hello | self.phone.hello_fields(resume=self.fleet.opts.resume != "off")))
        try:
            async with asyncio.timeout(15.0):
                welcome = await self.welcome
        except BaseException:
            link.abort()
            raise
        now = time.time() * 1000.0
        self.phone.connected(welcome, now)
        if not self.started:
            self.started = True
            self.fleet.started += 1
        self.fleet.connected += 1
        self.fleet.connects += 1
        link.send_many(self.phone.poll(now))  # newest fix first, then the backlog

    def _on_message(self, payload: bytes) -> None:
        if payload[:1] == b"\xa1" and self.phone.online:  # a compact ack
            self.phone.receive_binary(payload, time.time() * 1000.0)
            return
        msg = decode_welcome(payload) if payload[:1] == bytes((resume.WELCOME,)) else orjson.loads(payload)
        token = token_of(msg)
        if token:
            self.resume_token = token
        if self.phone.online:
            self.phone.receive(msg, time.time() * 1000.0)
        elif msg.get("type") == "welcome" and self.welcome is not None and not self.welcome.done():
            self.welcome.set_result(msg)
        elif msg.get("type") == "error":
            self.fleet.count(f"error_before_welcome:{msg.get('code')}")

    def _on_close(self, code: int, reason: str) -> None:
        if self.phone.online:
            self.phone.disconnected()
            self.fleet.connected -= 1
        if self.link is not None:
            self.fleet.bytes_closed += self.link.bytes_out
            self.fleet.bytes_in_closed += self.link.bytes_in
            self.link = None
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(code)
        if self.welcome is not None and not self.welcome.done():  # closed while waiting for welcome
            self.welcome.set_exception(ConnectionError(f"closed before welcome: {code} {reason}"))

    # faults (flaky mode)
    def fault(self, fault: Fault, loop: asyncio.AbstractEventLoop) -> None:
        if self.fleet.stopping or self.fleet.draining:
            return
        self.fleet.count(f"fault:{fault.kind}")
        if fault.kind == "slow":
            self._set_delay(fault.delay)
            loop.call_later(fault.length, self._set_delay, 0.0)
            return
        if fault.kind == "offline":
            self.offline_until = loop.time() + fault.length
        if self.link is not None:
            self.link.abort()

    def _set_delay(self, delay: float) -> None:
        self.delay = delay
        if self.link is not None:
            self.link.delay = delay


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class Fleet:
    """This process's phones: one scheduler ticks them all (no task per event), a token
    bucket paces new connections, and a task per phone only for (re)connecting.

    ``run()`` generates events until ``gen_until`` (wall seconds), then drains: phones stay
    connected until every event is acknowledged or ``drain_until`` passes.
    """

    def __init__(self, opts: SimOptions, indices: list[int], *, epoch_ms: float, connect_rate: float) -> None:
        assert opts.secret is not None and opts.org is not None and opts.seed is not None
        self.opts = opts
        self.url, self.interval = opts.url, opts.interval
        self.sources = loopback_sources(opts.url)
        self.batch_window = opts.batch_window * 1000.0 if opts.batch_mode else 0.0
        self.backoff_cap = BACKOFF_CAP_S
        self.connect_interval = 1.0 / connect_rate
        self.next_connect = 0.0
        self.stopping = self.draining = False
        self.connected = self.connects = self.started = self.generated = self.skipped_ticks = 0
        self.bytes_closed = 0
        self.bytes_in_closed = 0
        self.counts: dict[str, int] = {}
        self.epoch_ms = epoch_ms
        dwell = min(1.0, max(0.05, opts.duration / 600.0))
        self.phones: list[SimPhone] = []
        for i in indices:
            name = driver_name(i, opts.seed)
            model = DriverModel(i, org=opts.org, seed=opts.seed, dwell_scale=dwell, record_plans=opts.consign)
            rng = random.Random(f"reorder:{opts.seed}:{i}") if opts.flaky else None
            records = Records(epoch_ms)
            phone = Phone(
                driver_id(i),
                records=records,
                resend_after_ms=opts.resend_after * 1000,
                reorder=rng,
                encoding=opts.encoding,
                acks=opts.acks,
            )
            kind: Any = HttpSimPhone if opts.transport == "http" else SimPhone
            self.phones.append(kind(self, i, name, self.token_for(i, name), model, phone))
            if opts.resume == "warm" and kind is SimPhone:
                self.phones[-1].resume_token = warm_token(opts, self.phones[-1].token)
        self.consigner: Consigner | None = None
        if opts.consign:
            ttl = opts.duration + opts.drain_timeout + 3600.0
            token = mint_token(opts.secret, sub="sim-consigner", role="dispatcher", org=opts.org, ttl_s=ttl)
            self.consigner = Consigner(opts.url, token)

    async def prepare(self) -> None:
        """Before the run: with ``--consign``, consign every driver's first load (and wait)."""
        if self.consigner is None:
            return
        first: list[tuple[int, tuple[str, bool, float, float]]] = []
        for p in self.phones:
            first.extend((p.index, planned) for planned in p.model.planned or ())
            p.model.planned = []
        await self.consigner.post_all(first)
        self._count_consigned()

    def consign_later(self, index: int, planned: list[tuple[str, bool, float, float]]) -> None:
        if self.consigner is not None:
            self.consigner.post_later([(index, item) for item in planned])

    def _count_consigned(self) -> None:
        if self.consigner is not None:
            self.counts["consigned"] = self.consigner.posted
            if self.consigner.failed:
                self.counts["consign_failed"] = self.consigner.failed

    def token_for(self, index: int, name: str) -> str:
        o = self.opts
        assert o.secret is not None and o.org is not None
        ttl = o.duration + o.drain_timeout + 3600.0
        return mint_token(o.secret, sub=driver_id(index), role="driver", org=o.org, name=name, ttl_s=ttl)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def connect_slot(self) -> None:
        """Wait for this connection's turn: at most ``connect_rate`` new connections per second."""
        now = asyncio.get_running_loop().time()
        at = max(now, self.next_connect)
        self.next_connect = at + self.connect_interval
        if at > now:
            await asyncio.sleep(at - now)

    async def run(self, gen_until: float, drain_until: float) -> None:
        """Run the phones; return when all is acked after ``gen_until`` or at ``drain_until``."""
        loop = asyncio.get_running_loop()
        lives = [asyncio.create_task(p.life()) for p in self.phones]
        if self.opts.flaky:
            self._plan_faults(loop, gen_until - time.time())
        ticker = asyncio.create_task(self._ticker(gen_until))
        try:
            await asyncio.sleep(max(0.0, gen_until - time.time()))
            self.draining = True
            self.backoff_cap = 2.0
            for p in self.phones:
                p.offline_until = 0.0
                p._set_delay(0.0)
            # Polling a sum every 100 ms is cheaper than an Event fed by every ack of every phone.
            while time.time() < drain_until and self.unacked() > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        finally:
            self.stopping = True
            ticker.cancel()
            for p in self.phones:
                if p.link is not None:
                    p.link.close()
            for t in lives:
                t.cancel()
            await asyncio.gather(ticker, *lives, return_exceptions=True)
            if self.consigner is not None:
                await self.consigner.close()
                self._count_consigned()

    async def _ticker(self, gen_until: float) -> None:
        loop = asyncio.get_running_loop()
        n = max(1, round(self.interval / TICK_S))
        tick = self.interval / n
        buckets: list[list[SimPhone]] = [[] for _ in range(n)]
        for p in self.phones:  # spread phones evenly over the interval
            buckets[(p.index * 7919) % n].append(p)
        k, due = 0, loop.time()
        while True:
            if loop.time() - due > self.interval:  # more than an interval behind: the simulator is saturated
                skip = int((loop.time() - due) / tick)
                self.skipped_ticks += skip
                k, due = k + skip, due + skip * tick
            if due <= loop.time():
                now = time.time() * 1000.0
                generate = now < gen_until * 1000.0
                for p in buckets[k % n]:
                    self.generated += p.tick(now, generate)
                k, due = k + 1, due + tick
            # One bucket at a time, then let the loop read: when behind, acks are still taken
            # as they come (latency stays the service's), and generation is what slows down.
            await asyncio.sleep(max(0.0, due - loop.time()))

    def _plan_faults(self, loop: asyncio.AbstractEventLoop, span: float) -> None:
        assert self.opts.seed is not None
        start = loop.time()
        for p in self.phones:
            plan = FaultPlan(random.Random(f"faults:{self.opts.seed}:{p.index}"), span)
            for f in plan.faults:
                loop.call_at(start + f.at, p.fault, f, loop)

    # --- observations ------------------------------------------------------------------
    def unacked(self) -> int:
        return sum(len(p.phone.outbox) for p in self.phones)

    def stats(self) -> dict[str, Any]:
        """Counters for the progress line; cheap enough to call every second."""
        acked = refused = unacked = 0
        open_bytes = open_in = positions = 0
        for p in self.phones:
            positions += p.phone.positions
            acked += p.phone.acked
            refused += p.phone.refused
            unacked += len(p.phone.outbox)
            if p.link is not None:
                open_bytes += p.link.bytes_out
                open_in += p.link.bytes_in
        return {
            "connected": self.connected,
            "started": self.started,
            "generated": self.generated,
            "acked": acked,
            "refused": refused,
            "unacked": unacked,
            "bytes_out": self.bytes_closed + open_bytes,
            "bytes_in": self.bytes_in_closed + open_in,
            "positions": positions,
            "skipped_ticks": self.skipped_ticks,
            "connects": self.connects,
            "cpu_ms": int(time.process_time() * 1000),  # this process, all of it
        }

    def results(self) -> dict[str, Any]:
        """What the report needs from this process: per-driver records and counters."""
        errors: dict[str, int] = {}
        for p in self.phones:
            for code, n in p.phone.errors.items():
                errors[code] = errors.get(code, 0) + n
        return {
            "records": {p.phone.driver: p.phone.records for p in self.phones},
            "stats": self.stats(),
            "counts": dict(self.counts),
            "errors": errors,
            "stopped": {p.phone.driver: p.stopped for p in self.phones if p.stopped},
            "connects": self.connects,
            "cpu_ms": int(time.process_time() * 1000),  # this process, all of it
        }
