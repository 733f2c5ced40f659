"""Day-two operations (issue 12): alerts, the dashboard, the metrics they need, and upgrades.

The alerting rules pass `promtool check rules` and their own `promtool test rules` unit tests; every
metric named in the rules and in the Grafana dashboard is one a running instance exports at
/metrics (a renamed metric breaks the build); the metrics added for them (loop lag, readiness,
backend errors, writer buffer, custody verify failures) move when the thing they measure happens;
a database made by the first schema is upgraded by `tracker migrate`, data intact, idempotently.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import yaml

from harness.clients import Phone, acked, now_ms, pos, scan
from harness.http import consign, http, pkg_path, request
from harness.instances import Instance
from harness.servers import PgCluster, RedisServer
from harness.tokens import token
from harness.wait import eventually
from tracker import store
from tracker.app import extension_migrations

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tracker.json"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
# Recorded by Prometheus itself for every scrape target, not by the service.
PROMETHEUS_OWN = {"up"}
# A name followed by `(` is a function, by `=`, `=~` (not `==`) a label matcher.
METRIC_NAME = re.compile(r"\b((?:tracker|process|python)_[a-z0-9_]+|up)\b(?!\s*(?:\(|=(?!=)))")
SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}")
MATCHER = re.compile(r'([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
TARGET_LABELS = {"instance", "job"}  # attached by Prometheus to every scraped series


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (.ci/run installs it)"
    return path


# -- scraping a running instance -------------------------------------------------------------------


class Exported:
    """What one scrape of /metrics says: every name a query may use, and each family's labels."""

    def __init__(self, text: str) -> None:
        self.names: set[str] = set()
        self.labels: dict[str, set[str]] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.names.add(name)
                suffixes = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
                self.names.update(name + s for s in suffixes.get(kind, ()))
            elif line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                name, _, rest = series.partition("{")
                labels = dict(re.findall(r'([a-z_][a-z0-9_]*)="((?:[^"\\]|\\.)*)"', rest))
                self.names.add(name)
                self.labels.setdefault(name, set()).update(labels)
                self.samples.setdefault(name, []).append((labels, float(value)))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(v for ls, v in self.samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items()))


async def scrape(inst: Instance) -> Exported:
    status, headers, body = await request(inst, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, headers)
    return Exported(body.decode())


