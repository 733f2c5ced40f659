"""The second way of the custody stamp control messages: PostgreSQL LISTEN/NOTIFY (custody/notify.py).
The regression test of the gap it closes (a handover received by an instance without Redis) is in
tests/test_readiness.py; here: long messages split under PostgreSQL's payload limit, and a
listener whose connection is killed listens again."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import orjson

from harness.instances import Instance
from harness.wait import wait_until
from tracker.custody.notify import CHANNEL, per_org


def _stamps(inst: Instance) -> Any:
    return inst.node.extension.layer.stamps  # type: ignore[attr-defined]


async def test_a_long_message_is_split_under_the_payload_limit_in_order(instance: Instance, database_url: str) -> None:
    """500 closing notices and a `drivers` + `chained` pair: every NOTIFY under 8000 bytes, each
    naming its sender, together the whole message, `drivers` all heard before any `chained`."""
    heard: list[str] = []
    sender = f"elsewhere-{uuid.uuid4().hex[:8]}"  # the channel is the database's: other instances' notices too

    def hear(_c: object, _p: object, _ch: object, payload: str) -> None:
        if orjson.loads(payload).get("from") == sender:
            heard.append(payload)

    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(CHANNEL, hear)
        await wait_until(lambda: _stamps(instance).notifier.listening, 10, "the instance to listen")
        closing = [["org-split", f"PKG-{i:05d}", f"d-{i % 7}", i, "handover"] for i in range(500)]
        drivers = [["org-split", f"d-{i:04d}"] for i in range(400)]
        chained = [["org-split", f"PKG-{i:05d}", f"d-{i % 7}", i] for i in range(400)]
        msg = {"from": sender, "closing": closing, "drivers": drivers, "chained": chained}
        assert await _stamps(instance).notifier.send(msg)
        total = len(orjson.dumps(msg))

        def whole() -> bool:
            return sum(len(p) for p in heard) >= total

        await wait_until(whole, 10, lambda: f"all of the message by NOTIFY ({sum(map(len, heard))}/{total} bytes)")
        parts = [orjson.loads(p) for p in heard]
        assert len(parts) > 1
        assert all(len(p.encode()) < 8000 for p in heard), max(len(p.encode()) for p in heard)
        # Each part names its sender: one that did not would be missing from what was heard.
        assert [n for p in parts for n in p.get("closing", [])] == closing
        assert [n for p in parts for n in p.get("drivers", [])] == drivers
        assert [n for p in parts for n in p.get("chained", [])] == chained
        last_drivers = max(i for i, p in enumerate(parts) if "drivers" in p)
        assert all(i >= last_drivers for i, p in enumerate(parts) if "chained" in p)  # the same one at most
        # the instance heard them too (not its own): every closing notice noted once
        await wait_until(
            lambda: all(tuple(n) in _stamps(instance)._heard for n in closing), 10, "the instance to hear the notices"
        )
    finally:
        await listener.close()


async def test_a_listener_whose_connection_is_killed_listens_again(instance: Instance, db: asyncpg.Connection) -> None:
    """The listening backend is terminated: the instance takes another connection and hears a
    closing notice NOTIFYed afterwards (the old backend is gone, not back in the pool)."""
    notifier = _stamps(instance).notifier
    await wait_until(lambda: notifier.listening, 10, "the instance to listen")
    old = notifier.server_pid
    assert await db.fetchval("SELECT pg_terminate_backend($1)", old)
    await wait_until(lambda: notifier.listening and notifier.server_pid != old, 15, "the instance to listen again")
    notice = ["org-relisten", "PKG-1", "d-2", 1, "handover"]
    payload = orjson.dumps({"from": "elsewhere", "closing": [notice]}).decode()

    await db.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)  # after LISTEN: heard
    await wait_until(lambda: tuple(notice) in _stamps(instance)._heard, 10, "the notice heard on the new connection")
    assert not await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", old)


def test_a_stamp_message_goes_to_each_org_it_names() -> None:
    """Issue 17: a stamp control message is split per org (each org's control channel reaches only
    the instances holding its drivers), keeping each list's order and `drivers` before `chained`;
    a resync goes to every org asked for, alone if it has nothing else."""
    msg = {
        "from": "i-1",
        "closing": [["a", "p1", "d1", 3, "deliver"], ["b", "p2", "d2", 4, "deliver"], ["a", "p3", "d1", 5, "fail"]],
        "drivers": [["b", "d2"]],
        "chained": [["b", "p2", "d2", 4]],
        "resync": 1,
    }
    parts = per_org(msg, {"a", "c"})
    assert parts == {
        "a": {"from": "i-1", "closing": [msg["closing"][0], msg["closing"][2]], "resync": 1},
        "b": {
            "from": "i-1",
            "closing": [msg["closing"][1]],
            "drivers": [["b", "d2"]],
            "chained": msg["chained"],
            "resync": 1,
        },
        "c": {"from": "i-1", "resync": 1},
    }
    assert list(parts["b"]) == ["from", "closing", "drivers", "chained", "resync"]
    assert per_org({"from": "i-1", "shared": [["a", "p1"]]}, {"b"}) == {"a": {"from": "i-1", "shared": [["a", "p1"]]}}
