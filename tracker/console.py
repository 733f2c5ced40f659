"""What the command line says to a person: the start banner, the log format (text or one JSON
object per line), how to name a tracker command, defaults as people read them."""

from __future__ import annotations

import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .config import Settings

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DEFAULT_DATA_DIR = Path(".tracker")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc with a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        import orjson

        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def invocation() -> str:
    """How the person who started us runs tracker commands: `./dev tracker`, `tracker`, or python -m."""
    here = Path.cwd()
    if (here / "dev").is_file() and Path(sys.prefix).resolve() == (here / ".venv").resolve():
        return "./dev tracker"
    found = shutil.which("tracker")
    if found and sys.argv and Path(found).resolve() == Path(sys.argv[0]).resolve():
        return "tracker"
    return f"{sys.executable} -m tracker"


def public_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)


def banner(settings: Settings, port: int) -> str:
    """What a person needs after start: the dashboard, the exact token command, where data lives."""
    data = settings.data_dir
    token = f"{invocation()} token --role dispatcher --sub me --org acme"
    if data != DEFAULT_DATA_DIR:
        token += f" --data-dir {data}"
    if settings.jwt_alg != "HS256":
        token += " --private-key KEY.pem"
    if settings.database_url and settings.redis_url:
        where = "external PostgreSQL and Redis"
    else:
        where = f"{data.expanduser().resolve()} (embedded servers' logs there; `{invocation()} info` for DSNs)"
    return (
        f"tracker is ready\n"
        f"  dashboard  http://{public_host(settings.host)}:{port}/  (sign in with a dispatcher token)\n"
        f"  a token    {token}\n"
        f"  data       {where}"
    )


def readable(value: str) -> str:
    """A default as a person reads it: .tracker, not PosixPath('.tracker')."""
    path = re.fullmatch(r"\w*Path\('(.*)'\)", value)
    if path:
        return path.group(1)
    plain = {"None": "unset", "()": "none", "True": "true", "False": "false", "''": '""'}
    if value in plain:
        return plain[value]
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value


EXAMPLES = """examples:
  ./dev serve                                   embedded PostgreSQL and Redis under ./.tracker
  ./dev tracker token --role dispatcher --sub me --org acme
  ./dev tracker info                            URLs, DSNs and where the secret is
  ./dev tracker demo                            a moving fleet and the dashboard link (./.tracker-demo)
  ./dev tracker simulate --drivers 100 --duration 60 --org acme
  DATABASE_URL=postgresql://... REDIS_URL=redis://... TRACKER_JWT_SECRET=... \\
    tracker serve --host 0.0.0.0 --log-format json
"""