def names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label names and functions are not: `name=`, `fn(`)."""
    inside_quotes = re.sub(r'"[^"]*"', '""', expr)
    return set(METRIC_NAME.findall(inside_quotes))


def check_expressions(exprs: list[str], exported: Exported) -> set[str]:
    """Assert every metric and every label matcher of `exprs` is exported; returns the names."""
    used: set[str] = set()
    for expr in exprs:
        names = names_in(expr)
        assert names, f"no metric in {expr!r}"
        missing = names - exported.names - PROMETHEUS_OWN
        assert not missing, f"{expr!r} names metrics the service does not export: {sorted(missing)}"
        for name, matchers in SELECTOR.findall(expr):
            if name in PROMETHEUS_OWN:
                continue
            wanted = set(MATCHER.findall(matchers)) - TARGET_LABELS
            have = exported.labels.get(name, set())
            assert wanted <= have, f"{expr!r}: {name} has labels {sorted(have)}, not {sorted(wanted - have)}"
        used |= names
    return used


async def busy_instance(inst: Instance, org: str) -> Exported:
    """A scrape after a driver sent a stored position and a refused one (so labelled families
    such as tracker_events_refused_total{code} have samples to check label names against)."""
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(pos(1))
    await acked(phone, 1)
    await phone.send(pos(2, lat=91.0))  # no such latitude: refused `invalid`
    await phone.until(lambda p: p.refused(), timeout=5)
    return await scrape(inst)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# -- the rules ---------------------------------------------------------------------------------------


def test_promtool_checks_the_alerting_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_promtool_unit_tests_fire_each_alert_when_it_should_and_not_otherwise() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert is exercised, each with a case where it fires and one where it must not.
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names and quiet == names, (names - fires, names - quiet)


def test_the_issue_s_alerts_exist_and_each_has_a_runbook_entry() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "TrackerInstanceDown",
        "TrackerNotReady",
        "TrackerWriterBufferFilling",
        "TrackerUnavailableAnswers",
        "TrackerAckLatencyHigh",
        "TrackerLoopLag",
        "TrackerSlowConsumers",
        "TrackerRedisErrors",
        "TrackerPostgresErrors",
        "TrackerCustodyVerifyFailed",
    } <= names
    headings = {line[4:].strip().lower() for line in OPERATIONS.read_text().splitlines() if line.startswith("### ")}
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        anchor = rule["annotations"]["runbook"].removeprefix("docs/OPERATIONS.md#")
        assert anchor in headings, f"{rule['alert']}: no '### {anchor}' heading in docs/OPERATIONS.md"


async def test_every_metric_the_alerts_name_is_exported_by_a_running_instance(instance: Instance, org: str) -> None:
    exported = await busy_instance(instance, org)
    used = check_expressions([rule["expr"] for rule in alert_rules()], exported)
    assert {"tracker_ready", "tracker_loop_lag_seconds_bucket", "tracker_backend_errors_total"} <= used


async def test_every_dashboard_panel_queries_exported_metrics(instance: Instance, org: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = await busy_instance(instance, org)
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10 and all(panel["targets"] for panel in dashboard["panels"])
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = check_expressions(exprs, exported)
    alerted = set().union(*(names_in(rule["expr"]) for rule in alert_rules())) - PROMETHEUS_OWN
    assert alerted <= used, f"alerted on but not on the dashboard: {sorted(alerted - used)}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)


# -- the metrics the alerts need ---------------------------------------------------------------------


async def test_loop_lag_is_measured(instance: Instance) -> None:
    before = await scrape(instance)
    late = before.value("tracker_loop_lag_seconds_count") - before.value("tracker_loop_lag_seconds_bucket", le="0.25")
    # Hold the event loop for 1 s, as a blocking call in a handler would (the cause, not a wait):
    # a timer due every 0.5 s falls due within it and runs at least 0.5 s late.
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        pass

    async def late_ticks() -> float:
        now = await scrape(instance)
        return now.value("tracker_loop_lag_seconds_count") - now.value("tracker_loop_lag_seconds_bucket", le="0.25")

    await eventually(late_ticks, lambda n: n >= late + 1, timeout=5)
    after = await scrape(instance)
    assert after.value("tracker_loop_lag_seconds_count") > before.value("tracker_loop_lag_seconds_count")


async def test_readiness_and_redis_errors_follow_redis(start_instance: Any, private_redis: RedisServer) -> None:
    inst: Instance = await start_instance(redis_url=private_redis.url, ready_probe_s=0.5)

    async def ready() -> float:
        return (await scrape(inst)).value("tracker_ready")

    await eventually(ready, lambda v: v == 1, timeout=15)
    errors = (await scrape(inst)).value("tracker_backend_errors_total", backend="redis")
    private_redis.kill()
    await eventually(ready, lambda v: v == 0, timeout=15)
    now = await scrape(inst)
    assert now.value("tracker_backend_errors_total", backend="redis") > errors
    assert now.value("tracker_broker_live") == 0
    await private_redis.start()
    await eventually(ready, lambda v: v == 1, timeout=20)


async def test_postgres_errors_and_the_writer_buffer_follow_postgres(
    start_instance: Any, pg_cluster: PgCluster, private_pg: str, org: str
) -> None:
    inst: Instance = await start_instance(
        database_url=private_pg, writer_buffer_max=4321, answer_deadline_s=25.0, ready_probe_s=0.5
    )
    first = await scrape(inst)
    assert first.value("tracker_writer_buffer_max_events") == 4321
    errors = first.value("tracker_backend_errors_total", backend="postgres")
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    pg_cluster.stop()

    async def now() -> Exported:
        return await scrape(inst)

    await eventually(now, lambda m: m.value("tracker_backend_errors_total", backend="postgres") > errors, timeout=15)
    await eventually(now, lambda m: m.value("tracker_ready") == 0, timeout=15)
    for seq in range(1, 11):
        await phone.send(pos(seq))
    await eventually(now, lambda m: m.value("tracker_writer_buffered_events") == 10, timeout=10)
    await pg_cluster.start()
    await acked(phone, *range(1, 11))
    await eventually(now, lambda m: m.value("tracker_writer_buffered_events") == 0, timeout=10)
    await eventually(now, lambda m: m.value("tracker_ready") == 1, timeout=15)


async def test_a_failed_custody_verification_is_counted(start_instance: Any, org: str, db: asyncpg.Connection) -> None:
    inst: Instance = await start_instance()
    await consign(inst, org, "PKG-OK", "st-marys")
    await consign(inst, org, "PKG-BAD", "st-marys")
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(scan(1, "PKG-OK", "pickup"))
    await phone.send(scan(2, "PKG-BAD", "pickup"))
    await acked(phone, 1, 2)
    disp = token("dispatcher", "u", org)

    async def chained() -> Any:
        return await db.fetchval("SELECT count(*) FROM custody WHERE org = $1", org)

    await eventually(chained, lambda n: n == 2)

    async def failures() -> float:
        return (await scrape(inst)).value("tracker_custody_verify_failures_total")

    start = await failures()
    status, out = await http(inst, "GET", pkg_path("PKG-OK", "/verify"), disp)
    assert (status, out["ok"]) == (200, True)
    assert await failures() == start
    # Someone with write access to PostgreSQL (no key) edits a chained scan.
    await db.execute("UPDATE scans SET temp_c = 4.5 WHERE org = $1 AND package = 'PKG-BAD'", org)
    status, out = await http(inst, "GET", pkg_path("PKG-BAD", "/verify"), disp)
    assert (status, out["ok"]) == (200, False), out
    assert await failures() == start + 1


# -- upgrades ----------------------------------------------------------------------------------------


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _migrate_cli(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    # A deployment's DATABASE_URL alone: migrate uses neither shared key, so the operator running it
    # (often from a CI job without the secret store) must not be asked for them; `serve` still is.
    env |= {"DATABASE_URL": url, "TRACKER_DATA_DIR": str(data_dir)}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tracker", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


Rows = dict[str, tuple[list[str], list[tuple[Any, ...]]]]


async def _rows(conn: asyncpg.Connection, columns_of: Rows | None = None) -> Rows:
    """Every row of the first schema's tables, in the first schema's columns (later migrations may
    add columns; what was there must be unchanged)."""
    out: Rows = {}
    for table in ("drivers", "positions", "scans"):
        if columns_of is None:
            columns = [
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
                    "ORDER BY ordinal_position",
                    table,
                )
            ]
        else:
            columns = columns_of[table][0]
        rows = await conn.fetch(f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1, 2, 3")
        out[table] = (columns, [tuple(r) for r in rows])
    assert all(rows for _, rows in out.values())
    return out


@pytest.fixture
async def first_schema_db(database_url: str) -> Any:
    """A fresh database as the first release left it: migration 1 only, recorded in tracker_schema."""
    name = f"tracker_upgrade_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(database_url, name)
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_tracker_migrate_upgrades_a_database_of_the_first_schema(first_schema_db: str, tmp_path: Path) -> None:
    first_version, first_sql = store.MIGRATIONS[0]
    assert first_version == 1 and "CREATE TABLE positions" in first_sql
    conn = await asyncpg.connect(first_schema_db)
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE tracker_schema (version int PRIMARY KEY, applied_at timestamptz DEFAULT now())"
            )
            await conn.execute(first_sql)
            await conn.execute("INSERT INTO tracker_schema (version) VALUES (1)")
        t = now_ms() - 60_000
        await conn.execute("INSERT INTO drivers (org, driver_id, name) VALUES ('acme', 'd-7', 'Wanjiru')")
        await conn.executemany(
            "INSERT INTO positions (org, driver_id, seq, ts, received_at, lat, lon, spd) "
            "VALUES ('acme', 'd-7', $1, $2, $2, $3, 36.82, 8.5)",
            [(seq, t + seq * 1000, -1.29 + seq / 1000) for seq in range(1, 51)],
        )
        await conn.execute(
            "INSERT INTO scans (org, driver_id, seq, ts, received_at, package, event, temp_c) "
            "VALUES ('acme', 'd-7', 51, $1, $1, 'PKG-1', 'pickup', 5.0)",
            t + 51_000,
        )
        before = await _rows(conn)
    finally:
        await conn.close()

    every = sorted(v for v, _ in [*store.MIGRATIONS, *extension_migrations()])
    assert len(every) > 1, "nothing to upgrade: the first schema is the only one"
    run = await _migrate_cli(first_schema_db, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"({len(every) - 1} migration(s) applied)" in run.stdout, run.stdout

    conn = await asyncpg.connect(first_schema_db)
    try:
        assert [r["version"] for r in await conn.fetch("SELECT version FROM tracker_schema ORDER BY 1")] == every
        assert await _rows(conn, columns_of=before) == before
        # The later schema is there and usable: the custody tables of migration 2.
        assert await conn.fetchval("SELECT count(*) FROM packages") == 0
    finally:
        await conn.close()

    again = await _migrate_cli(first_schema_db, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(0 migration(s) applied)" in again.stdout, again.stdout


def test_serve_in_a_deployment_refuses_to_start_without_the_shared_keys(tmp_path: Path) -> None:
    """`migrate` needs no key, but `serve` with DATABASE_URL and no TRACKER_JWT_SECRET /
    TRACKER_CUSTODY_KEY would generate its own and refuse the other instances' tokens: it stops
    at once, exit code 2, naming the missing setting."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env |= {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", "TRACKER_DATA_DIR": str(tmp_path)}
    for missing, given in (("TRACKER_JWT_SECRET", {}), ("TRACKER_CUSTODY_KEY", {"TRACKER_JWT_SECRET": "s" * 32})):
        run = subprocess.run(
            [sys.executable, "-m", "tracker", "serve", "--port", "0"],
            cwd=ROOT,
            env=env | given,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stdout + run.stderr
        assert f"{missing} is required" in run.stderr, run.stderr


async def test_an_upgraded_database_serves_its_old_data(
    first_schema_db: str, start_instance: Any, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(first_schema_db)
    try:
        await conn.execute(
            "CREATE TABLE tracker_schema (version int PRIMARY KEY, applied_at timestamptz DEFAULT now())"
        )
        await conn.execute(store.MIGRATIONS[0][1])
        await conn.execute("INSERT INTO tracker_schema (version) VALUES (1)")
        t = now_ms() - 60_000
        await conn.executemany(
            "INSERT INTO positions (org, driver_id, seq, ts, received_at, lat, lon) "
            "VALUES ('acme-up', 'd-7', $1, $2, $2, -1.29, 36.82)",
            [(seq, t + seq * 1000) for seq in range(1, 6)],
        )
    finally:
        await conn.close()
    run = await _migrate_cli(first_schema_db, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    inst: Instance = await start_instance(database_url=first_schema_db)
    status, trail = await http(
        inst, "GET", "/v1/drivers/d-7/trail", token("dispatcher", "u", "acme-up"), query={"from": t, "to": t + 10_000}
    )
    assert status == 200, trail
    assert trail["properties"]["seq"] == [1, 2, 3, 4, 5]
