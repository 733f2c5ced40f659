"""A second way between instances for the stamp control messages (stamps.py): PostgreSQL
LISTEN/NOTIFY on channel `trk_custody`, for when the live feed (Redis) cannot carry them.

The broker is the first way. An instance that *receives* a scan ending a client's window while
it has lost Redis could not tell the instance of the old holder (which still has Redis), and that
instance went on stamping the old holder's positions for the old client until its next stamp
refresh (custody_sweep_s). So closing notices are always sent both ways (one statement per tick
with closing scans; no waiting to find out that Redis is gone, which may take a probe timeout),
and any other stamp control message goes this way when publishing it raised. Handling a message
twice is harmless: a closing notice heard before is ignored (Stamps.on_stamp_ctl), and a stamp
refresh is idempotent. Each way keeps its sender's order (here: one NOTIFY at a time, in the
order sent), so the first copies of two notices arrive in the order they were sent.

Every instance holds one pool connection that LISTENs (taken back and again, with backoff, when
it drops; given back on close). What was NOTIFYed while it was down is not heard again here: the
broker's copy and the periodic stamp refresh cover it, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import orjson

if TYPE_CHECKING:
    from ..extension import Core

log = logging.getLogger("tracker.packages")

CHANNEL: Final = "trk_custody"
PAYLOAD_MAX: Final = 7000  # bytes of JSON per NOTIFY (PostgreSQL refuses 8000 and more)
PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
CHECK_S: Final = 10.0  # how often the listening connection is asked whether it is still there
BACKOFF_S: Final = (0.2, 10.0)


def payloads(msg: dict[str, Any]) -> list[bytes]:
    """The message as NOTIFY payloads of at most PAYLOAD_MAX bytes: its lists split over several
    messages when needed, each naming its sender, its scalars in the first, its lists in order
    (a `chained` list after the `drivers` list of the same message: their stamps are redone before
    its closing scans are forgotten)."""
    whole = orjson.dumps(msg)
    if len(whole) <= PAYLOAD_MAX:
        return [whole]
    out: list[bytes] = []
    part: dict[str, Any] = {k: v for k, v in msg.items() if not isinstance(v, list)}
    size, has_items = len(orjson.dumps(part)), False
    for key, items in msg.items():
        if not isinstance(items, list):
            continue
        for item in items:
            piece = len(orjson.dumps(item)) + len(key) + 6  # ,"key":[item] at most
            if has_items and size + piece > PAYLOAD_MAX:
                out.append(orjson.dumps(part))
                part = {"from": msg.get("from")}
                size, has_items = len(orjson.dumps(part)), False
            part.setdefault(key, []).append(item)
            size, has_items = size + piece, True
    out.append(orjson.dumps(part))
    return out


# The fields of a stamp control message whose entries each start with their org.
ORG_FIELDS = ("clients", "shared", "closing", "resent", "drivers", "chained")


def per_org(msg: dict[str, Any], resync: set[str]) -> dict[str, dict[str, Any]]:
    """Split a stamp control message into one per org (the org's control channel reaches only the
    instances holding its drivers); `resync` goes, alone if need be, to each org of `resync`."""
    parts: dict[str, dict[str, Any]] = {}
    for name in ORG_FIELDS:
        for entry in msg.get(name, ()):
            part = parts.setdefault(entry[0], {"from": msg["from"]})
            part.setdefault(name, []).append(entry)
    if msg.get("resync"):
        for org in resync | set(parts):
            parts.setdefault(org, {"from": msg["from"]})["resync"] = 1
    return parts


class Notifier:
    """Sends stamp control messages by NOTIFY, and hands those of the other instances to `heard`."""

    def __init__(self, core: Core, heard: Callable[[str], None]) -> None:
        self.core = core
        self.heard = heard
        self.listening = False
        self.server_pid: int | None = None  # the listening connection's backend
        self._order = asyncio.Lock()  # one NOTIFY transaction at a time, in the order sent (FIFO)

    async def send(self, msg: dict[str, Any]) -> bool:
        """NOTIFY the message (split if long) in one transaction; False if PostgreSQL failed."""
        try:
            async with self._order, self.core.pool.acquire() as conn, conn.transaction():
                for payload in payloads(msg):
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload.decode())
        except PG_ERRORS as exc:
            log.warning("stamp control message not sent by NOTIFY (PostgreSQL: %s)", exc)
            return False
        return True

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.heard(payload)

    async def listen(self) -> None:
        """Hold one pool connection LISTENing on CHANNEL; take another (with backoff) if it drops."""
        delay = BACKOFF_S[0]
        while True:
            conn: Any = None
            lost = asyncio.Event()
            try:
                conn = await self.core.pool.acquire()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listening, self.server_pid, delay = True, conn.get_server_pid(), BACKOFF_S[0]
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CHECK_S):  # not wait_for: see tracker/redis_cluster.py
                            await lost.wait()
                    if not lost.is_set():  # a connection gone without a word (a dead network)
                        await conn.fetchval("SELECT 1", timeout=CHECK_S)
                log.warning("custody notice listener lost its connection; listening again")
            except PG_ERRORS as exc:
                log.warning("custody notice listener: PostgreSQL %s; listening again in %.1f s", exc, delay)
            except Exception:  # never a listener silently gone: whatever failed, listen again
                log.exception("custody notice listener failed; listening again in %.1f s", delay)
            finally:
                self.listening = False
                if conn is not None:
                    await self._give_back(conn)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _give_back(self, conn: Any) -> None:
        """Stop listening and return the connection to the pool (closed if UNLISTEN failed). A
        connection lost is already detached from the pool: its every method raises then."""
        try:
            await asyncio.wait_for(conn.remove_listener(CHANNEL, self._on_notify), 5.0)
        except PG_ERRORS:
            with contextlib.suppress(*PG_ERRORS):
                conn.terminate()  # never back in the pool still listening
        finally:
            with contextlib.suppress(*PG_ERRORS):
                await self.core.pool.release(conn)
