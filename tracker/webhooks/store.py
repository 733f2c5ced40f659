"""SQL of the webhooks: endpoints, the outbox, claims and outcomes of deliveries, the delivery log.

All SQL is static text with `$n` parameters. Times are ms since the Unix epoch. A delivery is one
(endpoint, event) pair; its states: pending (due at next_at) -> sending (claimed; next_at is the
claim's lease) -> delivered | pending again (a retry) | dead (retry window over, or the endpoint
answered 410). `claim` never hands out a delivery while an older one of the same endpoint and
ordering key (the package) is pending or sending: one package's events arrive in order.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from ..extension import OutboxEvent, Tx
from ..store import Migration, load_migrations
from .sign import new_secret

Conn = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool
SQL_DIR: Final = Path(__file__).parent / "sql"


def migrations() -> list[Migration]:
    return load_migrations(SQL_DIR)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def body_of(event: OutboxEvent) -> bytes:
    """The JSON posted for an event (the Standard Webhooks envelope): type, timestamp, data."""
    return orjson.dumps({"type": event.type, "timestamp": iso(event.ts), "data": event.data})


WRITE: Final = """
WITH ev AS (
    INSERT INTO webhook_events (id, org, type, okey, created_at, body)
    SELECT e.id, e.org, e.type, e.okey, e.at, e.body
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bytea[])
        WITH ORDINALITY AS e(id, org, type, okey, at, body, i)
    WHERE EXISTS (SELECT 1 FROM webhooks w WHERE w.org = e.org)
    ORDER BY e.i
    RETURNING n, org, type, okey
)
INSERT INTO webhook_deliveries (endpoint_id, event_n, okey, state, next_at, created_at)
SELECT w.id, ev.n, ev.okey, 'pending', $7, $7
FROM ev JOIN webhooks w ON w.org = ev.org AND w.enabled AND ev.type = ANY(w.events)
ORDER BY ev.n, w.id
"""


class Outbox:
    """`extension.Outbox`: events go into `webhook_events`, and a delivery per subscribed endpoint,
    in the caller's transaction. An org without endpoints costs one statement that writes nothing."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock  # () -> ms

    async def write(self, conn: Tx, events: Sequence[OutboxEvent]) -> None:
        if not events:
            return
        cols: tuple[list[Any], ...] = ([], [], [], [], [], [])
        for e in events:
            for col, value in zip(cols, ("msg_" + new_id(), e.org, e.type, e.key, e.ts, body_of(e)), strict=True):
                col.append(value)
        await conn.execute(WRITE, *cols, self.clock())


def new_id() -> str:
    return secrets.token_hex(16)


# -- endpoints ---------------------------------------------------------------------------------

LIST: Final = """SELECT id, url, events, enabled, disabled_reason, created_at, created_by, old_until
FROM webhooks WHERE org = $1 ORDER BY id"""
GET: Final = """SELECT id, url, events, enabled, disabled_reason, created_at, created_by, old_until
FROM webhooks WHERE org = $1 AND id = $2"""


async def create(
    conn: Conn, org: str, url: str, events: list[str], by: str, now: int, limit: int
) -> tuple[str, str] | None:
    """A new endpoint: (id, secret), or None if the org has `limit` endpoints already."""
    id_, secret = "wh_" + new_id()[:24], new_secret()
    row = await conn.fetchval(
        """INSERT INTO webhooks (id, org, url, events, secret, created_at, created_by)
        SELECT $1, $2, $3, $4, $5, $6, $7 WHERE (SELECT count(*) FROM webhooks WHERE org = $2) < $8
        RETURNING id""",
        id_,
        org,
        url,
        events,
        secret,
        now,
        by,
        limit,
    )
    return None if row is None else (id_, secret)


async def list_endpoints(conn: Conn, org: str) -> list[asyncpg.Record]:
    return await conn.fetch(LIST, org)


async def get_endpoint(conn: Conn, org: str, id_: str) -> asyncpg.Record | None:
    return await conn.fetchrow(GET, org, id_)


async def delete(conn: Conn, org: str, id_: str) -> bool:
    return await conn.fetchval("DELETE FROM webhooks WHERE org = $1 AND id = $2 RETURNING id", org, id_) is not None


async def rotate(conn: Conn, org: str, id_: str, now: int, grace_ms: int) -> str | None:
    """A new secret; the current one keeps signing for `grace_ms` (None: no such endpoint)."""
    secret = new_secret()
    done = await conn.fetchval(
        """UPDATE webhooks SET old_secret = secret, old_until = $3, secret = $4
        WHERE org = $1 AND id = $2 RETURNING id""",
        org,
        id_,
        now + grace_ms,
        secret,
    )
    return None if done is None else secret


# -- deliveries --------------------------------------------------------------------------------

