"""Session resumption for driver connections (docs/PROTOCOL.md, "Resuming a session"). Pure.

A phone that asked for it (`"resume": true` in `hello`) gets in `welcome` a short token, signed by
the server (HMAC-SHA256 with a key of its own, truncated to 96 bits), that names the driver, the
encoding and acks it negotiated, and two expiries: the token's own (at most `ttl_s` after it was
issued) and its JWT's (which it never outlives: a resumed session closes 4003 when the JWT would
have). Reconnecting within the token's life, the phone sends the binary frame `0xA3` + token
instead of its JWT `hello` (~60 bytes instead of ~370) and is answered by a binary welcome
(`0xA4`, ~20 bytes). Nothing is stored server side: any instance that holds the key verifies it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Final

from ..auth import ID_MAX, NAME_MAX, AuthError, Principal

HELLO: Final = 0xA3  # first byte of a resume hello: the token's bytes follow
WELCOME: Final = 0xA4  # first byte of the answer to it
VERSION: Final = 1
TAG_BYTES: Final = 12
TOKEN_MAX: Final = 1024
KEY_LABEL: Final = b"tracker resume v1"
ENCODINGS: Final = ("json", "compact-1", "compact-2")  # 2 bits of the flags byte, in this order
ACKS: Final = ("per-commit", "cumulative", "compact")  # the next 2 bits


def derive_key(secret: str) -> bytes:
    """The resume key when none is configured and tokens are HS256: derived from the JWT secret
    (so every instance sharing it shares this key), never equal to it."""
    return hmac.new(secret.encode(), KEY_LABEL, hashlib.sha256).digest()


def _uvar(out: bytearray, u: int) -> None:
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)


def _text(out: bytearray, s: str) -> None:
    data = s.encode()
    _uvar(out, len(data))
    out += data


class _Cursor:
    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def uvar(self) -> int:
        u = shift = 0
        for _ in range(10):
            if self.at >= len(self.data):
                raise AuthError("resume: token is malformed")
            b = self.data[self.at]
            self.at += 1
            u |= (b & 0x7F) << shift
            if b < 0x80:
                return u
            shift += 7
        raise AuthError("resume: token is malformed")

    def text(self, limit: int) -> str:
        size = self.uvar()
        if size > 4 * limit or self.at + size > len(self.data):
            raise AuthError("resume: token is malformed")
        self.at += size
        try:
            return self.data[self.at - size : self.at].decode()
        except UnicodeDecodeError:
            raise AuthError("resume: token is malformed") from None


class ResumeTokens:
    """Issues and verifies resume tokens with one key. `ttl_s`: a token's longest life."""

    def __init__(self, key: bytes, ttl_s: float) -> None:
        if len(key) < 16:
            raise ValueError("a resume key needs 16 bytes at least")
        self._key = key
        self.ttl_s = ttl_s

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:TAG_BYTES]

    def issue(self, principal: Principal, encoding: str, acks: str, now_s: float) -> bytes:
        """A token for this driver and what its connection negotiated, valid until the earlier of
        now + ttl_s and its JWT's expiry."""
        out = bytearray((VERSION,))
        _uvar(out, int(min(now_s + self.ttl_s, principal.exp)))
        _uvar(out, principal.exp)
        out.append(ENCODINGS.index(encoding) | ACKS.index(acks) << 2)
        for field in (principal.org, principal.sub, principal.name or ""):
            _text(out, field)
        return bytes(out + self._tag(bytes(out)))

    def verify(self, token: bytes, now_s: float) -> tuple[Principal, str, str, int]:
        """(principal, encoding, acks, the token's expiry) or AuthError (message starting
        `resume: `): a bad tag, a token expired or of another version."""
        if not TAG_BYTES < len(token) <= TOKEN_MAX:
            raise AuthError("resume: token is malformed")
        body, tag = token[:-TAG_BYTES], token[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise AuthError("resume: token signature is invalid")
        if body[0] != VERSION:
            raise AuthError(f"resume: token version must be {VERSION}")
        c = _Cursor(body)
        c.at = 1
        exp, jwt_exp = c.uvar(), c.uvar()
        if c.at >= len(body):
            raise AuthError("resume: token is malformed")
        flags = body[c.at]
        c.at += 1
        org, sub, name = c.text(ID_MAX), c.text(ID_MAX), c.text(NAME_MAX)
        if c.at != len(body) or flags >> 4 or flags & 3 >= len(ENCODINGS) or flags >> 2 >= len(ACKS):
            raise AuthError("resume: token is malformed")
        if now_s > exp:
            raise AuthError("resume: token expired")
        principal = Principal("driver", sub, org, jwt_exp, name=name or None)
        return principal, ENCODINGS[flags & 3], ACKS[flags >> 2], exp


def welcome_frame(
    *,
    last_seq: int,
    server_time: int,
    max_frame: int,
    max_batch: int,
    ack_delay_ms: int,
    encoding: str,
    acks: str,
    token: bytes,
) -> bytes:
    """The binary welcome: `0xA4`, varints last_seq, server_time, max_frame, max_batch,
    ack_delay_ms, the flags byte (encoding, acks), then a new token's length and bytes (0: none,
    keep yours)."""
    out = bytearray((WELCOME,))
    for u in (last_seq, server_time, max_frame, max_batch, ack_delay_ms):
        _uvar(out, u)
    out.append(ENCODINGS.index(encoding) | ACKS.index(acks) << 2)
    _uvar(out, len(token))
    return bytes(out + token)


def decode_welcome(data: bytes) -> dict[str, Any]:
    """The binary welcome as the fields of a JSON one (`resume`: the new token's bytes, or absent).
    ValueError if malformed. For phones: the simulator and the tests."""
    if data[:1] != bytes((WELCOME,)):
        raise ValueError("not a binary welcome")
    c = _Cursor(data)
    c.at = 1
    try:
        last_seq, server_time, max_frame, max_batch, ack_delay_ms = (c.uvar() for _ in range(5))
        flags = data[c.at]
        c.at += 1
        size = c.uvar()
    except (AuthError, IndexError):
        raise ValueError("binary welcome is malformed") from None
    if c.at + size != len(data):
        raise ValueError("binary welcome is malformed")
    out: dict[str, Any] = {
        "type": "welcome",
        "last_seq": last_seq,
        "server_time": server_time,
        "max_frame": max_frame,
        "max_batch": max_batch,
        "encoding": ENCODINGS[flags & 3],
        "acks": ACKS[(flags >> 2) & 3],
        "ack_delay_ms": ack_delay_ms,
        "resumed": True,
    }
    if size:
        out["resume"] = data[c.at :]
    return out
