"""deploy/: what `docker compose up` runs, tested for real without a Docker engine.

- nginx: Debian's binary runs `deploy/nginx.conf` itself (its server block, the upstream's servers
  templated to two `tracker serve` processes sharing the test PostgreSQL and Redis) as an
  unprivileged foreground process on a spare port. Phones and dashboards go through it: websocket
  upgrades on /v1/driver and /v1/live, the Origin check with the Origin a browser sends, the
  dashboard page (also opened in headless Chromium, which must go live), and failover when one
  instance stops.
- docker-compose.yml: `docker-compose config` validates it; the secrets every replica must share
  are required there, and the service refuses to start without them when DATABASE_URL is set.

nginx, docker-compose or chromium missing is a failure that says what to install (.ci/run installs
them), never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.exceptions import InvalidStatus

from harness.clients import Dash, Phone, acked, pos
from harness.fleet import Fleet
from harness.http import request
from harness.instances import Spawn, TrackerProc
from harness.loss import check_stored
from harness.ports import free_port, wait_port
from harness.servers import popen, stop_process
from harness.tokens import SECRET, token
from harness.wait import wait_until
from tracker.app import make_verifier
from tracker.config import ConfigError, Settings
from tracker.custody.extension import custody_key

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
COMPOSE = ROOT / "docker-compose.yml"
SHARED = {"TRACKER_JWT_SECRET": "compose-secret-" + "x" * 40, "TRACKER_CUSTODY_KEY": "compose-custody-" + "y" * 40}

# The official nginx image includes conf.d/*.conf (where compose mounts deploy/nginx.conf) inside
# `http {}`; this is that main file, with every path under a private prefix.
MAIN_CONF = """worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/conf.d/*.conf;
}}
"""


def _binary(name: str, package: str, *extra: str) -> str:
    for candidate in (shutil.which(name), *extra):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"`{name}` is missing: install Debian's {package} (apt-get install {package}); .ci/run does it")


def upstream_servers(conf: str) -> list[str]:
    """The addresses of `upstream tracker { server ...; }` in deploy/nginx.conf, in order."""
    block = re.search(r"^upstream tracker \{\n(.*?)^\}", conf, re.S | re.M)
    assert block, "deploy/nginx.conf has no `upstream tracker { ... }` block"
    return re.findall(r"^\s*server\s+(\S+)", block.group(1), re.M)


def site_conf(listen: int, upstreams: list[int]) -> str:
    """deploy/nginx.conf as shipped, but listening on 127.0.0.1:`listen`, and its upstream's
    servers, in order, on 127.0.0.1:`upstreams` (their parameters kept)."""
    conf = NGINX_CONF.read_text()
    assert len(upstream_servers(conf)) == len(upstreams), upstream_servers(conf)
    block = re.search(r"^upstream tracker \{\n(.*?)^\}", conf, re.S | re.M)
    assert block is not None
    ports = iter(upstreams)
    body = re.sub(r"^(\s*server\s+)\S+", lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}", block.group(1), flags=re.M)
    conf = conf[: block.start(1)] + body + conf[block.end(1) :]
    conf, n = re.subn(r"^(\s*)listen\s+80;", rf"\g<1>listen 127.0.0.1:{listen};", conf, flags=re.M)
    assert n == 1, "deploy/nginx.conf should listen on port 80 once (the compose file publishes 8080:80)"
    return conf


class Nginx:
    """Debian's nginx in the foreground with deploy/nginx.conf, under a private prefix. As root it
    runs as `nobody` (no privilege needed: a spare port, its own files)."""

    def __init__(self, upstreams: list[int]) -> None:
        self.binary = _binary("nginx", "nginx", "/usr/sbin/nginx")
        self.port = free_port()
        self.prefix = Path(tempfile.mkdtemp(prefix="tracker-nginx-"))
        self.log = self.prefix / "nginx.log"
        (self.prefix / "conf.d").mkdir()
        (self.prefix / "tmp").mkdir()
        (self.prefix / "nginx.conf").write_text(MAIN_CONF.format(prefix=self.prefix))
        (self.prefix / "conf.d" / "default.conf").write_text(site_conf(self.port, upstreams))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        """What a browser sends as Origin on a page loaded from this proxy."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Nginx:
        user: dict[str, Any] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in [self.prefix, *self.prefix.rglob("*")]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        globals_ = f"daemon off; pid {self.prefix}/nginx.pid; error_log stderr;"
        cmd = [self.binary, "-e", "stderr", "-c", str(self.prefix / "nginx.conf"), "-p", str(self.prefix)]
        self.proc = popen([*cmd, "-g", globals_], log=self.log, **user)
        try:
            await asyncio.to_thread(wait_port, self.port, 10, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"nginx did not start: {exc}\n{self.log.read_text(errors='replace')}") from None
        return self

    def close(self) -> None:
        stop_process(self.proc, signal.SIGQUIT, grace=5)  # SIGQUIT: nginx's graceful stop
        shutil.rmtree(self.prefix, ignore_errors=True)


@contextlib.asynccontextmanager
async def nginx_in_front(*instances: TrackerProc) -> AsyncIterator[Nginx]:
    proxy = Nginx([inst.port for inst in instances])
    try:
        yield await proxy.start()
    finally:
        proxy.close()


async def drivers_on(inst: TrackerProc) -> int:
    """`tracker_connections{role="driver"}` of one instance (read from it directly, not the proxy)."""
    status, _, body = await request(inst.port, "GET", "/metrics")
    assert status == 200
    found = re.search(rb'^tracker_connections\{role="driver"\} (\S+)$', body, re.M)
    return int(float(found.group(1))) if found else 0


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_nginx_upgrades_websockets_balances_and_keeps_the_origin_check(
    spawn: Spawn, org: str, database_url: str, redis_url: str
) -> None:
    a, b = await asyncio.gather(spawn(database_url, redis_url), spawn(database_url, redis_url))
    async with nginx_in_front(a, b) as nginx:
        # The dashboard page, and what it loads, through the proxy.
        status, headers, page = await request(nginx.port, "GET", "/")
        assert status == 200 and headers["content-type"].startswith("text/html"), (status, headers)
        assert b'src="/static/js/main.js"' in page
        status, _, _ = await request(nginx.port, "GET", "/static/js/main.js")
        assert status == 200
        # Metrics are for the monitoring network (SECURITY.md), not the public side of the proxy.
        assert (await request(nginx.port, "GET", "/metrics"))[0] == 403
        assert (await request(a.port, "GET", "/metrics"))[0] == 200

        # A browser's dashboard: its Origin is the proxy's address, which the instance behind it
        # must recognise as its own host (the Host header keeps the port).
        dash = await Dash.connect(nginx.url, token("dispatcher", "disp", org), subscribe={}, origin=nginx.origin)
        names = [f"d-{i}" for i in range(6)]
        phones = [await Phone.connect(nginx.url, token("driver", name, org)) for name in names]
        for phone in phones:
            await phone.send(pos(1))
        for phone in phones:
            await acked(phone, 1)
        # least_conn spread the phones over both instances; the dashboard, on one of them, sees all.
        on = await asyncio.gather(drivers_on(a), drivers_on(b))
        assert sum(on) == len(phones) and min(on) >= 1, on
        seen: set[str] = set()
        async with asyncio.timeout(10):
            while not set(names) <= seen:
                seen |= {f["driver"] for f in await dash.live() if f["type"] == "pos"}

        # Another site's page is still refused, behind the proxy as in front of the instance.
        with pytest.raises(InvalidStatus) as refused:
            await Dash.connect(nginx.url, token("dispatcher", "disp", org), origin="http://evil.example")
        assert refused.value.response.status_code == 403


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
async def test_the_dashboard_page_goes_live_in_chromium_through_nginx(
    spawn: Spawn, org: str, database_url: str, redis_url: str
) -> None:
    """What a user of the compose stack does: open the proxy's URL with a token in a browser. The
    page's websocket carries the browser's own Origin and must go live, with the phones' markers."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: install the dev extras (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); .ci/run does it")
    a, b = await asyncio.gather(spawn(database_url, redis_url), spawn(database_url, redis_url))
    async with nginx_in_front(a, b) as nginx:
        phones = [await Phone.connect(nginx.url, token("driver", f"d-{i}", org)) for i in range(2)]
        for phone in phones:
            await phone.send(pos(1))
            await acked(phone, 1)
        errors: list[str] = []
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            try:
                page = await browser.new_page()
                page.on("console", lambda m: m.type == "error" and errors.append(m.text))
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(f"http://127.0.0.1:{nginx.port}/#token={token('dispatcher', 'disp', org)}")
                live = "() => { const s = window.trackerDebug?.state(); return s && s.connection === 'live'"
                live += " && s.markers.length === 2; }"
                try:
                    await page.wait_for_function(live, timeout=15_000)
                except Exception:  # the page's own words say why better than a timeout
                    state = await page.evaluate("() => window.trackerDebug?.state()?.connection")
                    raise AssertionError(f"the dashboard did not go live through nginx: {state}, {errors}") from None
            finally:
                await browser.close()
        assert errors == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_nginx_fails_over_when_an_instance_stops_nothing_acked_lost(
    sig: signal.Signals, spawn: Spawn, org: str, database_url: str, redis_url: str
) -> None:
    env = {"TRACKER_SHUTDOWN_GRACE_S": "4"}
    a, b = await asyncio.gather(spawn(database_url, redis_url, **env), spawn(database_url, redis_url, **env))
    async with nginx_in_front(a, b) as nginx:
        async with Fleet([nginx.url], SECRET, org, 20, interval=0.02, resend_after=5.0) as fleet:
            await wait_until(lambda: all(len(d.acked) > 20 for d in fleet.drivers), 15, "every driver acked")
            on_a = await drivers_on(a)
            assert 0 < on_a < len(fleet.drivers), on_a  # both instances hold phones
            a.signal(sig)
            stopped_at = time.monotonic()
            await a.exited(15)
            # Every phone, those that were on A included, is acknowledged again, through the proxy.
            await wait_until(
                lambda: all(d.ack_times and d.ack_times[-1] > stopped_at + 0.1 for d in fleet.drivers),
                15,
                "every driver acknowledged again through nginx",
            )
            n = len(fleet.drivers)
            await wait_until(lambda: _is(drivers_on(b), n), 5, f"the {n} drivers connected to B")
            await fleet.drain(20)
        check = await check_stored(database_url, org, fleet.acked())
        check.assert_exactly_once()
        assert check.acked == fleet.generated > 300
        # A dashboard opened now, from the page's origin, sees the whole fleet.
        dash = await Dash.connect(nginx.url, token("dispatcher", "disp", org), subscribe={}, origin=nginx.origin)
        assert {d["driver"] for d in dash.snapshot["drivers"]} == {d.name for d in fleet.drivers}


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f docker-compose.yml <args>` (another -f first in `args` wins) with `env`
    and no TRACKER_ variable of ours."""
    binary = _binary("docker-compose", "docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    files = [] if args[:1] == ("-f",) else ["-f", str(COMPOSE)]
    return subprocess.run(
        [binary, *files, *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_is_valid_and_requires_the_shared_secrets() -> None:
    done = compose("config", env=SHARED)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    replicas = {name: s for name, s in services.items() if s.get("build")}
    assert len(replicas) >= 2, list(services)
    for name, service in replicas.items():
        env = service["environment"]
        # Every replica shares the secrets given, and uses the external PostgreSQL and Redis.
        assert {k: env.get(k) for k in SHARED} == SHARED, name
        assert env["DATABASE_URL"].startswith("postgresql://") and env["REDIS_URL"].startswith("redis://"), name
        assert Settings.from_env({k: str(v) for k, v in env.items()}).database_url, name
    # The proxy mounts deploy/nginx.conf, whose upstream names the replicas on their port.
    proxy = next(s for s in services.values() if str(s.get("image", "")).startswith("nginx"))
    assert any(str(v).startswith(f"{NGINX_CONF}:") for v in proxy["volumes"]), proxy["volumes"]
    expected = sorted(f"{name}:{s['environment']['TRACKER_PORT']}" for name, s in replicas.items())
    assert sorted(upstream_servers(NGINX_CONF.read_text())) == expected
    assert [p["target"] for p in proxy["ports"]] == [80]

    for missing in SHARED:
        done = compose("config", env={k: v for k, v in SHARED.items() if k != missing})
        assert done.returncode != 0, f"compose accepted a stack without {missing}"
        assert missing in done.stderr, done.stderr


def readme_compose_commands() -> list[str]:
    """The shell block of README.md's "With Docker Compose", one command a line."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### With Docker Compose\n", 1)
    assert len(section) == 2, "README.md has no '### With Docker Compose' section"
    block = re.search(r"^```sh\n(.*?)^```", section[1], re.S | re.M)
    assert block, "the section has no ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_compose_commands_give_a_stack_its_keys_and_a_working_token(tmp_path: Path) -> None:
    """README.md's commands as a user runs them in a fresh clone: the key setup writes .env, Compose
    accepts the stack with it (and nothing else), and the token command mints a token the replicas
    accept."""
    lines = readme_compose_commands()
    setup = [line for line in lines if not line.startswith("docker compose ")]
    commands = [shlex.split(line) for line in lines if line.startswith("docker compose ")]
    clone = tmp_path / "clone"
    (clone / "deploy").mkdir(parents=True)
    shutil.copy(COMPOSE, clone / COMPOSE.name)
    shutil.copy(NGINX_CONF, clone / "deploy" / NGINX_CONF.name)
    subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(setup)], cwd=clone, check=True, timeout=30)
    assert (clone / ".env").stat().st_mode & 0o777 == 0o600
    done = compose("-f", str(clone / COMPOSE.name), "config", env={})
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    keys = {k: services["tracker-a"]["environment"][k] for k in SHARED}
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in keys.values()) and len(set(keys.values())) == 2, keys

    assert ["docker", "compose", "up", "--build", "-d"] in commands
    [exec_] = [c for c in commands if c[2] == "exec"]
    service, program, *args = exec_[3:]
    assert service in services and program == "tracker", exec_
    env = {k: str(v) for k, v in services[service]["environment"].items()}
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    minted = subprocess.run(
        [sys.executable, "-m", "tracker", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert minted.returncode == 0, minted.stderr
    for name in ("tracker-a", "tracker-b"):
        replica = Settings.from_env({k: str(v) for k, v in services[name]["environment"].items()})
        principal = make_verifier(replica).verify(minted.stdout.strip().splitlines()[-1])
        assert (principal.role, principal.sub, principal.org) == ("dispatcher", "me", "acme")


@pytest.mark.parametrize("missing", ["TRACKER_JWT_SECRET", "TRACKER_CUSTODY_KEY"])
def test_a_deployment_without_a_shared_secret_refuses_to_start(
    missing: str, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """With DATABASE_URL set, each replica generating its own key would split the fleet (tokens one
    instance signs, chains one instance writes, fail on the others): a clear error, at once."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env = {**clean, "DATABASE_URL": database_url, "REDIS_URL": redis_url, **SHARED}
    del env[missing]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tracker", "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "d")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 10
    assert missing in done.stderr and "DATABASE_URL" in done.stderr, done.stderr
    assert not (tmp_path / "d").exists()  # nothing generated


def test_the_service_never_generates_a_key_for_an_external_database(tmp_path: Path) -> None:
    """The same rule for settings built in code (no environment read): the keys' accessors refuse."""
    deployed = Settings(database_url="postgresql://db/tracker", data_dir=tmp_path, **{"custody_key": "k" * 40})
    with pytest.raises(ConfigError, match="TRACKER_JWT_SECRET"):
        make_verifier(deployed)
    deployed = Settings(database_url="postgresql://db/tracker", data_dir=tmp_path, jwt_secret="s" * 40)
    with pytest.raises(ConfigError, match="TRACKER_CUSTODY_KEY"):
        custody_key(deployed)
    assert list(tmp_path.iterdir()) == []
    # Development (embedded PostgreSQL) still generates them once.
    assert custody_key(Settings(data_dir=tmp_path)) == custody_key(Settings(data_dir=tmp_path))
