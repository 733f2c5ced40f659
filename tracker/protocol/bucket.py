"""One token bucket for every rate limit (a driver's events, a dashboard's snapshots). Pure: the
caller passes the time (monotonic seconds)."""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens per second sustained, `burst` at once; starts with `tokens` (default: full)."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float, *, tokens: float | None = None) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst if tokens is None else tokens
        self.at = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken; otherwise the seconds until one is available (none taken)."""
        tokens = self.tokens + (now - self.at) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled to its burst (a fresh one would be the same)."""
        return self.tokens + (now - self.at) * self.rate >= self.burst
