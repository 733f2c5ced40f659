"""Abuse limits of one instance (SECURITY.md): who may hold one more socket. Pure: no I/O, no
asyncio; the endpoints apply the verdicts. (How often a dashboard may ask for a snapshot is the
viewer session's token bucket: tracker/protocol/viewer.py.)

Counts are per instance, like TRACKER_MAX_CONNECTIONS for drivers: a load balancer spreads a
principal's connections, so the bound across N instances is N times the setting.
"""

from __future__ import annotations

from collections import Counter

from ..config import Settings


class Admission:
    """Sockets waiting for `hello` (both endpoints) and open dashboards, in total and per (org, sub)."""

    def __init__(self, settings: Settings) -> None:
        self.max_pending = settings.max_pending
        self.max_dashboards = settings.max_dashboards
        self.max_per_user = settings.max_dashboards_per_user
        self.pending = 0
        self.dashboards = 0
        self.per_user: Counter[tuple[str, str]] = Counter()

    def begin_hello(self) -> bool:
        """Count one more socket waiting for hello; False (count unchanged) when the cap is reached."""
        if self.pending >= self.max_pending:
            return False
        self.pending += 1
        return True

    def end_hello(self) -> None:
        self.pending -= 1

    def admit_dashboard(self, user: tuple[str, str]) -> str | None:
        """Count one more dashboard of `user`, or the reason it is refused (close 1013)."""
        if self.dashboards >= self.max_dashboards:
            return "too many dashboards on this instance"
        if self.per_user[user] >= self.max_per_user:
            return f"too many dashboards for this user (at most {self.max_per_user})"
        self.dashboards += 1
        self.per_user[user] += 1
        return None

    def release_dashboard(self, user: tuple[str, str]) -> None:
        self.dashboards -= 1
        self.per_user[user] -= 1
        if self.per_user[user] <= 0:
            del self.per_user[user]
