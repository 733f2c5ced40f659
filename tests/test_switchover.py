"""A Multi-AZ PostgreSQL: a primary and a synchronous streaming standby behind one multi-host DSN
(`target_session_attrs=read-write`), failed over while phones keep sending (issue 11, item 11).

Both ways a managed database changes its primary: a hard failover (the primary is SIGKILLed, the
standby promoted) and a planned switchover (the primary turns read-only, the standby is promoted
3 s later: for those 3 s no host of the DSN is writable, and asyncpg raises
`TargetServerAttributeNotMatched` on every reconnect). Every event must be answered within 30 s
(ack or `unavailable`), nothing acked may be missing on the new primary, and acks must resume.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from harness.clients import Phone, now_ms, pos
from harness.servers import PgCluster
from harness.tokens import token
from harness.wait import wait_until

ANSWER_S = 30.0
PHONES = 4
INTERVAL_S = 0.02  # per phone: 200 events/s in all


@dataclass
class Pair:
    primary: PgCluster
    standby: PgCluster

    @property
    def dsn(self) -> str:
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/tracker?target_session_attrs=read-write"


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    primary = PgCluster()
    standby: PgCluster | None = None
    try:
        await primary.start()
        await primary.create_database("tracker")
        standby = PgCluster(standby_of=primary)
        await standby.start()
        # Synchronous replication, as in a Multi-AZ deployment: a commit (and so an ack) waits
        # until the standby has its WAL, so a failover loses nothing acknowledged. Set on the
        # primary alone, after the base backup: the promoted standby must not wait for a standby.
        conn = await asyncpg.connect(primary.url())
        try:
            await conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

        async def synchronous() -> bool:
            return await primary.standbys() == ["sync"]

        await wait_until(synchronous, 30, "the standby to stream synchronously")
        yield Pair(primary, standby)
    finally:
        primary.close()
        if standby is not None:
            standby.close()


@dataclass
class Driver:
    """One phone that sends a position every INTERVAL_S and records when each seq was answered."""

    phone: Phone
    sent: dict[int, float] = field(default_factory=dict)
    answered: dict[int, tuple[str, float]] = field(default_factory=dict)  # seq -> ("ack" | code, when)

    def note(self, frame: dict[str, Any]) -> None:
        t = time.monotonic()
        if frame["type"] == "ack":
            code, ranges = "ack", frame["ranges"]
        elif frame["type"] == "error":
            code, ranges = frame["code"], frame.get("ranges") or [[frame["seq"], frame["seq"]]]
        else:
            return
        for a, b in ranges:
            for seq in range(a, b + 1):
                self.answered.setdefault(seq, (code, t))

    async def read(self) -> None:
        while True:
            self.note(await self.phone.recv(timeout=120))

    async def send(self, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            self.sent[seq] = time.monotonic()
            await self.phone.send(pos(seq, ts=now_ms()))
            await asyncio.sleep(INTERVAL_S)  # the phones' pace, not a wait for an effect

    def acked_after(self, t: float) -> bool:
        return any(code == "ack" and self.sent[seq] > t for seq, (code, _) in self.answered.items())


async def run_fault(start_instance: Any, org: str, pair: Pair, fault: Callable[[], Awaitable[None]]) -> list[Driver]:
    """Phones send before, during and after `fault` (which returns once the new primary is
    promoted); returns once every event sent is answered, or fails after ANSWER_S."""
    inst = await start_instance(database_url=pair.dsn)
    drivers = [Driver(await Phone.connect(inst.url, token("driver", f"d-{i}", org))) for i in range(PHONES)]
    stop = asyncio.Event()
    readers = [asyncio.create_task(d.read()) for d in drivers]
    senders = [asyncio.create_task(d.send(stop)) for d in drivers]
    try:
        await wait_until(lambda: all(d.acked_after(0) for d in drivers), 10, "acks before the fault")
        await fault()
        promoted = time.monotonic()
        await wait_until(lambda: all(d.acked_after(promoted) for d in drivers), ANSWER_S, "acks on the new primary")
        resumed = time.monotonic() - promoted
        stop.set()
        await asyncio.gather(*senders)
        last = max(max(d.sent.values()) for d in drivers)
        await wait_until(
            lambda: all(d.answered.keys() >= d.sent.keys() for d in drivers),
            max(1.0, last + ANSWER_S - time.monotonic()),
            "every event answered",
        )
        waits = [d.answered[seq][1] - t for d in drivers for seq, t in d.sent.items()]
        print(
            f"acks again {resumed:.2f} s after the promotion; longest answer {max(waits):.2f} s; "
            f"{sum(len(d.sent) for d in drivers)} events"
        )
        assert max(waits) < ANSWER_S
        return drivers
    finally:
        stop.set()
        for task in senders + readers:
            task.cancel()
        await asyncio.gather(*senders, *readers, return_exceptions=True)


async def assert_acked_are_stored(pair: Pair, org: str, drivers: list[Driver]) -> None:
    conn = await asyncpg.connect(pair.standby.url("tracker"))
    try:
        for i, d in enumerate(drivers):
            acked = {seq for seq, (code, _) in d.answered.items() if code == "ack"}
            rows = await conn.fetch("SELECT seq FROM positions WHERE org = $1 AND driver_id = $2", org, f"d-{i}")
            assert acked <= {r["seq"] for r in rows}, "an acknowledged event is missing on the new primary"
            assert {code for code, _ in d.answered.values()} <= {"ack", "unavailable"}
    finally:
        await conn.close()


async def test_hard_failover_primary_killed_standby_promoted(start_instance: Any, org: str, pair: Pair) -> None:
    async def fault() -> None:
        pair.primary.kill()
        # A failover manager takes a while to notice: meanwhile one host refuses connections and
        # the other is a standby (asyncpg: TargetServerAttributeNotMatched on every reconnect).
        await asyncio.sleep(2.0)  # the outage itself, not a wait for an effect
        await pair.standby.promote()

    drivers = await run_fault(start_instance, org, pair, fault)
    await assert_acked_are_stored(pair, org, drivers)


async def test_switchover_primary_read_only_then_standby_promoted_3s_later(
    start_instance: Any, org: str, pair: Pair
) -> None:
    async def fault() -> None:
        conn = await asyncpg.connect(pair.primary.url())
        try:
            await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        await asyncio.sleep(3.0)  # the switchover's gap, with no writable host: the fault itself
        await pair.standby.promote()

    drivers = await run_fault(start_instance, org, pair, fault)
    await assert_acked_are_stored(pair, org, drivers)
