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

from ..broker import LiveItem
from ..clock import now_ms
from ..extension import NO_OUTBOX, Outbox, OutboxEvent
from ..protocol import frames
from . import alerts_store as als
from . import chain, rules
from . import state as custody
from . import store as ps


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
    heads: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)  # chains extended: (length, head)
    tampered: int = 0  # scan rows refused: their seal does not verify (written behind the service's back)


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
    id_: str,
    kind: str,
    state: str,
    ts: int,
    driver: str | None,
    package: str | None,
    message: str | None,
    *,
    acked: tuple[str, int] | None = None,
    resolved: tuple[str | None, str | None] | None = None,
) -> dict[str, Any]:
    """`acked`: (by, at) once acknowledged; `resolved`: (by, reason) once resolved (by None: automatically)."""
    frame: dict[str, Any] = {
        "type": "alert",
        "id": id_,
        "kind": kind,
        "state": state,
        "ts": ts,
        "driver": driver,
        "package": package,
        "message": message,
    }
    if acked is not None:
        frame["acknowledged_by"], frame["acknowledged_at"] = acked
    if state == "resolved" and resolved is not None:
        frame["resolved_by"], frame["resolved_reason"] = resolved
    return frame


def event_of(org: str, type_: str, frame: dict[str, Any]) -> OutboxEvent:
    """A webhook event from a live frame (package, alert): the frame's fields but `type`."""
    data = {k: v for k, v in frame.items() if k != "type"}
    return OutboxEvent(org, type_, data.get("package") or "", data["ts"], data)


def checkpoint_event(org: str, index: int, row: asyncpg.Record, chained_at: int, recovered: bool) -> OutboxEvent:
    """A scan appended to its package's chain of custody (record `index`)."""
    data = {"package": row["package"], "index": index, "chained_at": chained_at, "recovered": recovered}
    data.update({k: v for k, v in scan_frame(row).items() if k != "type"})
    return OutboxEvent(org, "custody.checkpoint", row["package"], row["ts"], data)


def alert_stamp(kind: str, stamp: bytes) -> bytes:
    """Scan anomalies are operations (who scanned what, wrongly), and suspected tampering is for
    those who can act on it: for the org's dispatchers only. Other kinds go to the package's client."""
    return b"" if kind in (custody.SCAN_ANOMALY, chain.TAMPER) else stamp


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
        row["driver_id"],
        row["seq"],
        row["ts"],
        row["event"],
        row["lat"],
        row["lon"],
        _f32(row["temp_c"]),
        received=row["received_at"],
        offset=row["offset_ms"],
    )


