"""The server's clock, in integer milliseconds since the Unix epoch (as on the wire).

The pure modules (`tracker.protocol`, `tracker.custody.state`) never read a clock: they take the
time as a parameter, and the I/O layers pass `now_ms()`.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
