"""Where RedisBroker keeps things in Redis, which Redis a `REDIS_URL` names, and its connections.

Three deployments, told apart by the URL's scheme (docs/OPERATIONS.md, "Redis"):

- `redis://`, `rediss://`, `unix://`: one Redis. Keys and channels keep the names of earlier
  releases (`trk:lastpos:<org>`, `trk:live:<org>`), so a rolling upgrade keeps the live state.
  Channels are server-wide, so on a database other than 0 they carry its number
  (`trk:<db>:live:<org>`, `trk:<db>:ctl`): deployments on one server do not hear each other.
- `redis+cluster://host:port[,host:port...]` (`rediss+cluster://` with TLS): a Redis Cluster. Every
  key of an org carries the org as a hash tag (`trk:lastpos:{<org>}`), so that each Lua script
  touches one slot, and live and control traffic goes by sharded pub/sub (SPUBLISH / SSUBSCRIBE on
  `trk:live:{<org>}` and `trk:ctl:{<org>}`, the org's slot): a message travels only to the node
  that owns the org.
- `redis+sentinel://host:port[,host:port...]/<service>[/<db>]`: a master found through Sentinel;
  after a failover, connections go to the new master.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from .redis_cluster import ClusterSubscribing

# A hash org -> 1, set once PostgreSQL's newest positions of an org were merged into Redis. A
# restarted Redis has lost it along with the positions, so the next snapshot merges again.
SYNCED_KEY: Final = "trk:pgsynced"
ORGS_KEY: Final = "trk:orgs"  # every org with presence: what the sweep visits
CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True)
class Target:
    """What a `REDIS_URL` names: `mode` is "single", "cluster" or "sentinel"."""

    mode: str
    url: str  # single: the URL as given; cluster: one node's redis:// URL (the others are found)
    nodes: tuple[tuple[str, int], ...] = ()  # cluster and sentinel: the addresses given
    service: str = ""  # sentinel: the master's name
    db: int = 0
    password: str | None = None
    username: str | None = None
    tls: bool = False


def parse_url(url: str) -> Target:
    """Read a `REDIS_URL`; raises ValueError when a cluster or sentinel URL names no node."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
        return Target("single", url)
    tls = scheme.startswith("rediss")
    netloc = parts.netloc.rpartition("@")[2]
    nodes = tuple(_host_port(h) for h in netloc.split(",") if h)
    if not nodes:
        raise ValueError(f"REDIS_URL {scheme}:// names no node")
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    path = [p for p in parts.path.split("/") if p]
    if scheme in CLUSTER_SCHEMES:
        host, port = nodes[0]
        first = f"{'rediss' if tls else 'redis'}://{host}:{port}"
        return Target("cluster", first, nodes, password=password, username=username, tls=tls)
    if not path:
        raise ValueError("REDIS_URL redis+sentinel:// needs the master's name: redis+sentinel://host:port/<service>")
    db = int(path[1]) if len(path) > 1 else 0
    return Target("sentinel", url, nodes, path[0], db, password, username, tls)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 6379
    return host.strip("[]"), int(port)


