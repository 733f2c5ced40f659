"""``tracker simulate``'s command line: its options, a run, the printed report and the exit code.

Wiring for ``tracker/cli.py``::

    sub = subparsers.add_parser("simulate", help="load-test a running service")
    simulate.add_arguments(sub)
    sub.set_defaults(func=simulate.run)      # run(args) -> exit code
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from tracker.sim import SimError, SimOptions
from tracker.sim.report import Report
from tracker.sim.run import simulate
from tracker.sim.workers import loop_factory

__all__ = ["add_arguments", "options_from_args", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tracker simulate``'s options to ``parser``."""
    d = SimOptions()
    a = parser.add_argument
    a("--url", default=d.url, help="service base URL, ws://host:port (default %(default)s)")
    a("--drivers", type=int, default=d.drivers, help="simulated phones (default %(default)s)")
    a("--interval", type=float, default=d.interval, help="seconds between a driver's fixes (default %(default)s)")
    a("--dashboards", type=int, default=d.dashboards, help="dispatcher dashboards (default %(default)s)")
    a("--duration", type=float, default=d.duration, help="seconds of traffic, ramp included (default %(default)s)")
    a("--flaky", action="store_true", help="mobile networks: drops, offline periods, slow links, reordering")
    a("--seed", type=int, default=None, help="make routes, scans and faults reproducible")
    a("--json", action="store_true", help="print the report as JSON")
    a("--secret", default=None, help="HS256 secret for tokens (default: $TRACKER_JWT_SECRET)")
    a("--org", default=None, help="tenant to use (default: a fresh sim-<hex>, so runs never mix)")
    a("--dsn", default=None, help="PostgreSQL DSN: check that every acknowledged event was stored")
    a("--processes", type=int, default=d.processes, help="spread phones over P processes (default %(default)s)")
    a("--batch-mode", action="store_true", help="phones upload every --batch-window s in batch frames")
    a("--batch-window", type=float, default=d.batch_window, help="seconds between uploads in batch mode")
    a("--connect-rate", type=float, default=d.connect_rate, help="new connections/s (default %(default)s)")
    a("--drain-timeout", type=float, default=d.drain_timeout, help="max seconds to get everything acked")
    a("--resend-after", type=float, default=d.resend_after, help="resend unanswered events after S seconds")
    a("--consign", action="store_true", help="consign each driver's packages first (POST /v1/packages as a dispatcher)")
    a(
        "--encoding",
        choices=("json", "compact", "compact2"),
        default=d.encoding,
        help="events as JSON, compact-1 frames (scans as JSON) or compact-2 batches (scans included)",
    )
    a("--acks", choices=("per-commit", "cumulative", "compact"), default=d.acks, help="v1, cumulative, binary acks")
    a("--transport", choices=("ws", "http"), default=d.transport, help="websocket, or HTTP uploads (POST)")
    a(
        "--resume",
        choices=("off", "on", "warm"),
        default=d.resume,
        help="session resumption: ask for tokens and reconnect with them; warm: start with one (connected before)",
    )
    a("--no-progress", action="store_true", help="no live progress line on stderr")


def options_from_args(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        url=args.url,
        drivers=args.drivers,
        interval=args.interval,
        dashboards=args.dashboards,
        duration=args.duration,
        flaky=args.flaky,
        seed=args.seed,
        secret=args.secret,
        org=args.org,
        dsn=args.dsn,
        processes=args.processes,
        batch_mode=args.batch_mode,
        batch_window=args.batch_window,
        connect_rate=args.connect_rate,
        drain_timeout=args.drain_timeout,
        resend_after=args.resend_after,
        consign=args.consign,
        encoding=args.encoding,
        acks=args.acks,
        transport=args.transport,
        resume=args.resume,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run a simulation from parsed arguments; print the report. 0 only if nothing was lost."""
    try:
        report = _run_loop(simulate(options_from_args(args)))
    except (SimError, ValueError) as exc:
        print(f"tracker simulate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(report.to_json() if args.json else report.format_table())
    return 0 if report.ok else 1


def _run_loop(coro: Coroutine[Any, Any, Report]) -> Report:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
