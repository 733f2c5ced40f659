"""The periodic alert check: time-based rules (custody/rules.py) over the packages on their way.

Every `TRACKER_WATCH_INTERVAL_S`, one instance (a PostgreSQL advisory lock taken for the round's
transaction; the others skip that round) reads the packages carried now or changed recently, their
open alerts of the rules' kinds and their holders' newest fixes, runs the rules with each org's
thresholds, and commits in one transaction: alerts opened, reopened, updated (an excursion that grew
or ended) and resolved (`watch_store.commit_alerts`), arrivals and departures recorded on the
packages (`watch_store.record_arrivals`). Live frames go out after the commit. Alert ids are a hash
of what they are about, so a round repeated by another instance finds its own work done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from ..broker import LiveItem
from ..clock import now_ms
from ..extension import NO_OUTBOX, Outbox, OutboxEvent
from ..protocol import frames
from . import rules
from . import store as ps
from . import watch_store as ws
from .process import alert_frame, alert_id, alert_stamp, event_of, fact, package_frame, stamp_of
from .stamps import PG_ERRORS

if TYPE_CHECKING:
    from ..extension import Core

log = logging.getLogger("tracker.watch")

Key = tuple[str, str]  # (org, package) or (org, driver)
AUTO: str = "automatic: the anomaly no longer holds"


@dataclass(slots=True)
class Round:
    """What one check decides, before it is committed."""

    now: int
    changes: list[ws.Change] = field(default_factory=list)
    arrivals: list[tuple[str, str, int | None, int | None]] = field(default_factory=list)
    live: list[tuple[str, LiveItem]] = field(default_factory=list)
    events: list[tuple[Key, OutboxEvent]] = field(default_factory=list)  # webhooks: (org, alert id) -> event
    found: dict[Key, tuple[str | None, rules.Finding]] = field(default_factory=dict)  # (org, id) -> (package, finding)


class Watch:
    def __init__(self, core: Core, outbox: Outbox = NO_OUTBOX) -> None:
        self.core = core
        self.outbox = outbox
        self.defaults = rules.Thresholds(
            data_gap_s=core.settings.alert_data_gap_s,
            arrival_radius_m=core.settings.alert_arrival_radius_m,
            arrival_dwell_s=core.settings.alert_arrival_dwell_s,
            temp_consecutive_s=core.settings.alert_temp_consecutive_s,
            temp_cumulative_s=core.settings.alert_temp_cumulative_s,
            long_stop_s=core.settings.alert_long_stop_s,
            stop_radius_m=core.settings.alert_stop_radius_m,
        )

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [self._run()]

    async def _run(self) -> None:
        interval = self.core.settings.watch_interval_s
        while True:
            await asyncio.sleep(interval)  # a period, not a wait for an effect
            try:
                await self.check(now_ms())
            except PG_ERRORS as exc:
                log.warning("alert check skipped: %s", exc)
            except asyncpg.DataError as exc:
                log.error("alert check failed on the data: %s", exc)

    async def check(self, now: int) -> bool:
        """One round; False if another instance holds the round's lock."""
        async with self.core.pool.acquire() as conn, conn.transaction():
            if not await ws.try_lock(conn):
                return False
            r = await self._plan(conn, now)
            keys = sorted({(c.org, c.package) for c in r.changes if c.package} | {(a[0], a[1]) for a in r.arrivals})
            if keys:
                await ps.lock_packages(conn, keys)  # the order custody/process.py and the alert workflow lock in
            done = set(await ws.commit_alerts(conn, r.changes, now))
            await self.outbox.write(conn, [e for k, e in r.events if k in done])
            await ws.record_arrivals(conn, r.arrivals)
        for org, item in r.live:
            self.core.publish(org, item)
        return True

    async def _plan(self, conn: ps.Tx, now: int) -> Round:
        lookback = int(self.core.settings.watch_lookback_s * 1000)
        r = Round(now)
        pkgs = await ws.packages(conn, now - lookback, now, rules.KINDS)
        opened = await ws.open_alerts(conn, rules.KINDS)
        overrides = await ws.thresholds(conn)
        limits = {org: self.defaults.merged(v) for org, v in overrides.items()}

        def t_of(org: str) -> rules.Thresholds:
            return limits.get(org, self.defaults)

        drivers = {(p["org"], p["holder"]) for p in pkgs if p["holder"]} | {
            (a["org"], a["driver_id"]) for a in opened if a["kind"] == rules.DATA_GAP
        }
        fixes = await ws.fixes(conn, sorted(drivers), now - lookback, now)
        cold = [(p["org"], p["package_id"]) for p in pkgs if p["temp_min"] is not None or p["temp_max"] is not None]
        readings: dict[Key, list[rules.Reading]] = {}
        last_t: dict[Key, int] = {}
        for row in await ps.chained_scans(conn, cold) if cold else []:
            f, k = fact(row), (row["org"], row["package"])
            last_t[k] = max(last_t.get(k, f.t), f.t)
            if f.temp_c is not None:
                readings.setdefault(k, []).append((f.t, f.temp_c, f.driver, f.seq))
        held: dict[Key, list[asyncpg.Record]] = {}
        for p in pkgs:
            k = (p["org"], p["package_id"])
            t = t_of(p["org"])
            carried = p["state"] == "picked_up"
            if carried:
                held.setdefault((p["org"], p["holder"]), []).append(p)
            mine = [f for f in fixes.get((p["org"], p["holder"]), []) if p["state_ts"] is None or f[0] >= p["state_ts"]]
            if p["consigned_at"] is not None:
                self._find(r, p, rules.window_missed(now, p["window_to"], p["state"], p["state_ts"], p["holder"]))
            if k in cold:
                end = now if carried else last_t.get(k, now)
                got = readings.get(k, [])
                for finding in rules.temperature(got, p["temp_min"], p["temp_max"], end, t, ongoing=carried):
                    self._find(r, p, finding)
                if carried:
                    self._find(r, p, rules.long_stop(now, mine, p["holder"], t))
            if p["dest_lat"] is not None and p["holder"] and p["departed_at"] is None:
                self._arrival(r, p, mine if carried else fixes.get((p["org"], p["holder"]), []), t)
        for (org, driver), ps_ in held.items():
            since = max(p["state_ts"] for p in ps_)
            dfix = fixes.get((org, driver), [])
            gap = rules.data_gap(now, since, dfix[-1][0] if dfix else None, driver, len(ps_), t_of(org))
            if gap is not None:
                r.found[(org, alert_id(org, "", (gap.kind, "", driver, gap.n)))] = (None, gap)
        await self._diff(conn, r, opened, {(p["org"], p["package_id"]): p for p in pkgs}, fixes, t_of)
        return r

    @staticmethod
    def _find(r: Round, p: asyncpg.Record, finding: rules.Finding | None) -> None:
        if finding is not None:
            org, package = p["org"], p["package_id"]
            # A missed window is the package's, whoever holds it (the alert names the holder it found).
            who = "" if finding.kind == rules.WINDOW_MISSED else finding.driver or ""
            r.found[(org, alert_id(org, package, (finding.kind, "", who, finding.n)))] = (package, finding)

    def _arrival(self, r: Round, p: asyncpg.Record, fixes: list[rules.Fix], t: rules.Thresholds) -> None:
        if p["arrived_at"] is not None:
            fixes = [f for f in fixes if f[0] >= p["arrived_at"]]
        elif p["state"] != "picked_up":
            return  # the arrival is looked for while the package is carried
        arrived, departed = rules.arrival(fixes, (p["dest_lat"], p["dest_lon"]), t, p["arrived_at"])
        if (arrived, departed) == (p["arrived_at"], p["departed_at"]):
            return
        org, package = p["org"], p["package_id"]
        r.arrivals.append((org, package, arrived, departed))
        client = p["client"] if p["consigned_at"] is not None else None
        ts = p["state_ts"] if p["state_ts"] is not None else r.now
        frame = package_frame(package, p["state"], p["holder"], client, ts)
        frame["arrived_at"], frame["departed_at"] = arrived, departed
        r.live.append((org, ("a", p["holder"] or "", ts, stamp_of(client), frames.encode(frame))))

    async def _diff(
        self,
        conn: ps.Tx,
        r: Round,
        opened: list[asyncpg.Record],
        pkgs: dict[Key, asyncpg.Record],
        fixes: dict[Key, list[rules.Fix]],
        t_of: Callable[[str], rules.Thresholds],
    ) -> None:
        """Open what is found and not open (a person's resolution stands), update what grew, resolve
        what no longer holds."""
        is_open = {(a["org"], a["id"]): a for a in opened}
        stopped = {(a["org"], a["package_id"]) for a in opened if a["kind"] == rules.LONG_STOP}
        prior = await ws.known(conn, [k for k in r.found if k not in is_open])
        for (org, id_), (package, f) in sorted(r.found.items()):
            if (org, id_) in is_open:
                a = is_open[(org, id_)]
                if f.kind in (rules.TEMP_CONSECUTIVE, rules.TEMP_CUMULATIVE) and _grew(a, f):
                    self._change(r, org, id_, f, package, "updated", a, client=_client(a))
                continue
            if f.kind == rules.LONG_STOP and (org, package) in stopped:
                continue  # one stop at a time: the open one lasts until the driver moves on
            known = prior.get((org, id_))
            if known is not None and known["resolved_by"] is not None:
                continue  # a person resolved this very occurrence: final
            p = pkgs.get((org, package)) if package is not None else None
            event = "reopened" if known is not None else "opened"
            self._change(r, org, id_, f, package, event, None, client=_client(p) if p is not None else None)
        for (org, id_), a in sorted(is_open.items()):
            if (org, id_) in r.found:
                continue
            reason, details = self._why_resolved(a, pkgs, fixes, t_of(org))
            if reason is not None:
                f = rules.Finding(a["kind"], a["driver_id"], a["seq"] or 0, a["message"] or "", details or {})
                self._change(
                    r, org, id_, f, a["package_id"], "resolved", a, client=_client(a), reason=reason, details=details
                )

    @staticmethod
    def _why_resolved(
        a: asyncpg.Record, pkgs: dict[Key, asyncpg.Record], fixes: dict[Key, list[rules.Fix]], t: rules.Thresholds
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Why an open alert no rule found any more is resolved (None: judge it next round)."""
        kind, org = a["kind"], a["org"]
        p = pkgs.get((org, a["package_id"])) if a["package_id"] else None
        if kind == rules.DATA_GAP:
            start = a["seq"] or 0
            closed = rules.gap_closed(start, [f[0] for f in fixes.get((org, a["driver_id"]), [])], t)
            if closed is not None:
                return closed
            if any(
                p["state"] == "picked_up" and (p["org"], p["holder"]) == (org, a["driver_id"]) for p in pkgs.values()
            ):
                return "automatic: data returned (a scan)", None
            return "automatic: no longer carrying packages", None
        if p is None:
            return None, None
        if kind == rules.LONG_STOP:
            if p["state"] != "picked_up" or p["holder"] != a["driver_id"]:
                return "automatic: no longer carrying the package", None
            d = orjson_loads(a["details"]) or {}
            mine = fixes.get((org, a["driver_id"]), [])
            if "lat" in d and not rules.moved_from(mine, d["lat"], d["lon"], t.stop_radius_m):
                return None, None
            return "automatic: the driver moved on", None
        return AUTO, None

    @staticmethod
    def _change(
        r: Round,
        org: str,
        id_: str,
        f: rules.Finding,
        package: str | None,
        event: str,
        a: asyncpg.Record | None,
        *,
        client: str | None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if event != "resolved":
            details = f.details
        r.changes.append(ws.Change(org, id_, f.kind, event, package, f.driver, f.n, f.message, details, reason))
        acked = None
        if a is not None and event in ("updated", "resolved") and a["acknowledged_at"] is not None:
            acked = (a["acknowledged_by"], a["acknowledged_at"])
        state = "resolved" if event == "resolved" else "open"
        frame = alert_frame(
            id_, f.kind, state, r.now, f.driver, package, f.message, acked=acked, resolved=(None, reason)
        )
        shown = details if details is not None else (orjson_loads(a["details"]) if a is not None else None)
        if shown is not None:
            frame["details"] = shown
        stamp = alert_stamp(f.kind, stamp_of(client)) if package is not None else b""  # package-less: dispatchers
        r.live.append((org, ("a", f.driver or "", r.now, stamp, frames.encode(frame))))
        if event != "updated":  # opened, reopened, resolved: what webhooks report
            r.events.append(
                ((org, id_), event_of(org, "alert.resolved" if state == "resolved" else "alert.opened", frame))
            )


def _client(row: asyncpg.Record) -> str | None:
    """The client a package is consigned to (a package row, or an alert joined with its package)."""
    return row["client"] if row["consigned_at"] is not None else None


def _grew(a: asyncpg.Record, f: rules.Finding) -> bool:
    d = orjson_loads(a["details"]) or {}
    return any(d.get(k) != f.details.get(k) for k in ("start", "min_c", "max_c", "excursions", "ongoing"))


def orjson_loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)
