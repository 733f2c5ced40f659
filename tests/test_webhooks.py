"""Webhooks over real sockets: registered over HTTP, written to the outbox with their facts,
delivered signed to a real HTTP receiver in this process (allow-listed loopback), retried, disabled
by 410, dead-lettered, replayed; the delivery log over HTTP; address policy at registration."""

from __future__ import annotations

import asyncio
import base64
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from harness.clients import Phone, acked, now_ms, scan
from harness.http import consign, http
from harness.instances import Instance
from harness.tokens import token
from harness.wait import wait_until
from harness.webhooks import Receiver, verify

from .schema_check import assert_frame_valid

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
        status, page = await http(
            inst, "GET", f"/v1/webhooks/{hook}/deliveries", _disp(org), query={**query, "after": after}
        )
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
        assert (await http(inst, "POST", f"/v1/alerts/{alert['id']}/resolve", _disp(org), {"reason": "checked"}))[
            0
        ] == 200
        events = await _events(database_url, org)
        await wait_until(lambda: len(receiver.got) >= len(events), 10, "every event delivered")
        # Every request carries a valid Standard Webhooks signature (verified independently).
        assert all(verify(hook["secret"], r.headers, r.body) for r in receiver.got)
        assert not verify(hook["secret"], {**receiver.got[0].headers, "webhook-id": "msg_other"}, receiver.got[0].body)
        got = _first_receipts(receiver)
        for _, body in got:
            assert_frame_valid(body, "webhook-event")
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
        status, page = await http(inst, "GET", f"/v1/webhooks/{hook['id']}/deliveries", _disp(org))
        assert status == 200
        assert_frame_valid(page, "webhook-deliveries")
        assert_frame_valid(hook, "webhook")
        assert_frame_valid((await http(inst, "GET", f"/v1/webhooks/{hook['id']}", _disp(org)))[1], "webhook")
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


async def _consign_many(inst: Instance, org: str, packages: list[str]) -> None:
    for p in packages:
        await consign(inst, org, p, "st-marys")


@pytest.mark.parametrize(
    "down_s", [pytest.param(6.0, id="down-6s"), pytest.param(60.0, id="down-60s", marks=pytest.mark.slow)]
)
async def test_receiver_down_then_back_every_event_once_after_dedupe(
    start_instance: Any, org: str, database_url: str, down_s: float
) -> None:
    """The receiver refuses connections for `down_s` (real time) while events keep coming; backoff
    is short (base 0.2 s, max 2 s) so that retries happen all through the outage."""
    receiver = Receiver()
    inst = await start_instance(
        webhook_allow=LOOPBACK, webhook_poll_s=0.1, webhook_backoff_base_s=0.2, webhook_backoff_max_s=2.0
    )
    hook = await _register(inst, org, receiver.url)  # registered while nothing listens: allowed
    loop = asyncio.get_running_loop()
    down_until = loop.time() + down_s
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    seq = 0
    for i in range(6):  # events all through the outage
        await _consign_many(inst, org, [f"PKG-{i}"])
        seq += 1
        await phone.send(scan(seq, f"PKG-{i}", "pickup"))
        await acked(phone, seq)
        await asyncio.sleep(max(0.0, (down_until - loop.time()) / (7 - i)))  # spread over the down period
    log = await _log(inst, org, hook["id"])
    assert log and all(d["state"] == "pending" for d in log) and max(d["attempts"] for d in log) >= 2
    assert all(d["error"] and d["status"] is None for d in log if d["attempts"])
    await asyncio.sleep(max(0.0, down_until - loop.time()))  # the outage lasts its full length
    await receiver.start()
    try:
        events = await _events(database_url, org)
        assert len(events) >= 6 * 3  # per package: created, checkpoint, picked_up

        async def all_delivered() -> bool:
            return all(d["state"] == "delivered" for d in await _log(inst, org, hook["id"]))

        await wait_until(all_delivered, 30, "every delivery to succeed after the outage")
        got = _first_receipts(receiver)
        assert sorted(i for i, _ in got) == sorted(e[0] for e in events)  # every event, each id once after dedupe
        assert all(verify(hook["secret"], r.headers, r.body) for r in receiver.got)
        order = _per_package([i for i, _ in got], events)
        written = _per_package([e[0] for e in events], events)
        assert order == written  # each package's events in the order they were written
        log = await _log(inst, org, hook["id"])
        assert max(d["attempts"] for d in log) >= 3
    finally:
        await receiver.stop()


