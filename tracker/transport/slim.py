"""asyncio's `Queue` and `Event`, as uvicorn uses them per connection, without their empty deques.

uvicorn gives every websocket an `asyncio.Queue` (ASGI `receive`) and an `asyncio.Event`
(`writable`). Each allocates its collections up front: the queue four deques (its items, its
getters, its putters, its `join()` event's waiters), the event one; an empty deque is 760 bytes.
That is ~3.8 KB of a driver connection that sits idle for hours while the fast path reads its
frames (BENCHMARKS.md, issue 13). These two hold a list only while something is in it.

Both are drop-ins for the methods uvicorn and tracker/transport/uvicorn_fast.py call, nothing more.
Like asyncio's, neither is thread-safe, and neither awaits anything but its own futures.
"""

from __future__ import annotations

import asyncio
from typing import Any


class _Waiters:
    """The futures of the tasks waiting on one object; a list only while there are some."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    def _add(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [future]
        else:
            self._waiters.append(future)
        return future

    def _wake_all(self) -> None:
        """Wake every waiter (each checks again what it waits for). The list is let go of first,
        so none is woken twice."""
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)

    async def _wait(self) -> None:
        future = self._add()
        try:
            await future
        finally:
            waiters = self._waiters
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    self._waiters = None


class Inbox(_Waiters):
    """A FIFO of ASGI receive events for uvicorn: `put_nowait`, `get`, `get_nowait`, `empty`,
    `qsize`. Unbounded, like uvicorn's queue."""

    __slots__ = ("_items",)

    def __init__(self, items: list[Any] | None = None) -> None:
        super().__init__()
        self._items: list[Any] | None = items or None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        """Never blocks; wakes the getters (each takes an item or waits again)."""
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        self._wake_all()

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.pop(0)
        if not items:
            self._items = None
        return item

    async def get(self) -> Any:
        while not self._items:
            await self._wait()
        return self.get_nowait()

    def ready(self) -> asyncio.Future[None]:
        """A future done once the inbox holds an item (at once if it does): one object to await,
        no coroutine frame. A cancelled one is dropped by the next `put_nowait`."""
        if not self._items:
            return self._add()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class Flag(_Waiters):
    """An `asyncio.Event`: `set`, `clear`, `is_set`, `wait`."""

    __slots__ = ("_value",)

    def __init__(self, value: bool = False) -> None:
        super().__init__()
        self._value = value

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            self._wake_all()

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if not self._value:  # like asyncio.Event: returns once woken, even if cleared since
            await self._wait()
        return True
