"""Tokens: the algorithm is pinned; bad, expired, foreign or unsigned tokens are refused."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect

from harness.clients import Peer
from harness.instances import Instance
from harness.tokens import SECRET, token
from tracker.auth import AuthError, TokenVerifier, mint_token


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "d-1", "role": "driver", "org": "acme", "aud": "tracker", "iat": now, "exp": now + 600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def unsigned(**over: Any) -> str:
    return _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(claims(**over)) + "."


BAD_TOKENS = {
    "wrong signature": jwt.encode(claims(), "another-secret-" + "y" * 40, algorithm="HS256"),
    "alg none": unsigned(),
    "wrong aud": jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256"),
    "no aud": jwt.encode(claims(aud=None), SECRET, algorithm="HS256"),
    "expired": jwt.encode(claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), SECRET, algorithm="HS256"),
    "no exp": jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
    "no iat": jwt.encode(claims(iat=None), SECRET, algorithm="HS256"),
    "bad role": jwt.encode(claims(role="admin"), SECRET, algorithm="HS256"),
    "garbage": "not.a.token",
    "HS384": jwt.encode(claims(), SECRET, algorithm="HS384"),
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_verifier_refuses(name: str) -> None:
    with pytest.raises(AuthError):
        TokenVerifier(alg="HS256", secret=SECRET).verify(BAD_TOKENS[name])


def test_verifier_accepts_and_reads_claims() -> None:
    p = TokenVerifier(alg="HS256", secret=SECRET).verify(
        mint_token(SECRET, role="client", sub="u", org="o", client="clinic-9", name="Ama")
    )
    assert (p.role, p.sub, p.org, p.client, p.name) == ("client", "u", "o", "clinic-9", "Ama")
    with pytest.raises(AuthError, match="client claim"):
        TokenVerifier(alg="HS256", secret=SECRET).verify(mint_token(SECRET, role="client", sub="u", org="o"))


def test_rs256_pinned_and_algorithm_confusion_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    verifier = TokenVerifier(alg="RS256", public_key=pem)
    assert verifier.verify(jwt.encode(claims(), key, algorithm="RS256")).sub == "d-1"
    # The public key used as an HMAC secret (algorithm confusion) must not pass.
    forged = jwt.api_jws.PyJWS().encode(json.dumps(claims()).encode(), "x" * 32, algorithm="HS256")
    header, payload, _ = forged.split(".")
    import hashlib
    import hmac

    sig = hmac.new(pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    confused = f"{header}.{payload}." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    with pytest.raises(AuthError):
        verifier.verify(confused)
    with pytest.raises(AuthError):
        verifier.verify(unsigned())


def test_es256_with_jwks_picks_key_by_kid(tmp_path: Any) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": []}
    for kid, key in (("2026-01", old), ("2026-06", new)):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwks["keys"].append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    verifier = TokenVerifier(alg="ES256", public_key=str(path))
    for kid, key in (("2026-01", old), ("2026-06", new)):
        assert verifier.verify(jwt.encode(claims(), key, algorithm="ES256", headers={"kid": kid})).org == "acme"
    with pytest.raises(AuthError):  # signed by one key, claiming the other's kid
        verifier.verify(jwt.encode(claims(), old, algorithm="ES256", headers={"kid": "2026-06"}))


@pytest.mark.parametrize("name", ["wrong signature", "alg none", "wrong aud", "expired"])
@pytest.mark.parametrize("path", ["/v1/driver", "/v1/live"])
async def test_endpoints_refuse_bad_tokens_with_4000(instance: Instance, name: str, path: str) -> None:
    peer = Peer(await connect(instance.url + path))
    await peer.send({"type": "hello", "token": BAD_TOKENS[name]})
    frame = await peer.recv()
    assert frame["type"] == "error" and frame["code"] == "unauthorized"
    assert await peer.closed() == 4000


async def test_wrong_role_per_endpoint(instance: Instance, org: str) -> None:
    peer = Peer(await connect(instance.url + "/v1/driver"))
    await peer.send({"type": "hello", "token": token("dispatcher", "u", org)})
    assert (await peer.recv())["code"] == "unauthorized"
    assert await peer.closed() == 4000
    peer = Peer(await connect(instance.url + "/v1/live"))
    await peer.send({"type": "hello", "token": token("driver", "d", org)})
    assert (await peer.recv())["code"] == "unauthorized"
    assert await peer.closed() == 4000


async def test_no_hello_in_time_closes(start_instance: Any) -> None:
    inst = await start_instance(hello_timeout_s=0.3)
    peer = Peer(await connect(inst.url + "/v1/driver"))
    assert await peer.closed(timeout=3) == 4000


async def test_token_expiring_on_open_connection_closes_4003(start_instance: Any, org: str) -> None:
    from harness.clients import Phone

    inst = await start_instance(jwt_leeway_s=0.0)
    phone = await Phone.connect(inst.url, token("driver", "d-1", org, ttl_s=1))
    assert await phone.closed(timeout=5) == 4003
