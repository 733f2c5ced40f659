"""The simulated phone's side of session resumption (docs/PROTOCOL.md, "Resuming a session")."""

from __future__ import annotations

import base64
import time
from typing import Any

from tracker.auth import TokenVerifier
from tracker.protocol import resume
from tracker.sim import SimOptions

decode_welcome = resume.decode_welcome


def token_of(welcome: dict[str, Any]) -> bytes | None:
    """The resume token a welcome carries (JSON: base64url; binary: bytes), or None."""
    token = welcome.get("resume") if welcome.get("type") == "welcome" else None
    if not token:
        return None
    if isinstance(token, bytes):
        return token
    return base64.urlsafe_b64decode(str(token) + "=" * (-len(str(token)) % 4))


def warm_token(opts: SimOptions, jwt: str) -> bytes:
    """The resume token a server with the default key (derived from the JWT secret) would have
    issued this phone on an earlier connection: ``--resume warm``, a phone that was on the road
    before the run began."""
    assert opts.secret is not None
    principal = TokenVerifier(alg="HS256", secret=opts.secret).verify(jwt)
    encoding = {"compact2": "compact-2", "compact": "compact-1"}.get(opts.encoding, "json")
    acks = opts.acks
    if acks == "compact" and encoding == "json":
        acks = "cumulative"
    tokens = resume.ResumeTokens(resume.derive_key(opts.secret), ttl_s=86_400.0)
    return tokens.issue(principal, encoding, acks, time.time())
