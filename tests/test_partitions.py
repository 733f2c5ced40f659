"""Positions in day partitions (issue 13): the protocol's guarantees across days, retention that
drops a day while ingest flows, and the migration of a database created by the old schema.

Each test gets its own schema in the test database (search_path), so dropping days and moving the
expiry floor never touch the other tests' rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
import pytest

from tests.test_writer import Answers
from tracker import eventstore, partitions, store
from tracker.custody.extension import migrations
from tracker.partitions import DAY_MS
from tracker.protocol.events import Position, Scan
from tracker.store import Pending
from tracker.writer import Writer

Pools = Callable[[], Coroutine[Any, Any, asyncpg.Pool]]


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[Pools]:
    """`await make()`: a pool whose connections live in a private schema, empty until migrated."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE SCHEMA "{name}"')
    pools: list[asyncpg.Pool] = []

    async def make() -> asyncpg.Pool:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, server_settings={"search_path": name})
        pools.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            await pool.close()
        await admin.execute(f'DROP SCHEMA "{name}" CASCADE')
        await admin.close()


TODAY = int(time.time() * 1000) // DAY_MS * DAY_MS


def pos(seq: int, ts: int, *, driver: str = "d-1", org: str = "acme", lat: float = -1.29) -> Pending:
    return Pending(None, org, driver, Position(seq, ts, lat, 36.82), int(time.time() * 1000))


async def answer(writer: Writer, answers: Answers, *items: Pending) -> dict[int, str]:
    """Submit and wait; the seqs answered by this submit: 'ack' or the refusal code."""
    n = len(answers.stored) + len(answers.refused)
    s0, r0 = len(answers.stored), len(answers.refused)
    writer.submit(list(items))
    await answers.until(n + len(items))
    out = {p.event.seq: "ack" for p in answers.stored[s0:]}
    out.update({p.event.seq: code for p, code, _ in answers.refused[r0:]})
    return out


async def test_resends_and_conflicts_hold_across_day_partitions(schema: Pools) -> None:
    pool = await schema()
    await store.migrate(pool, migrations())
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5)
    writer.start()
    try:
        yesterday, today, tomorrow = TODAY - DAY_MS + 5, TODAY + 5, TODAY + DAY_MS + 5
        assert await answer(writer, answers, pos(5, yesterday), pos(9, today), pos(12, tomorrow)) == {
            5: "ack",
            9: "ack",
            12: "ack",
        }
        # The very events again: acked, never stored twice.
        assert await answer(writer, answers, pos(5, yesterday), pos(12, tomorrow)) == {5: "ack", 12: "ack"}
        # Other events under taken seqs, on other days than the first ones: conflicts.
        assert await answer(writer, answers, pos(5, tomorrow), pos(9, yesterday), pos(12, today, lat=1.0)) == {
            5: "conflict",
            9: "conflict",
            12: "conflict",
        }
        # A scan under a position's seq (other table, other day), and a position under a scan's.
        now = int(time.time() * 1000)
        assert await answer(writer, answers, Pending(None, "acme", "d-1", Scan(9, tomorrow, "P", "pickup"), now)) == {
            9: "conflict"
        }
        scan = Pending(None, "acme", "d-1", Scan(20, today, "P", "pickup"), now)
        assert await answer(writer, answers, scan) == {20: "ack"}
        assert await answer(writer, answers, pos(20, yesterday)) == {20: "conflict"}
        # Below the highest seq but never taken (an out-of-order backlog): stored.
        assert await answer(writer, answers, pos(7, yesterday), pos(3, tomorrow)) == {7: "ack", 3: "ack"}
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT seq, ts FROM positions WHERE org = 'acme' ORDER BY seq")
            assert [(r["seq"], r["ts"]) for r in rows] == [
                (3, tomorrow),
                (5, yesterday),
                (7, yesterday),
                (9, today),
                (12, tomorrow),
            ]
            assert await store.drivers_hello(conn, [("acme", "d-1", None)]) == [20]
            assert [r["seq"] for r in await store.trail(conn, "acme", "d-1", TODAY - DAY_MS, TODAY + DAY_MS, 10)] == [
                5,
                7,
                9,
            ]
    finally:
        await writer.close()


