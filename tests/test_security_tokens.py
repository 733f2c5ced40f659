"""Tokens beyond tests/test_auth.py: iat in the future, leeway, lifetime cap, mixed JWKS, a fuzzed
verifier that only ever answers with a Principal or AuthError; refresh and 4003 on both endpoints."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from harness.clients import Dash, Peer, Phone, pos
from harness.instances import Instance
from harness.tokens import SECRET, token
from tracker.auth import ID_MAX, ROLES, AuthError, Principal, TokenVerifier
from tracker.config import ConfigError, Settings


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "d-1", "role": "driver", "org": "acme", "aud": "tracker", "iat": now, "exp": now + 600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs256(header: Any, payload: Any, secret: str = SECRET) -> str:
    """A token signed with HS256 whatever its header says (raw JSON, so anything can be in it)."""
    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return signing + "." + b64(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())


VERIFIER = TokenVerifier(alg="HS256", secret=SECRET, leeway_s=30, max_ttl_s=86_400)


def test_iat_in_the_future_beyond_the_leeway_is_refused() -> None:
    now = int(time.time())
    assert VERIFIER.verify(hs256({"alg": "HS256"}, claims(iat=now + 20, exp=now + 600))).sub == "d-1"
    with pytest.raises(AuthError, match="iat"):
        VERIFIER.verify(hs256({"alg": "HS256"}, claims(iat=now + 60, exp=now + 600)))
    with pytest.raises(AuthError, match="iat"):
        VERIFIER.verify(hs256({"alg": "HS256"}, claims(iat=str(now), exp=now + 600)))


def test_clock_skew_allowance_is_configurable_and_small() -> None:
    now = int(time.time())
    expired_20s_ago = hs256({"alg": "HS256"}, claims(iat=now - 600, exp=now - 20))
    assert TokenVerifier(alg="HS256", secret=SECRET, leeway_s=30).verify(expired_20s_ago).sub == "d-1"
    with pytest.raises(AuthError, match="expired"):
        TokenVerifier(alg="HS256", secret=SECRET, leeway_s=5).verify(expired_20s_ago)
    with pytest.raises(ConfigError, match="LEEWAY"):
        Settings.from_env({"TRACKER_JWT_LEEWAY_S": "3600"})
    assert Settings.from_env({"TRACKER_JWT_LEEWAY_S": "5"}).jwt_leeway_s == 5.0


def test_token_lifetime_is_capped() -> None:
    now = int(time.time())
    assert Settings().jwt_max_ttl_s == 86_400
    VERIFIER.verify(hs256({"alg": "HS256"}, claims(iat=now, exp=now + 86_400)))
    with pytest.raises(AuthError, match="lifetime"):
        VERIFIER.verify(hs256({"alg": "HS256"}, claims(iat=now, exp=now + 86_401)))
    with pytest.raises(AuthError, match="lifetime"):  # a 1e300 exp is no way around it
        VERIFIER.verify(hs256({"alg": "HS256"}, claims(iat=now, exp=1e300)))


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", "HS512", "RS256", "ES256", "PS256", "EdDSA"])
def test_every_other_algorithm_is_refused(alg: str) -> None:
    with pytest.raises(AuthError, match="algorithm"):
        VERIFIER.verify(hs256({"alg": alg, "typ": "JWT"}, claims()))


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    cls = jwt.algorithms.ECAlgorithm if alg == "ES256" else jwt.algorithms.RSAAlgorithm
    return {**json.loads(cls.to_jwk(key.public_key())), "kid": kid, "alg": alg, "use": "sig"}


def test_mixed_jwks_key_of_another_type_and_unknown_kid_are_refused() -> None:
    """A JWKS that also holds an RSA key (a rotation between algorithms): an ES256 token naming the RSA
    key's kid used to escape as a TypeError (a 500, a 1011); it is an AuthError now."""
    ec_key, rsa_key = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)
    jwks = json.dumps({"keys": [_jwk(ec_key, "ec-1", "ES256"), _jwk(rsa_key, "rsa-1", "RS256")]})
    verifier = TokenVerifier(alg="ES256", public_key=jwks)
    assert verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})).sub == "d-1"
    for kid in ("rsa-1", "nobody"):
        with pytest.raises(AuthError):
            verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": kid}))
    with pytest.raises(AuthError):  # no kid, and several keys: which one? none.
        verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256"))
    with pytest.raises(AuthError, match="algorithm"):
        verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"}))
    # Algorithm confusion with a JWKS: the public key's JSON as an HMAC secret.
    jwk_json = json.dumps(_jwk(ec_key, "ec-1", "ES256"))
    with pytest.raises(AuthError):
        verifier.verify(hs256({"alg": "HS256", "kid": "ec-1"}, claims(), secret=jwk_json))


