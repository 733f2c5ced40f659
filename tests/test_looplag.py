"""A stalled event loop is named in the log: one warning line per stall over 100 ms, with the stack
that held the loop (tracker/looplag.py); a pause under 100 ms is only in `tracker_loop_lag_seconds`."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from harness.instances import Instance
from harness.wait import wait_until
from tracker.looplag import gc_callback


def hold_the_loop_for(seconds: float) -> None:
    """A blocking call in the event loop's thread, as a CPU-bound handler would be."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def stall_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tracker.looplag" and "held" in r.getMessage()]


def held_ms(line: str) -> int:
    return int(line.split("event loop held ")[1].split(" ms")[0])


def lag_observations() -> float:
    return REGISTRY.get_sample_value("tracker_loop_lag_seconds_count") or 0.0


async def test_stall_is_logged_once_with_the_stack_that_held_the_loop(
    instance: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tracker.looplag")
    caplog.clear()
    # Short pauses first: each observed (the timer ran after it), none logged.
    for _ in range(3):
        seen = lag_observations()
        hold_the_loop_for(0.04)
        await wait_until(lambda seen=seen: lag_observations() > seen, 5, "the loop-lag timer", interval=0.005)
    # Then a stall.
    hold_the_loop_for(0.4)

    def ours() -> list[str]:  # a loaded machine may add stalls of its own, and stretch a short pause
        return [line for line in stall_lines(caplog) if held_ms(line) >= 300]

    await wait_until(ours, 5, "the stall's log line")
    assert len(ours()) == 1, stall_lines(caplog)  # one line per stall
    line = ours()[0]
    assert "\n" not in line
    assert held_ms(line) <= 2000, line
    assert "test_looplag.py" in line and "hold_the_loop_for" in line, line


async def test_serve_start_freezes_start_up_objects_and_raises_the_young_threshold(start_instance: Any) -> None:
    """At the fleet shape (10,000 drivers x 0.2 Hz) this keeps the young generation from filling more
    than about once in two minutes, each collection 19-57 ms, and no lag over 100 ms in 120 s
    (BENCHMARKS.md, issue 13, 2026-11-30); a young threshold of 10,000 was measured worse (gen-1
    collections of ~300 ms in a connect storm). Every `tracker serve` starts through this Server."""
    before = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)  # CPython's defaults, as a process starts
    while gc_callback in gc.callbacks:
        gc.callbacks.remove(gc_callback)
    try:
        await start_instance()
        assert gc.get_threshold() == (50_000, 50, 100)
        assert gc.get_freeze_count() > 1000  # the app, its modules and pools: out of every collection
        assert gc.callbacks.count(gc_callback) == 1  # each pause into tracker_gc_pause_seconds
    finally:
        gc.set_threshold(*before)
