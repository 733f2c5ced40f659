"""The links' SQL (tracker/share/sql). Reads the custody layer's `packages` and the core's
`drivers` rows too (read only): a link shows a package's state and, where allowed, a name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import asyncpg

from ..store import Migration, load_migrations

Conn = asyncpg.Pool | asyncpg.Connection
SQL_DIR: Final = Path(__file__).parent / "sql"


def migrations() -> list[Migration]:
    """The links' table (applied after the core's and the custody layer's, by version)."""
    return load_migrations(SQL_DIR)


FIND: Final = """
SELECT s.org, s.package_id, s.expires_at, s.revoked_at, p.state, p.holder, p.state_ts, p.live_view,
       p.dest_name, p.dest_lat, p.dest_lon, p.window_from, p.window_to
FROM package_shares s JOIN packages p ON p.org = s.org AND p.package_id = s.package_id
WHERE s.token_sha256 = $1
"""


async def find(conn: Conn, token_sha256: bytes) -> asyncpg.Record | None:
    """The link and its package's state, or None."""
    return await conn.fetchrow(FIND, token_sha256)


async def package(conn: Conn, org: str, package_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT client, consigned_at, state, state_ts FROM packages WHERE org = $1 AND package_id = $2",
        org,
        package_id,
    )


async def create(conn: Conn, token_sha256: bytes, org: str, package_id: str, by: str, now: int, expires: int) -> None:
    await conn.execute(
        "INSERT INTO package_shares (token_sha256, org, package_id, created_by, created_at, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        token_sha256,
        org,
        package_id,
        by,
        now,
        expires,
    )


async def revoke(conn: Conn, org: str, package_id: str, now: int) -> int:
    """Revoke every live link of the package; how many."""
    status: str = await conn.execute(
        "UPDATE package_shares SET revoked_at = $3 WHERE org = $1 AND package_id = $2 AND revoked_at IS NULL",
        org,
        package_id,
        now,
    )
    return int(status.rsplit(" ", 1)[-1])


async def driver_name(conn: Conn, org: str, driver: str) -> Any:
    return await conn.fetchval("SELECT name FROM drivers WHERE org = $1 AND driver_id = $2", org, driver)
