"""Ingest: accepted events of one event-loop tick go to the writer and the broker together; acks
go out after the commit.

Every driver frame handled in one loop iteration lands in `_pending`; one callback at the end of
the iteration hands them all to the writer (one buffer append) and to the broker (one pipelined
round trip). After a commit, one `ack` frame per driver connection, written without awaiting the
phone; refusals as `error` frames (`unavailable` ones merged into ranges).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from . import metrics
from .broker import Broker, LiveItem
from .clock import now_ms
from .conn import DriverConn
from .drivers import Drivers
from .extension import Extension
from .protocol import frames
from .protocol.events import Event, Position, Scan, live_ts
from .protocol.live import pos_frame, scan_frame
from .store import Pending


class Ingest:
    def __init__(self, drivers: Drivers, broker: Broker, extension: Extension) -> None:
        self.drivers = drivers
        self.broker = broker
        self.extension = extension
        self.writer_submit = _no_writer
        self.draining = False
        self._pending: list[Pending] = []
        self._live: dict[str, list[LiveItem]] = {}
        self._tick_handle: asyncio.Handle | None = None

    def submit(self, conn: DriverConn, events: Sequence[Event], received: int) -> None:
        """Queue one frame's accepted events for this tick. Never awaits.

        Only stored events may be shown. An event whose seq is above every seq this connection has
        seen (starting from welcome's `last_seq`, the highest stored) cannot name a stored event,
        so it may go live at receipt: a position if it becomes the driver's newest (by live ts), a
        scan unless the extension publishes scans after their commit. Any other event (a resend,
        or a different event under a taken seq: `conflict`) is `deferred`: it goes live only once
        stored (`answered`), and a position only if it is still the newest."""
        if self.draining:
            for ev in events:
                conn.channel.write(frames.error("unavailable", "the instance is restarting", seq=ev.seq, retry_ms=1000))
            return
        p = conn.principal
        org, sub = p.org, p.sub
        pending = self._pending
        live: list[LiveItem] | None = None
        for ev in events:
            fresh = ev.seq > conn.seq_high
            if fresh:
                conn.seq_high = ev.seq
            pending.append(Pending(conn, org, sub, ev, received, not fresh))
            if type(ev) is Position:
                conn.observe_fix(ev.ts, received)
                lts = live_ts(ev.ts, received)
                if fresh and lts > conn.live_ts:
                    conn.live_ts = lts
                    if live is None:
                        live = self._live.setdefault(org, [])
                    live.append(("p", sub, lts, conn.stamp, pos_frame(sub, ev)))
            else:
                scan: Scan = ev  # type: ignore[assignment]
                self.extension.scan_received(conn, scan)
                pending[-1].offset_ms = conn.clock_offset()
                pending[-1].seal = self.extension.seal(pending[-1])  # last: it covers the row as stored
                if fresh and not self.extension.fans_out_scans:
                    if live is None:
                        live = self._live.setdefault(org, [])
                    live.append(("a", sub, scan.ts, conn.stamp, scan_frame(sub, scan)))
        self._schedule()

    def publish(self, org: str, item: LiveItem) -> None:
        """Queue a live frame of another kind (package change, alert) for this tick."""
        self._live.setdefault(org, []).append(item)
        self._schedule()

    def _schedule(self) -> None:
        if self._tick_handle is None and (self._pending or self._live):
            self._tick_handle = asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        pending, self._pending = self._pending, []
        live, self._live = self._live, {}
        if pending:
            scans = sum(1 for it in pending if type(it.event) is Scan)
            metrics.POSITIONS_RECEIVED.inc(len(pending) - scans)
            metrics.SCANS_RECEIVED.inc(scans)
            rejected = self.writer_submit(pending)
            if rejected:
                metrics.EVENTS_REFUSED.labels("unavailable").inc(len(rejected))
                self.answered([], [(it, "unavailable", "the write buffer is full; resend later") for it in rejected])
        for org, items in live.items():
            self.broker.publish(org, items)

    def answered(self, stored: list[Pending], refused: list[tuple[Pending, str, str]]) -> None:
        """After a commit: one ack per driver connection; errors for what was refused."""
        # Grouped by the connection answered: events of a replaced connection are acked, in the
        # same frame, to the connection that replaced it.
        current = self.drivers.current
        acks: dict[DriverConn | None, list[int]] = {}
        oldest: dict[DriverConn | None, int] = {}
        for it in stored:
            target = current(it.owner)
            if it.deferred:
                self._stored_live(it, target)
            seqs = acks.get(target)
            if seqs is None:
                acks[target] = [it.event.seq]
                oldest[target] = it.received_at
            else:
                seqs.append(it.event.seq)
                oldest[target] = min(oldest[target], it.received_at)
        if self.extension.fans_out_scans:
            scans = [it for it in stored if type(it.event) is Scan]
            if scans:
                self.extension.scans_stored(scans)
        now = now_ms()
        for target, seqs in acks.items():
            if target is None or not target.welcomed:
                continue
            # Receipt to commit: a coalesced ack's deliberate delay (<= 1 s) is not the service's latency.
            metrics.ACK_SECONDS.observe((now - oldest[target]) / 1000)
            ledger = target.acks
            if ledger is None:
                target.channel.write(frames.ack(seqs))
                continue
            for seq in seqs:
                ledger.stored(seq)
            if target.ack_due is None:  # coalesced: one frame per ack delay (PROTOCOL.md, "Cumulative acks")
                target.ack_due = asyncio.get_running_loop().call_later(ledger.delay_ms / 1000, _write_ack, target)
        unavailable: dict[DriverConn, list[int]] = {}
        for it, code, message in refused:  # a coalesced ack (written later) may pass what they name
            target = current(it.owner)
            if target is None or not target.welcomed:
                continue
            if code == "unavailable":
                unavailable.setdefault(target, []).append(it.event.seq)
            else:
                target.channel.write(frames.error(code, message, seq=it.event.seq))
                if target.acks is not None and code in ("invalid", "conflict"):
                    target.acks.refused(it.event.seq)
        for target, seqs in unavailable.items():
            target.channel.write(
                frames.error("unavailable", "cannot store now; resend later", seqs=seqs, retry_ms=2000)
            )

    def _stored_live(self, it: Pending, target: DriverConn | None) -> None:
        """A deferred event is stored: it goes live now (a position only if still the newest)."""
        ev = it.event
        if type(ev) is Position:
            lts = live_ts(ev.ts, it.received_at)
            if target is not None and lts > target.live_ts:
                target.live_ts = lts
                self.publish(it.org, ("p", it.driver, lts, target.stamp, pos_frame(it.driver, ev)))
        elif not self.extension.fans_out_scans:
            conn: DriverConn = target if target is not None else it.owner
            self.publish(it.org, ("a", it.driver, ev.ts, conn.stamp, scan_frame(it.driver, ev)))  # type: ignore[arg-type]


def _write_ack(conn: DriverConn) -> None:
    """A coalesced ack is due: everything stored for `conn` since its last ack, in one frame."""
    conn.ack_due = None
    frame = conn.acks.frame() if conn.acks is not None else None
    if frame is not None:
        conn.channel.write(frame)


def _no_writer(items: list[Pending]) -> list[Pending]:
    return items
