"""Redis with failover on spare ports: a master, a replica and a Sentinel watching them.

`SentinelSet.url` is the `REDIS_URL` a tracker is given (`redis+sentinel://host:port/<service>`);
`kill_master()` SIGKILLs the master, and the sentinel promotes the replica after
`down_after_ms`. Readiness and the promotion are waited on as effects with a deadline.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .ports import free_port
from .servers import RedisServer, popen, stop_process
from .wait import wait_until

SERVICE = "trk"


async def _ask(port: int, *command: str) -> bytes:
    """One command to 127.0.0.1:`port` (RESP inline), its raw reply; b"" if nothing answers."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return b""
    try:
        writer.write((" ".join(command) + "\r\n").encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 1)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()


class SentinelSet:
    def __init__(self, *, down_after_ms: int = 1000) -> None:
        self.master = RedisServer()
        self.replica = RedisServer(args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.sentinel_port = free_port()
        self.down_after_ms = down_after_ms
        self.dir = Path(tempfile.mkdtemp(prefix="tracker-sentinel-"))
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}"

    async def start(self) -> SentinelSet:
        await self.master.start()
        await self.replica.start()
        await wait_until(self._replicating, 15, "the replica to sync with the master")
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.sentinel = popen(["redis-server", str(conf), "--sentinel"], log=self.dir / "sentinel.log")
        await wait_until(self._knows_master, 15, "the sentinel to know the master")
        return self

    async def _replicating(self) -> bool:
        return b"master_link_status:up" in await _ask(self.replica.port, "INFO", "replication")

    async def _knows_master(self) -> bool:
        reply = await _ask(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", SERVICE)
        return str(self.master.port).encode() in reply

    async def master_port(self) -> int:
        reply = await _ask(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", SERVICE)
        lines = reply.split(b"\r\n")
        return int(lines[4]) if len(lines) > 4 and lines[4].isdigit() else 0

    def kill_master(self) -> None:
        self.master.kill()

    async def promoted(self, timeout: float = 20.0) -> float:
        """Wait until the sentinel names the replica as master; returns the seconds waited."""

        async def replica_is_master() -> bool:
            return await self.master_port() == self.replica.port

        return await wait_until(replica_is_master, timeout, "the sentinel to promote the replica")

    def close(self) -> None:
        stop_process(self.sentinel, signal.SIGTERM)
        self.replica.close()
        self.master.close()
        shutil.rmtree(self.dir, ignore_errors=True)
