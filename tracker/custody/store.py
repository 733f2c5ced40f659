"""SQL for packages, the custody chain and alerts. Static text with `$n` parameters only; batches
go through array parameters (`unnest`), one round trip per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .chain import Consignment, Content, Record

Tx = asyncpg.Connection | PoolConnectionProxy  # a connection (in a transaction where it says so)
Conn = Tx | asyncpg.Pool
Key = tuple[str, str]  # (org, package)
AUTO_REASON: Final = "automatic: the anomaly no longer holds"  # an alert resolved by a replay

# Keys must come sorted: rows are created and locked in key order, so two instances processing
# overlapping batches wait for each other instead of deadlocking.
ENSURE: Final = """
INSERT INTO packages (org, package_id) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING
"""
LOCK: Final = """
SELECT * FROM packages
WHERE (org, package_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY org, package_id FOR UPDATE
"""
UNCHAINED: Final = """
SELECT k.i, s.* FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS k(org, d, seq, i)
JOIN scans s ON s.org = k.org AND s.driver_id = k.d AND s.seq = k.seq
WHERE NOT EXISTS (SELECT 1 FROM custody c WHERE c.org = s.org AND c.driver_id = s.driver_id AND c.seq = s.seq)
"""
INSERT_CUSTODY: Final = """
INSERT INTO custody (org, package_id, idx, driver_id, seq, chained_at, recovered, mac)
SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[], $5::int8[], $6::int8[], $7::bool[], $8::bytea[])
"""
CHAINED: Final = """
SELECT s.* FROM custody c JOIN scans s ON s.org = c.org AND s.driver_id = c.driver_id AND s.seq = c.seq
WHERE (c.org, c.package_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
ALERTS_OF: Final = """
SELECT org, package_id, id, kind, reason, driver_id, seq, state, message, resolved_by, acknowledged_by, acknowledged_at
FROM alerts
WHERE (org, package_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
UPSERT_ALERTS: Final = """
INSERT INTO alerts (org, id, kind, reason, state, package_id, driver_id, seq, message, opened_at, ts)
SELECT t.*, $10::int8, $10::int8 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                              $7::text[], $8::int8[], $9::text[])
    AS t(org, id, kind, reason, state, package_id, driver_id, seq, message)
ON CONFLICT (org, id) DO UPDATE SET state = EXCLUDED.state, ts = EXCLUDED.ts,
    message = coalesce(EXCLUDED.message, alerts.message),
    opened_at = CASE WHEN EXCLUDED.state = 'open' THEN EXCLUDED.opened_at ELSE alerts.opened_at END,
    -- reopened: a new occurrence, unacknowledged (the history keeps the earlier acknowledgement);
    -- resolved here: automatically (a person's resolution is never replayed: custody/process.py)
    acknowledged_by = CASE WHEN EXCLUDED.state = 'open' THEN NULL ELSE alerts.acknowledged_by END,
    acknowledged_at = CASE WHEN EXCLUDED.state = 'open' THEN NULL ELSE alerts.acknowledged_at END,
    ack_comment = CASE WHEN EXCLUDED.state = 'open' THEN NULL ELSE alerts.ack_comment END,
    resolved_by = NULL,
    resolved_reason = CASE WHEN EXCLUDED.state = 'open' THEN NULL ELSE $11::text END
"""
UPDATE_PACKAGES: Final = """
UPDATE packages p SET state = u.state, holder = u.holder, state_ts = u.state_ts, chain_len = u.chain_len,
    chain_head = u.chain_head, head_tag = u.head_tag, live_view = u.live_view
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int4[], $7::bytea[], $8::bytea[],
            $9::bool[])
    AS u(org, package_id, state, holder, state_ts, chain_len, chain_head, head_tag, live_view)