CLAIM: Final = """
WITH ready AS (
    SELECT d.n, d.endpoint_id, row_number() OVER (PARTITION BY d.endpoint_id ORDER BY d.event_n) AS rn
    FROM webhook_deliveries d JOIN webhooks w ON w.id = d.endpoint_id AND w.enabled
    WHERE d.state IN ('pending', 'sending') AND d.next_at <= $1
      AND NOT EXISTS (
        SELECT 1 FROM webhook_deliveries e
        WHERE e.endpoint_id = d.endpoint_id AND e.okey = d.okey AND e.event_n < d.event_n
          AND e.state IN ('pending', 'sending'))
    ORDER BY d.next_at
    LIMIT 1000
), picked AS (
    SELECT d.n FROM webhook_deliveries d
    JOIN ready r ON r.n = d.n
    LEFT JOIN unnest($2::text[], $3::int[]) AS b(endpoint_id, busy) ON b.endpoint_id = r.endpoint_id
    WHERE r.rn + coalesce(b.busy, 0) <= $4
      AND d.state IN ('pending', 'sending') AND d.next_at <= $1  -- re-checked on the row once locked
    ORDER BY d.event_n
    LIMIT $5
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d SET state = 'sending', attempts = d.attempts + 1, next_at = $6
FROM picked, webhooks w, webhook_events e
WHERE d.n = picked.n AND w.id = d.endpoint_id AND e.n = d.event_n
RETURNING d.n, d.endpoint_id, d.attempts, d.created_at, w.url, w.secret, w.old_secret, w.old_until,
    e.id AS msg_id, e.body
"""


async def claim(
    conn: Conn, now: int, *, busy: dict[str, int], per_endpoint: int, limit: int, lease_ms: int
) -> list[asyncpg.Record]:
    """Claim up to `limit` due deliveries, at most `per_endpoint` in flight per endpoint counting
    `busy` (this instance's), for `lease_ms`; another claimer skips them (SKIP LOCKED, then state)."""
    return await conn.fetch(CLAIM, now, list(busy), list(busy.values()), per_endpoint, limit, now + lease_ms)


FINISH: Final = """
WITH d AS (
    UPDATE webhook_deliveries SET state = $3, next_at = $4, delivered_at = $5, last_status = $6,
        last_latency_ms = $7, last_error = $8, last_response = $9
    WHERE n = $1 AND state = 'sending' AND attempts = $2
    RETURNING n
)
INSERT INTO webhook_attempts (delivery_n, at, status, latency_ms, error, response)
SELECT n, $10, $6, $7, $8, $9 FROM d
"""


async def finish(
    conn: Conn,
    n: int,
    attempts: int,
    *,
    state: str,
    next_at: int,
    now: int,
    status: int | None,
    latency_ms: int,
    error: str | None,
    response: str | None,
) -> None:
    """Record an attempt's outcome (only if the claim is still ours: same attempt number)."""
    delivered = now if state == "delivered" else None
    await conn.execute(FINISH, n, attempts, state, next_at, delivered, status, latency_ms, error, response, now)


async def disable(conn: Conn, endpoint: str, reason: str) -> None:
    await conn.execute("UPDATE webhooks SET enabled = false, disabled_reason = $2 WHERE id = $1", endpoint, reason)


async def enable(conn: Conn, org: str, endpoint: str) -> None:
    """Deliver to it again from the next event on (what it missed: `replay`)."""
    await conn.execute(
        "UPDATE webhooks SET enabled = true, disabled_reason = NULL WHERE org = $1 AND id = $2", org, endpoint
    )


REPLAY: Final = """
INSERT INTO webhook_deliveries (endpoint_id, event_n, okey, state, next_at, created_at)
SELECT w.id, e.n, e.okey, 'pending', $4, $4
FROM webhooks w JOIN webhook_events e ON e.org = w.org AND e.type = ANY(w.events)
WHERE w.org = $1 AND w.id = $2 AND e.created_at >= $3
ORDER BY e.n
ON CONFLICT (endpoint_id, event_n) DO UPDATE SET state = 'pending', attempts = 0, next_at = $4, created_at = $4
WHERE webhook_deliveries.state NOT IN ('pending', 'sending')
"""


async def replay(conn: Conn, org: str, id_: str, since: int, now: int) -> int:
    """Deliver again every event of the endpoint's types written since `since` (same webhook-id)."""
    status = await conn.execute(REPLAY, org, id_, since, now)
    return int(status.split()[-1])


LOG: Final = """
SELECT d.n, e.id AS msg_id, e.type, e.okey, d.state, d.attempts, d.created_at, d.next_at, d.delivered_at,
    d.last_status, d.last_latency_ms, d.last_error, d.last_response
FROM webhook_deliveries d JOIN webhooks w ON w.id = d.endpoint_id JOIN webhook_events e ON e.n = d.event_n
WHERE w.org = $1 AND w.id = $2 AND d.n > $3 AND ($4::text IS NULL OR d.state = $4)
ORDER BY d.n LIMIT $5
"""


async def deliveries(
    conn: Conn, org: str, id_: str, *, state: str | None, after: int, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(LOG, org, id_, after, state, limit)


PRUNE: Final = """
DELETE FROM webhook_events WHERE n IN (
    SELECT n FROM webhook_events e
    WHERE e.created_at < $1 AND NOT EXISTS (
        SELECT 1 FROM webhook_deliveries d WHERE d.event_n = e.n AND d.state IN ('pending', 'sending')
    )
    ORDER BY n LIMIT $2 FOR UPDATE SKIP LOCKED
)
"""


async def prune(conn: Conn, before_ms: int, limit: int) -> int:
    """Delete up to `limit` events older than `before_ms` with their deliveries and attempts (the
    foreign keys cascade); an event with a delivery still pending or in flight stays. The count."""
    status: str = await conn.execute(PRUNE, before_ms, limit)
    return int(status.split()[-1])
