"""tracker/transport/slim.py: uvicorn's per-connection queue and event, without their deques."""

from __future__ import annotations

import asyncio

import pytest

from tracker.transport.slim import Flag, Inbox


async def test_inbox_is_a_fifo_that_wakes_its_getter() -> None:
    inbox = Inbox([{"n": 0}])
    assert inbox.qsize() == 1 and not inbox.empty()
    getter = asyncio.create_task(_take(inbox, 3))
    await asyncio.sleep(0)
    inbox.put_nowait({"n": 1})
    inbox.put_nowait({"n": 2})
    assert await asyncio.wait_for(getter, 1) == [0, 1, 2]
    assert inbox.empty() and inbox._items is None and inbox._waiters is None  # nothing held when idle
    with pytest.raises(asyncio.QueueEmpty):
        inbox.get_nowait()


async def _take(inbox: Inbox, n: int) -> list[int]:
    return [(await inbox.get())["n"] for _ in range(n)]


async def test_inbox_with_two_getters_gives_each_item_once() -> None:
    inbox = Inbox()
    a, b = asyncio.create_task(inbox.get()), asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(1)
    done, pending = await asyncio.wait((a, b), timeout=0.05)
    assert [t.result() for t in done] == [1] and len(pending) == 1
    inbox.put_nowait(2)
    assert await asyncio.wait_for(pending.pop(), 1) == 2
    assert inbox._waiters is None


async def test_a_cancelled_get_loses_no_item() -> None:
    inbox = Inbox()
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    assert inbox._waiters is None
    inbox.put_nowait("x")
    assert await inbox.get() == "x"


async def test_ready_is_a_future_done_by_the_next_item() -> None:
    inbox = Inbox()
    ready = inbox.ready()
    assert not ready.done()
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(ready, 1)
    assert inbox.get_nowait()["code"] == 1000
    inbox.put_nowait("y")
    assert inbox.ready().done()  # already holds one
    cancelled = Inbox().ready()
    cancelled.cancel()  # allowed


async def test_flag_is_an_event() -> None:
    flag = Flag(True)
    assert flag.is_set() and await flag.wait()
    flag.clear()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    flag.set()
    assert await asyncio.wait_for(waiter, 1) is True
    assert flag._waiters is None
    cancelled = asyncio.create_task(Flag().wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
