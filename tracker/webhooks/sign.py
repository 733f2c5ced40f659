"""The Standard Webhooks signature scheme (https://www.standardwebhooks.com/): pure, no I/O.

A secret is `whsec_` + base64 of random bytes; the HMAC key is those bytes. A message is signed as
`v1,` + base64(HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}")); during a secret's
rotation grace period the header carries one signature per valid secret, separated by spaces.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Final

PREFIX: Final = "whsec_"
KEY_BYTES: Final = 32


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def key_of(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret (ValueError if it is not one)."""
    if not secret.startswith(PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len(PREFIX) :], validate=True)


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` of `msg_id.timestamp.body` (timestamp: integer Unix seconds)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key_of(secret), signed, hashlib.sha256).digest()).decode()


def header(secrets_: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: a signature per secret, space-separated."""
    return " ".join(signature(s, msg_id, timestamp, body) for s in secrets_)


def headers(secrets_: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": header(secrets_, msg_id, timestamp, body),
    }
