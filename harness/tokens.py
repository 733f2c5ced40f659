"""Tokens signed with the test secret (every in-process instance and `spawn`ed one trusts it)."""

from __future__ import annotations

from typing import Any

from tracker.auth import mint_token

SECRET = "test-secret-" + "x" * 40
CUSTODY_KEY = "test-custody-key-" + "y" * 40  # every instance under test shares it, as a deployment must


def token(role: str, sub: str, org: str, *, secret: str = SECRET, **claims: Any) -> str:
    """A token for `sub` in `org` with `role`; `claims` go to `tracker.auth.mint_token` (client,
    name, ttl_s, now, alg)."""
    return mint_token(secret, role=role, sub=sub, org=org, **claims)
