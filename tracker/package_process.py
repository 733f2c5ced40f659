"""Chaining newly stored scans and bringing their packages up to date, in one transaction.

For a batch of scans (already committed by the writer): lock their packages (in key order, so
instances never fork a chain nor deadlock), append the scans not chained yet to each package's
chain, replay each package from all its chained scans (`custody.replay`), diff the anomalies
against the stored alerts, and write the new state, head and alerts. The caller publishes what
`Outcome` holds after the commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from . import chain, custody
from . import package_store as ps
from .broker import LiveItem
from .protocol import frames
from .writer import now_ms


@dataclass(frozen=True, slots=True)
class Item:
    """A stored scan to chain: (org, driver, seq) names it; `recovered` if found by the sweep."""

    org: str
    driver: str
    seq: int
    package: str
    recovered: bool = False


@dataclass(slots=True)
class Outcome:
    live: list[tuple[str, LiveItem]] = field(default_factory=list)  # (org, item), in publishing order
    holders: set[tuple[str, str]] = field(default_factory=set)  # drivers whose held packages changed
    changed: set[tuple[str, str]] = field(default_factory=set)  # packages whose state or holder changed
    chained: int = 0


def alert_id(org: str, package: str, key: custody.AlertKey) -> str:
    """Stable: the same anomaly keeps its id when it is resolved and comes back."""
    digest = hashlib.sha256(orjson.dumps([org, package, *key])).hexdigest()
    return "al-" + digest[:24]


def stamp_of(client: str | None) -> bytes:
    return orjson.dumps([client]) if client else b""


def _f32(value: float | None) -> float | None:
    # temp_c is stored as real: show it as the phone sent it, not as its float32 widening.
    return None if value is None else float(f"{value:.7g}")


def scan_frame(row: asyncpg.Record) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "scan",
        "driver": row["driver_id"],
        "seq": row["seq"],
        "ts": row["ts"],
        "package": row["package"],
        "event": row["event"],
    }
    for key in ("lat", "lon", "note", "recipient", "pod"):
        if row[key] is not None:
            frame[key] = row[key]
    if row["temp_c"] is not None:
        frame["temp_c"] = _f32(row["temp_c"])
    return frame


def package_frame(package: str, state: str, holder: str | None, client: str | None, ts: int) -> dict[str, Any]:
    return {"type": "package", "package": package, "state": state, "driver": holder, "client": client, "ts": ts}


def alert_frame(
    id_: str, kind: str, state: str, ts: int, driver: str | None, package: str | None, message: str | None
) -> dict[str, Any]:
    return {
        "type": "alert",
        "id": id_,
        "kind": kind,
        "state": state,
        "ts": ts,
        "driver": driver,
        "package": package,
        "message": message,
    }


def terms(row: asyncpg.Record, max_delivery_m: float) -> custody.Terms:
    return custody.Terms(
        consigned=row["consigned_at"] is not None,
        dest_lat=row["dest_lat"],
        dest_lon=row["dest_lon"],
        temp_min=row["temp_min"],
        temp_max=row["temp_max"],
        max_delivery_m=max_delivery_m,
    )


def fact(row: asyncpg.Record) -> custody.Fact:
    return custody.Fact(
        row["driver_id"], row["seq"], row["ts"], row["event"], row["lat"], row["lon"], _f32(row["temp_c"])
    )


async def process(
    conn: ps.Tx, key: bytes, items: Sequence[Item], *, max_delivery_m: float, announce: Sequence[ps.Key] = ()
) -> Outcome:
    """Chain `items` and update their packages (and those of `announce`, whose package frame is
    published even when unchanged: a new consignment). Idempotent: scans chained before are skipped."""
    unique: dict[tuple[str, str, int], Item] = {}
    for it in items:  # a resend, or a scan both swept and handed over live: once, live if it was
        if (it.org, it.driver, it.seq) not in unique or not it.recovered:
            unique[(it.org, it.driver, it.seq)] = it
    items = list(unique.values())
    keys = sorted({(it.org, it.package) for it in items} | set(announce))
    out = Outcome()
    if not keys:
        return out
    now = now_ms()
    async with conn.transaction():
        locked = await ps.lock_packages(conn, keys)
        recovered = {(it.org, it.driver, it.seq): it.recovered for it in items}
        fresh = await ps.unchained(conn, [(it.org, it.driver, it.seq) for it in items])
        fresh.sort(key=lambda r: (r["received_at"], r["driver_id"], r["seq"]))  # the order they were stored
        by_package: dict[ps.Key, list[asyncpg.Record]] = {}
        for row in fresh:
            by_package.setdefault((row["org"], row["package"]), []).append(row)
        custody_rows: list[tuple[str, str, int, str, int, int, bool, bytes]] = []
        heads: dict[ps.Key, tuple[int, bytes]] = {}
        for (org, package), rows in by_package.items():
            pkg = locked[(org, package)]
            flags = [recovered[(org, r["driver_id"], r["seq"])] for r in rows]
            head = bytes(pkg["chain_head"]) if pkg["chain_head"] is not None else chain.GENESIS
            links = chain.extend(key, org, package, pkg["chain_len"], head, [ps.content(r) for r in rows], now, flags)
            for row, flag, (index, mac) in zip(rows, flags, links, strict=True):
                custody_rows.append((org, package, index, row["driver_id"], row["seq"], now, flag, mac))
            heads[(org, package)] = links[-1]
        await ps.insert_custody(conn, custody_rows)
        out.chained = len(custody_rows)
        scans: dict[ps.Key, list[asyncpg.Record]] = {}
        for row in await ps.chained_scans(conn, keys):
            scans.setdefault((row["org"], row["package"]), []).append(row)
        stored: dict[ps.Key, dict[custody.AlertKey, tuple[str, str, str | None]]] = {}
        for a in await ps.alerts_of(conn, keys):
            akey = (a["kind"], a["reason"], a["driver_id"], a["seq"])
            stored.setdefault((a["org"], a["package_id"]), {})[akey] = (a["state"], a["id"], a["message"])
        alert_rows: list[tuple[Any, ...]] = []
        package_rows: list[tuple[Any, ...]] = []
        order = sorted(keys, key=lambda k: min((r["received_at"] for r in by_package.get(k, ())), default=0))
        for k in order:
            _update(
                k,
                locked[k],
                scans.get(k, []),
                stored.get(k, {}),
                by_package.get(k, []),
                heads,
                key,
                now,
                max_delivery_m,
                k in announce,
                out,
                alert_rows,
                package_rows,
            )
        await ps.upsert_alerts(conn, alert_rows, now)
        await ps.update_packages(conn, package_rows)
    return out


def _update(
    k: ps.Key,
    pkg: asyncpg.Record,
    scans: list[asyncpg.Record],
    stored: dict[custody.AlertKey, tuple[str, str, str | None]],
    fresh: list[asyncpg.Record],
    heads: dict[ps.Key, tuple[int, bytes]],
    key: bytes,
    now: int,
    max_delivery_m: float,
    announce: bool,
    out: Outcome,
    alert_rows: list[tuple[Any, ...]],
    package_rows: list[tuple[Any, ...]],
) -> None:
    org, package = k
    client = pkg["client"] if pkg["consigned_at"] is not None else None
    stamp = stamp_of(client)
    for row in fresh:
        out.live.append((org, ("a", row["driver_id"], row["ts"], stamp, frames.encode(scan_frame(row)))))
    result = custody.replay(terms(pkg, max_delivery_m), [fact(r) for r in scans])
    ts = result.ts if result.ts is not None else pkg["consigned_at"] or now
    was = pkg["holder"] if pkg["state"] == custody.PICKED_UP else None
    held = result.holder if result.state == custody.PICKED_UP else None
    if (result.state, result.holder) != (pkg["state"], pkg["holder"]) or announce:
        out.changed.add(k)
        frame = package_frame(package, result.state, result.holder, client, ts)
        out.live.append((org, ("a", result.holder or "", ts, stamp, frames.encode(frame))))
    if was != held or announce:
        out.holders.update((org, d) for d in (was, held) if d is not None)
    to_open, to_resolve = custody.plan_alerts({a: s[0] for a, s in stored.items()}, result.anomalies)
    for anomaly in to_open:
        id_ = alert_id(org, package, anomaly.key)
        alert_rows.append(
            (org, id_, anomaly.kind, anomaly.reason, "open", package, anomaly.driver, anomaly.seq, anomaly.message)
        )
        frame = alert_frame(id_, anomaly.kind, "open", now, anomaly.driver, package, anomaly.message)
        a_stamp = b"" if anomaly.kind == custody.SCAN_ANOMALY else stamp
        out.live.append((org, ("a", anomaly.driver, now, a_stamp, frames.encode(frame))))
    for akey in to_resolve:
        _, id_, message = stored[akey]
        kind, reason, driver, seq = akey
        alert_rows.append((org, id_, kind, reason, "resolved", package, driver, seq, message))
        frame = alert_frame(id_, kind, "resolved", now, driver, package, message)
        a_stamp = b"" if kind == custody.SCAN_ANOMALY else stamp
        out.live.append((org, ("a", driver, now, a_stamp, frames.encode(frame))))
    length, head = heads.get(k, (pkg["chain_len"], bytes(pkg["chain_head"]) if pkg["chain_head"] else chain.GENESIS))
    tag = chain.head_tag(key, org, package, length, head, ps.consignment(pkg))
    package_rows.append((org, package, result.state, result.holder, result.ts, length, head if length else None, tag))
