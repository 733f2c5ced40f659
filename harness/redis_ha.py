"""Redis with failover on spare ports: a master, a replica and a Sentinel watching them.

`SentinelSet.url` is the `REDIS_URL` a tracker is given (`redis+sentinel://host:port/<service>`);
`kill_master()` SIGKILLs the master, and the sentinel promotes the replica after
`down_after_ms`. Readiness and the promotion are waited on as effects with a deadline.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
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


class RedisClusterSet:
    """A Redis Cluster of `n` masters (no replicas) on spare ports, made by `redis-cli --cluster
    create`. A node killed and started again keeps its identity and slots (its nodes.conf stays in
    its folder); the others go on serving theirs meanwhile (full coverage is not required)."""

    def __init__(self, n: int = 3) -> None:
        opts = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000")
        self.nodes = [
            RedisServer(_cluster_port(), args=(*opts, "--cluster-require-full-coverage", "no")) for _ in range(n)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    async def start(self) -> RedisClusterSet:
        for node in self.nodes:
            await node.start()
        create = await asyncio.create_subprocess_exec(
            "redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas", "0", "--cluster-yes",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await create.wait() == 0, "redis-cli --cluster create failed"
        await wait_until(self.healthy, 20, "every node to say cluster_state:ok")
        return self

    async def healthy(self) -> bool:
        replies = [await _ask(node.port, "CLUSTER", "INFO") for node in self.nodes]
        return all(b"cluster_state:ok" in r for r in replies)

    async def node_id(self, i: int) -> str:
        return (await _ask(self.nodes[i].port, "CLUSTER", "MYID")).split(b"\r\n")[1].decode()

    async def slot(self, key: str) -> int:
        return int((await _ask(self.nodes[0].port, "CLUSTER", "KEYSLOT", key)).strip()[1:])

    async def owner(self, slot: int) -> int:
        """The index of the node that serves `slot`."""
        for i, node in enumerate(self.nodes):
            if (await _ask(node.port, "CLUSTER", "COUNTKEYSINSLOT", str(slot))).startswith(b":"):
                probe = await _ask(node.port, "CLUSTER", "NODES")
                for line in probe.decode().splitlines():
                    fields = line.split()
                    if len(fields) > 8 and "myself" in fields[2] and _serves(fields[8:], slot):
                        return i
        raise AssertionError(f"no node serves slot {slot}")

    async def restart(self, i: int) -> None:
        self.nodes[i].kill()
        await self.nodes[i].start()
        await wait_until(self.healthy, 20, "the cluster to be whole again")

    async def migrate(self, slot: int, to: int) -> None:
        """Move `slot`, with its keys, to node `to` (CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE,
        SETSLOT NODE on every node), as `redis-cli --cluster reshard` does."""
        src = await self.owner(slot)
        src_id, dst_id = await self.node_id(src), await self.node_id(to)
        sport, dport = self.nodes[src].port, self.nodes[to].port
        await _ask(dport, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
        await _ask(sport, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
        while True:
            reply = await _ask(sport, "CLUSTER", "GETKEYSINSLOT", str(slot), "100")
            keys = [k for k in reply.decode().split("\r\n") if k and k[0] not in "*$"]
            if not keys:
                break
            await _ask(sport, "MIGRATE", "127.0.0.1", str(dport), '""', "0", "5000", "KEYS", *keys)
        for node in self.nodes:
            await _ask(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        await wait_until(self.healthy, 20, "the cluster to be whole after the move")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10,000) is free too (so at most 55,535)."""
    while True:
        port = free_port()
        if port > 55_535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


def _serves(ranges: list[str], slot: int) -> bool:
    for r in ranges:
        if r.startswith("["):
            continue
        lo, _, hi = r.partition("-")
        if int(lo) <= slot <= int(hi or lo):
            return True
    return False
