"""Rate limits of tracking links: one token bucket per link and one per client address, on this
instance (like every abuse limit, SECURITY.md). Memory is bounded: beyond `MAX_KEYS` buckets the
least recently used are forgotten (a forgotten bucket comes back full: at worst one more burst)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from ..protocol.bucket import TokenBucket

MAX_KEYS: Final = 100_000


class Buckets:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0.0 when allowed; otherwise the seconds to wait (nothing taken)."""
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self.buckets) > MAX_KEYS:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        return bucket.take(now)


class Limits:
    """Per link (`rate`) and per address (`ip_rate`), the same burst."""

    def __init__(self, rate: float, ip_rate: float, burst: int) -> None:
        self.links = Buckets(rate, burst)
        self.addresses = Buckets(ip_rate, burst)

    def take(self, link: str, address: str, now: float) -> float:
        """0.0 when both allow it; otherwise the seconds to wait. The address is charged first, so a
        client guessing tokens runs out of its own budget, not of the links'."""
        wait = self.addresses.take(address, now)
        if wait:
            return wait
        return self.links.take(link, now)