async def process(
    conn: ps.Tx,
    key: bytes,
    items: Sequence[Item],
    *,
    max_delivery_m: float,
    announce: Sequence[ps.Key] = (),
    outbox: Outbox = NO_OUTBOX,
) -> Outcome:
    """Chain `items` and update their packages (and those of `announce`, whose package frame is
    published even when unchanged: a new consignment). Idempotent: scans chained before are skipped.
    The events of what changed (checkpoints, package states, alerts) go to `outbox` in the same
    transaction."""
    unique: dict[tuple[str, str, int], Item] = {}
    for it in items:  # a resend, or a scan both swept and handed over live: once, live if it was
        if (it.org, it.driver, it.seq) not in unique or not it.recovered:
            unique[(it.org, it.driver, it.seq)] = it
    keys = sorted({(it.org, it.package) for it in unique.values()} | set(announce))
    batch = _Batch(key, now_ms(), max_delivery_m)
    if not keys:
        return batch.out
    async with conn.transaction():
        locked = await ps.lock_packages(conn, keys)
        fresh = await ps.unchained(conn, list(unique))
        fresh.sort(key=lambda r: (r["received_at"], r["driver_id"], r["seq"]))  # the order they were stored
        forged: list[asyncpg.Record] = []
        for row in fresh:
            if not chain.sealed(key, row["org"], ps.content(row), row["seal"]):
                forged.append(row)  # not written by the service: never chained, never replayed
                continue
            batch.fresh.setdefault((row["org"], row["package"]), []).append(row)
        await ps.insert_custody(conn, batch.chain(locked, {k: it.recovered for k, it in unique.items()}))
        scans: dict[ps.Key, list[asyncpg.Record]] = {}
        for row in await ps.chained_scans(conn, keys):
            scans.setdefault((row["org"], row["package"]), []).append(row)
        stored: dict[ps.Key, dict[custody.AlertKey, asyncpg.Record]] = {}
        tamper_known: set[tuple[str, str, int]] = set()
        for a in await ps.alerts_of(conn, keys):
            if a["kind"] in rules.KINDS:  # the periodic check's (custody/watch.py): not a replay's either
                continue
            if a["kind"] == chain.TAMPER:  # not a replay's anomaly: no scan explains it away
                tamper_known.add((a["org"], a["driver_id"], a["seq"]))
                continue
            akey = (a["kind"], a["reason"], a["driver_id"], a["seq"])
            stored.setdefault((a["org"], a["package_id"]), {})[akey] = a
        for row in forged:
            if (row["org"], row["driver_id"], row["seq"]) not in tamper_known:
                batch.tampered(row)
        first = {k: rows[0]["received_at"] for k, rows in batch.fresh.items()}
        for k in sorted(keys, key=lambda k: first.get(k, 0)):  # publish in the order scans were stored
            batch.update(k, locked[k], scans.get(k, []), stored.get(k, {}), announce=k in announce)
        await ps.upsert_alerts(conn, batch.alert_rows, batch.now)
        await als.add_events(conn, batch.event_rows)
        await ps.update_packages(conn, batch.package_rows)
        await outbox.write(conn, batch.events)
    return batch.out


