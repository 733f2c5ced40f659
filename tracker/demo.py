"""``tracker demo``: the service, a moving fleet and a dashboard link, in one command.

Starts the service in this process exactly like ``tracker serve`` (with no configuration: the
embedded PostgreSQL and Redis under its own data folder, ``.tracker-demo``, and a generated JWT secret), then a few
hundred simulated drivers (``tracker simulate`` in this process) that first have their packages
consigned by a dispatcher (``POST /v1/packages``), so their scans walk real packages through
pickup and delivery. Prints the dashboard URL with a dispatcher token in the fragment, then runs
until ``--duration`` passes or Ctrl-C, and stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .app import create_app, jwt_secret
from .auth import mint_token
from .config import Settings
from .embedded import lock_data_dir, unlock_data_dir
from .server import Server, listen, uvicorn_config
from .sim.run import Report as SimReport
from .sim.run import SimError, SimOptions, simulate

log = logging.getLogger("tracker.demo")

DEMO_DATA_DIR = Path(".tracker-demo")  # never the folder `tracker serve` uses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tracker demo``'s options."""
    a = parser.add_argument
    a("--host", default=None, help="address to listen on (default $TRACKER_HOST or 127.0.0.1)")
    a("--port", type=int, default=None, help="port to listen on (default $TRACKER_PORT or 8080)")
    a(
        "--data-dir",
        type=Path,
        default=DEMO_DATA_DIR,
        metavar="DIR",
        help="the demo's own folder: embedded PostgreSQL/Redis, their logs, the JWT secret (default: %(default)s)",
    )
    a("--drivers", type=int, default=300, help="simulated drivers (default %(default)s)")
    a("--interval", type=float, default=1.0, help="seconds between a driver's positions (default %(default)s)")
    a("--duration", type=float, default=3600.0, help="seconds to run; Ctrl-C stops earlier (default %(default)s)")
    a("--org", default="demo", help="the demo's distribution unit (default %(default)s)")
    a("--seed", type=int, default=None, help="make routes and scans reproducible")
    a("--flaky", action="store_true", help="mobile-network faults: drops, offline periods, slow links")


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; 0 when it ran and nothing was lost."""
    settings = Settings.from_env(host=args.host, port=args.port).with_(data_dir=args.data_dir)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    embedded = not (settings.database_url and settings.redis_url)
    if embedded:
        lock_data_dir(settings.data_dir)  # DataDirBusy: tracker's main() prints it
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        if embedded:
            unlock_data_dir(settings.data_dir)
        print(f"tracker demo: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_demo(settings, args, sock))
    except KeyboardInterrupt:
        return 130
    finally:
        if embedded:
            unlock_data_dir(settings.data_dir)


async def _demo(settings: Settings, args: argparse.Namespace, sock: socket.socket) -> int:
    app = create_app(settings)
    server = Server(uvicorn_config(app, settings, log_level="warning"), app, hard_exit_s=settings.shutdown_grace_s + 30)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="tracker-serve")
    while not server.started:
        if serving.done():
            print("tracker demo: the service did not start (see the log above)", file=sys.stderr)
            return 1
        await asyncio.sleep(0.05)
    secret = jwt_secret(settings)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    port = server.port
    token = mint_token(
        secret,
        role="dispatcher",
        sub="demo-dispatcher",
        org=args.org,
        name="Demo dispatcher",
        # The page keeps its socket for the whole run; a token above the service's cap is refused.
        ttl_s=min(max(args.duration, 0) + 3600, settings.jwt_max_ttl_s or float("inf")),
    )
    print(f"tracker demo: {args.drivers} drivers of org {args.org!r} on their way for {args.duration:g} s", flush=True)
    print(f"dashboard: http://{host}:{port}/#token={token}", flush=True)
    options = SimOptions(
        url=f"ws://{host}:{port}",
        drivers=args.drivers,
        interval=args.interval,
        dashboards=0,
        duration=args.duration,
        flaky=args.flaky,
        seed=args.seed,
        secret=secret,
        org=args.org,
        consign=True,
        drain_timeout=20.0,
        progress=False,
    )
    sim = asyncio.create_task(simulate(options), name="tracker-demo-fleet")
    started = time.monotonic()
    code = 0
    try:
        done, _ = await asyncio.wait({sim, serving}, return_when=asyncio.FIRST_COMPLETED)
        if sim in done:
            try:
                report: SimReport = sim.result()
            except (SimError, ValueError) as exc:
                print(f"tracker demo: the simulated fleet failed: {exc}", file=sys.stderr)
                code = 1
            else:
                consigned = report.counts.get("consigned", 0)
                print(
                    f"tracker demo: {report.generated} events from {report.drivers} drivers in "
                    f"{time.monotonic() - started:.0f} s, {report.acked} acknowledged, {report.lost} lost, "
                    f"{consigned} packages consigned",
                    flush=True,
                )
                code = 0 if report.ok else 1
        else:  # the service stopped first (Ctrl-C: uvicorn handles the signal)
            print("tracker demo: stopped", flush=True)
    finally:
        if not sim.done():
            sim.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sim
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
    return code
