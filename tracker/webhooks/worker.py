"""Delivery workers: claim due deliveries (store.claim: FOR UPDATE SKIP LOCKED, then a lease), post
them signed, record the outcome. Any number of instances run one each on the same database: a
delivery is claimed by one of them at a time, so each event goes out once per endpoint (again only
if an instance dies mid-delivery and its lease runs out: receivers dedupe on webhook-id).

One task per delivery, at most `webhook_concurrency` in flight on this instance and at most
`webhook_endpoint_concurrency` per endpoint, so a slow or dead endpoint holds a few slots for at
most its timeouts and never delays the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from typing import Any, Final

import asyncpg

from ..clock import now_ms
from ..config import Settings
from . import policy, sign, store
from .client import Answer, Client

log = logging.getLogger("tracker.webhooks")

PG_ERRORS: Final = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
ERROR_MAX: Final = 300


class Deliverer:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, client: Client) -> None:
        self.pool, self.s, self.client = pool, settings, client
        self.inflight: dict[str, int] = {}  # endpoint -> deliveries in flight on this instance
        self.attempts: Counter[str] = Counter()  # endpoint -> attempts made by this instance (tests, /metrics later)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # A claim outlives the longest attempt (connect, then response) by a wide margin.
        self.lease_ms = int((2 * (settings.webhook_connect_timeout_s + settings.webhook_timeout_s) + 30) * 1000)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim and start deliveries until cancelled; then wait for those in flight (bounded by
        their timeouts) so that none is left claimed."""
        delay = self.s.webhook_poll_s
        try:
            while True:
                self._wake.clear()
                started = 0
                free = self.s.webhook_concurrency - len(self._tasks)
                if free > 0:
                    try:
                        started = await self._claim(free)
                        delay = self.s.webhook_poll_s
                    except PG_ERRORS as exc:
                        log.warning("webhook claim failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
                        delay = min(delay * 2, 30.0)
                    except Exception:  # never a worker silently gone
                        log.exception("webhook claim failed")
                if started < free or free <= 0:  # nothing more due now: wait for a slot, a wake or the poll
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):  # not wait_for: see tracker/redis_cluster.py
                            await self._wake.wait()
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _claim(self, free: int) -> int:
        busy = {e: n for e, n in self.inflight.items() if n}
        rows = await store.claim(
            self.pool,
            now_ms(),
            busy=busy,
            per_endpoint=self.s.webhook_endpoint_concurrency,
            limit=free,
            lease_ms=self.lease_ms,
        )
        for row in rows:
            self.inflight[row["endpoint_id"]] = self.inflight.get(row["endpoint_id"], 0) + 1
            task = asyncio.create_task(self._deliver(row))
            self._tasks.add(task)
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()  # a slot is free, and the next event of its package may be due

    async def _deliver(self, row: Any) -> None:
        endpoint = row["endpoint_id"]
        try:
            now = now_ms()
            secrets = [row["secret"]]
            if row["old_secret"] is not None and (row["old_until"] or 0) > now:
                secrets.append(row["old_secret"])
            body = bytes(row["body"])
            headers = sign.headers(secrets, row["msg_id"], now // 1000, body)
            answer = await self.client.post(row["url"], body, headers)
            self.attempts[endpoint] += 1
            await self._record(row, answer)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly (its lease will expire and it is retried)", row["n"])
        finally:
            self.inflight[endpoint] -= 1
            if not self.inflight[endpoint]:
                del self.inflight[endpoint]

    async def _record(self, row: Any, answer: Answer) -> None:
        now = now_ms()
        status = answer.status
        next_at = now
        if status is not None and 200 <= status < 300:
            state = "delivered"
        elif status == 410:
            state = "dead"
        else:
            s = self.s
            due = policy.next_attempt(
                row["attempts"],
                now,
                row["created_at"],
                base_s=s.webhook_backoff_base_s,
                cap_s=s.webhook_backoff_max_s,
                window_s=s.webhook_retry_window_s,
                u=random.random(),
            )
            state, next_at = ("dead", now) if due is None else ("pending", due)
        error = answer.error[:ERROR_MAX] if answer.error else None
        for attempt in range(3):  # a failed write leaves the claim to its lease: a duplicate, never a loss
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if status == 410:
                        await store.disable(
                            conn, row["endpoint_id"], f"the endpoint answered 410 Gone at {store.iso(now)}"
                        )
                        log.warning("webhook endpoint %s answered 410: disabled", row["endpoint_id"])
                    await store.finish(
                        conn,
                        row["n"],
                        row["attempts"],
                        state=state,
                        next_at=next_at,
                        now=now,
                        status=status,
                        latency_ms=answer.latency_ms,
                        error=error,
                        response=answer.response,
                    )
                return
            except PG_ERRORS as exc:
                log.warning("webhook delivery %s: outcome not recorded (%s); retrying", row["n"], exc)
                await asyncio.sleep(0.5 * (attempt + 1))