WHERE p.org = u.org AND p.package_id = u.package_id
"""


def consignment(row: asyncpg.Record | dict[str, Any]) -> Consignment:
    return Consignment(
        row["client"],
        row["consigned_at"],
        row["dest_name"],
        row["dest_lat"],
        row["dest_lon"],
        row["window_from"],
        row["window_to"],
        row["temp_min"],
        row["temp_max"],
        row["notes"],
    )


def content(row: asyncpg.Record) -> Content:
    return Content(
        row["package"],
        row["driver_id"],
        row["seq"],
        row["ts"],
        row["received_at"],
        row["event"],
        row["lat"],
        row["lon"],
        row["temp_c"],
        row["note"],
        row["recipient"],
        row["pod"],
        row["offset_ms"],
    )


def _cols(keys: Sequence[Key]) -> tuple[list[str], list[str]]:
    return [k[0] for k in keys], [k[1] for k in keys]


async def lock_packages(conn: Tx, keys: Sequence[Key]) -> dict[Key, asyncpg.Record]:
    """Create missing package rows (scanned, not consigned) and lock them all, in key order."""
    orgs, ids = _cols(sorted(set(keys)))
    await conn.execute(ENSURE, orgs, ids)
    return {(r["org"], r["package_id"]): r for r in await conn.fetch(LOCK, orgs, ids)}


async def unchained(conn: Tx, scans: Sequence[tuple[str, str, int]]) -> list[asyncpg.Record]:
    """The stored scans among (org, driver, seq) that are not chained yet."""
    return await conn.fetch(UNCHAINED, [s[0] for s in scans], [s[1] for s in scans], [s[2] for s in scans])


async def insert_custody(conn: Tx, rows: Sequence[tuple[str, str, int, str, int, int, bool, bytes]]) -> None:
    if rows:
        await conn.execute(INSERT_CUSTODY, *(list(col) for col in zip(*rows, strict=True)))


async def chained_scans(conn: Conn, keys: Sequence[Key]) -> list[asyncpg.Record]:
    return await conn.fetch(CHAINED, *_cols(keys))


async def alerts_of(conn: Conn, keys: Sequence[Key]) -> list[asyncpg.Record]:
    return await conn.fetch(ALERTS_OF, *_cols(keys))


async def upsert_alerts(conn: Tx, rows: Sequence[tuple[Any, ...]], now: int) -> None:
    """rows: (org, id, kind, reason, state, package, driver, seq, message)."""
    if rows:
        await conn.execute(UPSERT_ALERTS, *(list(col) for col in zip(*rows, strict=True)), now, AUTO_REASON)


async def update_packages(conn: Tx, rows: Sequence[tuple[Any, ...]]) -> None:
    """rows: (org, package, state, holder, state_ts, chain_len, chain_head, head_tag, live_view)."""
    if rows:
        await conn.execute(UPDATE_PACKAGES, *(list(col) for col in zip(*rows, strict=True)))


async def held_by(conn: Conn, drivers: Sequence[tuple[str, str]]) -> list[asyncpg.Record]:
    """(org, holder, package_id, client) of consigned packages the drivers hold now, live view open."""
    return await conn.fetch(
        """
        SELECT p.org, p.holder, p.package_id, p.client FROM unnest($1::text[], $2::text[]) AS k(org, d)
        JOIN packages p ON p.org = k.org AND p.holder = k.d AND p.state = 'picked_up' AND p.client IS NOT NULL
            AND p.live_view
        """,
        [d[0] for d in drivers],
        [d[1] for d in drivers],
    )


async def open_consignments(conn: Conn, org: str) -> list[asyncpg.Record]:
    """(package_id, client) of the org's consigned packages not delivered (yet)."""
    return await conn.fetch(
        "SELECT package_id, client FROM packages WHERE org = $1 AND client IS NOT NULL AND state <> 'delivered'", org
    )


async def shared_packages(conn: Conn, org: str, now: int) -> list[asyncpg.Record]:
    """(package_id) of the org's packages with a tracking link neither revoked nor expired
    (tracker/share's table: its holder's stamps carry the package's mark)."""
    return await conn.fetch(
        "SELECT DISTINCT package_id FROM package_shares WHERE org = $1 AND revoked_at IS NULL AND expires_at > $2",
        org,
        now,
    )


