"""Packages and chain of custody (issue 4): not built yet. The node's hooks stay at their
defaults, under which a client administrator sees no driver and no package."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from .node import Node


def install(node: Node) -> None:
    """Wire the package layer's hooks into the node."""


def routes() -> list[BaseRoute]:
    return []
