"""Load simulator: simulated phones and dashboards over real WebSocket connections.

Modules, one concept each (pure ones first):

- ``routes``: the cities' roads (``data/routes.json``) and distances along them;
- ``driver``: a driver's day, deterministic movement and package scans (``data/drivers.json``);
- ``records``: per-event times of one driver (created, sent, acknowledged) in compact arrays;
- ``phone``: the driver app's outbox and ack bookkeeping (sans-I/O);
- ``faults``: each phone's schedule of mobile-network trouble (drops, offline, slow links);
- ``report``: loss, duplicates, latency, throughput and CPU, as a table or JSON;
- ``link``: the network link, a minimal asyncio WebSocket client over the shared RFC 6455 codec
  (:mod:`tracker.protocol.wscodec`);
- ``dashboard``: dispatcher dashboards that count what they receive;
- ``consign``: a dispatcher consigning the drivers' packages first (``--consign``);
- ``fleet``: this process's phones, ticked by one scheduler, (re)connecting at a paced rate;
- ``workers``: where the phones run, this process or spawned workers (``--processes``);
- ``run``: :func:`~tracker.sim.run.simulate`, one run from options to report;
- ``cli``: ``tracker simulate``'s options and exit code.

From the rest of ``tracker`` the simulator imports only ``tracker.protocol`` and
``tracker.auth``: it talks to the service as any client would. This module holds what the
others share.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace

__all__ = ["SimError", "SimOptions", "driver_id"]


class SimError(Exception):
    """The run could not start or finish (service unreachable, bad secret, ...)."""


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
    encoding: str = "json"  # json | compact (compact-1: live frames and compact batches, scans as JSON) | compact2
    # (compact-2 batches: positions and scans in one frame; live frames as compact-1)
    acks: str = "per-commit"  # per-commit (v1) | cumulative | compact (hello's "acks"; compact: binary acks)
    transport: str = "ws"  # ws | http (POST /v1/driver/events, one connection per upload)
    resume: str = "off"  # off | on (ask for resume tokens, resume with them) | warm (on, and start with one)
    settle: float = 3.0  # after the drain, how long dashboards wait for the last frames
    progress: bool = True  # a live line on stderr, once per second
    extra: dict[str, str] = field(default_factory=dict)  # free-form labels copied into the report

    def resolved(self) -> SimOptions:
        secret = self.secret or os.environ.get("TRACKER_JWT_SECRET")
        if not secret:
            raise ValueError("no JWT secret: pass --secret or set TRACKER_JWT_SECRET")
        if self.encoding not in ("json", "compact", "compact2") or self.acks not in (
            "per-commit",
            "cumulative",
            "compact",
        ):
            raise ValueError("encoding must be json, compact or compact2, acks per-commit, cumulative or compact")
        if self.resume not in ("off", "on", "warm"):
            raise ValueError("resume must be off, on or warm")
        if self.transport not in ("ws", "http"):
            raise ValueError("transport must be ws or http")
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