async def test_410_disables_the_endpoint(start_instance: Any, org: str, database_url: str) -> None:
    receiver = await Receiver(status=410).start()
    try:
        inst = await start_instance(webhook_allow=LOOPBACK, webhook_poll_s=0.1)
        hook = await _register(inst, org, receiver.url)
        await consign(inst, org, "PKG-1", "st-marys")
        await wait_until(lambda: receiver.got, 10, "the first delivery")

        async def disabled() -> bool:
            return not (await http(inst, "GET", f"/v1/webhooks/{hook['id']}", _disp(org)))[1]["enabled"]

        await wait_until(disabled, 10, "the endpoint to be disabled")
        _, one = await http(inst, "GET", f"/v1/webhooks/{hook['id']}", _disp(org))
        assert "410" in one["disabled_reason"]
        log = await _log(inst, org, hook["id"])
        assert [(d["state"], d["status"], d["attempts"]) for d in log] == [("dead", 410, 1)]
        await consign(inst, org, "PKG-2", "st-marys")  # after: no delivery for a disabled endpoint
        assert len(await _events(database_url, org)) == 2
        assert len(await _log(inst, org, hook["id"])) == 1 and len(receiver.got) == 1
        status, _ = await http(inst, "POST", f"/v1/webhooks/{hook['id']}/replay?since=0", _disp(org))
        assert status == 409
        # The integrator fixed it: enabled again, it takes new events, and a replay sends the missed one.
        receiver.status = 200
        status, one = await http(inst, "POST", f"/v1/webhooks/{hook['id']}/enable", _disp(org))
        assert status == 200 and one["enabled"] and one["disabled_reason"] is None
        await consign(inst, org, "PKG-3", "st-marys")
        await wait_until(lambda: len(receiver.got) == 2, 10, "a delivery after enable")
        status, body = await http(inst, "POST", f"/v1/webhooks/{hook['id']}/replay?since=0", _disp(org))
        assert status == 202 and body["replayed"] == 3  # PKG-1's (dead), PKG-2's (never sent), PKG-3's again
        await wait_until(lambda: len(receiver.got) == 5, 10, "the replayed events")
        other = await http(inst, "POST", f"/v1/webhooks/{hook['id']}/enable", token("dispatcher", "u", "org-x"))
        assert other[0] == 404  # another org's dispatcher: no such webhook
    finally:
        await receiver.stop()


async def test_dead_letter_after_the_retry_window_and_short_response_prefix(start_instance: Any, org: str) -> None:
    receiver = await Receiver(status=500, answer=b"x" * 10_000).start()
    try:
        inst = await start_instance(
            webhook_allow=LOOPBACK,
            webhook_poll_s=0.1,
            webhook_backoff_base_s=0.1,
            webhook_backoff_max_s=0.3,
            webhook_retry_window_s=1.5,
        )
        hook = await _register(inst, org, receiver.url)
        await consign(inst, org, "PKG-1", "st-marys")

        async def dead() -> list[dict[str, Any]]:
            log = await _log(inst, org, hook["id"], state="dead")
            return log

        await wait_until(dead, 15, "the dead-letter state")
        [d] = await _log(inst, org, hook["id"])
        assert d["state"] == "dead" and d["status"] == 500 and d["attempts"] >= 3
        assert d["attempts"] == len(receiver.got)  # no attempt after the dead letter
        assert d["response"] == "x" * 256  # a short prefix, never the whole body
        assert d["error"] == "HTTP 500"
    finally:
        await receiver.stop()


async def test_two_instances_never_deliver_an_event_twice(start_instance: Any, org: str, database_url: str) -> None:
    receiver = await Receiver(delay_s=0.02).start()
    try:
        settings = {"webhook_allow": LOOPBACK, "webhook_poll_s": 0.05}
        a, b = await start_instance(**settings), await start_instance(**settings)
        hook = await _register(a, org, receiver.url)
        phones = [await Phone.connect(inst.url, token("driver", f"d-{i}", org)) for i, inst in enumerate((a, b))]
        for i in range(24):
            inst, phone = (a, b)[i % 2], phones[i % 2]
            await consign(inst, org, f"PKG-{i}", "st-marys")
            await phone.send(scan(i + 1, f"PKG-{i}", "pickup"))
        events = await _events(database_url, org)
        await wait_until(lambda: len(receiver.got) >= 24 * 3, 30, lambda: f"{len(receiver.got)} of {24 * 3} deliveries")
        events = await _events(database_url, org)

        async def settled() -> bool:
            return all(d["state"] == "delivered" for d in await _log(a, org, hook["id"]))

        await wait_until(settled, 30, "every delivery recorded")
        ids = receiver.ids()
        assert len(ids) == len(set(ids)) == len(events) == 24 * 3  # each event exactly once, no duplicate at all
        assert _per_package(ids, events) == _per_package([e[0] for e in events], events)
        attempts = [inst.server.app.state.webhooks.deliverer.attempts[hook["id"]] for inst in (a, b)]
        assert all(n > 0 for n in attempts), attempts  # both instances really delivered
        assert sum(attempts) == len(events)  # one attempt per event, all instances together
        assert all(d["attempts"] == 1 for d in await _log(a, org, hook["id"]))
    finally:
        await receiver.stop()


