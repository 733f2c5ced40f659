"""Day partitions of positions: created ahead, dropped behind (retention), without blocking ingest.

`position_rows` is partitioned by `ts` in UTC days (sql/0008). `maintain_once` creates the days up
to `PARTITION_AHEAD_DAYS` past today (`tracker_position_days`: CREATE TABLE, then ATTACH, which
takes only SHARE UPDATE EXCLUSIVE on the parent), and with `retention_days` > 0 drops every day
partition that lies wholly before today minus `retention_days`:

1. `position_floor.floor_ts` is raised to the partition's end, committed first: from then on the
   writer's statement skips positions below it and acknowledges them as expired (PROTOCOL.md,
   "Retention"), so no new insert is routed to that day;
2. `DETACH PARTITION ... CONCURRENTLY` waits for the statements already running and never takes a
   lock that stops inserts into the other partitions;
3. `DROP TABLE` of the detached table, which nothing uses any more.

Scans, custody and alerts are other tables: never dropped. One instance at a time maintains (a
session advisory lock); a detach left pending by a crash is finalised on the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from .store import PARTITION_AHEAD_DAYS

log = logging.getLogger("tracker.partitions")

DAY_MS: Final = 86_400_000
LOCK: Final = 0x7472_6B70  # "trkp"
_BOUND: Final = re.compile(r"FROM \((.+?)\) TO \((.+?)\)")

PARTITIONS: Final = """
SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound, i.inhdetachpending AS pending
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'position_rows'::regclass
"""


DDL: Final = """
SELECT format('ALTER TABLE position_rows DETACH PARTITION %I ' || $2::text, $1::text), format('DROP TABLE %I', $1::text)
"""


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    start: int | None  # None: MINVALUE
    end: int
    pending: bool  # a DETACH ... CONCURRENTLY that did not finish


def _value(text: str) -> int | None:
    text = text.strip("'")
    return None if text == "MINVALUE" else int(text)


async def partitions(conn: Any) -> list[Part]:
    """The position partitions, by start."""
    out = []
    for row in await conn.fetch(PARTITIONS):
        m = _BOUND.search(row["bound"])
        if m is None:
            continue
        end = _value(m.group(2))
        if end is None:
            continue
        out.append(Part(row["name"], _value(m.group(1)), end, row["pending"]))
    return sorted(out, key=lambda p: p.end)


@dataclass(slots=True)
class Pass:
    created: int = 0
    dropped: int = 0
    drop_seconds: float = 0.0


async def maintain_once(conn: Any, *, retention_days: int, now_ms: int | None = None) -> Pass:
    """One maintenance pass on `conn` (an asyncpg connection, outside a transaction); a no-op while another instance
    holds the maintenance lock."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    today = now // DAY_MS
    result = Pass()
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK):
        return result
    try:
        result.created = await conn.fetchval("SELECT tracker_position_days($1)", today + PARTITION_AHEAD_DAYS)
        if retention_days > 0:
            cutoff = (today - retention_days) * DAY_MS
            for part in await partitions(conn):
                if part.end <= cutoff:
                    started = time.perf_counter()
                    await drop(conn, part)
                    result.drop_seconds = max(result.drop_seconds, time.perf_counter() - started)
                    result.dropped += 1
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK)
    if result.created or result.dropped:
        log.info("position partitions: %d created, %d dropped", result.created, result.dropped)
    return result


async def drop(conn: Any, part: Part) -> None:
    """Expire one day partition: floor first, then detach concurrently, then drop."""
    await conn.execute("UPDATE position_floor SET floor_ts = greatest(floor_ts, $1)", part.end)
    # DDL takes no parameters: PostgreSQL's format(%I) quotes the name (read from pg_class, never
    # from input), and the text is executed as it comes back. DETACH ... CONCURRENTLY cannot run
    # inside a function or a transaction, hence this round trip.
    ddl = await conn.fetchrow(DDL, part.name, "FINALIZE" if part.pending else "CONCURRENTLY")
    assert ddl is not None
    await conn.execute(ddl[0])
    await conn.execute(ddl[1])


async def maintain(pool: asyncpg.Pool, *, retention_days: int, every_s: float = 3600.0) -> None:
    """The service's background task: a pass at start, then every `every_s`; never raises."""
    while True:
        try:
            async with pool.acquire() as conn:
                await maintain_once(conn, retention_days=retention_days)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("position partition maintenance failed (%s: %s); retrying later", type(exc).__name__, exc)
        await asyncio.sleep(every_s)
