"""The broker: what moves live frames between instances and keeps the shared live state.

The core (ingest, drivers, snapshot, node) calls only this interface. `RedisBroker`
(tracker/redis_broker.py) is the production one; `MemoryBroker` (tracker/memory_broker.py) keeps
everything in this process, for fast unit tests. One conformance suite
(tests/test_broker_conformance.py) runs against both.

Live delivery is best effort: acks never depend on the broker (they follow the PostgreSQL commit),
and when the feed is interrupted the broker says so through `on_status(False)`; dashboards are
told, and get a fresh snapshot when it comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol


class BrokerUnavailable(ConnectionError):
    """The broker's store cannot be reached or failed (an OSError: the core catches OSError and
    never names a broker's own exception types)."""


# One live frame queued for publishing: (kind, driver, live ts, stamp, frame).
# kind 'p': a position, published only if it becomes the driver's newest (by live ts) and then kept
# as the driver's latest; 'a': always published (scans, presence, package changes, alerts).
# stamp: b"" or a JSON array of the client ids entitled to the frame (and, custody/stamps.py, the
# marks of the tracking links that may show it).
LiveItem = tuple[str, str, int, bytes, bytes]
# Presence: (org, driver, conn id, name, presence line) going online; (org, driver, conn id, line)
# going offline; (org, driver, conn id, stamp) kept online. A line is b"<stamp>\t<frame>".
Online = tuple[str, str, str, str | None, bytes]
Offline = tuple[str, str, str, bytes]
Held = tuple[str, str, str, bytes]


class Registered(NamedTuple):
    """What `drivers_online` answers for one connection."""

    live_ts: int
    """The driver's newest live ts known to the store (0 if none)."""
    gen: int
    """The connection's generation: grows per driver in the order the store registered the
    connections (across every instance), and keeps growing after the store lost its state."""
    current: bool
    """Still the driver's current connection when the call ended (a later connection of the same
    driver in the same call supersedes it: it must be closed 4001, never welcomed)."""


# An org's live state: driver -> (live ts, newest pos frame), driver -> name, drivers online.
LiveState = tuple[dict[str, tuple[int, bytes]], dict[str, str], set[str]]


class Broker(Protocol):
    """Every coroutine method raises `BrokerUnavailable` (or another OSError) when the store is
    unreachable; none raises a backend's own exception type."""

    instance_id: str
    live: bool
    """True while live frames flow (published and received); flips are reported to `on_status`."""

    on_live: Callable[[str, bytes], None]
    """Set by the node: (org, message) for every live message of a followed org. A message is lines
    `<stamp>\\t<frame>` joined by `\\n`, optionally led by `#<publish time ms>`."""
    on_ctl: Callable[[list[str]], None]
    """Set by the node: a control message, split on tabs (`kick`, or an extension's kind first)."""
    on_status: Callable[[bool], None]
    """Set by the node: the live feed was interrupted (False) or is back (True)."""

    def start(self) -> None:
        """Start the background tasks (sender, subscriber, probe). Never awaits."""

    async def close(self) -> None:
        """Stop the tasks and release connections."""

    @property
    def receiving(self) -> bool:
        """The subscriber is proven to receive: a loop-back probe published after the current
        subscription came back (not just "connected", nor "subscribe sent"). /readyz needs it."""

    async def ping(self) -> bool:
        """The shared store answers; never raises."""

    async def follow(self, org: str) -> None:
        """Receive `org`'s live messages from now on (its first dashboard here connected): returns
        once a message published after the return is sure to reach `on_live`, so a snapshot read
        after it misses nothing. While the feed is down it returns at once: when the feed is back,
        every followed org is received again and `on_status(True)` resnapshots every dashboard.
        Idempotent. An instance receives no org it does not follow (issue 17)."""

    def unfollow(self, org: str) -> None:
        """Stop receiving `org`'s live messages (its last dashboard here left). Never awaits; a
        message already under way may still arrive (the hub drops what no dashboard wants)."""

    def publish(self, org: str, items: list[LiveItem]) -> None:
        """Queue one org's live frames; a window's frames (every few ms) go out in one round trip,
        one message per org. Never awaits; when
        the broker is far behind, frames are dropped (live is best effort), never buffered without
        bound."""

    async def follow_control(self, org: str) -> None:
        """Receive `org`'s control messages from now on (its first driver here connected): returns
        once a control message published after the return is sure to reach `on_ctl`, so a
        connection registered after it (`drivers_online`) will hear its replacement's kick. While
        the feed is down it returns at once (as `follow`). Idempotent. An instance receives no
        control message of an org it does not follow this way (issue 17)."""

    def unfollow_control(self, org: str) -> None:
        """Stop receiving `org`'s control messages (its last driver here left). Never awaits."""

    async def publish_control(self, org: str, kind: str, payload: bytes) -> None:
        """Send a control message about `org` to every instance that follows `org`'s control
        messages (this one included, if it does): `on_ctl([kind, ...])`."""

    async def drivers_online(self, conns: list[Online]) -> list[Registered]:
        """Mark connections online (publishing their presence line), in order: each replaces any
        other connection of the same driver, and the instance that registered the replaced one
        gets `on_ctl(["kick", org, driver, conn id, gen])` naming the new one (every instance
        following the org's control messages does, when the store does not know that instance);
        an instance closes its connections of that driver whose generation is lower. The store is the one
        serialisation point: the newest connection is the one it registered last. Returns one
        `Registered` per connection."""

    async def drivers_offline(self, conns: list[Offline]) -> list[bool]:
        """Offline only where that connection is still the one that set the driver online, so a
        stale offline never hides a newer connection. True where it went offline."""

    async def refresh_presence(self, conns: list[Held], *, spread_s: float = 1.0) -> None:
        """Keep these connections online for another TTL (re-creating what a restarted store lost)."""

    async def sweep(self) -> int:
        """Set offline (and publish it) the drivers whose instance stopped refreshing them; each
        expiry is published once however many instances sweep. Returns how many."""

    async def live_state(self, org: str) -> LiveState:
        """The org's newest positions, names and drivers online."""

    async def latest(self, org: str, driver: str) -> tuple[int, bytes, bytes] | None:
        """The driver's newest position as kept by `publish`: (live ts, stamp, frame), the stamp as
        it was at the position's receipt; None when none is kept."""

    async def restore_positions(self, org: str, items: list[tuple[str, int, bytes]]) -> None:
        """Write back (driver, live ts, frame) read from PostgreSQL; never over a newer one."""

    async def is_synced(self, org: str) -> bool:
        """Whether PostgreSQL's positions of `org` were merged since the store last lost its state."""

    async def mark_synced(self, org: str) -> None: ...
