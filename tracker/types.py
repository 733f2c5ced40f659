"""Type aliases and the small interfaces the core needs from the transport."""

from __future__ import annotations

from typing import Protocol


class Channel(Protocol):
    """The sending half of one accepted websocket (tracker/transport/channel.py implements it)."""

    closed: bool

    def write(self, data: bytes) -> None:
        """Send one text frame now, without awaiting the peer. Never raises."""

    def buffered(self) -> int:
        """Bytes written but not yet taken by the peer."""

    async def wait_writable(self) -> None:
        """Until the transport's buffer is back under its low-water mark."""

    async def close(self, code: int, reason: str = "", *, timeout: float = 2.0) -> None:
        """Close with `code`; a peer that does not read gets its connection aborted instead."""
