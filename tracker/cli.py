"""tracker serve | token | migrate | simulate | demo"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .config import ConfigError, Settings, describe

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        host=getattr(args, "host", None), port=getattr(args, "port", None), data_dir=getattr(args, "data_dir", None)
    )


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt="%H:%M:%S")
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .server import Server, uvicorn_config

    settings = _settings(args)
    _configure_logging(settings.log_level)
    app = create_app(settings)
    Server(uvicorn_config(app, settings), app).run()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .app import jwt_secret
    from .auth import mint_token

    settings = _settings(args)
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


def cmd_migrate(args: argparse.Namespace) -> int:
    from .app import connect_postgres, migrate
    from .embedded import Embedded

    settings = _settings(args)
    _configure_logging("info")

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


def build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {name:<32} default {default}" for name, default in describe())
    parser = argparse.ArgumentParser(
        prog="tracker",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Real-time driver tracking for pharmaceutical logistics: phones stream positions and "
        "package scans over websockets; dashboards watch live; PostgreSQL keeps the chain of custody.",
        epilog="Configuration comes from the environment:\n" + env_help,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="folder for the embedded PostgreSQL/Redis and the generated JWT secret "
            "(default: $TRACKER_DATA_DIR or ./.tracker)",
        )

    serve = sub.add_parser(
        "serve", help="run the service (embedded PostgreSQL and Redis unless DATABASE_URL/REDIS_URL are set)"
    )
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default 8080)")
    common(serve)
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="mint a development token with the configured key")
    token.add_argument("--role", required=True, choices=["driver", "dispatcher", "client"])
    token.add_argument("--sub", required=True, help="driver id or user id")
    token.add_argument("--org", required=True, help="distribution unit (tenant)")
    token.add_argument("--client", default=None, help="client organisation id (role client only)")
    token.add_argument("--name", default=None, help="display name")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    token.add_argument("--private-key", default=None, help="PEM private key for RS256/ES256 (default: HS256 secret)")
    common(token)
    token.set_defaults(func=cmd_token)

    migrate = sub.add_parser("migrate", help="apply the database schema (also done at start)")
    common(migrate)
    migrate.set_defaults(func=cmd_migrate)

    try:
        from .sim import cli as simulate
    except ImportError:
        simulate = None  # type: ignore[assignment]
    if simulate is not None and hasattr(simulate, "add_arguments"):
        sim = sub.add_parser("simulate", help="simulated drivers and dashboards against a running service")
        simulate.add_arguments(sim)
        sim.set_defaults(func=simulate.run)
        from . import demo

        dem = sub.add_parser("demo", help="the service, a simulated fleet and the dashboard URL, in one command")
        demo.add_arguments(dem)
        dem.set_defaults(func=demo.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"tracker: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
