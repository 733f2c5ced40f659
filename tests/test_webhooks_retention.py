"""Webhook retention: events older than TRACKER_WEBHOOK_RETENTION_DAYS go with their deliveries and
attempts, in batches; an event whose delivery is still pending or in flight stays; recent ones stay."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from harness.instances import Instance
from tracker.clock import now_ms
from tracker.config import ConfigError, Settings
from tracker.webhooks.service import PRUNE_BATCH, Webhooks

DAY = 86_400_000


async def event(db: asyncpg.Connection, org: str, age_days: float, state: str | None) -> int:
    """An event `age_days` old with, unless `state` is None, one delivery in `state` and an attempt."""
    at = now_ms() - int(age_days * DAY)
    n: int = await db.fetchval(
        "INSERT INTO webhook_events (id, org, type, okey, created_at, body)"
        " VALUES ($1, $2, 'package.delivered', 'p', $3, '{}') RETURNING n",
        "msg_" + uuid.uuid4().hex,
        org,
        at,
    )
    if state is not None:
        d = await db.fetchval(
            "INSERT INTO webhook_deliveries (endpoint_id, event_n, okey, state, next_at, created_at)"
            " VALUES ($1, $2, 'p', $3, $4, $4) RETURNING n",
            f"ep_{org}",
            n,
            state,
            at,
        )
        await db.execute(
            "INSERT INTO webhook_attempts (delivery_n, at, status, latency_ms) VALUES ($1, $2, 200, 5)", d, at
        )
    return n


async def test_old_finished_events_go_with_their_log_pending_and_recent_ones_stay(
    instance: Instance, db: asyncpg.Connection, org: str
) -> None:
    await db.execute(
        "INSERT INTO webhooks (id, org, url, events, secret, created_at, created_by)"
        " VALUES ($1, $2, 'https://example.org/h', '{package.delivered}', 'whsec_x', 0, 'test')",
        f"ep_{org}",
        org,
    )
    done = await event(db, org, 40, "delivered")
    dead = await event(db, org, 31, "dead")
    orphan = await event(db, org, 45, None)  # its endpoint's deliveries were removed
    pending = await event(db, org, 40, "pending")
    sending = await event(db, org, 40, "sending")
    recent = await event(db, org, 29, "delivered")
    many = await db.fetchval(
        "WITH e AS (INSERT INTO webhook_events (id, org, type, okey, created_at, body)"
        " SELECT 'msg_' || md5(random()::text || g), $1, 'package.delivered', 'p', $2, '{}'"
        " FROM generate_series(1, $3) g RETURNING n) SELECT count(*) FROM e",
        org,
        now_ms() - 60 * DAY,
        PRUNE_BATCH * 2 + 500,
    )
    webhooks: Webhooks = instance.server.app.state.webhooks
    assert instance.node.settings.webhook_retention_days == 30  # the default
    assert await webhooks.prune() >= 3 + many  # other tests' old events may go too: never ours kept
    left = {r["n"] for r in await db.fetch("SELECT n FROM webhook_events WHERE org = $1", org)}
    assert left == {pending, sending, recent}
    assert not {done, dead, orphan} & left
    kept = await db.fetch(
        "SELECT d.event_n, count(a.*) AS attempts FROM webhook_deliveries d LEFT JOIN webhook_attempts a"
        " ON a.delivery_n = d.n WHERE d.endpoint_id = $1 GROUP BY d.event_n",
        f"ep_{org}",
    )
    assert {(r["event_n"], r["attempts"]) for r in kept} == {(pending, 1), (sending, 1), (recent, 1)}
    await webhooks.prune()  # a second run: what stays, stays
    assert {r["n"] for r in await db.fetch("SELECT n FROM webhook_events WHERE org = $1", org)} == left


async def test_retention_zero_keeps_everything(start_instance: object, db: asyncpg.Connection, org: str) -> None:
    inst: Instance = await start_instance(webhook_retention_days=0)  # type: ignore[operator]
    old = await event(db, org, 400, None)
    webhooks: Webhooks = inst.server.app.state.webhooks
    assert webhooks._pruner is None  # no retention task at all
    assert await webhooks.prune() == 0  # and a run deletes nothing, however old
    assert await db.fetchval("SELECT count(*) FROM webhook_events WHERE n = $1", old) == 1
    await db.execute("DELETE FROM webhook_events WHERE n = $1", old)


def test_retention_shorter_than_the_retry_window_is_refused() -> None:
    base = Settings(jwt_secret="x" * 32)
    with pytest.raises(ConfigError, match="TRACKER_WEBHOOK_RETENTION_DAYS"):
        base.with_(webhook_retention_days=2).check_values()  # retries go on for 3 days
    with pytest.raises(ConfigError, match="TRACKER_WEBHOOK_RETENTION_DAYS"):
        base.with_(webhook_retention_days=-1).check_values()
    base.with_(webhook_retention_days=0).check_values()
    base.with_(webhook_retention_days=3).check_values()
