"""RedisBroker's Lua scripts (tracker/lua/) and the arguments of a window's live publish."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Final

from .broker import LiveItem
from .redis_keys import Naming

LUA_DIR: Final = Path(__file__).parent / "lua"


def _lua(name: str) -> str:
    return (LUA_DIR / name).read_text()


PUBLISH_CHUNK: Final = 2_000  # live items per published message (and per Lua call)


class Lua:
    """A script of tracker/lua/, run by EVALSHA and loaded only when Redis says NOSCRIPT (redis-py's
    pipelines ask SCRIPT EXISTS before every execute: a second round trip per window)."""

    def __init__(self, name: str) -> None:
        self.text = _lua(name)
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()


LIVE_LUA: Final = Lua("live.lua")
PRESENCE_ON_LUA: Final = Lua("presence_on.lua")
PRESENCE_OFF_LUA: Final = Lua("presence_off.lua")
REFRESH_LUA: Final = Lua("presence_refresh.lua")
SWEEP_LUA: Final = Lua("presence_sweep.lua")

Call = tuple[list[str], list[Any]]  # (KEYS, ARGV) of one script call


def live_calls(naming: Naming, pending: dict[str, list[LiveItem]]) -> list[Call]:
    """LIVE_LUA's calls for one window: every org in one call, at most PUBLISH_CHUNK items a call
    (a backlog after a slow round trip must not become one multi-megabyte message). On a cluster,
    one call per org (each call stays in its org's slot)."""
    calls: list[Call] = []
    keys: list[str] = []
    args: list[Any] = [naming.publish_command]
    size = 0
    for org, items in pending.items():
        for start in range(0, len(items), PUBLISH_CHUNK):
            chunk = items[start : start + PUBLISH_CHUNK]
            if keys and (naming.cluster or size + len(chunk) > PUBLISH_CHUNK):
                calls.append((keys, args))
                keys, args, size = [], [naming.publish_command], 0
            keys.append(naming.key("lastpos", org))
            args += _block(naming.live_channel(org), chunk)
            size += len(chunk)
    if keys:
        calls.append((keys, args))
    return calls


def _block(channel: str, items: list[LiveItem]) -> list[Any]:
    drivers: list[Any] = []
    ltss: list[Any] = []
    plines: list[Any] = []
    always: list[Any] = []
    for kind, driver, lts, stamp, frame in items:
        if kind == "p":
            drivers.append(driver)
            ltss.append(lts)
            plines.append(stamp + b"\t" + frame)
        else:
            always.append(stamp + b"\t" + frame)
    return [channel, len(drivers), len(always), *drivers, *ltss, *plines, *always]