# -- the verifier, fuzzed ------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _near(value: Any) -> st.SearchStrategy[Any]:
    """Mostly `value` (so that some tokens pass and the checks after the signature run), else junk."""
    return st.one_of(st.just(value), st.just(value), st.just(value), JSON)


def _at(lo: int, hi: int) -> st.SearchStrategy[int]:
    """A time from now + lo to now + hi (drawn as an offset: the same draws mean the same token)."""
    return st.integers(lo, hi).map(lambda offset: int(time.time()) + offset)


@st.composite
def _clean_claims(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(sorted(ROLES)))
    out = {
        "sub": "d-1",
        "role": role,
        "org": "acme",
        "aud": "tracker",
        "iat": draw(_at(-3600, 20)),
        "exp": draw(_at(60, 7200)),
    }
    if role == "client":
        out["client"] = "c-1"
    return out


@st.composite
def tokens(draw: st.DrawFn) -> str:
    header = {"alg": draw(_near("HS256"))}
    # Hypothesis leans towards small draws (0 most of all): 0 takes the common branch, never the odd one.
    if draw(st.integers(0, 3)) == 3:  # odd header parameters now and then
        header.update(draw(st.fixed_dictionaries({}, optional={"kid": JSON, "typ": JSON, "crit": JSON})))
    payload = draw(
        st.fixed_dictionaries(
            {
                "sub": _near("d-1"),
                "role": st.one_of(st.sampled_from(sorted(ROLES)), st.sampled_from(sorted(ROLES)), JSON),
                "org": _near("acme"),
                "aud": st.sampled_from(["tracker", "tracker", ["tracker", "x"], "other"]) | JSON,
                "iat": st.one_of(_at(-3600, 60), _at(-3600, 60), _at(-200_000, -100_000), JSON),
                "exp": st.one_of(_at(-60, 7200), _at(-60, 7200), _at(86_400, 200_000), JSON),
            },
            optional={"client": _near("c-1"), "name": _near("Amina"), "nbf": _at(-100, 100) | JSON},
        )
    )
    shape = draw(st.integers(0, 3))
    if shape == 0:  # a well-formed token, so that the checks after the signature run
        header, payload = {"alg": "HS256"}, {**payload, **draw(_clean_claims())}
    elif shape == 1:  # a required claim missing
        payload.pop(draw(st.sampled_from(sorted(payload))))
    kind = draw(st.sampled_from(["signed", "signed", "signed", "wrong key", "garbled", "text"]))
    if kind == "text":
        return draw(st.text(max_size=300))
    tok = hs256(header, payload, SECRET if kind != "wrong key" else SECRET + "!")
    if kind == "garbled":
        i = draw(st.integers(0, len(tok) - 1))
        tok = tok[:i] + draw(st.text(alphabet="A.=-_/+\x00é", min_size=1, max_size=3)) + tok[i + 1 :]
    return tok


def test_the_token_generator_reaches_both_verdicts() -> None:
    """The property below is only as good as its inputs: some tokens must pass, many must not."""
    roles: set[str] = set()
    accepted = refused = 0

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(tokens())
    def collect(tok: str) -> None:
        nonlocal accepted, refused
        try:
            roles.add(VERIFIER.verify(tok).role)
            accepted += 1
        except AuthError:
            refused += 1

    collect()
    assert accepted >= 5 and roles and refused >= 30, (accepted, roles, refused)


@settings(max_examples=150, deadline=None)
@given(tokens())
def test_verifier_answers_a_principal_or_autherror_and_never_anything_else(tok: str) -> None:
    try:
        p = VERIFIER.verify(tok)
    except AuthError:
        return
    assert isinstance(p, Principal)
    assert p.role in ROLES
    for value in (p.sub, p.org):
        assert isinstance(value, str) and 1 <= len(value) <= ID_MAX and value.isprintable()
    assert (p.client is not None) == (p.role == "client")
    assert p.exp >= time.time() - VERIFIER.leeway_s - 1
    decoded = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))
    assert decoded["aud"] == "tracker" or "tracker" in decoded["aud"]


# -- on the endpoints ----------------------------------------------------------------------------

ROLE = {"/v1/driver": "driver", "/v1/live": "dispatcher"}


async def open_(inst: Instance, path: str, tok: str) -> Peer:
    if path == "/v1/driver":
        return await Phone.connect(inst.url, tok)
    return await Dash.connect(inst.url, tok)


