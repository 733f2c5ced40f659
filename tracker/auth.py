"""Tokens -> Principal, and what a Principal may see. Pure: no asyncio, no I/O after start.

The algorithm is pinned by configuration: HS256 with a secret, or RS256/ES256 with public keys
(a PEM, or a JWKS file whose keys are picked by `kid`). `alg: none` and every other algorithm are
refused, so a token signed with the public key as an HMAC secret (algorithm confusion) fails.
"""

from __future__ import annotations

import json
import secrets
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt

AUDIENCE: Final = "tracker"
ROLES: Final = frozenset({"driver", "dispatcher", "client"})
ID_MAX: Final = 64
NAME_MAX: Final = 100
REQUIRED_CLAIMS: Final = ("exp", "iat", "aud", "sub", "role", "org")


def _since_2_10(name: str, words: str) -> tuple[tuple[type[jwt.PyJWTError], str], ...]:
    kind = getattr(jwt.exceptions, name, None)
    return ((kind, words),) if kind is not None else ()


# PyJWT's refusals in the service's words, most specific first (InvalidSignatureError is a DecodeError).
PYJWT_WORDS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.InvalidAudienceError, f"token audience must be {AUDIENCE}"),
    (jwt.ImmatureSignatureError, "token is not valid yet (iat or nbf in the future)"),
    (jwt.InvalidIssuedAtError, "token claim iat must be a number"),
    (jwt.DecodeError, "token is malformed"),
    # PyJWT >= 2.10 checks sub and jti itself (pyproject allows 2.8, where these do not exist).
    *_since_2_10("InvalidSubjectError", f"sub: must be a string of 1 to {ID_MAX} characters"),
    *_since_2_10("InvalidJTIError", "token claim jti must be a string"),
)
# Characters no claim may hold: controls, format characters (bidi controls U+202A-U+202E and
# U+2066-U+2069, zero-width U+200B-U+200D, U+2060, U+FEFF), lone surrogates, private use and
# unassigned code points, line and paragraph separators. An id or a name holding one could show as
# another on a dispatcher's screen; a lone surrogate cannot even be encoded.
_UNSHOWABLE: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class AuthError(Exception):
    """The token is missing, malformed, badly signed, expired or lacks a claim."""


@dataclass(frozen=True, slots=True)
class Principal:
    role: str
    sub: str
    org: str
    exp: int
    client: str | None = None
    name: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """A driver's identity everywhere: (org, sub)."""
        return (self.org, self.sub)


