"""A dashboard connection's protocol (docs/PROTOCOL.md, "Dashboard connection"). Sans-I/O.

A `subscribe` costs a snapshot (PostgreSQL and Redis reads), so a dashboard gets at most `rate`
of them a second after a burst of `burst`; a faster subscribe waits for its turn and the newest
waiting one wins (older waiting ones get no snapshot of their own). The transport asks
`next_subscribe(now)` after every frame and when the wait it was told has passed.
"""

from __future__ import annotations

from typing import Any

from ..auth import TokenVerifier
from . import frames
from .bucket import TokenBucket
from .frames import ProtocolError
from .session import Session, State
from .subscribe import Filter, parse_subscribe


class ViewerSession(Session):
    ROLES = ("dispatcher", "client")

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        max_frame: int,
        leeway_s: float,
        subscribe_rate: float,
        subscribe_burst: int,
        max_ids: int,
        now_s: float,
    ) -> None:
        super().__init__(verifier, max_frame=max_frame, leeway_s=leeway_s)
        self.bucket = TokenBucket(subscribe_rate, subscribe_burst, now_s)
        self.max_ids = max_ids
        self.waiting: Filter | None = None  # the newest subscribe not applied yet

    def welcome(self, *, refreshed: bool = False) -> None:
        p = self.principal
        assert p is not None
        self.state = State.OPEN
        frame: dict[str, Any] = {"type": "welcome", "role": p.role, "org": p.org}
        if p.client:
            frame["client"] = p.client
        if refreshed:
            frame["refreshed"] = True
        self.send(frames.encode(frame))

    def receive(self, data: str | bytes) -> None:
        """One frame after `welcome`. ProtocolError becomes an `error` frame and a close."""
        if self.state is not State.OPEN:
            return
        try:
            if len(data) > self.max_frame:
                raise ProtocolError("frame too large", close_code=1009)
            obj = frames.decode(data)
            kind = obj["type"]
            if kind == "subscribe":
                self.waiting = parse_subscribe(obj, max_ids=self.max_ids)
            elif kind == "refresh":
                if self.refresh(obj) is not None:
                    self.welcome(refreshed=True)
            else:
                raise ProtocolError(f"unknown frame type {kind!r}")
        except ProtocolError as exc:
            self.protocol_error(exc)

    def next_subscribe(self, now_s: float) -> Filter | float | None:
        """The subscription to apply now (a Filter), the seconds to wait before asking again (a
        float), or None when no subscribe is waiting."""
        if self.waiting is None or self.state is not State.OPEN:
            return None
        wait = self.bucket.take(now_s)
        if wait > 0.0:
            return wait
        flt, self.waiting = self.waiting, None
        return flt
