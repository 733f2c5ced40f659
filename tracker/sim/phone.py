"""A simulated driver app: the outbox and acknowledgement bookkeeping of PROTOCOL.md.

:class:`Phone` is sans-I/O: events, the connection's life and the server's frames go in;
the text frames to write come out of :meth:`Phone.poll`. It never reads the clock (every
call takes ``now``, wall-clock milliseconds) and never touches a socket, so every rule of
the protocol is unit-tested without an event loop. :mod:`tracker.sim.fleet` is the thin
asyncio side that drives thousands of phones over real links.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from tracker.protocol import compact, compact2
from tracker.protocol.acks import decode_binary
from tracker.protocol.compact_live import LiveContext
from tracker.sim.entries import BATCH_HEAD, BATCH_TAIL, Entry, pack
from tracker.sim.records import KIND_POS, KIND_SCAN, Records

__all__ = ["BATCH_HEAD", "BATCH_TAIL", "Entry", "Phone", "pack"]

RESEND_AFTER_MS = 60_000.0  # PROTOCOL.md: resend on the same connection after 60 s without an answer
FINAL_ERRORS = frozenset({"invalid", "forbidden"})
RETRY_ERRORS = frozenset({"unavailable", "rate_limited"})


class Phone:
    """The driver app's outbox: numbering, buffering, acks, errors and (re)sending.

    Every event is kept until an ``ack`` names its seq or a final error (``invalid``,
    ``forbidden``) refuses it. After (re)connecting, the newest position goes first, alone,
    then the backlog in batches within the welcome's ``max_batch`` and ``max_frame``.
    ``reorder`` (a seeded Random) shuffles the backlog, as a flaky phone's storage might.

    ``encoding="compact"`` asks for compact-1 in ``hello`` (:meth:`hello_fields`): once welcomed
    with it, a lone position goes as a compact live frame and a backlog's positions as compact
    batches (scans stay JSON); ``acks`` asks for cumulative acks (``through``), in JSON or compact.
    ``encoding="compact2"`` asks for compact-2 first: a backlog (positions and scans) then goes in
    compact-2 batches, oldest first, and a lone position still as a compact live frame.
    """

    def __init__(
        self,
        driver: str,
        *,
        records: Records | None = None,
        resend_after_ms: float = RESEND_AFTER_MS,
        reorder: random.Random | None = None,
        encoding: str = "json",
        acks: str = "per-commit",
    ) -> None:
        self.driver = driver
        self.encoding = encoding
        self.acks = acks  # per-commit (v1), cumulative (JSON `through`), compact (binary, with compact-1)
        self.compact = False  # the welcome said compact-1 or compact-2
        self.compact2 = False  # ... compact-2
        self.live = LiveContext()
        self.base = 0  # the welcome's last_seq: cumulative acks speak of seqs above it
        self.positions = 0
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
        if body["type"] == "pos":
            self.positions += 1
        body["seq"] = seq
        body["ts"] = int(now + self.clock_offset)
        self.outbox[seq] = Entry(seq, body)
        self.due[seq] = None
        rec = self.records
        if rec is not None:
            rec.add(seq, KIND_POS if body["type"] == "pos" else KIND_SCAN, now)
        return seq

    def hello_fields(self, *, resume: bool = False) -> dict[str, Any]:
        """What ``hello`` carries beyond the token for this phone's encoding and acks (and a
        request for a resume token)."""
        fields: dict[str, Any] = {"resume": True} if resume else {}
        if self.encoding == "compact":
            fields["encodings"] = [compact.NAME, "json"]
        elif self.encoding == "compact2":
            fields["encodings"] = [compact2.NAME, compact.NAME, "json"]
        if self.acks != "per-commit":
            fields["acks"] = self.acks
        return fields

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
        self.compact = welcome.get("encoding") in (compact.NAME, compact2.NAME)
        self.compact2 = welcome.get("encoding") == compact2.NAME
        self.live = LiveContext()  # a new connection: the live context starts empty
        self.base = last_seq
        self.held.clear()
        self.due = dict.fromkeys(sorted(self.outbox))
        self.next_sweep = now + self.resend_after

    def disconnected(self) -> None:
        """The connection is gone: everything unacked waits for the next ``connected``."""
        self.online = False
        self.due.clear()
        self.held.clear()

    def receive_binary(self, data: bytes, now: float) -> None:
        """Handle a compact ack (the only binary frame a server sends)."""
        self.receive(decode_binary(data, self.base), now)

    def receive(self, msg: dict[str, Any], now: float) -> None:
        """Handle one server frame (``ack``, ``error``, a refresh ``welcome``)."""
        kind = msg.get("type")
        if kind == "ack":
            through = msg.get("through")
            if through is not None and int(through) > self.base:
                self._ack(self.base + 1, int(through), now)
            for a, b in msg.get("ranges") or ():
                self._ack(int(a), int(b), now)
        elif kind == "error":
            self._error(msg, now)

    # --- output -------------------------------------------------------------------------
    def poll(self, now: float) -> list[bytes]:
        """The text frames to write now (possibly none); marks their events as sent at ``now``."""
        if not self.online:
            return []
        self.poll_due(now)
        if not self.due:
            return []
        out = self.outbox
        entries = [out[s] for s in self.due if s in out]
        self.due = {}
        if self.compact:
            frames = self._compact_frames(entries)
        elif len(entries) == 1:  # the steady state: one new event, one frame
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

    def uploads(self, now: float) -> list[tuple[bytes, str]]:
        """The bodies of ``POST /v1/driver/events`` for what is due (at most ``max_batch`` events
        each; the rest stays due) with their content types: a compact phone's positions in a
        compact-1 body and its scans in a JSON one after it, else one JSON body."""
        if not self.online:
            return []
        self.poll_due(now)
        out = self.outbox
        entries = [out[s] for s in list(self.due) if s in out][: min(self.max_batch, self.split)]
        for e in entries:
            self.due.pop(e.seq, None)
            e.sent_at, e.batched = now, len(entries) > 1
            if self.records is not None:
                self.records.sent(e.seq, now)
        if not entries:
            return []
        if self.encoding == "compact2":
            return [(compact2.encode([e.body for e in entries]), compact2.CONTENT_TYPE)]
        if self.encoding != "compact":
            return [(_events_body(entries), "application/json")]
        positions = [e for e in entries if e.body["type"] == "pos"]
        scans = [e for e in entries if e.body["type"] != "pos"]
        bodies = [(compact.encode([e.body for e in positions]), compact.CONTENT_TYPE)] if positions else []
        return bodies + ([(_events_body(scans), "application/json")] if scans else [])

    def answered(self, answer: dict[str, Any], now: float) -> None:
        """The answer to an upload: ``ranges`` stored, ``errors`` per event, ``last_seq``."""
        for a, b in answer.get("ranges") or ():
            self._ack(int(a), int(b), now)
        for error in answer.get("errors") or ():
            self._error(error, now)

    def poll_due(self, now: float) -> None:
        """Queue what is due again: held events whose retry time came, unanswered ones (sweep)."""
        if self.held:
            for s in [s for s, t in self.held.items() if t <= now]:
                del self.held[s]
                if s in self.outbox:
                    self.due[s] = None
        if now >= self.next_sweep:
            self._sweep(now)

    @property
    def unacked(self) -> int:
        return len(self.outbox)

    # --- internals ----------------------------------------------------------------------
    def _compact_frames(self, entries: list[Entry]) -> list[bytes]:
        """compact-1: the newest position as a live frame, the other positions as compact batches,
        scans as JSON. compact-2: a lone position as a live frame, anything else in compact-2
        batches in seq order (a batch is stored in one commit: no newest-first split is needed)."""
        if self.compact2 and not (len(entries) == 1 and entries[0].body["type"] == "pos"):
            return self._compact2_frames(entries)
        newest, rest = self._order(entries) if len(entries) > 1 else (None, entries)
        if newest is None and len(rest) == 1 and rest[0].body["type"] == "pos":
            newest, rest = rest[0], []
        frames: list[bytes] = []
        if newest is not None:
            newest.batched = False
            frames.append(self.live.encode(newest.body))
        positions = [e for e in rest if e.body["type"] == "pos"]
        size = min(self.max_batch, self.split, max(1, self.max_frame // 64))
        for i in range(0, len(positions), size):
            group = positions[i : i + size]
            for e in group:
                e.batched = len(group) > 1
            frames.append(compact.encode([e.body for e in group]))
        scans = [e for e in rest if e.body["type"] != "pos"]
        if scans:
            frames.extend(pack(scans, min(self.max_batch, self.split), self.max_frame))
        return frames

    def _compact2_frames(self, entries: list[Entry]) -> list[bytes]:
        rest = sorted(entries, key=_by_seq)
        if self.reorder is not None:
            self.reorder.shuffle(rest)
        size = min(self.max_batch, self.split, max(1, self.max_frame // 64))
        frames: list[bytes] = []
        for i in range(0, len(rest), size):
            group = rest[i : i + size]
            for e in group:
                e.batched = len(group) > 1
            frames.append(compact2.encode([e.body for e in group]))
        return frames

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


def _events_body(entries: list[Entry]) -> bytes:
    return b'{"events":[' + b",".join([e.data for e in entries]) + b"]}"


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