class TokenVerifier:
    """Verifies tokens with the configured, pinned algorithm and key(s)."""

    def __init__(
        self,
        *,
        alg: str,
        secret: str | None = None,
        public_key: str | None = None,
        leeway_s: float = 30.0,
        max_ttl_s: float = 0.0,
    ) -> None:
        self.alg = alg
        self.leeway_s = leeway_s
        self.max_ttl_s = max_ttl_s  # a token issued for longer (exp - iat) is refused; 0: no cap
        self._keys: dict[str | None, Any] = {}
        if alg == "HS256":
            if not secret:
                raise AuthError("HS256 needs a secret")
            self._keys[None] = secret
        else:
            if not public_key:
                raise AuthError(f"{alg} needs a public key")
            self._keys = _load_public_keys(public_key, alg)

    def verify(self, token: object) -> Principal:
        """The token's Principal, or AuthError; never raises anything else (malformed keys and
        headers included): `iat` in the future beyond the leeway, a lifetime over `max_ttl_s`,
        another algorithm or an unknown `kid` are refused."""
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise AuthError("missing token")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != self.alg:
                raise AuthError(f"token algorithm must be {self.alg}")
            kid = header.get("kid")
            key = self._keys.get(kid) if kid in self._keys else self._keys.get(None)
            if key is None:
                raise AuthError("unknown key id")
            claims = jwt.decode(
                token,
                key,
                algorithms=[self.alg],
                audience=AUDIENCE,
                leeway=self.leeway_s,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(self._words(exc)) from None
        # A key of another type, exp: 1e999, a lone surrogate in the token (it cannot be encoded).
        except (TypeError, ValueError, KeyError, ArithmeticError):
            raise AuthError("token is malformed") from None
        principal = _principal(claims)
        iat: Any = claims.get("iat")
        if type(iat) not in (int, float):
            raise AuthError("iat must be a number")
        if self.max_ttl_s and principal.exp - iat > self.max_ttl_s:
            raise AuthError(f"token lifetime exceeds {self.max_ttl_s:g} s")
        return principal

    def _words(self, exc: jwt.PyJWTError) -> str:
        """The service's own words for PyJWT's refusal: its messages (library internals, which
        change between versions) never reach a client."""
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"token is missing claim {exc.claim}" if exc.claim in REQUIRED_CLAIMS else "token is missing a claim"
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return f"token algorithm must be {self.alg}"
        for kind, words in PYJWT_WORDS:
            if isinstance(exc, kind):
                return words
        return "token is invalid"


_NO_INVISIBLE: Final = " (no controls, bidi or zero-width characters)"


def _id_claim(value: object) -> bool:
    # isprintable() is False for every category in _UNSHOWABLE and for spaces other than U+0020.
    return isinstance(value, str) and 1 <= len(value) <= ID_MAX and value.isprintable()


def _principal(claims: dict[str, Any]) -> Principal:
    role: Any = claims.get("role")
    sub: Any = claims.get("sub")
    org: Any = claims.get("org")
    if not isinstance(role, str) or role not in ROLES:  # a list or object is unhashable: no TypeError
        raise AuthError("role must be driver, dispatcher or client")
    for name, value in (("sub", sub), ("org", org)):
        if not _id_claim(value):
            raise AuthError(f"{name}: must be a string of 1 to {ID_MAX} printable characters{_NO_INVISIBLE}")
    client = claims.get("client")
    if role == "client" and not _id_claim(client):
        raise AuthError(
            f"client: a client token needs a client claim of 1 to {ID_MAX} printable characters{_NO_INVISIBLE}"
        )
    display: Any = claims.get("name")
    if display == "":
        display = None
    if display is not None and not (
        isinstance(display, str)
        and len(display) <= NAME_MAX
        and not any(unicodedata.category(c) in _UNSHOWABLE for c in display)
    ):
        raise AuthError(f"name: must be a string of at most {NAME_MAX} printable characters{_NO_INVISIBLE}")
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        raise AuthError("exp must be a number")
    return Principal(
        role=role, sub=sub, org=org, exp=int(exp), client=client if role == "client" else None, name=display
    )


def _load_public_keys(source: str, alg: str) -> dict[str | None, Any]:
    text = source
    if not source.lstrip().startswith(("-----", "{")):
        text = Path(source).read_text()
    if text.lstrip().startswith("{"):
        jwks = jwt.PyJWKSet.from_dict(json.loads(text))
        keys: dict[str | None, Any] = {k.key_id: k.key for k in jwks.keys}
        if len(jwks.keys) == 1:
            keys[None] = jwks.keys[0].key
        return keys
    algo = jwt.get_algorithm_by_name(alg)
    return {None: algo.prepare_key(text)}


def mint_token(
    secret: str,
    *,
    role: str,
    sub: str,
    org: str,
    client: str | None = None,
    name: str | None = None,
    ttl_s: float = 3600.0,
    now: float | None = None,
    alg: str = "HS256",
) -> str:
    """A token for development and tests (`tracker token`). `secret` may be a private key PEM."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "role": role,
        "org": org,
        "aud": AUDIENCE,
        "iat": issued,
        "exp": issued + int(ttl_s),
    }
    if client is not None:
        claims["client"] = client
    if name is not None:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=alg)


def new_secret() -> str:
    return secrets.token_urlsafe(48)
