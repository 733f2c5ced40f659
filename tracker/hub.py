"""This process's dashboards: scope matching, capped queues, conflation, snapshot hand-over.

Frames arrive from the broker already encoded; each is parsed once per process for routing and
its bytes are forwarded as they are, joined into one `batch` frame per dashboard per flush.

Per dashboard, memory is capped: when more than `backlog` frames wait, positions are conflated
(only each driver's newest waits); scans, package changes, presence and alerts are never dropped,
and if more than `queue_max` of them wait the dashboard is sent `slow_consumer` and closed (1013).
Writes never await the peer (see wsio), so a slow dashboard cannot slow the others or ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import metrics
from .auth import Principal
from .protocol import frames
from .protocol.subscribe import Filter, in_bbox
from .types import Channel

log = logging.getLogger("tracker.hub")


@dataclass(eq=False)
class Dashboard:
    principal: Principal
    channel: Channel
    hub: Hub
    flt: Filter = field(default_factory=Filter)
    live: bool = False  # False while a snapshot is being built: frames wait in `pre`
    pre: list[tuple[str, str | None, int, bytes]] = field(default_factory=list)
    queue: deque[tuple[str | None, bytes]] = field(default_factory=deque)  # (driver if a position, frame)
    latest: dict[str, bytes] = field(default_factory=dict)  # conflated positions
    urgent: int = 0  # non-position frames in `queue`
    inside: set[str] = field(default_factory=set)  # drivers last seen inside the bbox
    carriers: set[str] = field(default_factory=set)  # drivers holding a followed package
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    closing: bool = False
    needle: bytes = b""

    def __post_init__(self) -> None:
        if self.principal.client is not None:
            self.needle = orjson.dumps(self.principal.client)

    # -- routing --------------------------------------------------------------------------------

    def wants(self, kind: str, obj: dict[str, Any], stamp: bytes) -> bool:
        if self.needle and self.needle not in stamp:
            return False  # a client admin sees only what the publisher stamped for its client
        flt = self.flt
        driver = obj.get("driver")
        if kind == "pos":
            if not (flt.follows_all or (flt.drivers and driver in flt.drivers) or driver in self.carriers):
                return False
            if flt.bbox is not None:
                if in_bbox(flt.bbox, obj["lat"], obj["lon"]):
                    self.inside.add(driver)  # type: ignore[arg-type]
                elif driver in self.inside:
                    self.inside.discard(driver)  # type: ignore[arg-type]  # one last position outside
                else:
                    return False
            return True
        if flt.follows_all:
            return True
        package = obj.get("package")
        if kind == "package" and package and flt.packages and package in flt.packages:
            holder = obj.get("driver")
            if obj.get("state") == "picked_up" and holder:
                self.carriers.add(holder)
            elif holder:
                self.carriers.discard(holder)
        return bool(
            (flt.drivers and driver in flt.drivers)
            or (flt.packages and package in flt.packages)
            or (kind == "presence" and driver in self.carriers)
        )

    def offer(self, kind: str, driver: str | None, ts: int, frame: bytes) -> None:
        if self.closing:
            return
        if not self.live:
            self.pre.append((kind, driver, ts, frame))
            return
        self.push(driver if kind == "pos" else None, frame)

    def push(self, pos_driver: str | None, frame: bytes) -> None:
        hub = self.hub
        # A driver already conflated stays conflated until the flush: queued behind its older frame
        # in `latest`, a newer position would be sent first and the dashboard end on the older one.
        if pos_driver is not None and (pos_driver in self.latest or len(self.queue) + len(self.latest) >= hub.backlog):
            if not self.latest:
                self._compact()
            if pos_driver in self.latest:
                metrics.FRAMES_CONFLATED.inc()
            self.latest[pos_driver] = frame
        else:
            self.queue.append((pos_driver, frame))
            if pos_driver is None:
                self.urgent += 1
                if self.urgent > hub.queue_max:
                    self.slow_consumer()
                    return
        if not self.wake.is_set():
            self.wake.set()

    def _compact(self) -> None:
        """Falling behind: keep only the newest waiting position of each driver."""
        kept: deque[tuple[str | None, bytes]] = deque()
        for driver, frame in self.queue:
            if driver is None:
                kept.append((driver, frame))
            else:
                if driver in self.latest:
                    metrics.FRAMES_CONFLATED.inc()
                self.latest[driver] = frame
        self.queue = kept

    def slow_consumer(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.queue.clear()
        self.latest.clear()
        metrics.DASHBOARDS_DROPPED.inc()
        log.info("dashboard %s/%s is a slow consumer: closing (1013)", self.principal.org, self.principal.sub)
        self.channel.write(frames.error("slow_consumer", "too many frames waiting"))
        self.hub.remove(self)
        asyncio.get_running_loop().create_task(self.channel.close(1013, "slow consumer", timeout=1.0))

    # -- sending --------------------------------------------------------------------------------

    def take(self) -> list[bytes]:
        out = [frame for _, frame in self.queue]
        out.extend(self.latest.values())
        self.queue.clear()
        self.latest.clear()
        self.urgent = 0
        return out

    async def run(self) -> None:
        """Flush waiting frames as one `batch` at most every `flush_s`, never waiting on the peer
        except through the transport's own high-water mark."""
        flush_s = self.hub.flush_s
        while not self.closing:
            await self.wake.wait()
            await asyncio.sleep(flush_s)
            await self.channel.wait_writable()
            self.wake.clear()
            if self.closing:
                return
            out = self.take()
            if out:
                self.channel.write(out[0] if len(out) == 1 else frames.batch(out))

    def finish_snapshot(self, known: dict[str, int]) -> None:
        """Go live: replay what arrived while the snapshot was built, minus what it already holds."""
        pre, self.pre = self.pre, []
        self.live = True
        for kind, driver, ts, frame in pre:
            if kind == "pos" and driver is not None and ts <= known.get(driver, -1):
                continue
            self.push(driver if kind == "pos" else None, frame)


