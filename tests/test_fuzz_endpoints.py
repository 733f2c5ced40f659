"""Fuzzing the running endpoints (real uvicorn, PostgreSQL, Redis) with frames generated from the JSON
Schemas and mutated (tests/test_fuzz_frames.py), and the HTTP API with odd paths, queries and bodies.

Driver endpoint, per frame, the answer the protocol promises: an `ack` for every storable event, an
`invalid` error naming the seq of every refused one (the connection stays usable: a following valid
event is acked), `protocol` and close 1008 for what is not a frame, `unauthorized` and 4000 for a bad
refresh; every answer matches its schema; what is stored is exactly what was validated, under the
token's identity, and nothing else. Dashboards: a snapshot for every well-formed subscribe, with
nothing of another org; protocol 1008 otherwise. HTTP: never a 5xx, errors always JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness.clients import Dash, Phone, now_ms, pos
from harness.http import request
from harness.instances import Instance
from harness.tokens import token
from tracker.protocol.events import Position, Refusal, Scan
from tracker.protocol.frames import ProtocolError, decode
from tracker.protocol.subscribe import parse_subscribe
from tracker.store import identity

from .schema_check import assert_frame_valid
from .test_fuzz_frames import NASTY, decode_and_check, mutated, schema_frames, wire_bytes
from .test_security_http import assert_json_error

NETWORK = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- the driver endpoint ---------------------------------------------------------------------------


@dataclass(repr=False)  # the state grows with every example: keep failure reports short
class DriverFuzz:
    """One driver's connection across the examples, and the server's state as the oracle models it:
    what is stored under each seq (a resent event is acked again, another one under a taken seq is a
    conflict), and which answers each seq may get."""

    inst: Instance
    org: str
    db: asyncpg.Connection
    phone: Phone | None = None
    seqs: itertools.count[int] = field(default_factory=lambda: itertools.count(1_000_000))
    allowed: dict[int, set[str]] = field(default_factory=dict)  # seq -> "ack" / "invalid" / "conflict"
    stored: dict[int, Position | Scan] = field(default_factory=dict)

    async def connection(self) -> Phone:
        if self.phone is None:
            phone = Phone(await connect(self.inst.url + "/v1/driver", compression=None))
            await phone.send({"type": "hello", "token": token("driver", "d-fuzz", self.org)})
            async with asyncio.timeout(10):
                while (frame := await phone.pump())["type"] != "welcome":
                    # acks of the closed connection's events go to the driver's new connection,
                    # and may even come before its welcome
                    _check_answer(frame, self)
            phone.welcome = frame
            self.phone = phone
        return self.phone

    def renumber(self, frame: Any) -> None:
        """Fresh seqs for generated events with a valid one (encoded wire frames keep theirs)."""
        if type(frame) is not dict:
            return
        seq = frame.get("seq")
        if frame.get("type") in ("pos", "scan") and type(seq) is int and 1 <= seq < 2**53:
            frame["seq"] = next(self.seqs)
        if frame.get("type") == "batch" and type(frame.get("items")) is list:
            for item in frame["items"]:  # every item with a valid seq, whatever its type
                if type(item) is dict and type(item.get("seq")) is int and 1 <= item["seq"] < 2**53:
                    item["seq"] = next(self.seqs)

    def expect(self, ev: Position | Scan | Refusal) -> tuple[str, int] | None:
        """The answer the server owes for this verdict: (code, seq), or None for a bare `invalid`."""
        if isinstance(ev, Refusal):
            if ev.seq is None:
                return None
            answer = (ev.code, ev.seq)
        else:
            old = self.stored.setdefault(ev.seq, ev)
            answer = ("ack" if identity(old) == identity(ev) else "conflict", ev.seq)
        self.allowed.setdefault(ev.seq, set()).add(answer[0])
        return answer


@pytest.fixture
async def driver_fuzz(start_instance: Any, org: str, db: asyncpg.Connection) -> AsyncIterator[DriverFuzz]:
    yield DriverFuzz(await start_instance(), org, db)


def driver_frames() -> st.SearchStrategy[Any]:
    events = st.sampled_from(["pos", "scan", "batch"]).flatmap(schema_frames)
    return st.one_of(
        events,
        mutated(events),
        mutated(st.sampled_from(["hello", "refresh", "subscribe"]).flatmap(schema_frames)),
        wire_bytes(),
    )


def _check_answer(frame: dict[str, Any], fuzz: DriverFuzz) -> None:
    """Every answer matches its schema and is one the oracle allows for the seqs it names."""
    assert_frame_valid(frame, frame["type"])
    if frame["type"] == "ack":
        for a, b in frame["ranges"]:
            for seq in range(a, b + 1):
                assert "ack" in fuzz.allowed.get(seq, ()), f"seq {seq} acked; allowed: {fuzz.allowed.get(seq)}"
    elif frame["type"] == "error":
        if "seq" in frame:
            assert frame["code"] in fuzz.allowed.get(frame["seq"], ()), (frame, fuzz.allowed.get(frame["seq"]))
        else:
            assert "ranges" not in frame and frame["code"] in ("invalid", "protocol", "unauthorized"), frame


async def _answers(phone: Phone, fuzz: DriverFuzz, *, want: set[tuple[str, int]], bare: int, close: int | None) -> None:
    """Read until every expected answer came; when a close is expected, until the close (acks of
    events before it may be lost with the connection: a phone resends them)."""
    got_bare = 0

    def answered() -> bool:
        got = {("ack", s) for s in phone.acked} | {(e["code"], e["seq"]) for e in phone.errors if "seq" in e}
        return want <= got and got_bare >= bare

    async with asyncio.timeout(10):
        while close is not None or not answered():
            try:
                frame = await phone.pump()
            except ConnectionClosed:
                assert close is not None, "connection closed unexpectedly"
                refused = {a for a in want if a[0] != "ack"}
                assert answered() or (
                    refused <= {(e["code"], e["seq"]) for e in phone.errors if "seq" in e} and got_bare >= bare
                ), (want, phone.errors, bare)
                assert phone.ws.close_code == close, (phone.ws.close_code, close)
                return
            _check_answer(frame, fuzz)
            if frame["type"] == "error" and "seq" not in frame:
                got_bare += 1


def _same(stored: Any, validated: Any) -> bool:
    if isinstance(validated, float) and stored is not None:
        return math.isclose(stored, validated, rel_tol=1e-6, abs_tol=1e-38)
    return bool(stored == validated)


async def _assert_stored_exactly(fuzz: DriverFuzz) -> None:
    """Exactly the accepted events are stored (waiting for commits acks may not have announced), each
    with the values check_event produced, under the token's identity."""
    async with asyncio.timeout(10):
        while True:
            count = await fuzz.db.fetchval(
                "SELECT (SELECT count(*) FROM positions WHERE org = $1) + (SELECT count(*) FROM scans WHERE org = $1)",
                fuzz.org,
            )
            if count >= len(fuzz.stored):
                break
            await asyncio.sleep(0.01)
    rows = await fuzz.db.fetch(
        "SELECT 'pos' AS kind, org, driver_id, seq, ts, lat, lon, acc, spd, hdg, alt, bat, NULL AS package, "
        "NULL AS event, NULL::real AS temp_c, NULL AS note, NULL AS recipient, NULL AS pod FROM positions "
        "WHERE org = $1 UNION ALL SELECT 'scan', org, driver_id, seq, ts, lat, lon, NULL, NULL, NULL, NULL, NULL, "
        "package, event, temp_c, note, recipient, pod FROM scans WHERE org = $1",
        fuzz.org,
    )
    assert {r["seq"] for r in rows} == set(fuzz.stored), "stored events differ from the accepted ones"
    for row in rows:
        ev = fuzz.stored[row["seq"]]
        assert (row["kind"], row["driver_id"]) == (ev.kind, "d-fuzz")
        for name in ev.__slots__:
            assert _same(row[name], getattr(ev, name)), (row["seq"], name, row[name], getattr(ev, name))


