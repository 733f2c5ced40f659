"""`DriverConn`: one open driver connection, as the core sees it (the transport creates it)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .auth import Principal
from .protocol.bucket import TokenBucket
from .types import Channel

DriverKey = tuple[str, str]  # (org, sub): a driver everywhere


@dataclass(eq=False)
class DriverConn:
    """One open driver connection, as the core sees it."""

    principal: Principal
    channel: Channel
    conn_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    live_ts: int = 0  # the newest live ts fanned out for this driver
    bucket: TokenBucket = field(default_factory=lambda: TokenBucket(1.0, 1, 0.0))
    stamp: bytes = b""  # client ids entitled to this driver's live frames (packages it holds)
    closed: bool = False
    welcomed: bool = False  # nothing but `welcome` may reach the phone before `welcome`

    @property
    def key(self) -> DriverKey:
        return self.principal.key
