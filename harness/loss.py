"""Loss and duplicates, as sets over (driver, seq), checked against PostgreSQL.

"Lost" is a (driver, seq) that was acknowledged but is not stored; "unacknowledged" one sent but
never acknowledged; "duplicated" one stored more than once. Positions and scans share a driver's
seq space, so both tables are read by default.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg

TABLES = ("positions", "scans")
Pair = tuple[str, int]


async def stored_seqs(dsn: str, org: str, tables: Iterable[str] = TABLES) -> dict[str, list[int]]:
    """driver -> every seq stored for `org` in `tables` (a seq stored twice appears twice)."""
    tables = tuple(tables)
    if not tables or not set(tables) <= set(TABLES):
        raise ValueError(f"tables must be among {TABLES}: {tables}")
    union = " UNION ALL ".join(f"SELECT driver_id, seq FROM {t} WHERE org = $1" for t in tables)  # noqa: S608
    sql = f"SELECT driver_id, array_agg(seq) FROM ({union}) s GROUP BY driver_id"  # noqa: S608 - names from TABLES
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(sql, org)
    finally:
        await conn.close()
    return {r[0]: list(r[1]) for r in rows}


@dataclass
class StoreCheck:
    """What was sent and acknowledged, against what PostgreSQL stored."""

    acked: int  # acknowledged (driver, seq) pairs
    stored: int  # distinct stored pairs
    lost: list[Pair]  # acknowledged, not stored
    duplicated: list[Pair]  # stored more than once
    rows: int = 0  # stored rows, duplicates included
    sent: int = 0  # sent pairs (when known)
    unacked: list[Pair] = field(default_factory=list)  # sent, never acknowledged (when `sent` is known)

    def assert_exactly_once(self) -> None:
        assert not self.lost, f"{len(self.lost)} acknowledged events are not stored: {self.lost[:10]}"
        assert not self.duplicated, f"{len(self.duplicated)} events stored twice: {self.duplicated[:10]}"


def account(
    stored: Mapping[str, list[int]],
    acked: Mapping[str, set[int]],
    sent: Mapping[str, set[int]] | None = None,
) -> StoreCheck:
    """The sets: sent minus acknowledged, acknowledged minus stored, stored more than once. One
    driver at a time, so millions of events cost sets of ints, not a set of pairs."""
    check = StoreCheck(acked=0, stored=0, lost=[], duplicated=[])
    sent = sent or {}
    for driver in {**stored, **acked, **sent}:
        seqs, ok = stored.get(driver, []), acked.get(driver, set())
        have = set(seqs)
        check.rows += len(seqs)
        check.stored += len(have)
        check.acked += len(ok)
        check.sent += len(sent.get(driver, ()))
        if len(have) != len(seqs):
            check.duplicated += [(driver, s) for s, n in Counter(seqs).items() if n > 1]
        check.lost += [(driver, s) for s in ok - have]
        check.unacked += [(driver, s) for s in sent.get(driver, set()) - ok]
    check.lost.sort()
    check.unacked.sort()
    return check


async def check_stored(
    dsn: str, org: str, acked: Mapping[str, set[int]], *, sent: Mapping[str, set[int]] | None = None
) -> StoreCheck:
    """Every acknowledged (driver, seq) of `org` against PostgreSQL: stored, and stored once."""
    return account(await stored_seqs(dsn, org), acked, sent)
