"""What the benchmark scripts share beyond the harness (harness/: ports, private servers, process
stopping, readiness, loss accounting): the machine, CPU from /proc, the servers under test
(tracker from a clean git copy, the Socket.IO peers) on the benchmark's PostgreSQL, the Node load
generator, and load.js's acked files checked against PostgreSQL. Every process started here is
stopped by the context managers that started it.

CPU is read from /proc/<pid>/stat (utime + stime), so a number holds on a busy machine: it is the
work a process did, not the wall time it waited for a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from harness.http import wait_ready
from harness.loss import account, stored_seqs
from harness.ports import free_port, wait_port
from harness.servers import RedisServer, popen, stop_process

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LOAD_JS = BENCH / "load" / "load.js"
NODE_PEER = BENCH / "peers" / "node-socketio"
PY_PEER = BENCH / "peers" / "python-socketio" / "server.py"
PEERS_VENV = BENCH / ".peers-venv"
PG_BASE = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_AUX = ("checkpointer", "background writer", "walwriter", "autovacuum", "logical replication", "stats collector")


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so the context managers stop the servers this script started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# --- the machine ---------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM, kernel, date, load average: printed beside every number."""
    model = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": load_average(),
        "fd_hard_limit": _hard_nofile(),
    }


def _hard_nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# --- CPU from /proc ------------------------------------------------------------------------


def ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    user, system = ticks2(pid)
    return user + system


def ticks2(pid: int) -> tuple[int, int]:
    """(utime, stime) of one process, in clock ticks ((0, 0) if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    return int(fields[11]), int(fields[12])


def tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return [pid]


def postgres_pids(database: str) -> tuple[list[int], list[int]]:
    """(backends connected to ``database``, the cluster's shared auxiliary processes).

    Other databases' backends (other engineers' tests on the same cluster) are left out; the
    WAL writer, checkpointer and background writer work for everybody and are counted whole.
    """
    backends, aux = [], []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if not cmd.startswith("postgres:"):
            continue
        rest = cmd.split(":", 2)[-1].strip()
        if rest.split(" ")[:2] and len(rest.split()) >= 2 and rest.split()[1] == database:
            backends.append(p.pid)
        elif any(rest.startswith(a) for a in PG_AUX):
            aux.append(p.pid)
    return backends, aux


@dataclass
class CpuMeter:
    """CPU seconds of named groups of processes between ``start()`` and ``stop()``.

    A group is a function returning its pids at the moment of sampling, so processes born
    during the window (a new PostgreSQL backend) are counted whole; one that ends during the
    window loses its share (an undercount, never someone else's work).
    """

    groups: dict[str, Callable[[], list[int]]]
    _t0: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    _wall0: float = 0.0
    result: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def _sample(self) -> dict[str, dict[int, tuple[int, int]]]:
        return {name: {pid: ticks2(pid) for pid in fn()} for name, fn in self.groups.items()}

    def start(self) -> None:
        self._t0 = self._sample()
        self._wall0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        t1 = self._sample()
        self.wall_s = time.monotonic() - self._wall0
        self.result = {}
        for name, now in t1.items():
            before = self._t0.get(name, {})
            user = sum(u - before.get(pid, (0, 0))[0] for pid, (u, _) in now.items()) / CLK_TCK
            system = sum(s - before.get(pid, (0, 0))[1] for pid, (_, s) in now.items()) / CLK_TCK
            self.result[name] = user + system
            self.result[name + "_kernel"] = system
        return self.result


# --- tracker's own view: GC pauses and loop lag from /metrics ---------------------------------

STALL_S = 0.1  # a loop lag or GC pause this long is a stall (tracker/looplag.py logs it)


def scrape(url: str) -> dict[str, float]:
    """tracker's /metrics as {sample name with labels: value}; {} if it does not answer (a peer)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url.replace("ws://", "http://") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in ("tracker_gc_pause_seconds", "tracker_loop_lag_seconds", "tracker_positions_conflated"):
            continue
        for smp in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}"] = smp.value
    return out