class Hub:
    def __init__(self, *, flush_ms: int = 25, backlog: int = 2_000, queue_max: int = 10_000) -> None:
        self.flush_s = flush_ms / 1000
        self.backlog = backlog
        self.queue_max = queue_max
        self.by_org: dict[str, set[Dashboard]] = {}
        # Called with an org when its last dashboard here left (the node: Broker.unfollow). Its
        # first dashboard's snapshot follows it (Snapshots.send: Broker.follow before the read).
        self.on_empty: Callable[[str], None] = lambda org: None

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_org.values())

    def dashboards(self) -> Iterable[Dashboard]:
        for group in list(self.by_org.values()):
            yield from list(group)

    def add(self, dash: Dashboard) -> None:
        self.by_org.setdefault(dash.principal.org, set()).add(dash)
        dash.task = asyncio.create_task(dash.run(), name="dashboard")

    def remove(self, dash: Dashboard) -> None:
        group = self.by_org.get(dash.principal.org)
        if group is not None:
            group.discard(dash)
            if not group:
                del self.by_org[dash.principal.org]
                self.on_empty(dash.principal.org)
        dash.closing = True
        dash.wake.set()

    async def stop(self, dash: Dashboard) -> None:
        self.remove(dash)
        if dash.task is not None:
            dash.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await dash.task

    def deliver(self, org: str, payload: bytes) -> None:
        """Route one broker message (lines of `<stamp>\\t<frame>`) to this org's dashboards."""
        members = self.by_org.get(org)
        if not members:
            return
        group = tuple(members)  # a slow consumer leaves the set while we route
        for line in payload.split(b"\n"):
            if line[:1] == b"#":  # the broker's publish time, in ms
                metrics.FANOUT_LAG.observe(max(0.0, time.time() - int(line[1:]) / 1000))
                continue
            stamp, _, frame = line.partition(b"\t")
            try:
                obj = orjson.loads(frame)
                kind = obj["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("dropping a malformed live frame for org %s", org)
                continue
            driver = obj.get("driver")
            ts = obj.get("ts", 0)
            for dash in group:
                if dash.wants(kind, obj, stamp):
                    dash.offer(kind, driver, ts, frame)
