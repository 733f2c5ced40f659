"""The simulated phone's outbox entries and how JSON frames are packed from them (tracker.sim.phone)."""

from __future__ import annotations

from typing import Any

import orjson

BATCH_HEAD = b'{"type":"batch","items":['
BATCH_TAIL = b"]}"


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