async def test_a_slow_receiver_does_not_delay_other_endpoints(start_instance: Any, org: str) -> None:
    slow, fast = await Receiver(delay_s=8.0).start(), await Receiver().start()
    try:
        inst = await start_instance(
            webhook_allow=LOOPBACK,
            webhook_poll_s=0.05,
            webhook_concurrency=8,
            webhook_endpoint_concurrency=2,
            webhook_timeout_s=10.0,
        )
        await _register(inst, org, slow.url, ["package.state_changed"])
        await _register(inst, org, fast.url, ["package.state_changed"])
        for i in range(12):
            await consign(inst, org, f"PKG-{i}", "st-marys")
        await wait_until(lambda: len(fast.got) == 12, 6, lambda: f"the fast endpoint got {len(fast.got)} of 12")
        assert len(slow.got) <= 2  # the slow endpoint holds at most its share of the slots
    finally:
        await slow.stop()  # its deliveries in flight fail at once: the instance stops without waiting 8 s
        await fast.stop()


REFUSED = [
    "http://127.0.0.1:9/hook",
    "http://localhost:9/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.10/hook",
    "http://172.16.0.1/hook",
    "http://100.64.0.1/hook",  # shared address space (CGNAT)
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
    "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
    "http://[fe80::1]/hook",
    "http://[fd00:ec2::254]/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
    "ftp://203.0.113.1/x",
    "http://user:pw@93.184.215.14/hook",
    "not a url",
]


async def test_registration_refuses_internal_addresses_and_scopes_to_the_org(start_instance: Any, org: str) -> None:
    inst = await start_instance()  # no allow-list
    tok = _disp(org)
    for url in REFUSED:
        status, out = await http(inst, "POST", "/v1/webhooks", tok, {"url": url, "events": ALL})
        assert status == 400, (url, out)
    status, out = await http(inst, "POST", "/v1/webhooks", tok, {"url": "http://127.0.0.1:9/", "events": ALL})
    assert "loopback" in out["error"]["message"] and "TRACKER_WEBHOOK_ALLOW" in out["error"]["message"]
    for events in ([], ["package.deleted"], "alert.opened", None):
        assert (await http(inst, "POST", "/v1/webhooks", tok, {"url": "http://93.184.215.14/", "events": events}))[
            0
        ] == 400
    # A public address (an IP literal: no DNS needed) is accepted; the secret is shown once.
    hook = await _register(inst, org, "http://93.184.215.14/hook", ["alert.opened"])
    assert hook["events"] == ["alert.opened"] and hook["enabled"] and hook["url"] == "http://93.184.215.14/hook"
    status, out = await http(inst, "GET", "/v1/webhooks", tok)
    assert status == 200 and [h["id"] for h in out["webhooks"]] == [hook["id"]]
    assert all("secret" not in h for h in out["webhooks"])
    # Only the org's dispatchers.
    other = token("dispatcher", "ops", "org-other")
    assert (await http(inst, "GET", f"/v1/webhooks/{hook['id']}", other))[0] == 404
    assert (await http(inst, "DELETE", f"/v1/webhooks/{hook['id']}", other))[0] == 404
    assert (await http(inst, "GET", "/v1/webhooks", other))[1] == {"webhooks": []}
    assert (await http(inst, "GET", "/v1/webhooks", token("client", "c", org, client="st-marys")))[0] == 403
    assert (await http(inst, "POST", "/v1/webhooks", token("driver", "d", org), {"url": "x"}))[0] == 403
    assert (await http(inst, "POST", f"/v1/webhooks/{hook['id']}/replay", tok))[0] == 400  # since is required
    assert (await http(inst, "DELETE", f"/v1/webhooks/{hook['id']}", tok))[0] == 204
    assert (await http(inst, "GET", f"/v1/webhooks/{hook['id']}", tok))[0] == 404