async def test_a_reconnect_keeps_the_drivers_id_and_uses_no_new_one(schema: Pools) -> None:
    """`drivers.id` is a 32-bit identity: if every hello used one (an upsert evaluates the default
    of each row it proposes), a fleet reconnecting all day would run out of ids within a few years
    and every hello would then fail."""
    pool = await schema()
    await store.migrate(pool, migrations())
    async with pool.acquire() as conn:
        seq = await conn.fetchval("SELECT pg_get_serial_sequence('drivers', 'id')")
        await store.drivers_hello(conn, [("acme", "d-1", "Amina"), ("acme", "d-2", None)])
        ids = dict(await conn.fetch("SELECT driver_id, id FROM drivers"))
        used = await conn.fetchval(f"SELECT last_value FROM {seq}")
        for _ in range(5):
            await store.drivers_hello(conn, [("acme", "d-2", "Juma"), ("acme", "d-1", None)])
        assert dict(await conn.fetch("SELECT driver_id, id FROM drivers")) == ids
        assert await conn.fetchval(f"SELECT last_value FROM {seq}") == used
        names = dict(await conn.fetch("SELECT driver_id, name FROM drivers"))
        assert names == {"d-1": "Amina", "d-2": "Juma"}  # a hello without a name keeps the known one
        # A new instance's writer (its id cache empty) looks the known ones up, using none either.
        assert await eventstore.DriverKeys().ids(conn, [("acme", "d-2"), ("acme", "d-1")]) == [ids["d-2"], ids["d-1"]]
        assert await conn.fetchval(f"SELECT last_value FROM {seq}") == used
        await store.drivers_hello(conn, [("acme", "d-3", None), ("acme", "d-1", None)])  # a new one: one id
        assert await conn.fetchval(f"SELECT last_value FROM {seq}") == used + 1


async def test_retention_drops_a_day_while_ingest_flows_and_expired_resends_are_acked(schema: Pools) -> None:
    """Days before the cutoff are dropped while positions keep being acked: a transaction reading
    positions holds its locks meanwhile (a plain DETACH would queue every insert behind it). A
    resend of a dropped day's position is acknowledged (the phone may forget it), not stored."""
    pool = await schema()
    await store.migrate(pool, migrations())
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5)
    writer.start()
    reader = await pool.acquire()
    maint = await pool.acquire()
    try:
        old = pos(1, TODAY + 1000)  # today's partition, dropped below
        assert await answer(writer, answers, old, pos(2, TODAY - 30 * DAY_MS)) == {1: "ack", 2: "ack"}
        later = TODAY + 2 * DAY_MS  # the service's clock two days on; one day of retention
        reader_tx = reader.transaction()
        await reader_tx.start()
        await reader.fetchval("SELECT count(*) FROM positions")  # holds AccessShare on every partition
        maintenance = asyncio.create_task(partitions.maintain_once(maint, retention_days=1, now_ms=later))
        latencies = []
        for seq in range(100, 140):  # ingest flows while the detach waits for the reader
            started = time.perf_counter()
            assert await answer(writer, answers, pos(seq, later + seq)) == {seq: "ack"}
            latencies.append(time.perf_counter() - started)
        assert not maintenance.done()  # still waiting for the reader, without blocking the inserts
        assert max(latencies) < 1.0, latencies
        await reader_tx.rollback()
        result = await asyncio.wait_for(maintenance, 30)
        assert result.dropped == 2  # the migration's `before` partition and today's
        async with pool.acquire() as conn:
            names = {p.name for p in await partitions.partitions(conn)}
            assert "position_rows_before" not in names and len(names) >= 4
            assert await conn.fetchval("SELECT count(*) FROM positions WHERE seq < 100") == 0
            # Expired: acknowledged, not stored; a new event of that day too (older than retention).
            assert await answer(writer, answers, old, pos(3, TODAY + 5)) == {1: "ack", 3: "ack"}
            assert await conn.fetchval("SELECT count(*) FROM positions WHERE seq < 100") == 0
            # The highest seq survives the drop (welcome's last_seq), and new days go on.
            assert await store.drivers_hello(conn, [("acme", "d-1", None)]) == [139]
            assert await answer(writer, answers, pos(140, later + DAY_MS)) == {140: "ack"}
    finally:
        await pool.release(reader)
        await pool.release(maint)
        await writer.close()