@pytest.mark.parametrize("path", ["/v1/driver", "/v1/live"])
async def test_token_lifetime_over_the_cap_is_refused_at_hello(start_instance: Any, org: str, path: str) -> None:
    inst = await start_instance(jwt_max_ttl_s=3600)
    peer = Peer(await connect(inst.url + path))
    await peer.send({"type": "hello", "token": token(ROLE[path], "u-1", org, ttl_s=7200)})
    frame = await peer.recv()
    assert frame["code"] == "unauthorized" and "lifetime" in frame["message"]
    assert await peer.closed() == 4000


IDENTITY_CHANGES = [  # (endpoint, the connection's identity, the refresh token's identity)
    ("/v1/driver", ("driver", "u-1", "", None), ("driver", "u-2", "", None)),
    ("/v1/driver", ("driver", "u-1", "", None), ("driver", "u-1", "-b", None)),
    ("/v1/driver", ("driver", "u-1", "", None), ("dispatcher", "u-1", "", None)),
    ("/v1/live", ("dispatcher", "u-1", "", None), ("dispatcher", "u-2", "", None)),
    ("/v1/live", ("dispatcher", "u-1", "", None), ("dispatcher", "u-1", "-b", None)),
    ("/v1/live", ("dispatcher", "u-1", "", None), ("client", "u-1", "", "c-1")),
    ("/v1/live", ("client", "u-1", "", "c-1"), ("client", "u-1", "", "c-2")),
    ("/v1/live", ("client", "u-1", "", "c-1"), ("dispatcher", "u-1", "", None)),
]


async def test_refresh_for_another_identity_is_forbidden_and_closes(instance: Instance, org: str) -> None:
    def tok(role: str, sub: str, org_suffix: str, client: str | None) -> str:
        return token(role, sub, org + org_suffix, client=client)

    for path, mine, theirs in IDENTITY_CHANGES:
        peer = await open_(instance, path, tok(*mine))
        await peer.send({"type": "refresh", "token": tok(*theirs)})
        frame = await peer.recv()
        assert frame["type"] == "error" and frame["code"] == "forbidden", (path, mine, theirs, frame)
        assert await peer.closed() == 4000, (path, mine, theirs)


@pytest.mark.parametrize("path", ["/v1/driver", "/v1/live"])
async def test_refresh_with_a_bad_token_is_unauthorized_and_closes(instance: Instance, org: str, path: str) -> None:
    peer = await open_(instance, path, token(ROLE[path], "u-1", org))
    unsigned = (
        b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims(role=ROLE[path], sub="u-1", org=org)).encode()) + "."
    )
    await peer.send({"type": "refresh", "token": unsigned})
    frame = await peer.recv()
    assert frame["type"] == "error" and frame["code"] == "unauthorized"
    assert await peer.closed() == 4000


@pytest.mark.parametrize("path", ["/v1/driver", "/v1/live"])
async def test_refresh_postpones_the_4003_close(start_instance: Any, org: str, path: str) -> None:
    inst = await start_instance(jwt_leeway_s=0.0)
    role = ROLE[path]
    refreshed = await open_(inst, path, token(role, "u-1", org, ttl_s=3))
    await refreshed.send({"type": "refresh", "token": token(role, "u-1", org, ttl_s=600)})
    answer = await refreshed.recv()
    assert answer["type"] == "welcome" and answer["refreshed"] is True
    # A witness opened later with the same lifetime: when it is closed with 4003, the first
    # token has expired too (its timer was due no later), yet its connection stays usable.
    witness = await open_(inst, path, token(role, "u-2", org, ttl_s=3))
    assert await witness.closed(timeout=8) == 4003
    if isinstance(refreshed, Phone):
        await refreshed.send(pos(1))
        await refreshed.until(lambda p: p.acked == {1})
    else:
        assert isinstance(refreshed, Dash)
        assert (await refreshed.subscribe({}))["drivers"] == []


def test_generated_secrets_are_owner_only_files(tmp_path: Any) -> None:
    """Without TRACKER_JWT_SECRET / TRACKER_CUSTODY_KEY (development), the keys generated under the data
    folder are readable by their owner only, and kept: the same key after a restart."""
    from tracker.app import make_verifier
    from tracker.custody.extension import custody_key

    settings = Settings(data_dir=tmp_path)
    make_verifier(settings)
    key = custody_key(settings)
    for name in ("jwt-secret", "custody-key"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    assert custody_key(settings) == key
