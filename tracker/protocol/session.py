"""What driver and dashboard sessions share: `hello`, `refresh`, the token's expiry, the outbox.

Sans-I/O, in the style of python-websockets' `protocol.py`: frames (bytes) and the current time go
in; frames to send (`data_to_send()`) and a close to perform (`close_code`) come out. Nothing here
awaits, reads a socket or starts a timer; `tracker.transport` moves the bytes and keeps the timers.
"""

from __future__ import annotations

import enum
from typing import Any

from ..auth import AuthError, Principal, TokenVerifier
from . import frames
from .frames import ProtocolError


class State(enum.Enum):
    HELLO = "hello"  # waiting for the first frame
    OPEN = "open"  # authenticated (for a driver: welcomed)
    CLOSED = "closed"  # a close was decided: nothing more is sent but the close itself


class Session:
    """A connection's protocol state. Subclasses name the roles that may connect."""

    ROLES: tuple[str, ...] = ()

    def __init__(self, verifier: TokenVerifier, *, max_frame: int, leeway_s: float) -> None:
        self.verifier = verifier
        self.max_frame = max_frame
        self.leeway_s = leeway_s
        self.state = State.HELLO
        self.principal: Principal | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._out: list[bytes] = []

    # -- output ---------------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Frames to write, in order; each call returns what accumulated since the last one."""
        out, self._out = self._out, []
        return out

    def send(self, frame: bytes) -> None:
        if self.state is not State.CLOSED:
            self._out.append(frame)

    def fail(self, code: int, reason: str) -> None:
        """Decide to close with `code`; what was queued before still goes out first."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_code, self.close_reason = code, reason[:100]

    def protocol_error(self, exc: ProtocolError) -> None:
        self.send(frames.error("protocol", str(exc)))
        self.fail(exc.close_code, str(exc))

    # -- hello, refresh, expiry -----------------------------------------------------------------

    def receive_hello(self, data: str | bytes, *, bearer: str | None = None) -> Principal | None:
        """The first frame. Returns the principal, or None with the close decided (1008 for a
        frame that is not `hello`, 4000 for a token that is refused)."""
        try:
            if len(data) > self.max_frame:
                raise ProtocolError("frame too large", close_code=1009)
            obj = frames.decode(data)
            if obj["type"] != "hello":
                raise ProtocolError("the first frame must be hello")
        except ProtocolError as exc:
            self.protocol_error(exc)
            return None
        try:
            principal = self.verifier.verify(obj.get("token") or bearer)
            if principal.role not in self.ROLES:
                raise AuthError(f"role {principal.role} cannot use this endpoint")
        except AuthError as exc:
            self.send(frames.error("unauthorized", str(exc)))
            self.fail(4000, "unauthorized")
            return None
        self.principal = principal
        return principal

    def hello_timeout(self) -> None:
        self.fail(4000, "no hello in time")

    @property
    def expires_at(self) -> float:
        """When the token expires, leeway included (seconds since the Unix epoch): then `expire()`."""
        assert self.principal is not None
        return self.principal.exp + self.leeway_s

    def expire(self) -> None:
        self.fail(4003, "token expired")

    def refresh(self, obj: dict[str, Any]) -> Principal | None:
        """A new token for the same identity on an open connection. None: refused, close decided."""
        current = self.principal
        assert current is not None
        try:
            fresh = self.verifier.verify(obj.get("token"))
        except AuthError as exc:
            self.send(frames.error("unauthorized", str(exc)))
            self.fail(4000, "refresh refused")
            return None
        if (fresh.role, fresh.sub, fresh.org, fresh.client) != (current.role, current.sub, current.org, current.client):
            self.send(frames.error("forbidden", "a refresh must be for the same identity"))
            self.fail(4000, "refresh refused")
            return None
        self.principal = fresh
        return fresh
