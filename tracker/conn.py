"""`DriverConn`: one open driver connection, as the core sees it (the transport creates it)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Final

from .auth import Principal
from .protocol.acks import CumulativeAcks
from .protocol.bucket import TokenBucket
from .types import Channel

DriverKey = tuple[str, str]  # (org, sub): a driver everywhere
FIX_WINDOW: Final = 10  # the clock offset is estimated from this many of the connection's last fixes


@dataclass(eq=False, slots=True)
class DriverConn:
    """One open driver connection, as the core sees it. Slotted, its fix window a short list: at
    10,000 connections every byte counts ten thousand times (a deque's first block alone is 0.5 KB)."""

    principal: Principal
    channel: Channel
    conn_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    live_ts: int = 0  # the newest live ts fanned out for this driver
    # The highest seq accepted on this connection, from welcome's `last_seq` (the highest stored):
    # an event above it cannot name a stored event, so it may go live at receipt (ingest.py).
    seq_high: int = 0
    bucket: TokenBucket = field(default_factory=lambda: TokenBucket(1.0, 1, 0.0))
    stamp: bytes = b""  # client ids entitled to this driver's live frames (packages it holds)
    closed: bool = False
    welcomed: bool = False  # nothing but `welcome` may reach the phone before `welcome`
    # The order in which the broker registered the driver's connections (Broker.drivers_online):
    # the highest is the newest, on whichever instance. None until the broker answered.
    gen: int | None = None
    # received - ts of the connection's last fixes (ms): network delay only adds to the phone's
    # clock offset, so their minimum is the best bound on it (PROTOCOL.md, "Phones' clocks").
    fix_gaps: list[int] = field(default_factory=list, repr=False)
    # Cumulative acks (the phone asked for them in hello): the session's ledger; ingest writes its
    # frame at most `delay_ms` after a commit (`ack_due` is that pending timer). None: one ack per commit.
    acks: CumulativeAcks | None = None
    ack_due: object = None

    @property
    def key(self) -> DriverKey:
        return self.principal.key

    def observe_fix(self, ts: int, received: int) -> None:
        """A position received on this connection: one more sample of the phone's clock offset."""
        gaps = self.fix_gaps
        gaps.append(received - ts)
        if len(gaps) > FIX_WINDOW:
            del gaps[0]

    def clock_offset(self) -> int | None:
        """What to add to this phone's `ts` to get the server's clock (network delay included, so
        an upper bound): the minimum of received - ts over its last fixes; None before any fix."""
        return min(self.fix_gaps) if self.fix_gaps else None
