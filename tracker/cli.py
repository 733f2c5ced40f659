"""tracker serve | token | info | migrate | simulate | demo"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from pathlib import Path

from .config import ConfigError, Settings, describe
from .console import EXAMPLES, banner, configure_logging, invocation, public_host, readable


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        host=getattr(args, "host", None), port=getattr(args, "port", None), data_dir=getattr(args, "data_dir", None)
    )


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"tracker {command}: {message}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from .embedded import lock_data_dir, unlock_data_dir
    from .server import Server, listen, uvicorn_config

    settings = _settings(args)
    settings.check()  # a deployment's shared keys: serve signs and verifies (migrate does not)
    if (archive := settings.tiles_archive()) is not None:  # a map tile archive it cannot serve: exit 2 now
        from .tiles.archive import open_archive

        open_archive(archive).close()
    configure_logging(settings.log_level, args.log_format)
    embedded = not (settings.database_url and settings.redis_url)
    if args.workers != 1:
        return _serve_workers(settings, args, embedded)
    if embedded:
        lock_data_dir(settings.data_dir)  # DataDirBusy: main() prints it
    try:
        try:
            sock = listen(settings.host, settings.port, reuse_port=args.reuse_port)
        except OSError as exc:
            return _fail(
                "serve",
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} (pick another --port)",
            )
        from .app import create_app

        app = create_app(settings)
        log = logging.getLogger("tracker")
        server = Server(
            uvicorn_config(app, settings),
            app,
            on_started=lambda s: log.info("%s", banner(settings, s.port)),
            hard_exit_s=settings.shutdown_grace_s + 30,
        )
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        if embedded:
            unlock_data_dir(settings.data_dir)


def _serve_workers(settings: Settings, args: argparse.Namespace, embedded: bool) -> int:
    from .workers import Supervisor

    if args.workers < 1:
        return _fail("serve", f"--workers must be at least 1, not {args.workers}", 2)
    if embedded:
        return _fail(
            "serve", "--workers above 1 needs DATABASE_URL and REDIS_URL (the embedded servers serve one process)", 2
        )
    try:
        return Supervisor(settings, args.workers, log_format=args.log_format).run()
    except OSError as exc:
        return _fail(
            "serve", f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} (pick another --port)"
        )


def cmd_token(args: argparse.Namespace) -> int:
    from .app import jwt_secret
    from .auth import mint_token

    settings = _settings(args)
    if args.role == "client" and not args.client:
        return _fail("token", "--role client needs --client CLIENT_ID (the client organisation it may see)", 2)
    if args.role != "client" and args.client:
        return _fail("token", "--client is for --role client only", 2)
    if args.ttl < 1:
        return _fail("token", f"--ttl must be at least 1 s, not {args.ttl:g}", 2)
    cap = settings.jwt_max_ttl_s
    if cap > 0 and int(args.ttl) > cap:
        return _fail(
            "token",
            f"--ttl {args.ttl:g} exceeds the service's limit of {cap:g} s (TRACKER_JWT_MAX_TTL_S); "
            "the service would refuse this token",
            2,
        )
    if args.private_key:
        key, alg = Path(args.private_key).read_text(), settings.jwt_alg
    else:
        key, alg = jwt_secret(settings), "HS256"
    print(
        mint_token(
            key, role=args.role, sub=args.sub, org=args.org, client=args.client, name=args.name, ttl_s=args.ttl, alg=alg
        )
    )
    return 0


def _mask(url: str) -> str:
    return re.sub(r"(//[^:/@]+:)[^@/]+@", r"\1***@", url)


def cmd_info(args: argparse.Namespace) -> int:
    from .embedded import holder, postgres_dsn, redis_dsn

    settings = _settings(args)
    data = settings.data_dir.expanduser().resolve()
    base = f"{public_host(settings.host)}:{settings.port}"
    held = holder(data)
    rows = [
        ("data folder", f"{data} ({'in use by ' + held if held else 'no service running on it'})"),
        ("dashboard", f"http://{base}/"),
        ("phones", f"ws://{base}/v1/driver"),
        ("dashboards", f"ws://{base}/v1/live"),
        (
            "PostgreSQL",
            f"{_mask(settings.database_url)} (DATABASE_URL)"
            if settings.database_url
            else f"{postgres_dsn(data)} (embedded; answers while a service runs on the folder)",
        ),
        (
            "Redis",
            f"{_mask(settings.redis_url)} (REDIS_URL)" if settings.redis_url else f"{redis_dsn(data)} (embedded)",
        ),
        (
            "JWT secret",
            "$TRACKER_JWT_SECRET"
            if settings.jwt_secret
            else f"{data / 'jwt-secret'}" + ("" if (data / "jwt-secret").exists() else " (not generated yet)"),
        ),
        ("custody key", "$TRACKER_CUSTODY_KEY" if settings.custody_key else f"{data / 'custody-key'}"),
        ("logs", f"{data / 'postgres.log'}, {data / 'redis.log'}, {data / 'initdb.log'}"),
        ("a token", f"{invocation()} token --role dispatcher --sub me --org acme --data-dir {settings.data_dir}"),
    ]
    for name, value in rows:
        print(f"{name:<12} {value}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .app import connect_postgres, migrate
    from .embedded import Embedded

    settings = _settings(args)
    configure_logging("info", args.log_format)

    async def run() -> int:
        embedded = Embedded(settings.data_dir)
        try:
            pool = await connect_postgres(settings.database_url or embedded.postgres_url(), settings, wait_s=30)
            try:
                applied = await migrate(pool)
            finally:
                await pool.close()
        finally:
            embedded.close()
        print(f"schema up to date ({applied} migration(s) applied)")
        return 0

    return asyncio.run(run())


def cmd_simulate(args: argparse.Namespace) -> int:
    """`tracker simulate` with the data folder's generated secret, like `tracker token`."""
    from .sim import cli as simulate

    if not args.secret:
        settings = Settings.from_env(data_dir=args.data_dir)
        path = settings.data_dir.expanduser() / "jwt-secret"
        if settings.jwt_secret:
            args.secret = settings.jwt_secret
        elif path.exists():
            args.secret = path.read_text().strip()
        else:
            return _fail(
                "simulate",
                f"no JWT secret: none in {path} (start `{invocation()} serve` on that folder first), "
                "and neither --secret nor TRACKER_JWT_SECRET is set",
                2,
            )
    return int(simulate.run(args))