def stalls(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Between two scrapes: collections per generation (count, total and mean ms, how many took
    >= 100 ms), loop-lag timers (count, how many ran >= 100 ms late) and positions conflated for
    a slow dashboard (one worker's, with `serve --workers N`)."""
    if not after:
        return {}

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    out: dict[str, Any] = {}
    for gen in ("0", "1", "2"):
        n = d(f"tracker_gc_pause_seconds_count{{generation={gen}}}")
        total = d(f"tracker_gc_pause_seconds_sum{{generation={gen}}}")
        under = d(f"tracker_gc_pause_seconds_bucket{{generation={gen},le=0.05}}")
        long_ = n - d(f"tracker_gc_pause_seconds_bucket{{generation={gen},le={STALL_S}}}")
        out[f"gc{gen}"] = {
            "n": int(n),
            "ms": round(total * 1000, 1),
            "mean_ms": round(total * 1000 / n, 2) if n else 0,
            "over_50ms": int(n - under),
            "over_100ms": int(long_),
        }
    lag_n = d("tracker_loop_lag_seconds_count{}")
    out["lag"] = {
        "n": int(lag_n),
        "over_25ms": int(lag_n - d("tracker_loop_lag_seconds_bucket{le=0.025}")),
        "over_100ms": int(lag_n - d(f"tracker_loop_lag_seconds_bucket{{le={STALL_S}}}")),
        "over_250ms": int(lag_n - d("tracker_loop_lag_seconds_bucket{le=0.25}")),
    }
    out["conflated"] = int(d("tracker_positions_conflated_total{}"))  # for a dashboard that fell behind
    return out


# --- services ------------------------------------------------------------------------------


def py_spy() -> str:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else (shutil.which("py-spy") or "py-spy")


def psql(sql: str, db: str = "postgres") -> None:
    subprocess.run(
        ["psql", f"{PG_BASE}/{db}", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


def fresh_database(name: str) -> str:
    """Drop and create ``name`` on the benchmark cluster; returns its DSN."""
    psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    psql(f'CREATE DATABASE "{name}"')
    return f"{PG_BASE}/{name}"


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, int]]:
    """A redis-server of our own (so its CPU is ours alone): (url, pid). Nothing kept on disk."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    server = RedisServer()
    try:
        asyncio.run(server.start())
        yield server.url, server.pid
    finally:
        server.close()


@dataclass
class Server:
    """A server under test: its kind, URL, the pid whose CPU and memory are its own."""

    kind: str  # tracker | node | python
    url: str
    pid: int
    dsn: str
    database: str
    proc: subprocess.Popen[Any]
    table: str = "positions"

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)


SECRET = os.environ.get("BENCH_JWT_SECRET") or "bench-" + secrets.token_hex(24)


def tracker_source(ref: str = "HEAD") -> tuple[Path, str]:
    """A clean copy of tracker at git ``ref`` (``git archive``; the work tree, which others may be
    editing, is not used), and the commit it names. ``ref`` "." means the work tree as it is."""
    if ref == ".":
        return ROOT, "work tree"
    if Path(ref).is_dir():  # an experiment: a copy of the source with changes of its own
        return Path(ref), f"source at {ref}"
    sha = subprocess.run(
        ["git", "rev-parse", "--short=12", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = Path(f"/tmp/tracker-bench-src-{sha}")
    if not (dest / "tracker").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "tracker"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, sha


TRACKER_REF = os.environ.get("BENCH_TRACKER_REF", "HEAD")


@contextlib.contextmanager
def start_server(
    kind: str,
    redis_url: str,
    *,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
    tracker_workers: int = 1,
) -> Iterator[Server]:
    """Start tracker (one process, or `serve --workers N`: a supervisor and N workers; its CPU is
    the process tree's, `tree(pid)`) or a Socket.IO peer on a free port, with a fresh database of its
    own; stop it on exit."""
    # One database per checkout: two engineers' runs on one cluster must not drop each other's
    # (a run's `fresh_database` dropped another's bench_tracker mid-run: "relation drivers does not exist").
    database = f"bench_{kind}_{ROOT.name}".replace("-", "_")
    dsn = fresh_database(database)
    port = free_port()
    base = {**os.environ, **(env or {})}
    if kind == "tracker":
        cmd = [sys.executable, "-m", "tracker", "serve"]
        if tracker_workers != 1:
            cmd += ["--workers", str(tracker_workers)]
        base.update(
            DATABASE_URL=dsn,
            REDIS_URL=redis_url,
            TRACKER_JWT_SECRET=SECRET,
            TRACKER_CUSTODY_KEY="bench-custody-key-" + "y" * 40,  # required with DATABASE_URL
            TRACKER_PORT=str(port),
            TRACKER_HOST="127.0.0.1",
            TRACKER_LOG_LEVEL=base.get("TRACKER_LOG_LEVEL", "warning"),
        )
    elif kind == "node":
        cmd = ["node", str(NODE_PEER / "server.js")]
        base.update(DATABASE_URL=dsn, REDIS_URL=redis_url, JWT_SECRET=SECRET, PORT=str(port))
    elif kind == "python":
        cmd = [str(PEERS_VENV / "bin" / "python"), str(PY_PEER)]
        base.update(DATABASE_URL=dsn, REDIS_URL=redis_url, JWT_SECRET=SECRET, PORT=str(port))
    else:
        raise ValueError(kind)
    cwd = ROOT
    if kind == "tracker":
        cwd, sha = tracker_source(TRACKER_REF)
        base["PYTHONPATH"] = str(cwd)
        log(f"tracker from {sha} ({cwd})")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    proc = popen(cmd, log=log_file, cwd=cwd, env=base)
    try:
        wait_port(port, 90, proc)
        if kind == "tracker":
            asyncio.run(wait_ready(port, proc=proc, log=log_file, timeout=60, interval=0.3))
        yield Server(kind, f"ws://127.0.0.1:{port}", proc.pid, dsn, database, proc)
    finally:
        stop_process(proc, grace=20)


# --- peers and the load generator: installed on first use ----------------------------------


def ensure_node_modules() -> None:
    """npm install the load generator's and the Node peer's packages (into gitignored folders)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("node and npm are needed (apt-get install nodejs npm)")
    for folder in (LOAD_JS.parent, NODE_PEER):
        if not (folder / "node_modules").is_dir():
            log(f"npm install in {folder.relative_to(ROOT)}")
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder, check=True, timeout=600
            )


def ensure_peers_venv() -> None:
    """python-socketio and friends in a venv of their own (not a dependency of tracker)."""
    py = PEERS_VENV / "bin" / "python"
    if not py.exists():
        log("creating bench/.peers-venv")
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, timeout=300)
    probe = subprocess.run(
        [str(py), "-c", "import socketio, uvicorn, asyncpg, redis, jwt, uvloop, websockets"], capture_output=True
    )
    if probe.returncode:
        log("pip install python-socketio into bench/.peers-venv")
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                "python-socketio>=5.11",
                "uvicorn>=0.30",
                "uvloop",
                "httptools",
                "websockets",
                "asyncpg",
                "redis[hiredis]>=5",
                "pyjwt",
            ],
            check=True,
            timeout=900,
        )


