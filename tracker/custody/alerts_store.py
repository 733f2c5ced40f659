"""SQL for the alert workflow: list and read alerts in scope, acknowledge, resolve, and the history.

The history (`alert_events`) is only appended to: an automatic resolution or a reopening never
erases a person's acknowledgement or resolution from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import asyncpg

from .store import Conn, Tx

STATES: Final = ("open", "acknowledged", "unacknowledged", "resolved")
# A client admin never sees these kinds (docs/PROTOCOL.md): scan anomalies are operations (who
# scanned what, wrongly) and suspected tampering is for those who can act on it.
DISPATCHER_ONLY: Final = ("scan_anomaly", "tamper_suspected")

LIST: Final = """
SELECT a.id, a.kind, a.state, a.ts, a.opened_at, a.driver_id, a.package_id, a.seq, a.message, a.acknowledged_by,
    a.acknowledged_at, a.ack_comment, a.resolved_by, a.resolved_reason, p.client, p.consigned_at,
    a.details::text AS details
FROM alerts a LEFT JOIN packages p ON p.org = a.org AND p.package_id = a.package_id
WHERE a.org = $1
  AND ($2::text IS NULL OR (p.client = $2 AND p.consigned_at IS NOT NULL AND a.kind <> ALL($9::text[])))
  AND CASE $3::text
        WHEN 'open' THEN a.state = 'open'
        WHEN 'acknowledged' THEN a.state = 'open' AND a.acknowledged_at IS NOT NULL
        WHEN 'unacknowledged' THEN a.state = 'open' AND a.acknowledged_at IS NULL
        WHEN 'resolved' THEN a.state = 'resolved'
        ELSE true END
  AND ($4::text IS NULL OR a.kind = $4) AND ($5::text IS NULL OR a.package_id = $5)
  AND ($6::text IS NULL OR a.driver_id = $6) AND a.id > $7
ORDER BY a.id LIMIT $8
"""
GET: Final = """
SELECT a.id, a.kind, a.state, a.ts, a.opened_at, a.driver_id, a.package_id, a.seq, a.message, a.acknowledged_by,
    a.acknowledged_at, a.ack_comment, a.resolved_by, a.resolved_reason, p.client, p.consigned_at,
    a.details::text AS details
FROM alerts a LEFT JOIN packages p ON p.org = a.org AND p.package_id = a.package_id
WHERE a.org = $1 AND a.id = $2
"""
LOCK: Final = "SELECT 1 FROM alerts WHERE org = $1 AND id = $2 FOR UPDATE"
ACK: Final = """
UPDATE alerts SET acknowledged_by = $3, acknowledged_at = $4, ack_comment = $5 WHERE org = $1 AND id = $2
"""
RESOLVE: Final = """
UPDATE alerts SET state = 'resolved', ts = $4, resolved_by = $3, resolved_reason = $5 WHERE org = $1 AND id = $2
"""
EVENTS: Final = """
INSERT INTO alert_events (org, alert_id, event, actor, ts, note)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[])
"""
HISTORY: Final = "SELECT event, actor, ts, note FROM alert_events WHERE org = $1 AND alert_id = $2 ORDER BY n"


async def list_alerts(
    conn: Conn,
    org: str,
    *,
    client: str | None,
    state: str | None,
    kind: str | None,
    package: str | None,
    driver: str | None,
    after: str,
    limit: int,
) -> list[asyncpg.Record]:
    """Alerts of `org` by id (a client's: those of its packages, of the kinds it may see)."""
    return await conn.fetch(LIST, org, client, state, kind, package, driver, after, limit, list(DISPATCHER_ONLY))


async def get_alert(conn: Conn, org: str, alert: str) -> asyncpg.Record | None:
    return await conn.fetchrow(GET, org, alert)


async def lock_alert(conn: Tx, org: str, alert: str) -> bool:
    """In a transaction, after the alert's package row (custody/process.py locks packages first)."""
    return await conn.fetchval(LOCK, org, alert) is not None


async def acknowledge(conn: Tx, org: str, alert: str, *, by: str, at: int, comment: str | None) -> None:
    await conn.execute(ACK, org, alert, by, at, comment)
    await add_events(conn, [(org, alert, "acknowledged", by, at, comment)])


async def resolve(conn: Tx, org: str, alert: str, *, by: str, at: int, reason: str) -> None:
    await conn.execute(RESOLVE, org, alert, by, at, reason)
    await add_events(conn, [(org, alert, "resolved", by, at, reason)])


async def add_events(conn: Tx, rows: Sequence[tuple[str, str, str, str | None, int, str | None]]) -> None:
    """rows: (org, alert id, event, actor or None for the service, ts, note)."""
    if rows:
        await conn.execute(EVENTS, *(list(col) for col in zip(*rows, strict=True)))


async def history(conn: Conn, org: str, alert: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(HISTORY, org, alert)]
