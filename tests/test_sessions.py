"""The sans-I/O driver and viewer sessions (tracker/protocol/driver.py, viewer.py): bytes and the
time go in, frames and a close decision come out. No event loop, no socket, no sleep."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tracker.auth import TokenVerifier, mint_token
from tracker.protocol.bucket import TokenBucket
from tracker.protocol.driver import DriverSession
from tracker.protocol.events import Position, Scan
from tracker.protocol.session import State
from tracker.protocol.subscribe import Filter
from tracker.protocol.viewer import ViewerSession

SECRET = "session-secret-" + "x" * 40
NOW_MS = 1_764_240_000_000
VERIFIER = TokenVerifier(alg="HS256", secret=SECRET, max_ttl_s=86_400)


def tok(role: str = "driver", sub: str = "d-1", org: str = "acme", **kw: Any) -> str:
    return mint_token(SECRET, role=role, sub=sub, org=org, **kw)


def hello(token: str | None = None, **kw: Any) -> bytes:
    return orjson.dumps({"type": "hello", **({"token": token} if token else {}), **kw})


def sent(session: DriverSession | ViewerSession) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in session.data_to_send()]


def pos(seq: int, ts: int = NOW_MS, **kw: Any) -> dict[str, Any]:
    return {"type": "pos", "seq": seq, "ts": ts, "lat": -1.29, "lon": 36.82, **kw}


def driver(*, rate: float = 10.0, burst: int = 100, max_batch: int = 300) -> DriverSession:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=max_batch, leeway_s=30)
    assert session.receive_hello(hello(tok())) is not None
    session.welcome(1041, NOW_MS, TokenBucket(rate, burst, 0.0))
    assert sent(session)[0]["type"] == "welcome"
    return session


# -- hello ----------------------------------------------------------------------------------------


def test_hello_then_welcome_is_the_first_frame() -> None:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    principal = session.receive_hello(hello(tok(name="Amina")))
    assert principal is not None and principal.key == ("acme", "d-1") and principal.name == "Amina"
    assert session.data_to_send() == [] and session.state is State.HELLO  # nothing before welcome
    session.welcome(1041, NOW_MS, TokenBucket(10, 100, 0.0))
    assert sent(session) == [
        {
            "type": "welcome",
            "driver": "d-1",
            "last_seq": 1041,
            "server_time": NOW_MS,
            "max_frame": 65_536,
            "max_batch": 300,
        }
    ]
    assert session.state is State.OPEN


def test_hello_token_may_come_from_the_bearer_header() -> None:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    assert session.receive_hello(hello(), bearer=tok()) is not None


@pytest.mark.parametrize(
    ("frame", "code", "error"),
    [
        (b"not json", 1008, "protocol"),
        (b'{"type":"pos","seq":1}', 1008, "protocol"),
        (hello("not-a-token"), 4000, "unauthorized"),
        (hello(tok(role="dispatcher")), 4000, "unauthorized"),
        (hello(), 4000, "unauthorized"),
        (b"x" * 70_000, 1009, "protocol"),
    ],
)
def test_a_bad_hello_decides_the_close(frame: bytes, code: int, error: str) -> None:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    assert session.receive_hello(frame) is None
    assert [f["code"] for f in sent(session)] == [error]
    assert session.close_code == code and session.state is State.CLOSED


def test_no_hello_in_time_closes_4000_without_a_frame() -> None:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    session.hello_timeout()
    assert session.data_to_send() == [] and (session.close_code, session.close_reason) == (4000, "no hello in time")


# -- events ---------------------------------------------------------------------------------------


def test_events_are_validated_and_returned_in_order() -> None:
    session = driver()
    events = session.receive(
        orjson.dumps(
            {
                "type": "batch",
                "items": [
                    pos(5),
                    {"type": "scan", "seq": 6, "ts": NOW_MS, "package": "PKG-1", "event": "pickup"},
                    pos(7, lat=91),
                ],
            }
        ),
        NOW_MS,
        1.0,
    )
    assert [type(e) for e in events] == [Position, Scan] and [e.seq for e in events] == [5, 6]
    assert sent(session) == [
        {"type": "error", "code": "invalid", "seq": 7, "message": "lat: must be a number between -90 and 90"}
    ]
    assert session.refused == ["invalid"] and session.close_code is None  # a bad event is refused alone


def test_a_batch_over_max_batch_is_too_large_with_its_seqs() -> None:
    session = driver(max_batch=3)
    assert session.receive(orjson.dumps({"type": "batch", "items": [pos(s) for s in (1, 2, 3, 9)]}), NOW_MS, 1.0) == []
    assert sent(session) == [
        {"type": "error", "code": "too_large", "ranges": [[1, 3], [9, 9]], "message": "a batch carries at most 3 items"}
    ]
    assert session.receive(b'{"type":"batch","items":{}}', NOW_MS, 1.0) == []
    assert sent(session)[0]["code"] == "invalid"


def test_the_rate_limit_follows_the_clock_it_is_given() -> None:
    session = driver(rate=1.0, burst=2)
    frame = orjson.dumps({"type": "batch", "items": [pos(s) for s in (1, 2, 3)]})
    assert [e.seq for e in session.receive(frame, NOW_MS, 0.0)] == [1, 2]
    errors = sent(session)
    assert [(e["code"], e["seq"]) for e in errors] == [("rate_limited", 3)] and errors[0]["retry_ms"] == 1001
    assert session.receive(orjson.dumps(pos(3)), NOW_MS, 0.5) == []  # half a token
    assert [e.seq for e in session.receive(orjson.dumps(pos(3)), NOW_MS, 1.5)] == [3]


@pytest.mark.parametrize(
    ("frame", "code"),
    [(b"{", 1008), (b'{"type":"subscribe"}', 1008), (b'{"type":1}', 1008), (b"x" * 70_000, 1009)],
)
def test_protocol_errors_close_and_nothing_follows(frame: bytes, code: int) -> None:
    session = driver()
    assert session.receive(frame, NOW_MS, 1.0) == []
    assert [f["code"] for f in sent(session)] == ["protocol"] and session.close_code == code
    assert session.receive(orjson.dumps(pos(1)), NOW_MS, 1.0) == [] and session.data_to_send() == []


def test_refresh_same_identity_is_welcomed_again() -> None:
    session = driver()
    before = session.expires_at
    fresh = tok(ttl_s=7200)
    assert session.receive(orjson.dumps({"type": "refresh", "token": fresh}), NOW_MS, 1.0) == []
    frame = sent(session)[0]
    assert frame["type"] == "welcome" and frame["refreshed"] is True and "last_seq" not in frame
    assert session.expires_at > before and session.close_code is None


@pytest.mark.parametrize(("token", "error"), [(tok(sub="d-2"), "forbidden"), ("garbage", "unauthorized")])
def test_refresh_for_another_identity_or_a_bad_token_closes_4000(token: str, error: str) -> None:
    session = driver()
    session.receive(orjson.dumps({"type": "refresh", "token": token}), NOW_MS, 1.0)
    assert [f["code"] for f in sent(session)] == [error] and session.close_code == 4000


def test_expiry_closes_4003() -> None:
    session = driver()
    assert session.expires_at == session.principal.exp + 30  # type: ignore[union-attr]
    session.expire()
    assert (session.close_code, session.close_reason) == (4003, "token expired")


# -- viewer ---------------------------------------------------------------------------------------


def viewer(role: str = "dispatcher", **kw: Any) -> ViewerSession:
    session = ViewerSession(
        VERIFIER, max_frame=65_536, leeway_s=30, subscribe_rate=2.0, subscribe_burst=2, max_ids=3, now_s=0.0
    )
    assert session.receive_hello(hello(tok(role=role, sub="u-1", **kw))) is not None
    session.welcome()
    return session


def test_viewer_welcome_names_role_org_and_client() -> None:
    assert sent(viewer("client", client="c-9")) == [
        {"type": "welcome", "role": "client", "org": "acme", "client": "c-9"}
    ]
    session = ViewerSession(
        VERIFIER, max_frame=65_536, leeway_s=30, subscribe_rate=2.0, subscribe_burst=2, max_ids=3, now_s=0.0
    )
    assert session.receive_hello(hello(tok())) is None and session.close_code == 4000  # a driver token


def test_subscribes_are_paced_and_the_newest_waiting_one_wins() -> None:
    session = viewer()
    assert session.next_subscribe(0.0) is None  # nothing asked
    for drivers in (["a"], ["b"]):
        session.receive(orjson.dumps({"type": "subscribe", "drivers": drivers}))
        flt = session.next_subscribe(0.0)
        assert isinstance(flt, Filter) and flt.drivers == frozenset(drivers)
    session.receive(orjson.dumps({"type": "subscribe", "drivers": ["c"]}))
    session.receive(orjson.dumps({"type": "subscribe", "drivers": ["d"], "bbox": [36.6, -1.45, 37.1, -1.1]}))
    wait = session.next_subscribe(0.0)
    assert wait == pytest.approx(0.5)  # the burst is spent: one token per 0.5 s
    flt = session.next_subscribe(0.5)
    assert isinstance(flt, Filter) and flt.drivers == frozenset({"d"}) and flt.bbox == (36.6, -1.45, 37.1, -1.1)
    assert session.next_subscribe(10.0) is None  # "c" never gets a snapshot of its own


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "subscribe", "drivers": ["a", "b"], "packages": ["c", "d"]},  # over max_ids
        {"type": "subscribe", "drivers": "d-1"},
        {"type": "subscribe", "bbox": [0, 10, 1, 5]},
        {"type": "pos"},
    ],
)
def test_a_bad_subscribe_or_frame_is_a_protocol_error(frame: dict[str, Any]) -> None:
    session = viewer()
    session.data_to_send()
    session.receive(orjson.dumps(frame))
    assert [f["code"] for f in sent(session)] == ["protocol"] and session.close_code == 1008
    assert session.next_subscribe(0.0) is None


def test_viewer_refresh_keeps_the_client_claim() -> None:
    session = viewer("client", client="c-9")
    session.data_to_send()
    session.receive(orjson.dumps({"type": "refresh", "token": tok(role="client", sub="u-1", client="c-9")}))
    assert sent(session) == [{"type": "welcome", "role": "client", "org": "acme", "client": "c-9", "refreshed": True}]
    session.receive(orjson.dumps({"type": "refresh", "token": tok(role="client", sub="u-1", client="c-8")}))
    assert [f["code"] for f in sent(session)] == ["forbidden"] and session.close_code == 4000