async def test_a_database_of_the_old_schema_is_migrated_with_its_rows(schema: Pools) -> None:
    """A database created before partitions (migrations up to 0007, rows in the old `positions`
    table) migrates; the new code then reads its trails and deduplicates its rows."""
    pool = await schema()
    old = [(v, sql) for v, sql in sorted([*store.MIGRATIONS, *migrations()]) if v < 8]
    async with pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE tracker_schema (version int PRIMARY KEY, applied_at timestamptz DEFAULT now())"
        )
        for version, sql in old:
            await conn.execute(sql)
            await conn.execute("INSERT INTO tracker_schema (version) VALUES ($1)", version)
        assert await conn.fetchval("SELECT relkind FROM pg_class WHERE oid = to_regclass('positions')") == b"r"
        await conn.execute("INSERT INTO drivers (org, driver_id, name) VALUES ('acme', 'd-1', 'Ann')")
        await conn.execute(
            "INSERT INTO positions (org, driver_id, seq, ts, received_at, lat, lon, spd) "
            "SELECT 'acme', d, s, $1::bigint + s * 1000, $1::bigint + s * 1000, -1.29, 36.82, 10 "
            "FROM generate_series(1, 50) s, unnest(ARRAY['d-1', 'd-2']) d",
            TODAY - 3 * DAY_MS,
        )
        await conn.execute(
            "INSERT INTO scans (org, driver_id, seq, ts, received_at, package, event) "
            "VALUES ('acme', 'd-2', 51, $1::bigint, $1::bigint, 'P', 'pickup')",
            TODAY - DAY_MS,
        )
    newer = [v for v, _ in [*store.MIGRATIONS, *migrations()] if v >= 8]
    assert await store.migrate(pool, migrations()) == len(newer)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT relkind FROM pg_class WHERE oid = to_regclass('position_rows')") == b"p"
        trail = await store.trail(conn, "acme", "d-2", TODAY - 3 * DAY_MS, TODAY, 100)
        assert [r["seq"] for r in trail] == list(range(1, 51))
        assert await store.count_trail(conn, "acme", "d-1", TODAY - 3 * DAY_MS, TODAY) == 50
        assert await store.drivers_hello(conn, [("acme", "d-1", None), ("acme", "d-2", None)]) == [50, 51]
        assert [r["name"] for r in await store.last_positions(conn, "acme", ["d-1"])] == ["Ann"]
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5)
    writer.start()
    try:
        t = TODAY - 3 * DAY_MS
        again = Pending(None, "acme", "d-1", Position(7, t + 7000, -1.29, 36.82, spd=10.0), int(time.time() * 1000))
        assert await answer(writer, answers, again) == {7: "ack"}
        assert await answer(writer, answers, pos(8, TODAY + 8)) == {8: "conflict"}
        assert await answer(writer, answers, pos(51, TODAY + 51, driver="d-2")) == {51: "conflict"}
        assert await answer(writer, answers, pos(52, TODAY + 52, driver="d-2")) == {52: "ack"}
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM positions") == 101
    finally:
        await writer.close()


async def test_a_missing_day_is_created_not_refused(schema: Pools) -> None:
    """A day partition missing (maintenance could not run): the writer creates it and stores the
    position; a phone's event is never refused `invalid` for the service's missing day."""
    pool = await schema()
    await store.migrate(pool, migrations())
    tomorrow = TODAY + DAY_MS
    async with pool.acquire() as conn:
        name = "position_rows_" + time.strftime("%Y%m%d", time.gmtime(tomorrow / 1000))
        await conn.execute(f'DROP TABLE "{name}"')
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5)
    writer.start()
    try:
        assert await answer(writer, answers, pos(1, tomorrow + 5), pos(2, TODAY + 5)) == {1: "ack", 2: "ack"}
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM positions") == 2
    finally:
        await writer.close()
