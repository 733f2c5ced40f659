"""A driver connection's protocol (docs/PROTOCOL.md, "Driver connection"). Sans-I/O.

`receive(data, now_ms, now_s)` validates a frame and returns the events to store; refusals,
`welcome` and refresh answers accumulate in `data_to_send()`, a close in `close_code`. The rate
limit is the driver's token bucket (it belongs to the driver, not the connection, so the
transport hands over the registry's bucket at `welcome`). Acks are not decided here: they follow
the commit (tracker.ingest).
"""

from __future__ import annotations

import base64
import time
from typing import Any

from ..auth import AuthError, Principal, TokenVerifier
from . import compact, compact2, compact_live, frames, resume
from .acks import CumulativeAcks
from .bucket import TokenBucket
from .events import SEQ_MAX, Event, Refusal, check_event
from .frames import ProtocolError
from .session import Session, State

ENCODINGS = (compact2.NAME, compact.NAME)  # the binary encodings a driver connection may use, preferred first


class DriverSession(Session):
    ROLES = ("driver",)

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        max_frame: int,
        max_batch: int,
        leeway_s: float,
        ack_delay_ms: int = 1000,
        resume_tokens: resume.ResumeTokens | None = None,
    ) -> None:
        super().__init__(verifier, max_frame=max_frame, leeway_s=leeway_s)
        self.resume_tokens = resume_tokens  # None: resumption is off on this server
        self.resume_asked = False  # the phone asked for resume tokens (or resumed with one)
        self.resumed_until = 0  # a resumed session: its token's expiry (seconds); 0: a JWT hello
        self.max_batch = max_batch
        self.ack_delay_ms = ack_delay_ms
        self.bucket: TokenBucket | None = None
        self.refused: list[str] = []  # codes of refused events since the caller last cleared it
        self.encoding = "json"  # what binary frames carry: "json" (none accepted), compact-1 or compact-2
        self.encodings_asked = False  # the phone's hello listed `encodings`: welcome names the choice
        self.cumulative = False  # the phone's hello asked for cumulative acks (`"acks":"cumulative"` or "compact")
        self.binary_acks = False  # ... as compact (binary) acks: `"acks":"compact"` and a compact encoding
        self.acks: CumulativeAcks | None = None  # their ledger, from `welcome` on
        self._live: compact_live.LiveContext | None = None  # made on the first compact live frame

    @property
    def live(self) -> compact_live.LiveContext:
        """The connection's compact live frames so far (most connections never send one)."""
        if self._live is None:
            self._live = compact_live.LiveContext()
        return self._live

    def welcome(self, last_seq: int, now_ms: int, bucket: TokenBucket) -> None:
        """Open the session: `welcome` is the first frame the phone receives."""
        assert self.principal is not None
        self.bucket = bucket
        self.state = State.OPEN
        if self.cumulative:
            self.acks = CumulativeAcks(last_seq, self.ack_delay_ms, binary=self.binary_acks)
        if self.resumed_until:
            self.send(self._binary_welcome(last_seq, now_ms))
        else:
            self.send(self._welcome(now_ms, last_seq=last_seq))

    def _binary_welcome(self, last_seq: int, now_ms: int) -> bytes:
        """The answer to a resume hello; a new token only when it would live at least half a ttl
        longer than the old one (never while both end at the JWT's expiry: that would gain nothing)."""
        assert self.principal is not None and self.resume_tokens is not None
        now_s = now_ms / 1000
        token = b""
        ttl = self.resume_tokens.ttl_s
        if min(now_s + ttl, self.principal.exp) - self.resumed_until >= ttl / 2:
            token = self.resume_tokens.issue(self.principal, self.encoding, self._acks_name(), now_s)
        return resume.welcome_frame(
            last_seq=last_seq,
            server_time=now_ms,
            max_frame=self.max_frame,
            max_batch=self.max_batch,
            ack_delay_ms=self.ack_delay_ms,
            encoding=self.encoding,
            acks=self._acks_name(),
            token=token,
        )

    def _resume_field(self, now_ms: int) -> dict[str, str]:
        if not self.resume_asked or self.resume_tokens is None:
            return {}
        assert self.principal is not None
        token = self.resume_tokens.issue(self.principal, self.encoding, self._acks_name(), now_ms / 1000)
        return {"resume": base64.urlsafe_b64encode(token).rstrip(b"=").decode()}

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
                **({"encoding": self.encoding} if self.encodings_asked else {}),
                **({"acks": self._acks_name(), "ack_delay_ms": self.ack_delay_ms} if self.cumulative else {}),
                **self._resume_field(now_ms),
            }
        )

    def receive_hello(
        self, data: str | bytes, *, bearer: str | None = None, binary: bool = False, now_s: float | None = None
    ) -> Principal | None:
        """`hello`, plus the encoding: compact-2, else compact-1, when the phone lists it in `encodings`. A malformed
        `encodings` is a `protocol` error (1008). `"acks":"cumulative"` asks for cumulative acks, `"resume":true`
        for resume tokens. A binary first frame (`binary`) must be a resume hello (0xA3 + token), else 1003."""
        if binary:
            return self._resume(bytes(data) if isinstance(data, bytes) else data.encode(), now_s)
        principal = super().receive_hello(data, bearer=bearer)
        if principal is None:
            return None
        hello = frames.decode(data)  # decoded once already: cannot fail
        self.resume_asked = hello.get("resume") is True
        self.cumulative = hello.get("acks") in ("cumulative", "compact")
        asked = hello.get("encodings")
        if asked is None:
            return principal
        if type(asked) is not list or len(asked) > 16 or any(type(e) is not str for e in asked):
            self.principal = None
            self.protocol_error(ProtocolError("hello: encodings must be an array of at most 16 strings"))
            return None
        self.encodings_asked = True
        self.encoding = next((e for e in ENCODINGS if e in asked), "json")
        self.binary_acks = hello.get("acks") == "compact" and self.encoding != "json"
        return principal

    def _resume(self, data: bytes, now_s: float | None) -> Principal | None:
        """A resume hello: the token's driver, encoding and acks, with no JWT (docs/PROTOCOL.md)."""
        if data[:1] != bytes((resume.HELLO,)):
            self.fail(1003, "binary frames are not accepted")
            return None
        try:
            if self.resume_tokens is None:
                raise AuthError("resume: not enabled on this server, send your JWT")
            now = time.time() if now_s is None else now_s
            principal, encoding, acks, until = self.resume_tokens.verify(data[1:], now)
        except AuthError as exc:
            self.send(frames.error("unauthorized", str(exc)))
            self.fail(4000, "unauthorized")
            return None
        self.principal = principal
        self.encoding, self.encodings_asked = encoding, True
        self.cumulative, self.binary_acks = acks != "per-commit", acks == "compact"
        self.resume_asked, self.resumed_until = True, until
        return principal

    def _acks_name(self) -> str:
        if not self.cumulative:
            return "per-commit"
        return "compact" if self.binary_acks else "cumulative"

    def receive_binary(self, data: bytes, now_ms: int, now_s: float) -> list[Event]:
        """One binary frame after `welcome`: a compact batch or live frame where compact-1 or
        compact-2 was negotiated (the events accepted for storage, in order), else close 1003.
        compact-2 includes compact-1's frames. Never raises ProtocolError."""
        if self.state is not State.OPEN:
            return []
        if self.encoding == "json":
            self.fail(1003, "binary frames are not accepted")
            return []
        try:
            if len(data) > self.max_frame:
                raise ProtocolError("frame too large", close_code=1009)
            if data[:1] == b"\xc2":
                return self._events((self.live.decode(data),), now_ms, now_s)
            if data[:1] == b"\xc3" and self.encoding == compact2.NAME:
                items = compact2.decode(data, self.max_batch)
            else:
                items = compact.decode(data, self.max_batch)
        except ProtocolError as exc:
            self.protocol_error(exc)
            return []
        except compact.TooLarge as exc:
            seqs = [s for s in exc.seqs if 1 <= s < SEQ_MAX]
            self.send(frames.error("too_large", f"a batch carries at most {self.max_batch} items", seqs=seqs))
            return []
        return self._events(items, now_ms, now_s)

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
                if self.acks is not None and ev.seq is not None and ev.code == "invalid":
                    self.acks.refused(ev.seq)  # final: `through` may pass it
            elif bucket.take(now_s) > 0.0:
                self.refused.append("rate_limited")
                retry_ms = int(1000 / bucket.rate) + 1
                self.send(frames.error("rate_limited", "over the per-driver event rate", seq=ev.seq, retry_ms=retry_ms))  # type: ignore[union-attr]
            else:
                accepted.append(ev)  # type: ignore[arg-type]
        return accepted