@NETWORK
@given(batch=st.lists(driver_frames(), min_size=1, max_size=4))
async def test_driver_endpoint_answers_every_frame_rightly(driver_fuzz: DriverFuzz, batch: list[Any]) -> None:
    fuzz = driver_fuzz
    phone = await fuzz.connection()
    phone.acked.clear()
    phone.errors.clear()
    want: set[tuple[str, int]] = set()
    bare, close = 0, None
    for frame in batch:
        fuzz.renumber(frame)
        data = frame if isinstance(frame, bytes) else orjson.dumps(frame)
        verdicts = decode_and_check(data, now_ms())
        obj = decode(data) if verdicts is not None else None  # as the server parses it (1e400)
        kind = obj.get("type") if obj is not None else None
        await phone.ws.send(data.decode() if _utf8(data) else data)
        if not _utf8(data):  # sent as a binary frame: closed 1003 by the transport, no error frame first
            close = 1003
            break
        if verdicts is None or kind not in ("pos", "scan", "batch"):
            bare += 1  # protocol (1008) or, for refresh, unauthorized (4000): the connection closes
            close = 4000 if kind == "refresh" else 1008
            break
        if kind == "batch" and type(obj.get("items")) is not list:  # type: ignore[union-attr]
            bare += 1
        for ev in verdicts:
            answer = fuzz.expect(ev)
            if answer is None:
                bare += 1
            else:
                want.add(answer)
    if close is None:  # still usable after whatever was refused: one more event is acked
        sentinel = pos(next(fuzz.seqs))
        await phone.send(sentinel)
        ev = decode_and_check(orjson.dumps(sentinel), now_ms())[0]  # type: ignore[index]
        answer = fuzz.expect(ev)
        assert answer is not None and answer[0] == "ack"
        want.add(answer)
    await _answers(phone, fuzz, want=want, bare=bare, close=close)
    if close is not None:
        fuzz.phone = None
    await _assert_stored_exactly(fuzz)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- the dashboard endpoint ------------------------------------------------------------------------


