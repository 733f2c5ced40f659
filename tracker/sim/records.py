"""Per-event times of one simulated driver, kept compact for millions of events.

Written by the :class:`~tracker.sim.phone.Phone` as events are created, sent and
acknowledged; read by the report for loss and latency. Pure, like the phone.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable

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