class Naming:
    """Key and channel names; on a cluster each org's are in the org's slot (hash tag).

    Keys live in the URL's database, but pub/sub channels are server-wide: two deployments on one
    Redis with different `/<db>` numbers would receive each other's live traffic and control
    messages. So on a database other than 0 the channels carry its number (`trk:<db>:live:<org>`,
    `trk:<db>:ctl:<org>`); database 0 keeps the names of earlier releases (a rolling upgrade keeps live).

    Control messages (custody stamps) go per org, on `trk:ctl:<org>`: an instance listens to an
    org's control channel only while it holds drivers of that org. A kick goes to the one instance
    that registered the replaced connection, on its own `trk:kick:<instance id>` (on the org's
    channel when the store does not know that instance). `ctl_channel` (`trk:ctl`)
    is where the previous release sent every control message; it is still listened to, so that
    an old instance's kicks are heard during a rolling upgrade."""

    def __init__(self, *, cluster: bool, db: int = 0) -> None:
        self.cluster = cluster
        self.publish_command = "SPUBLISH" if cluster else "PUBLISH"
        self.channels = "trk:" if db == 0 else f"trk:{db}:"
        self.ctl_channel = self.channels + "ctl"
        self._live = self.channels + "live:"
        self._ctl = self.channels + "ctl:"
        self._kick = self.channels + "kick:"
        self._ctl_raw, self._ctl_all_raw = self._ctl.encode(), self.ctl_channel.encode()
        self._kick_raw = self._kick.encode()

    def tag(self, org: str) -> str:
        return "{" + org + "}" if self.cluster else org

    def key(self, kind: str, org: str) -> str:
        """`kind` is one of lastpos, names, pconn, pstamp, presence, pgen, pinst."""
        return f"trk:{kind}:{self.tag(org)}"

    def presence_keys(self, org: str) -> list[str]:
        """KEYS of the presence scripts (tracker/lua/presence_*.lua), in their order."""
        return [self.key(k, org) for k in ("pconn", "pgen", "pstamp", "presence", "names", "lastpos", "pinst")]

    def live_channel(self, org: str) -> str:
        return self._live + self.tag(org)

    def control_channel(self, org: str) -> str:
        """The org's control channel: kicks and custody stamps of its drivers."""
        return self._ctl + self.tag(org)

    def kick_channel(self, instance_id: str) -> str:
        """An instance's own control channel (kicks of the connections it registered): a classic
        channel, also on a cluster (a script in an org's slot may PUBLISH to it, not SPUBLISH)."""
        return self._kick + instance_id

    def org_of(self, channel: bytes) -> str:
        """The org of a live channel."""
        name = channel.decode()[len(self._live) :]
        return name[1:-1] if self.cluster else name

    def is_control(self, channel: bytes) -> bool:
        """A control channel: an org's (`trk:ctl:<org>`), an instance's (`trk:kick:<id>`), or the
        previous release's `trk:ctl`."""
        return channel.startswith(self._ctl_raw) or channel.startswith(self._kick_raw) or channel == self._ctl_all_raw


class FastPacking:
    """hiredis packs commands in C, ~15x faster than redis-py's Python packer: it matters when one
    call carries a window's worth of items."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class FastConnection(FastPacking, aioredis.Connection):
    pass


class FastUnixConnection(FastPacking, aioredis.UnixDomainSocketConnection):
    pass


def clients(url: str) -> tuple[Any, Callable[[], Any], Naming, list[Any]]:
    """What `RedisBroker` talks to for the Redis `url` names: the command client, a factory of
    clients for the subscriber (one per subscription: it is made again after a loss), the names,
    and the other clients to close with the broker (the sentinels' own)."""
    target = parse_url(url)
    # A command that meets a connection the network left dead is sent once more at once, on a new
    # one: stated here, not left to the redis-py version's default.
    kw: dict[str, Any] = {
        "socket_timeout": 3,
        "socket_connect_timeout": 2,
        "health_check_interval": 10,
        "retry": Retry(NoBackoff(), 1),
    }
    if target.mode == "sentinel":
        auth: dict[str, Any] = {"db": target.db, "password": target.password, "username": target.username}
        if target.tls:
            auth["ssl"] = True
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs={"socket_timeout": 2, "socket_connect_timeout": 2})  # type: ignore[no-untyped-call]
        # Every connection asks the sentinels for the master when it connects: after a failover,
        # the next (re)connection reaches the promoted replica.
        command = sentinel.master_for(target.service, max_connections=32, **kw, **auth)

        def subscriber_client() -> Any:
            client = sentinel.master_for(target.service, socket_connect_timeout=2, **auth)
            # master_for's client does not own its pool, so its aclose() would leave the pubsub's
            # connection open (a socket per reconnect, found by the garbage collector): it owns it.
            client.auto_close_connection_pool = True
            return client

        return command, subscriber_client, Naming(cluster=False, db=target.db), list(sentinel.sentinels)
    if target.mode == "cluster":
        auth = {"password": target.password, "username": target.username}
        if target.tls:
            auth["ssl"] = True
        nodes = list(target.nodes)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],
            max_connections=32,
            socket_timeout=3,
            socket_connect_timeout=2,
            **auth,
        )
        return cluster, lambda: ClusterSubscribing(nodes, auth), Naming(cluster=True), []
    # A bounded pool: callers queue for a connection instead of opening thousands.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=32, timeout=5, **kw)
    unix = issubclass(pool.connection_class, aioredis.UnixDomainSocketConnection)
    pool.connection_class = FastUnixConnection if unix else FastConnection
    return (
        aioredis.Redis(connection_pool=pool),
        lambda: aioredis.Redis.from_url(url, socket_connect_timeout=2),
        Naming(cluster=False, db=int(pool.connection_kwargs.get("db") or 0)),
        [],
    )
