"""The batch writer (tracker/writer.py) alone, on the real test PostgreSQL, without a server:
answered after the commit, resends acked again, conflicts told apart, a bad event bisected out,
a full buffer and an expired deadline answered `unavailable`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tracker import store
from tracker.custody.extension import migrations
from tracker.protocol.events import Position, Scan
from tracker.store import Pending
from tracker.writer import Writer

Answer = tuple[list[Pending], list[tuple[Pending, str, str]]]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await store.migrate(pool, migrations())
    yield pool
    await pool.close()


class Answers:
    def __init__(self) -> None:
        self.stored: list[Pending] = []
        self.refused: list[tuple[Pending, str, str]] = []
        self.event = asyncio.Event()

    def __call__(self, stored: list[Pending], refused: list[tuple[Pending, str, str]]) -> None:
        self.stored += stored
        self.refused += refused
        self.event.set()

    async def until(self, n: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.stored) + len(self.refused) < n:
                self.event.clear()
                await self.event.wait()

    def codes(self) -> dict[int, str]:
        return {p.event.seq: code for p, code, _ in self.refused}


def item(org: str, seq: int, ts: int | None = None, *, driver: str = "d-1", kind: str = "pos", **kw: Any) -> Pending:
    ts = ts if ts is not None else 1_764_240_000_000 + seq
    event: Position | Scan
    if kind == "pos":
        event = Position(seq, ts, kw.get("lat", -1.29), 36.82)
    else:
        event = Scan(seq, ts, kw.get("package", "PKG-1"), "pickup")
    return Pending(owner=None, org=org, driver=driver, event=event, received_at=int(time.time() * 1000))


async def test_answers_come_after_the_commit_and_resends_are_acked_again(
    pool: asyncpg.Pool, org: str, db: asyncpg.Connection
) -> None:
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5)
    writer.start()
    try:
        assert writer.submit([item(org, s) for s in (1, 2, 3)]) == []
        await answers.until(3)
        # Acked only once committed: another connection sees all of them.
        assert await db.fetchval("SELECT count(*) FROM positions WHERE org = $1", org) == 3
        assert sorted(p.event.seq for p in answers.stored) == [1, 2, 3]
        writer.submit([item(org, 2), item(org, 2)])  # the same event twice more, in one batch too
        await answers.until(5)
        assert [p.event.seq for p in answers.stored[3:]] == [2, 2] and not answers.refused
        assert await db.fetchval("SELECT count(*) FROM positions WHERE org = $1", org) == 3
    finally:
        await writer.close()


async def test_a_different_event_under_a_taken_seq_is_a_conflict(pool: asyncpg.Pool, org: str) -> None:
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5)
    writer.start()
    try:
        writer.submit([item(org, 1)])
        await answers.until(1)
        writer.submit([item(org, 1, ts=1_764_240_999_000), item(org, 1, kind="scan"), item(org, 7), item(org, 7, 5)])
        await answers.until(5)
        assert answers.codes() == {1: "conflict", 7: "conflict"}  # stored before, or twins in one batch
        assert [p.event.seq for p in answers.stored] == [1, 7]
    finally:
        await writer.close()


async def test_identity_is_the_whole_content(pool: asyncpg.Pool, org: str) -> None:
    """Same seq and ts, other content: `conflict` (a `deliver` must never vanish behind an ack);
    the same content again is a resend, also at the stored precision of optional numbers."""
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5)
    writer.start()
    ts = 1_764_240_000_000
    now = int(time.time() * 1000)  # received now: within the answer deadline
    try:
        writer.submit(
            [
                Pending(None, org, "d-1", Scan(1, ts, "PKG-1", "pickup", temp_c=4.1), now),
                Pending(None, org, "d-1", Position(2, ts, -1.29, 36.82, bat=0.3), now),
            ]
        )
        await answers.until(2)
        again = [
            Scan(1, ts, "PKG-1", "deliver", temp_c=4.1),  # another event
            Scan(1, ts, "PKG-2", "pickup", temp_c=4.1),  # another package
            Scan(1, ts, "PKG-1", "pickup", temp_c=4.2),  # another reading
            Scan(1, ts, "PKG-1", "pickup", temp_c=4.1, note="x"),  # another note
            Position(2, ts, -1.3, 36.82, bat=0.3),  # another lat
            Position(2, ts, -1.29, 36.82),  # without its battery reading
            Scan(1, ts, "PKG-1", "pickup", temp_c=4.1),  # the very scan: a resend
            Position(2, ts, -1.29, 36.82, bat=0.3),  # the very position (bat stored as a real)
        ]
        for ev in again:  # one flush each: compared with what is stored
            n = len(answers.stored) + len(answers.refused)
            writer.submit([Pending(None, org, "d-1", ev, now)])
            await answers.until(n + 1)
        assert [(p.event.seq, code) for p, code, _ in answers.refused] == [(1, "conflict")] * 4 + [(2, "conflict")] * 2
        assert [p.event.seq for p in answers.stored] == [1, 2, 1, 2]
        # Twins in one batch: the same content piggybacks, other content is refused.
        answers.refused.clear()
        writer.submit(
            [Pending(None, org, "d-1", Scan(3, ts, "PKG-1", ev_), now) for ev_ in ("deliver", "deliver", "fail")]
        )
        await answers.until(4 + 3)
        assert [(p.event.seq, code) for p, code, _ in answers.refused] == [(3, "conflict")]
        assert [p.event.seq for p in answers.stored[4:]] == [3, 3]
    finally:
        await writer.close()


async def test_an_unstorable_event_is_refused_alone(pool: asyncpg.Pool, org: str, db: asyncpg.Connection) -> None:
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=50)
    writer.start()
    try:
        bad = item(org, 5, kind="scan", package="PKG\x00NUL")  # PostgreSQL refuses NUL in text
        writer.submit([item(org, s) for s in range(1, 5)] + [bad] + [item(org, s) for s in range(6, 10)])
        await answers.until(9)
        assert answers.codes() == {5: "invalid"}
        assert await db.fetchval("SELECT count(*) FROM positions WHERE org = $1", org) == 8
    finally:
        await writer.close()


async def test_a_full_buffer_refuses_what_does_not_fit(pool: asyncpg.Pool, org: str) -> None:
    writer = Writer(pool, Answers(), buffer_max=3)  # not started: nothing drains
    rejected = writer.submit([item(org, s) for s in range(1, 6)])
    assert [p.event.seq for p in rejected] == [4, 5] and writer.buffered == 3


async def test_what_waits_past_the_deadline_is_answered_unavailable(org: str) -> None:
    # PostgreSQL unreachable (a closed port): the batch is kept and retried until its deadline.
    pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:9/none", min_size=0, max_size=1, timeout=0.5)
    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=5, answer_deadline_s=0.5)
    writer.start()
    try:
        writer.submit([item(org, 1), item(org, 2)])
        await answers.until(2, timeout=15)
        assert answers.codes() == {1: "unavailable", 2: "unavailable"} and not writer.healthy
    finally:
        await writer.close()
        await pool.close()


async def test_a_large_batch_goes_through_copy_with_the_same_answers(
    pool: asyncpg.Pool, org: str, db: asyncpg.Connection
) -> None:
    """A flush of eventstore.COPY_MIN positions or more is staged by COPY: resends are acked and not
    stored twice, a different event under a taken seq is a conflict, the rest is stored."""
    from tracker.eventstore import COPY_MIN

    answers = Answers()
    writer = Writer(pool, answers, flush_interval_ms=50, flush_max_events=COPY_MIN + 600)
    writer.start()
    try:
        writer.submit([item(org, s, driver=f"d-{s % 7}") for s in range(1, 11)])
        await answers.until(10)
        again = [item(org, s, driver=f"d-{s % 7}") for s in range(1, 10)]  # resends
        other = [item(org, 10, ts=1, driver="d-3")]  # seq 10 of d-3 is taken by another event
        new = [item(org, s, driver=f"d-{s % 7}") for s in range(11, COPY_MIN + 500)]
        assert writer.submit(again + other + new) == []
        await answers.until(10 + len(again) + 1 + len(new), timeout=30)
        assert answers.codes() == {10: "conflict"}
        assert len(answers.stored) == 10 + len(again) + len(new)
        stored = await db.fetchval("SELECT count(*) FROM positions WHERE org = $1", org)
        assert stored == 10 + len(new)
        # It was staged: a pooled connection of the writer holds the stage (a temporary table).
        staged = "SELECT count(*) FROM pg_class WHERE relname = 'tracker_stage' AND relpersistence = 't'"
        assert await db.fetchval(staged) >= 1
    finally:
        await writer.close()
