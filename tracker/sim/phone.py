"""A simulated driver app: the outbox and acknowledgement bookkeeping of PROTOCOL.md.

:class:`Phone` is sans-I/O: events, the connection's life and the server's frames go in;
the text frames to write come out of :meth:`Phone.poll`. It never reads the clock (every
call takes ``now``, wall-clock milliseconds) and never touches a socket, so every rule of
the protocol is unit-tested without an event loop. Below it, :class:`SimPhone` and
:class:`Fleet` are the thin asyncio side that drives thousands of phones over real links.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from array import array
from collections.abc import Iterable
from typing import Any

import orjson

from tracker.sim import SimOptions, driver_id, mint_token
from tracker.sim.consign import Consigner
from tracker.sim.flaky import Fault, FaultPlan, Link, WsError, loopback_sources, open_link
from tracker.sim.routes import DriverModel, driver_name

RESEND_AFTER_MS = 60_000.0  # PROTOCOL.md: resend on the same connection after 60 s without an answer
FINAL_ERRORS = frozenset({"invalid", "forbidden"})
RETRY_ERRORS = frozenset({"unavailable", "rate_limited"})
BATCH_HEAD = b'{"type":"batch","items":['
BATCH_TAIL = b"]}"
NAN = math.nan
KIND_NONE, KIND_POS, KIND_SCAN = 0, 1, 2


class Records:
    """Per-event times of one driver, indexed by seq: created, first and last send, ack.

    Times are float32 milliseconds since the run's ``epoch`` (0.25 ms resolution over an hour)
    so 10 million events cost 160 MB, not gigabytes of dicts. ``kind`` is 1 for a position,
    2 for a scan, 0 for a seq that names no event of ours (a gap, or renumbered away).
    """

    __slots__ = ("ack", "base", "created", "epoch", "first", "kind", "last", "refused")

    def __init__(self, epoch: float) -> None:
        self.epoch = epoch
        self.base = 0
        self.kind = array("b")
        self.created, self.first, self.last, self.ack = array("f"), array("f"), array("f"), array("f")
        self.refused: dict[int, str] = {}

    def add(self, seq: int, kind: int, now: float) -> None:
        kinds = self.kind
        if kinds and seq - self.base == len(kinds):  # the usual case: the next seq
            kinds.append(kind)
            self.created.append(now - self.epoch)
            self.first.append(NAN)
            self.last.append(NAN)
            self.ack.append(NAN)
            return
        if not self.kind:
            self.base = seq
        i = seq - self.base
        while len(self.kind) < i:  # a jump in numbering (a welcome's last_seq): fill the gap
            self._append(KIND_NONE, NAN)
        if i < 0 or i < len(self.kind):
            raise ValueError(f"seq {seq} recorded twice or out of order")
        self._append(kind, now - self.epoch)

    def _append(self, kind: int, t: float) -> None:
        self.kind.append(kind)
        self.created.append(t)
        self.first.append(NAN)
        self.last.append(NAN)
        self.ack.append(NAN)

    def sent(self, seq: int, now: float) -> None:
        i = seq - self.base
        t = now - self.epoch
        if self.first[i] != self.first[i]:  # NaN: first transmission
            self.first[i] = t
        self.last[i] = t

    def acked(self, seq: int, now: float) -> None:
        self.ack[seq - self.base] = now - self.epoch

    def renumbered(self, old: int, new: int) -> None:
        """The event ``old`` now lives under ``new`` (already added): move its times."""
        i, j = old - self.base, new - self.base
        self.created[j], self.first[j] = self.created[i], self.first[i]
        self.kind[i] = KIND_NONE

    def events(self) -> Iterable[tuple[int, int, float, float, float, float]]:
        """``(seq, kind, created, first, last, ack)`` for every event of ours."""
        b = self.base
        for i, k in enumerate(self.kind):
            if k:
                yield b + i, k, self.created[i], self.first[i], self.last[i], self.ack[i]


class Entry:
    """One event waiting in the outbox, with its encoding cached (it may be sent many times)."""

    __slots__ = ("batched", "body", "data", "retry_at", "sent_at", "seq")

    def __init__(self, seq: int, body: dict[str, Any]) -> None:
        self.seq = seq
        self.body = body
        self.data = orjson.dumps(body)
        self.sent_at = 0.0  # last transmission, 0 = never sent
        self.retry_at = 0.0
        self.batched = False  # last sent inside a batch of several (so a too_large can be split)


def pack(entries: list[Entry], max_batch: int, max_frame: int) -> list[bytes]:
    """Frames for ``entries`` in order: batches of at most ``max_batch`` items and ``max_frame``
    bytes; a group of one is sent as the bare event. An event too large for any batch goes alone."""
    frames: list[bytes] = []
    group: list[Entry] = []
    size = len(BATCH_HEAD) + len(BATCH_TAIL)
    for e in entries:
        grow = len(e.data) + (1 if group else 0)
        if group and (len(group) >= max_batch or size + grow > max_frame):
            frames.append(_frame(group))
            group, size = [], len(BATCH_HEAD) + len(BATCH_TAIL)
            grow = len(e.data)
        group.append(e)
        size += grow
    if group:
        frames.append(_frame(group))
    return frames


def _frame(group: list[Entry]) -> bytes:
    if len(group) == 1:
        group[0].batched = False
        return group[0].data
    for e in group:
        e.batched = True
    return BATCH_HEAD + b",".join([e.data for e in group]) + BATCH_TAIL


class Phone:
    """The driver app's outbox: numbering, buffering, acks, errors and (re)sending.

    Every event is kept until an ``ack`` names its seq or a final error (``invalid``,
    ``forbidden``) refuses it. After (re)connecting, the newest position goes first, alone,
    then the backlog in batches within the welcome's ``max_batch`` and ``max_frame``.
    ``reorder`` (a seeded Random) shuffles the backlog, as a flaky phone's storage might.
    """

    def __init__(
        self,
        driver: str,
        *,
        records: Records | None = None,
        resend_after_ms: float = RESEND_AFTER_MS,
        reorder: random.Random | None = None,
    ) -> None:
        self.driver = driver
        self.records = records
        self.resend_after = resend_after_ms
        self.reorder = reorder
        self.counter = 0  # highest seq this phone has used or seen stored
        self.outbox: dict[int, Entry] = {}
        self.due: dict[int, None] = {}  # an ordered set: what the next poll sends
        self.held: dict[int, float] = {}  # seq -> retry_at, after unavailable / rate_limited
        self.online = False
        self.max_frame = 65536
        self.max_batch = 300
        self.split = 1 << 30  # halved on each too_large for a batch
        self.clock_offset = 0.0
        self.next_sweep = 0.0
        self.acked = 0
        self.refused = 0
        self.errors: dict[str, int] = {}

    # --- inputs -------------------------------------------------------------------------
    def record(self, body: dict[str, Any], now: float) -> int:
        """Number a new event (``type`` and fields, no seq/ts), store it, queue it; return its seq."""
        self.counter = seq = self.counter + 1
        body["seq"] = seq
        body["ts"] = int(now + self.clock_offset)
        self.outbox[seq] = Entry(seq, body)
        self.due[seq] = None
        rec = self.records
        if rec is not None:
            rec.add(seq, KIND_POS if body["type"] == "pos" else KIND_SCAN, now)
        return seq

    def connected(self, welcome: dict[str, Any], now: float) -> None:
        """The server said ``welcome``: adopt its limits and numbering, queue everything unacked."""
        last_seq = int(welcome.get("last_seq") or 0)
        self.max_frame = int(welcome.get("max_frame") or self.max_frame)
        self.max_batch = int(welcome.get("max_batch") or self.max_batch)
        server_time = welcome.get("server_time")
        if isinstance(server_time, int | float):
            offset = server_time - now
            self.clock_offset = offset if abs(offset) > 2000 else 0.0  # ignore round-trip noise
        if last_seq > self.counter:
            # Our counter was lost (reinstall): events never sent may reuse stored seqs.
            stale = [s for s, e in self.outbox.items() if s <= last_seq and not e.sent_at]
            self.counter = last_seq
            for s in stale:
                self._renumber(s)
        self.online = True
        self.held.clear()
        self.due = dict.fromkeys(sorted(self.outbox))
        self.next_sweep = now + self.resend_after

    def disconnected(self) -> None:
        """The connection is gone: everything unacked waits for the next ``connected``."""
        self.online = False
        self.due.clear()
        self.held.clear()

    def receive(self, msg: dict[str, Any], now: float) -> None:
        """Handle one server frame (``ack``, ``error``, a refresh ``welcome``)."""
        kind = msg.get("type")
        if kind == "ack":
            for a, b in msg.get("ranges") or ():
                self._ack(int(a), int(b), now)
        elif kind == "error":
            self._error(msg, now)

    # --- output -------------------------------------------------------------------------
    def poll(self, now: float) -> list[bytes]:
        """The text frames to write now (possibly none); marks their events as sent at ``now``."""
        if not self.online:
            return []
        if self.held:
            for s in [s for s, t in self.held.items() if t <= now]:
                del self.held[s]
                if s in self.outbox:
                    self.due[s] = None
        if now >= self.next_sweep:
            self._sweep(now)
        if not self.due:
            return []
        out = self.outbox
        entries = [out[s] for s in self.due if s in out]
        self.due = {}
        if len(entries) == 1:  # the steady state: one new event, one frame
            entries[0].batched = False
            frames = [entries[0].data]
        else:
            newest, rest = self._order(entries)
            frames = pack(rest, min(self.max_batch, self.split), self.max_frame)
            if newest is not None:
                newest.batched = False
                frames.insert(0, newest.data)
        rec = self.records
        for e in entries:
            e.sent_at = now
            if rec is not None:
                rec.sent(e.seq, now)
        return frames

    @property
    def unacked(self) -> int:
        return len(self.outbox)

    # --- internals ----------------------------------------------------------------------
    def _order(self, entries: list[Entry]) -> tuple[Entry | None, list[Entry]]:
        """The newest position (sent first, alone), and the rest oldest first (or shuffled)."""
        newest: Entry | None = None
        for e in entries:
            if e.body["type"] == "pos" and (newest is None or e.seq > newest.seq):
                newest = e
        rest = [e for e in entries if e is not newest]
        rest.sort(key=_by_seq)
        if self.reorder is not None:
            self.reorder.shuffle(rest)
        return newest, rest

    def _ack(self, a: int, b: int, now: float) -> None:
        out, rec = self.outbox, self.records
        if b - a + 1 <= len(out):
            seqs: Iterable[int] = range(a, b + 1)
        else:
            seqs = [s for s in out if a <= s <= b]
        for s in seqs:
            if out.pop(s, None) is not None:
                self.acked += 1
                self.due.pop(s, None)
                self.held.pop(s, None)
                if rec is not None:
                    rec.acked(s, now)

    def _error(self, msg: dict[str, Any], now: float) -> None:
        code = str(msg.get("code"))
        self.errors[code] = self.errors.get(code, 0) + 1
        seqs = [s for s in _named_seqs(msg, self.outbox) if s in self.outbox]
        if code in FINAL_ERRORS:
            for s in seqs:
                self._drop(s, code)
        elif code == "conflict":
            for s in seqs:
                self._renumber(s)
        elif code in RETRY_ERRORS:
            retry = now + float(msg.get("retry_ms") or 1000)
            for s in seqs:
                self.due.pop(s, None)
                self.held[s] = retry
        elif code == "too_large":
            for s in seqs:
                if self.outbox[s].batched:
                    self.due[s] = None
                else:  # a single event over the limit can never be stored
                    self._drop(s, code)
            if any(self.outbox[s].batched for s in seqs if s in self.outbox):
                self.split = max(1, min(self.split, self.max_batch) // 2)

    def _drop(self, seq: int, code: str) -> None:
        self.outbox.pop(seq)
        self.due.pop(seq, None)
        self.held.pop(seq, None)
        self.refused += 1
        if self.records is not None:
            self.records.refused[seq] = code

    def _renumber(self, seq: int) -> None:
        """Move event ``seq`` above every seq known (ours and the server's) and queue it."""
        entry = self.outbox.pop(seq)
        self.due.pop(seq, None)
        self.held.pop(seq, None)
        self.counter += 1
        new = self.counter
        entry.body["seq"] = new
        fresh = Entry(new, entry.body)
        self.outbox[new] = fresh
        self.due[new] = None
        if self.records is not None:
            self.records.add(new, KIND_POS if entry.body["type"] == "pos" else KIND_SCAN, 0.0)
            self.records.renumbered(seq, new)

    def _sweep(self, now: float) -> None:
        """Queue again what was sent on this connection and is unanswered after ``resend_after``."""
        cutoff = now - self.resend_after
        for s, e in self.outbox.items():
            if e.sent_at and e.sent_at <= cutoff and s not in self.held:
                self.due[s] = None
        self.next_sweep = now + min(self.resend_after / 4, 5000.0)


def _by_seq(e: Entry) -> int:
    return e.seq


def _named_seqs(msg: dict[str, Any], outbox: dict[int, Entry]) -> list[int]:
    if "seq" in msg and msg["seq"] is not None:
        return [int(msg["seq"])]
    seqs: list[int] = []
    for a, b in msg.get("ranges") or ():
        a, b = int(a), int(b)
        if b - a + 1 <= len(outbox):
            seqs.extend(range(a, b + 1))
        else:
            seqs.extend(s for s in outbox if a <= s <= b)
    return seqs


# --- the asyncio side: many phones over real connections -----------------------------------

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
            if code in NO_RECONNECT:
                self.stopped = NO_RECONNECT[code]
                return
            if code == 4003:  # expired on an open connection: a fresh token, then reconnect
                self.token = fleet.token_for(self.index, self.name)
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
        hello = {"type": "hello", "token": self.token, "device": f"sim-{self.index:06d}", "app": "sim/1"}
        link.send(orjson.dumps(hello))
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
        msg = orjson.loads(payload)
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
        self.counts: dict[str, int] = {}
        self.epoch_ms = epoch_ms
        dwell = min(1.0, max(0.05, opts.duration / 600.0))
        self.phones: list[SimPhone] = []
        for i in indices:
            name = driver_name(i, opts.seed)
            model = DriverModel(i, org=opts.org, seed=opts.seed, dwell_scale=dwell, record_plans=opts.consign)
            rng = random.Random(f"reorder:{opts.seed}:{i}") if opts.flaky else None
            records = Records(epoch_ms)
            phone = Phone(driver_id(i), records=records, resend_after_ms=opts.resend_after * 1000, reorder=rng)
            self.phones.append(SimPhone(self, i, name, self.token_for(i, name), model, phone))
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
        open_bytes = 0
        for p in self.phones:
            acked += p.phone.acked
            refused += p.phone.refused
            unacked += len(p.phone.outbox)
            if p.link is not None:
                open_bytes += p.link.bytes_out
        return {
            "connected": self.connected,
            "started": self.started,
            "generated": self.generated,
            "acked": acked,
            "refused": refused,
            "unacked": unacked,
            "bytes_out": self.bytes_closed + open_bytes,
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