@dataclass
class LoadRun:
    events: list[dict[str, Any]]
    returncode: int
    pid: int


def run_load(
    args: list[str],
    on_event: Callable[[dict[str, Any]], None] | None = None,
    *,
    timeout: float = 1800.0,
    stdin_open: bool = False,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
) -> LoadRun:
    """Run ``node load.js ARGS``; call ``on_event`` for each JSON line as it arrives (so CPU can be
    sampled at the generator's markers). Killed after ``timeout`` seconds."""
    proc = subprocess.Popen(
        ["node", str(LOAD_JS), *args],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        stdin=subprocess.PIPE if stdin_open else subprocess.DEVNULL,
    )
    if on_start:
        on_start(proc)
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    killer = _Killer(proc, timeout)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            events.append(ev)
            if on_event:
                on_event(ev)
            if time.monotonic() > deadline:
                break
        proc.wait(30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return LoadRun(events, proc.returncode or 0, proc.pid)


class _Killer:
    def __init__(self, proc: subprocess.Popen[Any], timeout: float) -> None:
        import threading

        self.timer = threading.Timer(timeout, lambda: proc.poll() is None and proc.kill())
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.timer.cancel()


# --- loss: load.js's acked file against PostgreSQL ----------------------------------------------


def loss(acked_file: Path, dsn: str, table: str = "positions") -> dict[str, Any]:
    """Sent minus acknowledged, and acknowledged minus stored, as sets over (driver, seq) (the
    harness's accounting, over the drivers of the file); and stored rows counted twice."""
    data = json.loads(acked_file.read_text())
    drivers = data["drivers"]
    sent = {d: set(range(1, v["sent"] + 1)) for d, v in drivers.items()}
    acked = {d: {s for a, b in v["acked"] for s in range(a, b + 1)} for d, v in drivers.items()}
    stored = asyncio.run(stored_seqs(dsn, data["org"], (table,)))
    check = account({d: stored.get(d, []) for d in drivers}, acked, sent)
    unacked: dict[str, list[int]] = {}
    unstored: dict[str, list[int]] = {}
    for d, s in check.unacked:
        unacked.setdefault(d, []).append(s)
    for d, s in check.lost:
        unstored.setdefault(d, []).append(s)
    sample = [
        f"{d}: unacked {unacked.get(d, [])[:5]} unstored {unstored.get(d, [])[:5]}"
        for d in drivers
        if d in unacked or d in unstored
    ][:10]
    return {
        "sent": check.sent,
        "acked": check.acked,
        "stored": check.rows,
        "lost_unacked": len(check.unacked),
        "lost_unstored": len(check.lost),
        "lost": len(check.unacked) + len(check.lost),
        "stored_duplicates": check.rows - check.stored,
        "sample": sample,
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
