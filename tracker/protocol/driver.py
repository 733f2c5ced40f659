"""A driver connection's protocol (docs/PROTOCOL.md, "Driver connection"). Sans-I/O.

`receive(data, now_ms, now_s)` validates a frame and returns the events to store; refusals,
`welcome` and refresh answers accumulate in `data_to_send()`, a close in `close_code`. The rate
limit is the driver's token bucket (it belongs to the driver, not the connection, so the
transport hands over the registry's bucket at `welcome`). Acks are not decided here: they follow
the commit (tracker.ingest).
"""

from __future__ import annotations

from typing import Any

from ..auth import TokenVerifier
from . import frames
from .bucket import TokenBucket
from .events import Event, Refusal, check_event
from .frames import ProtocolError
from .session import Session, State


class DriverSession(Session):
    ROLES = ("driver",)

    def __init__(self, verifier: TokenVerifier, *, max_frame: int, max_batch: int, leeway_s: float) -> None:
        super().__init__(verifier, max_frame=max_frame, leeway_s=leeway_s)
        self.max_batch = max_batch
        self.bucket: TokenBucket | None = None
        self.refused: list[str] = []  # codes of refused events since the caller last cleared it

    def welcome(self, last_seq: int, now_ms: int, bucket: TokenBucket) -> None:
        """Open the session: `welcome` is the first frame the phone receives."""
        assert self.principal is not None
        self.bucket = bucket
        self.state = State.OPEN
        self.send(self._welcome(now_ms, last_seq=last_seq))

    def _welcome(self, now_ms: int, **extra: Any) -> bytes:
        assert self.principal is not None
        return frames.encode(
            {
                "type": "welcome",
                "driver": self.principal.sub,
                **extra,
                "server_time": now_ms,
                "max_frame": self.max_frame,
                "max_batch": self.max_batch,
            }
        )

    def receive(self, data: str | bytes, now_ms: int, now_s: float) -> list[Event]:
        """One frame after `welcome`: the events accepted for storage, in order. Never raises
        ProtocolError (it becomes an `error` frame and a close); any other exception is a bug."""
        if self.state is not State.OPEN:
            return []
        try:
            if len(data) > self.max_frame:
                raise ProtocolError("frame too large", close_code=1009)
            obj = frames.decode(data)
            kind = obj["type"]
            if kind == "pos" or kind == "scan":
                return self._events((obj,), now_ms, now_s)
            if kind == "batch":
                return self._batch(obj, now_ms, now_s)
            if kind == "refresh":
                if self.refresh(obj) is not None:
                    self.send(self._welcome(now_ms, refreshed=True))
                return []
            raise ProtocolError(f"unknown frame type {kind!r}")
        except ProtocolError as exc:
            self.protocol_error(exc)
            return []

    def _batch(self, obj: dict[str, Any], now_ms: int, now_s: float) -> list[Event]:
        items = obj.get("items")
        if type(items) is not list:
            self.send(frames.error("invalid", "batch: items must be an array"))
            return []
        if len(items) > self.max_batch:
            seqs = [s for it in items if type(it) is dict and type(s := it.get("seq")) is int]
            self.send(frames.error("too_large", f"a batch carries at most {self.max_batch} items", seqs=seqs))
            return []
        return self._events(items, now_ms, now_s)

    def _events(self, items: Any, now_ms: int, now_s: float) -> list[Event]:
        bucket = self.bucket
        assert bucket is not None
        accepted: list[Event] = []
        for obj in items:
            ev = check_event(obj, now_ms)
            if type(ev) is Refusal:
                self.refused.append(ev.code)
                self.send(frames.error(ev.code, ev.message, seq=ev.seq))
            elif bucket.take(now_s) > 0.0:
                self.refused.append("rate_limited")
                retry_ms = int(1000 / bucket.rate) + 1
                self.send(frames.error("rate_limited", "over the per-driver event rate", seq=ev.seq, retry_ms=retry_ms))  # type: ignore[union-attr]
            else:
                accepted.append(ev)  # type: ignore[arg-type]
        return accepted