@dataclass(repr=False)
class LiveFuzz:
    inst: Instance
    org: str
    dash: Dash | None = None

    async def connection(self) -> Dash:
        if self.dash is None:
            self.dash = await Dash.connect(self.inst.url, token("dispatcher", "u-fuzz", self.org))
        return self.dash


@pytest.fixture
async def live_fuzz(start_instance: Any, org: str) -> AsyncIterator[LiveFuzz]:
    inst = await start_instance(subscribe_rate_per_s=1000.0, subscribe_burst=1000)
    for who, lat in ((org, -1.0), (org + "-other", 7.0)):  # the same driver id in another org
        phone = await Phone.connect(inst.url, token("driver", "d-1", who))
        await phone.send(pos(1, lat=lat))
        await phone.until(lambda p: p.acked == {1})
    yield LiveFuzz(inst, org)


def live_frames() -> st.SearchStrategy[Any]:
    sub = schema_frames("subscribe")
    return st.one_of(
        sub,
        sub,
        mutated(sub),
        mutated(st.sampled_from(["refresh", "hello", "pos"]).flatmap(schema_frames)),
        wire_bytes(),
    )


@NETWORK
@given(frame=live_frames())
async def test_live_endpoint_answers_every_frame_rightly(live_fuzz: LiveFuzz, frame: Any) -> None:
    dash = await live_fuzz.connection()
    data = frame if isinstance(frame, bytes) else orjson.dumps(frame)
    expected = "snapshot"
    try:
        verdicts = decode_and_check(data, now_ms())
        obj = decode(data) if verdicts is not None else None
        if obj is None or obj["type"] not in ("subscribe", "refresh"):
            raise ProtocolError("not a dashboard frame")
        if obj["type"] == "refresh":
            expected = "unauthorized"
        else:
            parse_subscribe(obj)
    except ProtocolError:
        expected = "protocol"
    await dash.ws.send(data.decode() if _utf8(data) else data)
    if not _utf8(data):  # sent as a binary frame: closed 1003 by the transport, no error frame first
        assert await dash.closed() == 1003
        live_fuzz.dash = None
        return
    if expected != "snapshot":
        answer = await dash.recv()
        assert_frame_valid(answer, "error")
        assert answer["code"] == expected
        assert await dash.closed() == (1008 if expected == "protocol" else 4000)
        live_fuzz.dash = None
        return
    async with asyncio.timeout(10):
        while True:
            answer = await dash.recv()
            if answer["type"] == "status":
                continue
            assert_frame_valid(answer, "snapshot")
            for driver in answer["drivers"]:
                assert (driver["driver"], driver.get("lat")) == ("d-1", -1.0)  # never the other org's d-1
            if not answer.get("more"):
                break


