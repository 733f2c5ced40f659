"""Odd values without a socket (issue 11, items 4, 5 and 9): the frame decoder, the driver and viewer
sessions, the event validator and the token verifier. Bytes and the time go in, frames and a close
decision come out; no loop, no sleep. tests/test_edges_values.py drives the same over real sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from typing import Any

import orjson
import pytest

from tracker.auth import AuthError, TokenVerifier, mint_token
from tracker.protocol import frames
from tracker.protocol.bucket import TokenBucket
from tracker.protocol.driver import DriverSession
from tracker.protocol.events import Position, Refusal, Scan, check_event
from tracker.protocol.subscribe import parse_subscribe
from tracker.protocol.viewer import ViewerSession

SECRET = "odd-secret-" + "x" * 40
NOW_MS = 1_764_240_000_000
NOW_S = NOW_MS / 1000
VERIFIER = TokenVerifier(alg="HS256", secret=SECRET, max_ttl_s=86_400)


def tok(role: str = "driver", sub: str = "d-1", org: str = "acme", **kw: Any) -> str:
    return mint_token(SECRET, role=role, sub=sub, org=org, **kw)


def sent(session: DriverSession | ViewerSession) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in session.data_to_send()]


def driver() -> DriverSession:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    assert session.receive_hello(orjson.dumps({"type": "hello", "token": tok()})) is not None
    session.welcome(0, NOW_MS, TokenBucket(10, 100, 0.0))
    session.data_to_send()
    return session


def pos(seq: int, **raw: str) -> str:
    text = f'{{"type":"pos","seq":{seq},"ts":{NOW_MS},"lat":-1.29,"lon":36.82'
    return text + "".join(f',"{k}":{v}' for k, v in raw.items()) + "}"


def scan(seq: int, package: str = '"PKG-1"', **raw: str) -> str:
    text = f'{{"type":"scan","seq":{seq},"ts":{NOW_MS},"event":"pickup","package":{package}'
    return text + "".join(f',"{k}":{v}' for k, v in raw.items()) + "}"


# -- the decoder --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"x","v":1e400}',
        '{"type":"x","v":-1e400}',
        '{"type":"x","v":"\\ud83d"}',
        '{"type":"x","v":"\\udc00 trailing low half"}',
        '{"type":"x","v":' + "9" * 5000 + "}",  # more digits than Python parses as an int
    ],
)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_valid_json_that_orjson_refuses_is_decoded(text: str, as_bytes: bool) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)
    obj = frames.decode(text.encode() if as_bytes else text)
    assert obj["type"] == "x" and "v" in obj


@pytest.mark.parametrize(
    "data", ['{"type":"x","v":NaN}', '{"type":"x","v":Infinity}', '{"type":"x"', b"\xff\xfe{}", "[" * 5000 + "]" * 5000]
)
def test_what_is_not_json_is_still_refused_1008(data: str | bytes) -> None:
    with pytest.raises(frames.ProtocolError) as exc:
        frames.decode(data)
    assert exc.value.close_code == 1008


# -- the validator ------------------------------------------------------------------------------


def test_odd_optional_values_become_null_and_odd_required_values_refuse() -> None:
    ev = check_event(frames.decode(pos(1, bat="1e400", spd="-1e400", acc="1" + "0" * 400)), NOW_MS)
    assert isinstance(ev, Position) and (ev.bat, ev.spd, ev.acc) == (None, None, None)
    ev = check_event(frames.decode(scan(2, note='"cut \\ud83d"', recipient='"\\udc00"', temp_c="1e400")), NOW_MS)
    assert isinstance(ev, Scan) and (ev.note, ev.temp_c) == (None, None)
    for bad in (pos(3, lat="1e400"), scan(4, package='"PKG-\\ud83d"'), scan(5, package='"PKG\\u202e1"')):
        ev = check_event(frames.decode(bad), NOW_MS)
        assert isinstance(ev, Refusal) and (ev.code, ev.seq) == ("invalid", int(bad.split('"seq":')[1].split(",")[0]))


@pytest.mark.parametrize(
    "char",
    [
        "\u200b",
        "\u200c",
        "\u200d",
        "\u2060",
        "\ufeff",
        *map(chr, range(0x202A, 0x202F)),
        *map(chr, range(0x2066, 0x206A)),
    ],
)
def test_package_ids_with_bidi_or_zero_width_characters_are_refused(char: str) -> None:
    ev = check_event({"type": "scan", "seq": 7, "ts": NOW_MS, "package": f"PKG{char}1", "event": "pickup"}, NOW_MS)
    assert isinstance(ev, Refusal) and (ev.code, ev.seq) == ("invalid", 7)
    note = check_event(
        {"type": "scan", "seq": 8, "ts": NOW_MS, "package": "PKG-1", "event": "pickup", "note": f"a{char}b"}, NOW_MS
    )
    assert isinstance(note, Scan) and note.note == f"a{char}b"  # free text may hold them (Arabic, Hebrew)


# -- the sessions -------------------------------------------------------------------------------


def test_a_batch_with_odd_values_is_answered_item_by_item_and_stays_open() -> None:
    session = driver()
    items = [pos(s) for s in range(1, 11)]
    items[3] = pos(4, bat="1e400")
    items[5] = scan(6, note='"\\ud83d"')
    items[7] = pos(8, lon="-1e400")
    events = session.receive('{"type":"batch","items":[' + ",".join(items) + "]}", NOW_MS, NOW_S)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert [(f["code"], f["seq"]) for f in sent(session)] == [("invalid", 8)]
    assert session.close_code is None
    by_seq = {e.seq: e for e in events}
    assert by_seq[4].bat is None and by_seq[6].note is None  # type: ignore[union-attr]


def test_hello_with_odd_values_is_welcomed_on_both_sessions() -> None:
    extra = ',"device":"\\ud83d","x":1e400}'
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    assert session.receive_hello(orjson.dumps({"type": "hello", "token": tok()})[:-1] + extra.encode()) is not None
    viewer = ViewerSession(
        VERIFIER, max_frame=65_536, leeway_s=30, subscribe_rate=1, subscribe_burst=5, max_ids=100, now_s=0.0
    )
    hello = orjson.dumps({"type": "hello", "token": tok("dispatcher", "u-1")})[:-1] + extra.encode()
    assert viewer.receive_hello(hello) is not None
    viewer.welcome()
    viewer.data_to_send()
    viewer.receive('{"type":"subscribe","drivers":["d-1","\\ud83d"],"zoom":1e400}')
    assert viewer.close_code is None and viewer.waiting is not None and "d-1" in (viewer.waiting.drivers or ())
    viewer.receive('{"type":"subscribe","bbox":[-1e400,-10,10,10]}')
    [error] = sent(viewer)
    assert error["code"] == "protocol" and "bbox" in error["message"] and viewer.close_code == 1008


# -- tokens: every string claim, and the service's own words ------------------------------------


def _b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(payload: Any, header: Any = None, secret: str = SECRET) -> str:
    head = _b64(header or {"alg": "HS256", "typ": "JWT"})
    body = _b64(payload)
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def claims(**changes: Any) -> dict[str, Any]:
    t = int(time.time())
    base = {"sub": "d-1", "role": "driver", "org": "acme", "aud": "tracker", "iat": t, "exp": t + 600}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "Amina \ud83d"}, "name"),
        ({"name": "Ami\u202ena"}, "name"),
        ({"name": "Ami\u200bna"}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": ["Amina"]}, "name"),
        ({"sub": "d-\ud83d"}, "sub"),
        ({"sub": "d-\u2066"}, "sub"),
        ({"org": "acme\ufeff"}, "org"),
        ({"role": "client", "client": "st-marys\u202e"}, "client"),
        ({"role": "client", "client": "st\u200d-marys"}, "client"),
    ],
)
def test_every_string_claim_is_validated(changes: dict[str, Any], field: str) -> None:
    token = signed(claims(**changes))
    with pytest.raises(AuthError, match=rf"^{field}: "):
        VERIFIER.verify(token)


def test_names_of_every_script_and_emoji_are_accepted() -> None:
    for name in ("Amina Wanjiru", "José Núñez", "Ngọc Ánh", "محمد", "יעל", "张伟", "Kofi 😀", None, ""):
        p = VERIFIER.verify(signed(claims(name=name)))
        assert p.name == (name or None)


# Every message the verifier may give: the service's own words (a claim's name filled in).
OWN_WORDS = re.compile(
    r"missing token|token expired|token signature is invalid|token is malformed|token is invalid"
    r"|token audience must be tracker|token is not valid yet \(iat or nbf in the future\)"
    r"|token claim (iat must be a number|jti must be a string)|token is missing claim (exp|iat|aud|sub|role|org)"
    r"|token algorithm must be HS256|unknown key id|iat must be a number|exp must be a number"
    r"|token lifetime exceeds .*|role must be driver, dispatcher or client"
    r"|(sub|org|name|client): .*must be .*"
)
PYJWT_WORDS = (
    "Signature verification failed",
    "Not enough segments",
    "Invalid",
    "padding",
    "claim (",
    "integer",
    "Expecting",
)


def bad_tokens() -> dict[str, str]:
    t = int(time.time())
    good = signed(claims())
    head, body, sig = good.split(".")
    cases = {
        "wrong key": signed(claims(), secret="another"),
        "two segments": f"{head}.{body}",
        "garbled header": f"!{head[1:]}.{body}.{sig}",
        "header not JSON": f"{_b64(b'not json')}.{body}.{sig}",
        "payload not JSON": signed(b"not json"),
        "payload a list": signed([1, 2]),
        "bad padding": f"{head}.{body}.{sig}===x",
        "wrong audience": signed(claims(aud="other")),
        "audience list without tracker": signed(claims(aud=["x", "y"])),
        "exp a string": signed(claims(exp="soon")),
        "iat a string": signed(claims(iat="now")),
        "iat in the future": signed(claims(iat=t + 10**6, exp=t + 10**6 + 60)),
        "nbf in the future": signed(claims(nbf=t + 10**4)),
        "expired": signed(claims(iat=t - 7200, exp=t - 3600)),
        "sub a number": signed(claims(sub=17)),
        "jti a number": signed(claims(jti=17)),
        "alg none": f"{_b64({'alg': 'none'})}.{body}.",
        "alg RS256": f"{_b64({'alg': 'RS256'})}.{body}.{sig}",
        "kid a list": signed(claims(), header={"alg": "HS256", "kid": [1]}),
        "lone surrogate": good[:10] + "\ud83d" + good[11:],
        "non-ASCII": good[:10] + "é" + good[11:],
        "NUL": good[:10] + "\x00" + good[11:],
    }
    for claim in ("exp", "iat", "aud", "sub", "role", "org"):
        cases[f"no {claim}"] = signed(claims(**{claim: ...}))
    return cases


@pytest.mark.parametrize(("case", "token"), bad_tokens().items(), ids=bad_tokens().keys())
def test_refusals_are_in_the_services_words_never_pyjwts(case: str, token: str) -> None:
    with pytest.raises(AuthError) as exc:
        TokenVerifier(alg="HS256", secret=SECRET, max_ttl_s=86_400, leeway_s=30).verify(token)
    message = str(exc.value)
    assert OWN_WORDS.fullmatch(message), (case, message)
    assert not any(words in message for words in PYJWT_WORDS), (case, message)


def test_the_fixed_messages_name_the_cause() -> None:
    cases = bad_tokens()
    expected = {
        "wrong key": "token signature is invalid",
        "two segments": "token is malformed",
        "wrong audience": "token audience must be tracker",
        "no exp": "token is missing claim exp",
        "no org": "token is missing claim org",
        "lone surrogate": "token is malformed",
        "iat in the future": "token is not valid yet (iat or nbf in the future)",
    }
    for case, message in expected.items():
        with pytest.raises(AuthError) as exc:
            VERIFIER.verify(cases[case])
        assert str(exc.value) == message, case


def test_subscribe_ids_no_table_can_hold_name_nothing_and_are_dropped() -> None:
    flt = parse_subscribe(
        frames.decode('{"type":"subscribe","drivers":["d-1","\\ud83d","a\\u0000"],"packages":["\\udc00"]}')
    )
    assert flt.drivers == frozenset({"d-1"}) and flt.packages == frozenset()  # follows no package, not every one
