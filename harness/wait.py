"""Waiting for an effect with a deadline, never guessing with a sleep.

`wait_until` polls a predicate (sync, or returning an awaitable) until it holds, and fails with
what it waited for; `eventually` polls an async probe and fails with the last value it saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.02,
) -> float:
    """Poll `predicate` until truthy; returns the seconds waited. After `timeout` s, raises
    AssertionError naming `what` (a callable is asked only then, so it can say how far it got)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {said}")
        await asyncio.sleep(interval)


async def eventually(probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll `probe` until `check(value)` holds and return that value; fail after `timeout` s with
    the last value seen."""
    last: list[T] = []

    async def holds() -> bool:
        last[:] = [await probe()]
        return check(last[0])

    await wait_until(holds, timeout, lambda: f"the check to pass; last value: {last[0]!r}" if last else "a value")
    return last[0]
