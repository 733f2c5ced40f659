"""Load simulator: simulated phones and dashboards over real WebSocket connections.

Modules, one concept each:

- ``routes``: deterministic movement along real roads and package scans (pure);
- ``phone``: the driver app's outbox and ack bookkeeping (sans-I/O) and the asyncio fleet;
- ``flaky``: the network link (a minimal RFC 6455 client) and mobile-network faults;
- ``dashboard``: dispatcher dashboards that count what they receive;
- ``report``: loss, duplicates, latency, throughput and CPU, as a table or JSON.

:func:`tracker.simulate.simulate` wires them; this module holds what they share.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field, replace

import jwt

__all__ = ["SimOptions", "driver_id", "mint_token"]


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Everything a run needs. ``resolved()`` fills the seed, org and secret defaults."""

    url: str = "ws://127.0.0.1:8080"  # tracker serve's default
    drivers: int = 100
    interval: float = 1.0  # seconds between a driver's positions
    dashboards: int = 1
    duration: float = 30.0  # seconds of event generation, ramp included
    flaky: bool = False
    seed: int | None = None
    secret: str | None = None  # default: $TRACKER_JWT_SECRET
    org: str | None = None  # default: a fresh sim-<hex> so runs never mix
    dsn: str | None = None  # PostgreSQL to check what was stored
    processes: int = 1
    batch_mode: bool = False  # phones upload every batch_window seconds, as a power-saving app
    batch_window: float = 5.0
    connect_rate: float = 1000.0  # new connections per second, all processes together
    drain_timeout: float = 60.0  # after the run, how long phones may take to get everything acked
    resend_after: float = 60.0  # seconds without an answer before resending on the same connection
    consign: bool = False  # a dispatcher consigns each planned package (POST /v1/packages) before its pickup
    settle: float = 3.0  # after the drain, how long dashboards wait for the last frames
    progress: bool = True  # a live line on stderr, once per second
    extra: dict[str, str] = field(default_factory=dict)  # free-form labels copied into the report

    def resolved(self) -> SimOptions:
        secret = self.secret or os.environ.get("TRACKER_JWT_SECRET")
        if not secret:
            raise ValueError("no JWT secret: pass --secret or set TRACKER_JWT_SECRET")
        if self.drivers < 0 or self.dashboards < 0 or self.interval <= 0 or self.duration <= 0:
            raise ValueError("drivers and dashboards must be >= 0, interval and duration > 0")
        return replace(
            self,
            secret=secret,
            seed=self.seed if self.seed is not None else secrets.randbits(32),
            org=self.org or f"sim-{secrets.token_hex(4)}",
            processes=max(1, min(self.processes, max(1, self.drivers))),
        )


def driver_id(index: int) -> str:
    """The ``sub`` of simulated driver ``index`` (unique within the run's org)."""
    return f"d-{index}"


def mint_token(secret: str, *, sub: str, role: str, org: str, name: str | None = None, ttl_s: float = 3600.0) -> str:
    """An HS256 token with the claims of PROTOCOL.md (``aud`` = ``tracker``)."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "role": role, "org": org, "aud": "tracker", "iat": now}
    claims["exp"] = now + int(ttl_s)
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm="HS256")
