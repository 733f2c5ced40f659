"""The Python stack a team would otherwise pick, doing tracker's job for the benchmarks:
python-socketio's AsyncServer with its Redis manager (AsyncRedisManager: every emit goes through
Redis pub/sub, so several instances share rooms) on uvicorn, positions batched into PostgreSQL
with asyncpg (executemany-free: one INSERT ... SELECT FROM unnest per flush, ON CONFLICT DO
NOTHING), and the driver's ack sent after the commit.

    PORT=8102 DATABASE_URL=postgresql://... REDIS_URL=redis://127.0.0.1:6390 JWT_SECRET=... \
        bench/.peers-venv/bin/python bench/peers/python-socketio/server.py

Drivers connect with auth {token} (an HS256 JWT, role driver) and emit `pos` events with an ack
callback (the handler's return value, sent after the commit); dashboards (role dispatcher) join the
room of their org and receive `pos` events. Written the way the python-socketio documentation
shows it, plus the batching a team would add.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg
import jwt
import redis.asyncio
import socketio
import uvicorn

SECRET = os.environ["JWT_SECRET"]
FLUSH_S = 0.02
FLUSH_MAX = 5000

SCHEMA = """
CREATE TABLE IF NOT EXISTS positions (
  org text NOT NULL, driver_id text NOT NULL, seq bigint NOT NULL, ts bigint NOT NULL,
  received_at bigint NOT NULL, lat double precision NOT NULL, lon double precision NOT NULL,
  acc real, spd real, hdg real, alt real, bat real,
  PRIMARY KEY (org, driver_id, seq));
CREATE INDEX IF NOT EXISTS positions_trail ON positions (org, driver_id, ts);
"""

INSERT = """
INSERT INTO positions (org, driver_id, seq, ts, received_at, lat, lon, acc, spd, hdg, alt, bat)
SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::float8[], $7::float8[],
                     $8::float4[], $9::float4[], $10::float4[], $11::float4[], $12::float4[])
ON CONFLICT DO NOTHING
"""


class CappedRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """AsyncRedisManager, but its publishes share a bounded, blocking pool of Redis connections.

    With the stock manager every concurrent emit takes a connection of its own from redis-py's
    unbounded pool; at 10,000 drivers on a saturated loop its publishes failed ("Cannot publish to
    redis... giving up": 6,811 times in one 15 s step), and those positions never reached a
    dashboard. A team would hit that and cap it like this (PEER_REDIS_POOL=stock: the stock one).
    """

    def _redis_connect(self) -> None:
        super()._redis_connect()
        pool = redis.asyncio.BlockingConnectionPool.from_url(self.redis_url, max_connections=64, timeout=None)
        self.redis = redis.asyncio.Redis(connection_pool=pool)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)


mgr_class = (
    CappedRedisManager if os.environ.get("PEER_REDIS_POOL", "capped") == "capped" else socketio.AsyncRedisManager
)
mgr = mgr_class(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
sio = socketio.AsyncServer(
    async_mode="asgi",
    client_manager=mgr,
    transports=["websocket"],
    cors_allowed_origins=None,
    max_http_buffer_size=65536,
)


class BatchWriter:
    """Flush on size or after FLUSH_S; two flushes in flight; futures resolve after the commit."""

    def __init__(self) -> None:
        self.pool: asyncpg.Pool | None = None
        self.rows: list[tuple[Any, ...]] = []
        self.futures: list[asyncio.Future[bool]] = []
        self.wake = asyncio.Event()
        self.slots = asyncio.Semaphore(2)

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=8)
        async with self.pool.acquire() as conn:
            await conn.execute(SCHEMA)
        asyncio.get_running_loop().create_task(self.run())

    def submit(self, row: tuple[Any, ...]) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.rows.append(row)
        self.futures.append(fut)
        self.wake.set()
        return fut

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            if len(self.rows) < FLUSH_MAX:
                await asyncio.sleep(FLUSH_S)
            await self.slots.acquire()
            rows, futs = self.rows[:FLUSH_MAX], self.futures[:FLUSH_MAX]
            del self.rows[:FLUSH_MAX], self.futures[:FLUSH_MAX]
            if not self.rows:
                self.wake.clear()
            asyncio.get_running_loop().create_task(self.flush(rows, futs))

    async def flush(self, rows: list[tuple[Any, ...]], futs: list[asyncio.Future[bool]]) -> None:
        assert self.pool is not None
        try:
            cols = list(zip(*rows, strict=True))
            async with self.pool.acquire() as conn:
                await conn.execute(INSERT, *cols)
            for f in futs:
                f.set_result(True)
        except Exception as exc:
            for f in futs:
                f.set_exception(exc)
        finally:
            self.slots.release()


writer = BatchWriter()
principals: dict[str, dict[str, Any]] = {}


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> bool:
    try:
        claims = jwt.decode((auth or {}).get("token", ""), SECRET, algorithms=["HS256"], audience="tracker")
    except jwt.PyJWTError:
        return False
    principals[sid] = claims
    if claims["role"] != "driver":
        await sio.enter_room(sid, "org:" + claims["org"])
    return True


@sio.event
async def disconnect(sid: str, *args: Any) -> None:
    principals.pop(sid, None)


@sio.on("pos")
async def pos(sid: str, p: dict[str, Any]) -> Any:
    who = principals.get(sid)
    if who is None or who["role"] != "driver":
        return {"error": "forbidden"}
    try:
        seq, ts, lat, lon = int(p["seq"]), int(p["ts"]), float(p["lat"]), float(p["lon"])
        if seq < 1 or abs(lat) > 90 or abs(lon) > 180:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        return {"error": "invalid"}
    org, driver = who["org"], who["sub"]
    row = (
        org,
        driver,
        seq,
        ts,
        int(time.time() * 1000),
        lat,
        lon,
        p.get("acc"),
        p.get("spd"),
        p.get("hdg"),
        p.get("alt"),
        p.get("bat"),
    )
    stored = writer.submit(row)
    await sio.emit("pos", {"driver": driver, **p}, room="org:" + org)
    try:
        await stored
    except Exception:
        return {"error": "unavailable"}
    return True


async def main() -> None:
    await writer.start()
    app = socketio.ASGIApp(sio)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8102")),
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_level="warning",
        backlog=4096,
        lifespan="off",
    )
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
