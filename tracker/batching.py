"""Per-tick batching of request/response work: every caller in one event-loop iteration shares
one round trip. A storm of 10,000 reconnecting phones costs a few hundred queries, not 10,000."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TickBatcher(Generic[K, V]):
    """`await get(key)` -> value; keys gathered in one tick go to `run(keys)` together.

    `run` returns one value per key, in order; if it raises, every caller of that batch gets the
    exception. At most `max_batch` keys per call (the rest go in further calls of the same tick).
    """

    def __init__(self, run: Callable[[list[K]], Awaitable[Sequence[V]]], *, max_batch: int = 1000) -> None:
        self._run = run
        self._max_batch = max_batch
        self._keys: list[K] = []
        self._futures: list[asyncio.Future[V]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V] = loop.create_future()
        self._keys.append(key)
        self._futures.append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._fire)
        return await future

    def _fire(self) -> None:
        self._scheduled = False
        keys, futures = self._keys, self._futures
        self._keys, self._futures = [], []
        for start in range(0, len(keys), self._max_batch):
            task = asyncio.get_running_loop().create_task(
                self._call(keys[start : start + self._max_batch], futures[start : start + self._max_batch])
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, keys: list[K], futures: list[asyncio.Future[V]]) -> None:
        try:
            values = await self._run(keys)
        except Exception as exc:  # handed to every caller of this batch
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, value in zip(futures, values, strict=True):
            if not future.done():
                future.set_result(value)