def build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {name:<32} default {readable(default)}" for name, default in describe())
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tracker",
        formatter_class=raw,
        description="Real-time driver tracking for pharmaceutical logistics: phones stream positions and "
        "package scans over websockets; dashboards watch live; PostgreSQL keeps the chain of custody.",
        epilog=EXAMPLES + "\nConfiguration comes from the environment (options below win):\n" + env_help,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir(p: argparse.ArgumentParser, default: str = ".tracker") -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            metavar="DIR",
            help="folder of the embedded PostgreSQL and Redis, their logs, the generated JWT secret and custody "
            f"key; one service at a time (default: $TRACKER_DATA_DIR, else {default})",
        )

    def log_format(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--log-format",
            choices=["text", "json"],
            default="text",
            help="text for people; json: one JSON object per line for log collectors (default: text)",
        )

    def listen(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default=None, help="address to listen on (default: $TRACKER_HOST, else 127.0.0.1)")
        p.add_argument(
            "--port",
            type=int,
            default=None,
            help="port to listen on; 0 picks a free one (default: $TRACKER_PORT, else 8080)",
        )

    serve = sub.add_parser(
        "serve",
        help="run the service (embedded PostgreSQL and Redis unless DATABASE_URL/REDIS_URL are set)",
        description="Run the service. Without DATABASE_URL and REDIS_URL it starts a private PostgreSQL and "
        "Redis under the data folder and stops them when it stops. Ctrl-C or SIGTERM drain and stop it; "
        "a second one stops it at once.",
        formatter_class=raw,
        epilog="examples:\n  ./dev serve\n  ./dev serve --port 9000 --data-dir /var/tmp/tracker\n"
        "  DATABASE_URL=postgresql://u:p@db/tracker REDIS_URL=redis://cache:6379/0 TRACKER_JWT_SECRET=... \\\n"
        "    tracker serve --host 0.0.0.0 --log-format json\n"
        "  TRACKER_MAP_TILES=maps/kenya.pmtiles ./dev serve   # street tiles from a PMTiles raster archive in\n"
        "                                                      # the data folder (or an absolute path; or an\n"
        "                                                      # XYZ URL template: docs/OPERATIONS.md#map-tiles)",
    )
    listen(serve)
    data_dir(serve)
    log_format(serve)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N processes sharing the port (SO_REUSEPORT), each an instance of its own; one per core. Needs "
        "DATABASE_URL and REDIS_URL (default: 1)",
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers N
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser(
        "token",
        help="mint a development token with the configured key",
        description="Print a JWT the service accepts, signed with TRACKER_JWT_SECRET or the data folder's "
        "generated secret (or --private-key). Refuses what the service would refuse (exit code 2).",
        formatter_class=raw,
        epilog="examples:\n  ./dev tracker token --role dispatcher --sub me --org acme\n"
        "  ./dev tracker token --role driver --sub d-17 --org acme --ttl 600\n"
        "  ./dev tracker token --role client --sub ann --org acme --client pharma-1",
    )
    token.add_argument(
        "--role",
        required=True,
        choices=["driver", "dispatcher", "client"],
        help="driver: a phone; dispatcher: sees the whole org; client: sees its client's packages",
    )
    token.add_argument("--sub", required=True, help="driver id (role driver) or user id")
    token.add_argument("--org", required=True, help="distribution unit (tenant)")
    token.add_argument("--client", default=None, help="client organisation id (required for role client, only there)")
    token.add_argument("--name", default=None, help="display name shown on dashboards (default: none)")
    token.add_argument(
        "--ttl",
        type=float,
        default=3600.0,
        help="lifetime in seconds, at most $TRACKER_JWT_MAX_TTL_S (default: 3600; cap 86400)",
    )
    token.add_argument(
        "--private-key", default=None, metavar="PEM", help="PEM private key for RS256/ES256 (default: the HS256 secret)"
    )
    data_dir(token)
    token.set_defaults(func=cmd_token)

    info = sub.add_parser(
        "info",
        help="where things are: URLs, DSNs, the secret and the logs of a data folder",
        description="Print the dashboard and websocket URLs, the PostgreSQL and Redis DSNs, where the JWT "
        "secret and the logs are, and which process uses the data folder.",
        formatter_class=raw,
        epilog="examples:\n  ./dev tracker info\n  ./dev tracker info --data-dir .tracker-demo",
    )
    listen(info)
    data_dir(info)
    info.set_defaults(func=cmd_info)

    migrate = sub.add_parser(
        "migrate",
        help="apply the database schema (also done at start)",
        description="Apply the database schema; idempotent (serve does it at start too).",
        formatter_class=raw,
        epilog="examples:\n  ./dev tracker migrate\n  DATABASE_URL=postgresql://u:p@db/tracker tracker migrate",
    )
    data_dir(migrate)
    log_format(migrate)
    migrate.set_defaults(func=cmd_migrate)

    try:
        from .sim import cli as simulate
    except ImportError:
        simulate = None  # type: ignore[assignment]
    if simulate is not None and hasattr(simulate, "add_arguments"):
        sim = sub.add_parser(
            "simulate",
            help="simulated drivers and dashboards against a running service",
            description="Simulated phones (and dashboards) against a running service; exit 0 only if "
            "nothing acknowledged was lost. Tokens are signed with --secret, TRACKER_JWT_SECRET or the "
            "data folder's generated secret.",
            formatter_class=raw,
            epilog="examples:\n  ./dev tracker simulate --drivers 100 --duration 60\n"
            "  ./dev tracker simulate --url ws://127.0.0.1:9000 --data-dir /var/tmp/tracker --flaky",
        )
        simulate.add_arguments(sim)
        data_dir(sim)
        sim.set_defaults(func=cmd_simulate)
        from . import demo

        dem = sub.add_parser(
            "demo",
            help="the service, a simulated fleet and the dashboard URL, in one command",
            description="Start the service (own data folder), a moving fleet, and print the dashboard URL "
            "with a token: open it in a browser.",
            formatter_class=raw,
            epilog="examples:\n  ./dev tracker demo\n  ./dev tracker demo --drivers 50 --port 9000 --duration 600",
        )
        demo.add_arguments(dem)
        dem.set_defaults(func=demo.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .embedded import EmbeddedError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"tracker: configuration error: {exc}", file=sys.stderr)
        return 2
    except EmbeddedError as exc:
        print(f"tracker {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
