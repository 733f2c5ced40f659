"""What a tracking link shows, as a pure function of what was read. No I/O, no clock.

The window: the carrying driver's position is shown only if, at once,
- the package is `picked_up`, has a holder, and its live view is open (custody/state.py), and
- the holder's newest position carries the package's mark in its stamp: the stamp a position gets
  at its *receipt* (custody/stamps.py), so a position sent after the delivery, a handover or the
  pickup of nothing of this package never carries it, even before that scan is chained.
Anything else (another package, another driver, before the pickup, after the delivery): no
position and no ETA. The driver's identity is never shown, except its display name where the org
allows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

PICKED_UP = "picked_up"
DELIVERED = "delivered"


@dataclass(frozen=True, slots=True)
class Link:
    """A link and its package, as stored."""

    org: str
    package: str
    expires_at: int
    revoked_at: int | None
    state: str
    holder: str | None
    state_ts: int | None
    live_view: bool
    destination: dict[str, Any] | None
    window: dict[str, Any] | None


def expiry(link: Link, grace_ms: int) -> int:
    """When the link stops working: its own expiry, or the delivery plus the grace, if sooner."""
    if link.state == DELIVERED and link.state_ts is not None:
        return min(link.expires_at, link.state_ts + grace_ms)
    return link.expires_at


def gone(link: Link, grace_ms: int, now: int) -> str | None:
    """Why the link no longer works (revoked, expired), or None."""
    if link.revoked_at is not None:
        return "this tracking link was revoked"
    if now >= expiry(link, grace_ms):
        return "this tracking link has expired"
    return None


def in_window(link: Link, stamp: bytes, needle: bytes) -> bool:
    """Whether the holder's newest position (with this stamp) may be shown on the link."""
    return link.state == PICKED_UP and link.holder is not None and link.live_view and needle in stamp


def position(frame: bytes) -> dict[str, Any] | None:
    """The fields of a live `pos` frame a recipient sees: where and when, nothing else."""
    try:
        obj = orjson.loads(frame)
        return {"lat": float(obj["lat"]), "lon": float(obj["lon"]), "ts": int(obj["ts"])}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def render(
    link: Link,
    grace_ms: int,
    *,
    driver: dict[str, Any] | None,
    eta_ts: int | None,
) -> dict[str, Any]:
    """The view (PROTOCOL.md, "GET /v1/share"). `driver` and `eta_ts` must be None outside the
    window (the caller decides with `in_window`); this keeps them out once more."""
    carrying = link.state == PICKED_UP and driver is not None
    return {
        "package": link.package,
        "state": link.state,
        "ts": link.state_ts,
        "destination": link.destination,
        "window": link.window,
        "eta": {"ts": eta_ts} if carrying and eta_ts is not None else None,
        "driver": driver if carrying else None,
        "expires_at": expiry(link, grace_ms),
    }
