"""Webhooks over real sockets: registered over HTTP, written to the outbox with their facts,
delivered signed to a real HTTP receiver in this process (allow-listed loopback), retried, disabled
by 410, dead-lettered, replayed; the delivery log over HTTP; address policy at registration."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import asyncpg
import pytest

from harness.clients import Phone, acked, now_ms, scan
from harness.http import consign, http
from harness.instances import Instance
from harness.tokens import token
from harness.wait import wait_until
from harness.webhooks import Receiver, verify

ALL = ["package.state_changed", "alert.opened", "alert.acknowledged", "alert.resolved", "custody.checkpoint"]
LOOPBACK = ("127.0.0.1",)


def _disp(org: str) -> str:
    return token("dispatcher", "ops", org)


async def _register(inst: Instance, org: str, url: str, events: list[str] = ALL) -> dict[str, Any]:
    status, out = await http(inst, "POST", "/v1/webhooks", _disp(org), {"url": url, "events": events})
    assert status == 201, out
    return dict(out)


async def _log(inst: Instance, org: str, hook: str, **query: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        status, page = await http(inst, "GET", f"/v1/webhooks/{hook}/deliveries", _disp(org), query={**query, "after": after})
        assert status == 200, page
        out += page["deliveries"]
        if page["next"] is None:
            return out
        after = page["next"]


async def _events(database_url: str, org: str) -> list[tuple[str, str, str]]:
    """(webhook-id, type, package) of every event the outbox holds for `org`, in the order written."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, type, okey FROM webhook_events WHERE org = $1 ORDER BY n", org)
    finally:
        await conn.close()
    return [(r["id"], r["type"], r["okey"]) for r in rows]


def _first_receipts(receiver: Receiver) -> list[tuple[str, dict[str, Any]]]:
    """(webhook-id, body) of each message the first time it arrived: the receiver's dedupe."""
    seen: dict[str, dict[str, Any]] = {}
    for r in receiver.got:
        seen.setdefault(r.id, r.json)
    return list(seen.items())


def _per_package(ids: list[str], events: list[tuple[str, str, str]]) -> dict[str, list[str]]:
    package = {e[0]: e[2] for e in events}
    out: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        out[package[i]].append(i)
    return out


async def test_events_are_signed_delivered_in_order_logged_and_replayed(
    start_instance: Any, org: str, database_url: str
) -> None:
    receiver = await Receiver().start()
    try:
        inst = await start_instance(webhook_allow=LOOPBACK, webhook_poll_s=0.1)
        hook = await _register(inst, org, receiver.url)
        assert hook["secret"].startswith("whsec_") and hook["id"].startswith("wh_")
        await consign(inst, org, "PKG-1", "st-marys")
        phone = await Phone.connect(inst.url, token("driver", "d-1", org))
        t = now_ms() - 60_000
        await phone.send(scan(1, "PKG-1", "pickup", ts=t, temp_c=9.5))  # above 2-8 C: an alert opens
        await wait_until(lambda: any(r.json["type"] == "alert.opened" for r in receiver.got), 10, "alert.opened")
        # (Scans chained in one transaction would give one package.state_changed, with the latest state.)
        await phone.send(scan(2, "PKG-1", "deliver", ts=t + 1000, lat=-1.3, lon=36.8))
        await acked(phone, 1, 2)
        await wait_until(lambda: any(r.json["data"].get("state") == "delivered" for r in receiver.got), 10, "delivered")
        alert = next(r.json["data"] for r in receiver.got if r.json["type"] == "alert.opened")
        assert (await http(inst, "POST", f"/v1/alerts/{alert['id']}/ack", _disp(org), {"comment": "on it"}))[0] == 200
        assert (await http(inst, "POST", f"/v1/alerts/{alert['id']}/resolve", _disp(org), {"reason": "checked"}))[0] == 200
        events = await _events(database_url, org)
        await wait_until(lambda: len(receiver.got) >= len(events), 10, "every event delivered")
        # Every request carries a valid Standard Webhooks signature (verified independently).
        assert all(verify(hook["secret"], r.headers, r.body) for r in receiver.got)
        assert not verify(hook["secret"], {**receiver.got[0].headers, "webhook-id": "msg_other"}, receiver.got[0].body)
        got = _first_receipts(receiver)
        assert [i for i, _ in got] == [e[0] for e in events]  # one package: exactly the order written
        types = [body["type"] for _, body in got]
        assert types[0] == "package.state_changed" and got[0][1]["data"]["state"] == "created"
        assert set(types) == set(ALL)
        assert types[-2:] == ["alert.acknowledged", "alert.resolved"]
        checkpoints = [b["data"] for _, b in got if b["type"] == "custody.checkpoint"]
        assert [(c["index"], c["event"], c["seq"]) for c in checkpoints] == [(1, "pickup", 1), (2, "deliver", 2)]
        states = [b["data"]["state"] for _, b in got if b["type"] == "package.state_changed"]
        assert states == ["created", "picked_up", "delivered"]
        ack = next(b for _, b in got if b["type"] == "alert.acknowledged")["data"]
        assert ack["acknowledged_by"] == "ops" and ack["id"] == alert["id"]
        # The delivery log.
        log = await _log(inst, org, hook["id"])
        assert [d["webhook_id"] for d in log] == [e[0] for e in events]
        assert all(d["state"] == "delivered" and d["status"] == 200 and d["attempts"] == 1 for d in log)
        assert all(d["latency_ms"] >= 0 and d["response"] == "ok" for d in log)
        # Replay: everything again, with the same webhook-ids.
        before = len(receiver.got)
        status, out = await http(inst, "POST", f"/v1/webhooks/{hook['id']}/replay?since=0", _disp(org))
        assert status == 202 and out == {"replayed": len(events)}
        await wait_until(lambda: len(receiver.got) >= before + len(events), 10, "the replay")
        assert [r.id for r in receiver.got[before:]] == [e[0] for e in events]
        assert len(receiver.got) == before + len(events)
    finally:
        await receiver.stop()