async def test_delivery_checks_the_address_again(start_instance: Any, org: str) -> None:
    """Registered through an instance that allows loopback, delivered by one that does not: the
    delivery is refused at connect time (what a DNS answer changed since registration would meet)."""
    receiver = await Receiver().start()
    try:
        a = await start_instance(webhook_allow=LOOPBACK, webhook_concurrency=0)
        b = await start_instance(webhook_poll_s=0.05, webhook_backoff_base_s=10.0)
        hook = await _register(a, org, receiver.url)
        await consign(a, org, "PKG-1", "st-marys")

        async def refused() -> list[dict[str, Any]]:
            return [d for d in await _log(a, org, hook["id"]) if d["error"]]

        await wait_until(refused, 10, "the attempt")
        [d] = await _log(b, org, hook["id"])
        assert d["state"] == "pending" and d["status"] is None and "loopback" in d["error"]
        assert receiver.got == []
    finally:
        await receiver.stop()


async def test_rotation_signs_with_both_secrets_during_the_grace_period(start_instance: Any, org: str) -> None:
    receiver = await Receiver().start()
    try:
        inst = await start_instance(webhook_allow=LOOPBACK, webhook_poll_s=0.05)
        hook = await _register(inst, org, receiver.url, ["package.state_changed"])
        status, rotated = await http(inst, "POST", f"/v1/webhooks/{hook['id']}/rotate", _disp(org))
        assert status == 200 and rotated["secret"] != hook["secret"] and rotated["secret"].startswith("whsec_")
        assert rotated["old_secret_until"] > now_ms() + 3_600_000  # 24 h by default
        await consign(inst, org, "PKG-1", "st-marys")
        await wait_until(lambda: receiver.got, 10, "the delivery")
        r = receiver.got[0]
        assert len(r.headers["webhook-signature"].split(" ")) == 2
        assert verify(hook["secret"], r.headers, r.body) and verify(rotated["secret"], r.headers, r.body)
        assert not verify("whsec_" + "A" * 44, r.headers, r.body)
    finally:
        await receiver.stop()


def test_the_worked_example_in_the_protocol_doc_verifies() -> None:
    """docs/PROTOCOL.md's signature example: its numbers agree with the spec's algorithm (the
    test's own verifier) and with the server's signer; a changed byte fails."""
    from tracker.webhooks import sign

    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    block = re.search(r"```text\n(secret:.*?)```", doc, re.S)
    assert block, "no worked example in docs/PROTOCOL.md"
    values = dict(re.match(r"([a-z ()-]+):\s+(.*)$", line).groups() for line in block.group(1).strip().split("\n"))  # type: ignore[union-attr]
    secret, body = values["secret"], values["body"].encode()
    headers = {k: values[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    assert base64.b64decode(secret.removeprefix("whsec_")).hex() == values["key (hex)"]
    assert f"{len(body)} of them" in doc
    assert verify(secret, headers, body, now=int(headers["webhook-timestamp"]))
    assert (
        sign.header([secret], headers["webhook-id"], int(headers["webhook-timestamp"]), body)
        == headers["webhook-signature"]
    )
    assert not verify(secret, headers, body.replace(b"9.5", b"9.6"), now=int(headers["webhook-timestamp"]))
    assert not verify(secret, headers, body, now=int(headers["webhook-timestamp"]) + 301)  # too old: a replay


async def test_time_based_alerts_are_delivered_with_their_commit(start_instance: Any, org: str) -> None:
    """The periodic check (custody/watch.py) writes its alerts' events in its own transaction."""
    receiver = await Receiver().start()
    try:
        inst = await start_instance(webhook_allow=LOOPBACK, webhook_poll_s=0.05, watch_interval_s=0.2)
        hook = await _register(inst, org, receiver.url, ["alert.opened", "alert.resolved"])
        t0 = now_ms()
        await consign(inst, org, "PKG-1", "st-marys", window={"from": t0 - 60_000, "to": t0 + 500})

        def missed() -> list[dict[str, Any]]:
            return [r.json for r in receiver.got if r.json["data"]["kind"] == "delivery_window_missed"]

        await wait_until(missed, 15, "the delivery_window_missed alert's webhook")
        [event] = missed()
        assert event["type"] == "alert.opened" and event["data"]["package"] == "PKG-1"
        assert event["data"]["details"] == {"window_to": t0 + 500}
        assert_frame_valid(event, "webhook-event")
        assert all(verify(hook["secret"], r.headers, r.body) for r in receiver.got)
    finally:
        await receiver.stop()