class _Batch:
    """What one transaction computes: chain records, package updates, alerts, frames to publish."""

    def __init__(self, key: bytes, now: int, max_delivery_m: float) -> None:
        self.key, self.now, self.max_delivery_m = key, now, max_delivery_m
        self.out = Outcome()
        self.fresh: dict[ps.Key, list[asyncpg.Record]] = {}  # scans chained now, per package, in order
        self.heads: dict[ps.Key, tuple[int, bytes]] = {}
        self.alert_rows: list[tuple[Any, ...]] = []
        self.event_rows: list[tuple[str, str, str, str | None, int, str | None]] = []  # the alerts' history
        self.package_rows: list[tuple[Any, ...]] = []
        self.events: list[OutboxEvent] = []  # for webhooks, per package in the order they happened

    def chain(
        self, locked: dict[ps.Key, asyncpg.Record], recovered: dict[tuple[str, str, int], bool]
    ) -> list[tuple[str, str, int, str, int, int, bool, bytes]]:
        """The custody records of the fresh scans, each package's appended to its chain."""
        rows: list[tuple[str, str, int, str, int, int, bool, bytes]] = []
        for (org, package), scans in self.fresh.items():
            pkg = locked[(org, package)]
            flags = [recovered[(org, r["driver_id"], r["seq"])] for r in scans]
            head = bytes(pkg["chain_head"]) if pkg["chain_head"] is not None else chain.GENESIS
            contents = [ps.content(r) for r in scans]
            links = chain.extend(self.key, org, package, pkg["chain_len"], head, contents, self.now, flags)
            for row, flag, (index, mac) in zip(scans, flags, links, strict=True):
                rows.append((org, package, index, row["driver_id"], row["seq"], self.now, flag, mac))
                self.events.append(checkpoint_event(org, index, row, self.now, flag))
            self.heads[(org, package)] = links[-1]
        self.out.chained = len(rows)
        self.out.heads = dict(self.heads)
        return rows

    def tampered(self, row: asyncpg.Record) -> None:
        """A scan row whose seal does not verify: an alert for the org's dispatchers, once."""
        org, package, driver, seq = row["org"], row["package"], row["driver_id"], row["seq"]
        akey = (chain.TAMPER, "unsealed", driver, seq)
        message = (
            f"scan {driver} seq {seq} ({row['event']}) was not written by the service "
            "(its seal does not verify): it is kept out of the chain of custody"
        )
        self._alert((org, package), b"", akey, "opened", alert_id(org, package, akey), message)
        self.out.tampered += 1

    def update(
        self,
        k: ps.Key,
        pkg: asyncpg.Record,
        scans: list[asyncpg.Record],
        stored: dict[custody.AlertKey, asyncpg.Record],
        *,
        announce: bool,
    ) -> None:
        """Replay one package from all its chained scans; queue its new row, alerts and frames."""
        org, package = k
        out = self.out
        client = pkg["client"] if pkg["consigned_at"] is not None else None
        stamp = stamp_of(client)
        for row in self.fresh.get(k, ()):
            out.live.append((org, ("a", row["driver_id"], row["ts"], stamp, frames.encode(scan_frame(row)))))
        result = custody.replay(terms(pkg, self.max_delivery_m), [fact(r) for r in scans])
        ts = result.ts if result.ts is not None else pkg["consigned_at"] or self.now
        was = pkg["holder"] if pkg["state"] == custody.PICKED_UP else None
        held = result.holder if result.state == custody.PICKED_UP else None
        if (result.state, result.holder) != (pkg["state"], pkg["holder"]) or announce:
            out.changed.add(k)
            frame = package_frame(package, result.state, result.holder, client, ts)
            out.live.append((org, ("a", result.holder or "", ts, stamp, frames.encode(frame))))
            self.events.append(event_of(org, "package.state_changed", frame))
        if was != held or announce or pkg["live_view"] != result.live:
            out.holders.update((org, d) for d in (was, held) if d is not None)
        # A person's resolution is final: the same anomaly is neither reopened nor resolved again by a replay.
        auto = {a: s["state"] for a, s in stored.items() if s["state"] == "open" or s["resolved_by"] is None}
        to_open, to_resolve = custody.plan_alerts(auto, result.anomalies)
        for anomaly in to_open:
            if anomaly.key in stored and anomaly.key not in auto:
                continue
            event = "reopened" if anomaly.key in stored else "opened"
            self._alert(k, stamp, anomaly.key, event, alert_id(org, package, anomaly.key), anomaly.message)
        for akey in to_resolve:
            s = stored[akey]
            acked = (s["acknowledged_by"], s["acknowledged_at"]) if s["acknowledged_at"] is not None else None
            self._alert(k, stamp, akey, "resolved", s["id"], s["message"], acked=acked)
        length, head = self.heads.get(k, (pkg["chain_len"], bytes(pkg["chain_head"] or chain.GENESIS)))
        tag = chain.head_tag(self.key, org, package, length, head, ps.consignment(pkg))
        self.package_rows.append(
            (org, package, result.state, result.holder, result.ts, length, head if length else None, tag, result.live)
        )

    def _alert(
        self,
        k: ps.Key,
        stamp: bytes,
        akey: custody.AlertKey,
        event: str,
        id_: str,
        message: str | None,
        *,
        acked: tuple[str, int] | None = None,
    ) -> None:
        """`event`: opened, reopened or resolved (automatically); written to the alert's history too."""
        org, package = k
        kind, reason, driver, seq = akey
        state = "resolved" if event == "resolved" else "open"
        self.alert_rows.append((org, id_, kind, reason, state, package, driver, seq, message))
        note = ps.AUTO_REASON if state == "resolved" else None
        self.event_rows.append((org, id_, event, None, self.now, note))
        frame = alert_frame(id_, kind, state, self.now, driver, package, message, acked=acked, resolved=(None, note))
        self.out.live.append((org, ("a", driver, self.now, alert_stamp(kind, stamp), frames.encode(frame))))
        self.events.append(event_of(org, "alert.resolved" if state == "resolved" else "alert.opened", frame))