async def unchained_since(conn: Conn, since: int, before: int, limit: int) -> list[asyncpg.Record]:
    """Scans received in [since, before) that no instance has chained (it crashed in between),
    except those already refused as not written by the service (a `tamper_suspected` alert)."""
    return await conn.fetch(
        """
        SELECT s.org, s.driver_id, s.seq, s.package FROM scans s
        WHERE s.received_at >= $1 AND s.received_at < $2
          AND NOT EXISTS (SELECT 1 FROM custody c WHERE c.org = s.org AND c.driver_id = s.driver_id AND c.seq = s.seq)
          AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.org = s.org AND a.package_id = s.package
                          AND a.kind = 'tamper_suspected' AND a.driver_id = s.driver_id AND a.seq = s.seq)
        ORDER BY s.received_at LIMIT $3
        """,
        since,
        before,
        limit,
    )


async def consign(conn: Tx, org: str, package: str, c: Consignment, by: str) -> asyncpg.Record | None:
    """Consign a new package, or one scanned before it was consigned; None if already consigned."""
    return await conn.fetchrow(
        """
        INSERT INTO packages (org, package_id, client, consigned_at, consigned_by, dest_name, dest_lat, dest_lon,
                              window_from, window_to, temp_min, temp_max, notes)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        ON CONFLICT (org, package_id) DO UPDATE SET client = EXCLUDED.client, consigned_at = EXCLUDED.consigned_at,
            consigned_by = EXCLUDED.consigned_by, dest_name = EXCLUDED.dest_name, dest_lat = EXCLUDED.dest_lat,
            dest_lon = EXCLUDED.dest_lon, window_from = EXCLUDED.window_from, window_to = EXCLUDED.window_to,
            temp_min = EXCLUDED.temp_min, temp_max = EXCLUDED.temp_max, notes = EXCLUDED.notes
        WHERE packages.consigned_at IS NULL
        RETURNING *
        """,
        org,
        package,
        c.client,
        c.consigned_at,
        by,
        c.dest_name,
        c.dest_lat,
        c.dest_lon,
        c.window_from,
        c.window_to,
        c.temp_min,
        c.temp_max,
        c.notes,
    )


