"""Mobile-network trouble for simulated phones (``tracker simulate --flaky``).

Pure and deterministic: a :class:`FaultPlan` is drawn from a seeded Random; the fleet
schedules each :class:`Fault` on the event loop and applies it to the phone's link.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fault:
    """One episode of trouble: ``at`` seconds into the run, lasting ``length`` seconds.

    ``kind`` is ``drop`` (connection reset, reconnect at once), ``offline`` (no network for
    ``length``), or ``slow`` (writes delayed by ``delay`` seconds for ``length``).
    """

    at: float
    kind: str
    length: float
    delay: float = 0.0


class FaultPlan:
    """A phone's deterministic schedule of faults over a run of ``duration`` seconds.

    Offline periods run from seconds to minutes, scaled down with short runs
    (``scale = min(1, duration / 600)``), and end before the run does, so the drain phase
    starts with every phone able to connect.
    """

    def __init__(self, rng: random.Random, duration: float, *, mean_gap: float | None = None) -> None:
        scale = min(1.0, duration / 600.0)
        gap = mean_gap if mean_gap is not None else max(5.0, 120.0 * scale)
        self.faults: list[Fault] = []
        t = rng.expovariate(1.0 / gap)
        while t < duration:
            r = rng.random()
            if r < 0.4:
                fault = Fault(t, "drop", 0.0)
            elif r < 0.75:
                # log-uniform between 2 s and 3 min, then scaled: seconds to minutes
                length = max(1.0, math.exp(rng.uniform(math.log(2.0), math.log(180.0))) * scale)
                fault = Fault(t, "offline", min(length, duration - t))
            else:
                fault = Fault(t, "slow", rng.uniform(5.0, 60.0) * scale, delay=rng.uniform(0.2, 3.0))
            self.faults.append(fault)
            t += fault.length + rng.expovariate(1.0 / gap)
        self.reorder_seed = rng.getrandbits(32)
