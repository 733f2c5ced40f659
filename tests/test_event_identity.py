"""An event's identity is its whole content (issue 11, item 8): real websockets, real PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg

from harness.clients import Phone, now_ms, pos, scan
from harness.tokens import token


async def test_a_scan_resent_with_other_content_is_a_conflict(instance: Any, org: str, db: asyncpg.Connection) -> None:
    """Same seq and ts, another package or event: `conflict`, never an ack (a `deliver` that
    vanished behind an ack would be a lost medicine)."""
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms() - 10_000
    await phone.send(scan(1, "PKG-1", "pickup", ts=t))
    await phone.send(pos(2, ts=t, lat=1.0, lon=1.0))
    await phone.until(lambda p: p.acked == {1, 2})
    phone.acked.clear()
    await phone.send(scan(1, "PKG-1", "deliver", ts=t))  # another event
    await phone.send(scan(1, "PKG-2", "pickup", ts=t))  # another package
    await phone.send(pos(2, ts=t, lat=1.5, lon=1.0))  # a position: another lat
    await phone.until(lambda p: len(p.errors) == 3)
    await phone.send(scan(1, "PKG-1", "pickup", ts=t))  # the very event again: a resend
    await phone.until(lambda p: 1 in p.acked)
    assert [(e["code"], e["seq"]) for e in phone.errors] == [("conflict", 1), ("conflict", 1), ("conflict", 2)]
    rows = await db.fetch("SELECT seq, package, event FROM scans WHERE org=$1", org)
    assert [(r["seq"], r["package"], r["event"]) for r in rows] == [(1, "PKG-1", "pickup")]
    # ...and in one batch: twins are acked, a look-alike is refused.
    phone.errors.clear()
    phone.acked.clear()
    await phone.send(
        {
            "type": "batch",
            "items": [
                scan(3, "PKG-1", "deliver", ts=t),
                scan(3, "PKG-1", "deliver", ts=t),
                scan(3, "PKG-1", "fail", ts=t),
            ],
        }
    )
    await phone.until(lambda p: 3 in p.acked and len(p.errors) == 1)
    assert [(e["code"], e["seq"]) for e in phone.errors] == [("conflict", 3)]