async def get_package(conn: Conn, org: str, package: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM packages WHERE org = $1 AND package_id = $2", org, package)


async def list_packages(
    conn: Conn, org: str, *, client: str | None, state: str | None, driver: str | None, after: str, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT * FROM packages
        WHERE org = $1 AND ($2::text IS NULL OR client = $2) AND ($3::text IS NULL OR state = $3)
          AND ($4::text IS NULL OR holder = $4) AND package_id > $5
        ORDER BY package_id LIMIT $6
        """,
        org,
        client,
        state,
        driver,
        after,
        limit,
    )


async def custody_records(conn: Conn, org: str, package: str) -> list[tuple[Record, asyncpg.Record]]:
    """The package's chain, in index order, each with its scan row (fields None if it is gone)."""
    rows = await conn.fetch(
        """
        SELECT c.idx, c.driver_id AS c_driver, c.seq AS c_seq, c.chained_at, c.recovered, c.mac,
               s.seq IS NOT NULL AS present, s.*
        FROM custody c LEFT JOIN scans s ON s.org = c.org AND s.driver_id = c.driver_id AND s.seq = c.seq
        WHERE c.org = $1 AND c.package_id = $2 ORDER BY c.idx
        """,
        org,
        package,
    )
    return [
        (
            Record(
                r["idx"],
                r["c_driver"],
                r["c_seq"],
                r["chained_at"],
                r["recovered"],
                bytes(r["mac"]),
                content(r) if r["present"] else None,
            ),
            r,
        )
        for r in rows
    ]


async def unchained_of(conn: Conn, org: str, package: str, limit: int) -> list[asyncpg.Record]:
    """Stored scans of a package not chained (yet), oldest first, at most `limit`."""
    return await conn.fetch(
        """
        SELECT s.* FROM scans s WHERE s.org = $1 AND s.package = $2
          AND NOT EXISTS (SELECT 1 FROM custody c WHERE c.org = s.org AND c.driver_id = s.driver_id AND c.seq = s.seq)
        ORDER BY s.received_at, s.driver_id, s.seq LIMIT $3
        """,
        org,
        package,
        limit,
    )


async def count_unchained(conn: Conn, org: str, package: str) -> int:
    value = await conn.fetchval(
        """
        SELECT count(*) FROM scans s WHERE s.org = $1 AND s.package = $2
          AND NOT EXISTS (SELECT 1 FROM custody c WHERE c.org = s.org AND c.driver_id = s.driver_id AND c.seq = s.seq)
        """,
        org,
        package,
    )
    return int(value)


async def package_alerts(conn: Conn, org: str, package: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, kind, reason, state, driver_id, seq, message, opened_at, ts, details::text AS details FROM alerts "
        "WHERE org = $1 AND package_id = $2 ORDER BY opened_at, id",
        org,
        package,
    )


async def scope_packages(
    conn: Conn,
    org: str,
    *,
    client: str | None,
    follow_all: bool,
    packages: Sequence[str],
    drivers: Sequence[str],
    recent_since: int,
) -> list[asyncpg.Record]:
    """A snapshot's packages: in scope (a client's own), followed, and on their way or finished recently."""
    return await conn.fetch(
        """
        SELECT package_id, state, holder, client, coalesce(state_ts, consigned_at) AS ts FROM packages
        WHERE org = $1 AND ($2::text IS NULL OR client = $2)
          AND ($3 OR package_id = ANY($4::text[]) OR holder = ANY($5::text[]))
          AND (state IN ('created', 'picked_up', 'failed') OR state_ts >= $6 OR package_id = ANY($4::text[]))
        ORDER BY package_id
        """,
        org,
        client,
        follow_all,
        list(packages),
        list(drivers),
        recent_since,
    )


async def scope_alerts(
    conn: Conn, org: str, *, client: str | None, follow_all: bool, packages: Sequence[str], drivers: Sequence[str]
) -> list[asyncpg.Record]:
    """Open alerts in scope; a client sees those of its packages, except scan anomalies (operations)
    and suspected tampering (for dispatchers only)."""
    return await conn.fetch(
        """
        SELECT a.id, a.kind, a.state, a.ts, a.driver_id, a.package_id, a.message, a.acknowledged_by,
               a.acknowledged_at, a.details::text AS details
        FROM alerts a
        LEFT JOIN packages p ON p.org = a.org AND p.package_id = a.package_id
        WHERE a.org = $1 AND a.state = 'open'
          AND ($2::text IS NULL OR (p.client = $2 AND a.kind NOT IN ('scan_anomaly', 'tamper_suspected')))
          AND ($3 OR a.package_id = ANY($4::text[]) OR a.driver_id = ANY($5::text[]))
        ORDER BY a.opened_at, a.id
        """,
        org,
        client,
        follow_all,
        list(packages),
        list(drivers),
    )


async def client_holders(conn: Conn, org: str, client: str) -> list[asyncpg.Record]:
    """(package_id, holder) of a client's packages on their way now, whose holder it may see live."""
    return await conn.fetch(
        "SELECT package_id, holder FROM packages WHERE org = $1 AND client = $2 AND state = 'picked_up' AND live_view",
        org,
        client,
    )


async def holders_of(conn: Conn, org: str, packages: Sequence[str], client: str | None) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT holder FROM packages WHERE org = $1 AND package_id = ANY($2::text[]) "
        "AND state = 'picked_up' AND ($3::text IS NULL OR client = $3)",
        org,
        list(packages),
        client,
    )
    return [r["holder"] for r in rows]


async def client_scans_with(conn: Conn, org: str, client: str, driver: str) -> list[asyncpg.Record]:
    """The chained scans of a client's packages that `driver` ever scanned (for its trail windows)."""
    return await conn.fetch(
        """
        SELECT s.* FROM custody c JOIN scans s ON s.org = c.org AND s.driver_id = c.driver_id AND s.seq = c.seq
        WHERE c.org = $1 AND c.package_id IN (
            SELECT p.package_id FROM packages p WHERE p.org = $1 AND p.client = $2
              AND p.package_id IN (SELECT package_id FROM custody WHERE org = $1 AND driver_id = $3))
        """,
        org,
        client,
        driver,
    )