# -- HTTP ------------------------------------------------------------------------------------------

SEGMENTS = st.one_of(st.text(max_size=20), st.sampled_from(["..", "%00", "\x00", "PKG-1", "d-1", " ", "a/b", "🚚"]))
QUERY = st.dictionaries(
    st.sampled_from(["from", "to", "state", "client", "driver", "after", "limit", "x"]),
    st.one_of(st.text(max_size=12), st.integers(-(2**70), 2**70).map(str), st.sampled_from(["", "1e3", "-0", "NaN"])),
    max_size=4,
)
PATHS = [
    "/v1/drivers",
    "/v1/drivers/{}/trail",
    "/v1/packages",
    "/v1/packages/{}",
    "/v1/packages/{}/verify",
    "/v1/{}",
    "/{}",
    "/static/{}",
    "/healthz",
    "/v1/config",
]
CONSIGN = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=70) | NASTY,
        "client": st.sampled_from(["clinic-1", "a b", ""]) | NASTY,
        "destination": st.fixed_dictionaries({}, optional={"lat": NASTY, "lon": NASTY, "name": NASTY}) | NASTY,
        "window": st.fixed_dictionaries({}, optional={"from": NASTY, "to": NASTY}) | NASTY,
        "cold_chain": st.fixed_dictionaries({}, optional={"min_c": NASTY, "max_c": NASTY}) | NASTY,
        "notes": NASTY,
    },
)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, str, bytes]:
    path = draw(st.sampled_from(PATHS)).format(quote(draw(SEGMENTS), safe=draw(st.sampled_from(["", "/"]))))
    query = draw(QUERY)
    target = path + ("?" + urlencode(query) if query else "")
    who = draw(st.sampled_from(["dispatcher", "client", "driver", "none", "garbage"]))
    method, body = "GET", b""
    if path == "/v1/packages" and draw(st.booleans()):
        method = "POST"
        body = orjson.dumps(draw(CONSIGN)) if draw(st.integers(0, 9)) else draw(st.binary(max_size=60))
    elif draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["DELETE", "PUT", "PATCH", "OPTIONS"]))
    return method, target, who, body


@NETWORK
@given(req=http_requests())
async def test_http_api_never_fails_with_5xx_and_answers_json(
    instance: Instance, org: str, req: tuple[str, str, str, bytes]
) -> None:
    method, target, who, body = req
    tok = {"none": None, "garbage": "x.y.z"}.get(who, token(who, "u-1", org, client="c-1" if who == "client" else None))
    status, headers, payload = await request(instance, method, target, tok, body)
    assert status < 500, (status, payload[:300])
    if status >= 400:
        assert_json_error((status, headers, payload), status)
    elif target.startswith("/v1/"):
        assert headers["content-type"].startswith("application/"), headers
        orjson.loads(payload)


@pytest.mark.parametrize("path", ["/v1/driver", "/v1/live"])
async def test_a_long_non_ascii_frame_type_still_gets_its_1008(instance: Instance, org: str, path: str) -> None:
    """Found by the fuzzer: the close reason quotes the frame type; over 123 bytes of UTF-8 the close
    frame could not be sent and the connection was dropped without a code (1006)."""
    if path == "/v1/driver":
        peer: Phone | Dash = await Phone.connect(instance.url, token("driver", "d-1", org))
    else:
        peer = await Dash.connect(instance.url, token("dispatcher", "u-1", org))
    await peer.send({"type": "\U0001f4e6" * 70})
    assert (await peer.recv())["code"] == "protocol"
    assert await peer.closed() == 1008
