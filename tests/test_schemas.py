"""The JSON Schemas of schemas/ are valid, their examples pass, and they agree with the server's validator.

`tracker.protocol.events.check_event` is the hand-written validator the ingest path runs; `schemas/pos.json`
and `schemas/scan.json` are what app developers read. Both must accept and refuse the same events, except
for two rules a JSON Schema cannot express (schemas/README.md):
- `ts` at most one day past the server's clock (refused by the server only);
- `seq`/`ts` written with a fraction (`5.0`): JSON Schema's `integer` accepts it, the server refuses it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.schema_check import BASE_URI, assert_frame_valid, schemas, validator
from tracker.protocol import frames
from tracker.protocol.events import TS_FUTURE_MS, TS_MIN, Position, Refusal, Scan, check_event

NOW_MS = 1_764_240_000_000 + 3_600_000  # later than every example's ts
TS_2025 = 1_735_689_600_000  # 2025-01-01: example ts lie between this and NOW_MS
SEQ_LIMIT = 2**53

EXPECTED = {
    # phone -> server (WS /v1/driver); hello and refresh also dashboard -> server (WS /v1/live)
    "hello", "pos", "scan", "batch", "refresh",
    # server -> phone
    "welcome", "ack", "error",
    # dashboard -> server
    "subscribe",
    # server -> dashboard
    "live-welcome", "snapshot", "live-pos", "live-scan", "package", "presence", "alert", "status", "live-batch",
    # HTTP bodies: POST /v1/driver/events and its answer
    "upload", "upload-answer",
    # Webhooks: the event a delivery posts, an endpoint, the delivery log
    "webhook-event", "webhook", "webhook-deliveries",
}  # fmt: skip

EXAMPLES = [(name, i) for name, schema in sorted(schemas().items()) for i in range(len(schema.get("examples", [])))]


def schema_accepts(obj: object) -> bool:
    """The schemas' verdict on one phone event, as a batch item (pos or scan) and on its own schema."""
    verdict = validator("batch").is_valid({"type": "batch", "items": [obj]})
    if isinstance(obj, dict) and obj.get("type") in ("pos", "scan"):
        assert validator(obj["type"]).is_valid(obj) is verdict
    return verdict


def server_accepts(obj: object, now_ms: int = NOW_MS) -> bool:
    result = check_event(obj, now_ms)
    assert isinstance(result, Position | Scan | Refusal)
    return not isinstance(result, Refusal)


def example_events() -> list[dict[str, Any]]:
    events = [*schemas()["pos"]["examples"], *schemas()["scan"]["examples"]]
    for batch in schemas()["batch"]["examples"]:
        events.extend(batch["items"])
    return events


# ---------------------------------------------------------------- the schema files themselves


def test_every_frame_has_its_schema() -> None:
    assert set(schemas()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = schemas()[name]
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"{BASE_URI}{name}.json"
    assert schema["title"] and len(schema["description"]) > 40
    assert len(schema["examples"]) >= 2
    assert schema.get("additionalProperties", True) is not False  # unknown fields are ignored (PROTOCOL.md)


@pytest.mark.parametrize(("name", "index"), EXAMPLES)
def test_example_is_valid(name: str, index: int) -> None:
    assert_frame_valid(schemas()[name]["examples"][index], name)


def test_examples_are_recent_and_not_in_the_future() -> None:
    for event in example_events():
        assert TS_2025 <= event["ts"] <= NOW_MS, event


@pytest.mark.parametrize("event", example_events(), ids=lambda e: f"{e['type']}-{e['seq']}")
def test_example_events_are_accepted_by_schema_and_server(event: dict[str, Any]) -> None:
    assert schema_accepts(event)
    assert server_accepts(event)


def test_helper_reports_the_failing_field() -> None:
    with pytest.raises(AssertionError, match=r"pos\.json at lat"):
        assert_frame_valid({"type": "pos", "seq": 1, "ts": TS_MIN, "lat": 91, "lon": 0}, "pos.json")
    assert_frame_valid(b'{"type":"ack","ranges":[[1,2]]}', "ack")


# ---------------------------------------------------------------- phone events: schema and server agree

POS = {"type": "pos", "seq": 1042, "ts": 1764240001000, "lat": -1.29207, "lon": 36.82195}
SCAN = {"type": "scan", "seq": 1043, "ts": 1764240002500, "package": "PKG-000123", "event": "pickup"}
_MISSING = object()
# Characters an id may not hold besides NUL: zero-width characters and bidi controls.
INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff") | frozenset(
    map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
)


def edit(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `base` with fields replaced, or removed when given `_MISSING`."""
    obj = copy.deepcopy(base)
    for key, value in changes.items():
        key = key.rstrip("_")  # type_ -> type
        if value is _MISSING:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


# NaN and Infinity are not JSON (orjson refuses them), so they never reach the validator: not listed.
REFUSED = {
    "pos missing seq": edit(POS, seq=_MISSING),
    "pos seq 0": edit(POS, seq=0),
    "pos seq -1": edit(POS, seq=-1),
    "pos seq 2^53": edit(POS, seq=SEQ_LIMIT),
    "pos seq true": edit(POS, seq=True),
    "pos seq '5'": edit(POS, seq="5"),
    "pos seq null": edit(POS, seq=None),
    "pos seq 5.5": edit(POS, seq=5.5),
    "pos missing ts": edit(POS, ts=_MISSING),
    "pos ts before 2020": edit(POS, ts=TS_MIN - 1),
    "pos ts 0": edit(POS, ts=0),
    "pos ts as string": edit(POS, ts="1764240001000"),
    "pos ts true": edit(POS, ts=True),
    "pos missing lat": edit(POS, lat=_MISSING),
    "pos lat 91": edit(POS, lat=91),
    "pos lat -90.000001": edit(POS, lat=-90.000001),
    "pos lat '1'": edit(POS, lat="1"),
    "pos lat null": edit(POS, lat=None),
    "pos lat true": edit(POS, lat=True),
    "pos lat [1]": edit(POS, lat=[1]),
    "pos missing lon": edit(POS, lon=_MISSING),
    "pos lon -181": edit(POS, lon=-181),
    "pos lon 180.5": edit(POS, lon=180.5),
    "pos lon '36.8'": edit(POS, lon="36.8"),
    "type foo": edit(POS, type_="foo"),
    "type Pos": edit(POS, type_="Pos"),
    "type missing": edit(POS, type_=_MISSING),
    "type null": edit(POS, type_=None),
    "not an object (array)": [POS],
    "not an object (string)": "pos",
    "scan missing seq": edit(SCAN, seq=_MISSING),
    "scan seq 2^53": edit(SCAN, seq=SEQ_LIMIT),
    "scan ts before 2020": edit(SCAN, ts=TS_MIN - 1),
    "scan missing package": edit(SCAN, package=_MISSING),
    "scan package ''": edit(SCAN, package=""),
    "scan package 65 chars": edit(SCAN, package="P" * 65),
    "scan package 64 chars + newline": edit(SCAN, package="P" * 64 + "\n"),
    "scan package with NUL": edit(SCAN, package="PKG\x00123"),
    "scan package NUL only": edit(SCAN, package="\x00"),
    "scan package with a lone surrogate": edit(SCAN, package="PKG-\ud83d"),
    "scan package with a bidi override": edit(SCAN, package="PKG\u202e1"),
    "scan package with a bidi isolate": edit(SCAN, package="\u2066PKG\u2069"),
    "scan package with a zero-width space": edit(SCAN, package="PKG\u200b1"),
    "scan package with a zero-width joiner": edit(SCAN, package="PKG\u200d1"),
    "scan package with a word joiner": edit(SCAN, package="PKG\u2060"),
    "scan package with a BOM": edit(SCAN, package="\ufeffPKG"),
    "scan package number": edit(SCAN, package=123),
    "scan package null": edit(SCAN, package=None),
    "scan missing event": edit(SCAN, event=_MISSING),
    "scan event unknown": edit(SCAN, event="picked_up"),
    "scan event upper case": edit(SCAN, event="PICKUP"),
    "scan event number": edit(SCAN, event=1),
    "scan event null": edit(SCAN, event=None),
}

ACCEPTED = {
    "pos minimal": POS,
    "pos seq 1": edit(POS, seq=1),
    "pos seq 2^53 - 1": edit(POS, seq=SEQ_LIMIT - 1),
    "pos ts 2020-01-01": edit(POS, ts=TS_MIN),
    "pos ts one day ahead": edit(POS, ts=NOW_MS + TS_FUTURE_MS),
    "pos lat/lon integers": edit(POS, lat=-90, lon=180),
    "pos lat/lon bounds as floats": edit(POS, lat=90.0, lon=-180.0),
    "pos unknown fields": edit(POS, sat=9, provider="fused", extra={"a": [1]}),
    "pos optional fields out of range": edit(POS, acc=-1, spd=1e6, hdg=361, alt=-5000, bat=1.01),
    "pos optional fields of wrong type": edit(POS, acc="6.5", spd=True, hdg=None, alt=[1], bat={"v": 1}),
    "scan minimal": SCAN,
    "scan package 64 chars": edit(SCAN, package="P" * 64),
    "scan package 64 non-ASCII chars": edit(SCAN, package="\u03a9\U0001f4e6" * 32),
    **{f"scan event {e}": edit(SCAN, event=e) for e in ("pickup", "handover", "deliver", "fail", "return")},
    "scan note with NUL": edit(SCAN, note="a\x00b"),
    "scan bad optional fields": edit(
        SCAN, lat=91, lon="x", temp_c=200, note="n" * 501, recipient="a\x00b", pod=["ref"], event="deliver"
    ),
    "scan lat without lon": edit(SCAN, lat=1.5),
}


@pytest.mark.parametrize("obj", REFUSED.values(), ids=REFUSED.keys())
def test_both_refuse(obj: object) -> None:
    assert not schema_accepts(obj)
    assert not server_accepts(obj)


@pytest.mark.parametrize("obj", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_both_accept(obj: dict[str, Any]) -> None:
    assert schema_accepts(obj)
    assert server_accepts(obj)


def test_bad_optional_fields_are_stored_as_null() -> None:
    pos = check_event(ACCEPTED["pos optional fields out of range"], NOW_MS)
    assert isinstance(pos, Position)
    assert (pos.acc, pos.spd, pos.hdg, pos.alt, pos.bat) == (None, None, None, None, None)
    scan = check_event(ACCEPTED["scan bad optional fields"], NOW_MS)
    assert isinstance(scan, Scan)
    assert (scan.lat, scan.lon, scan.temp_c, scan.note, scan.recipient, scan.pod) == (None,) * 6


def test_ts_more_than_a_day_ahead_is_refused_by_the_server_only() -> None:
    """The upper bound of ts depends on the server's clock: a schema cannot express it (schemas/README.md)."""
    for base in (POS, SCAN):
        future = edit(base, ts=NOW_MS + TS_FUTURE_MS + 1)
        assert schema_accepts(future)
        result = check_event(future, NOW_MS)
        assert isinstance(result, Refusal)
        assert (result.code, result.seq) == ("invalid", base["seq"])
        assert server_accepts(future, now_ms=NOW_MS + 1)  # the same event, a millisecond later on the server


@pytest.mark.parametrize("raw", [b'"seq":1042.0', b'"seq":1.042e3', b'"ts":1764240001000.0', b'"ts":1.764240001e12'])
def test_integers_written_with_a_fraction_are_refused_by_the_server_only(raw: bytes) -> None:
    """JSON Schema's `integer` matches any number with a zero fraction; the server takes only JSON integers.

    The schemas describe this ("write it as a plain JSON integer") and schemas/README.md lists it.
    """
    key = raw.split(b":")[0].strip(b'"').decode()
    body = orjson.dumps({k: v for k, v in POS.items() if k != key})
    obj = orjson.loads(body[:-1] + b"," + raw + b"}")
    assert isinstance(obj[key], float)
    assert schema_accepts(obj)
    assert not server_accepts(obj)


@pytest.mark.parametrize("event", [["pickup"], {"e": "pickup"}])
def test_unhashable_scan_event_is_refused(event: object) -> None:
    obj = edit(SCAN, event=event)
    assert not schema_accepts(obj)
    assert not server_accepts(obj)


# ---------------------------------------------------------------- property: same verdict on arbitrary events

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def around(*points: int) -> st.SearchStrategy[int]:
    return st.one_of(*(st.integers(min_value=p - 2, max_value=p + 2) for p in points))


def numbers_in(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return st.floats(min_value=lo, max_value=hi) | st.integers(min_value=lo, max_value=hi)


def numbers_around(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(min_value=lo - 1, max_value=hi + 1),
        around(lo, hi),
        st.sampled_from([float(lo), float(hi), lo - 1e-9, hi + 1e-9]),
        json_values,
    )


# Each field: (a strategy of values both accept, a strategy of edge cases: boundaries, wrong types, junk).
# ts stays at most one day past NOW_MS: beyond it the server refuses and the schema cannot (tested above).
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "type": (st.sampled_from(["pos", "scan"]), st.sampled_from(["foo", "POS", "", "batch"]) | json_scalars),
    "seq": (
        st.integers(min_value=1, max_value=SEQ_LIMIT - 1),
        st.one_of(around(0, SEQ_LIMIT), st.integers(), st.floats(), st.sampled_from([5.0, 1042.0]), json_values),
    ),
    "ts": (
        st.integers(min_value=TS_MIN, max_value=NOW_MS + TS_FUTURE_MS),
        st.one_of(
            around(TS_MIN, NOW_MS + TS_FUTURE_MS - 2),
            st.integers(max_value=NOW_MS + TS_FUTURE_MS),
            st.sampled_from([float(TS_MIN), float(NOW_MS)]),
            json_scalars.filter(lambda v: not (type(v) is int and v > NOW_MS + TS_FUTURE_MS)),
        ),
    ),
    "lat": (numbers_in(-90, 90), numbers_around(-90, 90)),
    "lon": (numbers_in(-180, 180), numbers_around(-180, 180)),
    "package": (
        st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s and not INVISIBLE.intersection(s)),
        st.one_of(
            st.text(max_size=70),
            st.text(alphabet=st.sampled_from("P-1\u200b\u200d\u2060\ufeff\u202a\u202e\u2066\u2069"), max_size=8),
            st.text(alphabet=st.sampled_from("a\x00\n\u03a9\U0001f4e6"), min_size=60, max_size=68),
            st.sampled_from(["", "P" * 64, "P" * 65, "\x00", "PKG-1\n", "P" * 64 + "\n"]),
            json_scalars,
        ),
    ),
    "event": (
        st.sampled_from(["pickup", "handover", "deliver", "fail", "return"]),
        st.sampled_from(["Pickup", "", "deliver ", "picked_up"]) | json_values,
    ),
    # optional fields: nothing they hold can refuse an event
    "acc": (numbers_in(0, 100_000), json_values),
    "bat": (numbers_in(0, 1), numbers_around(0, 1)),
    "temp_c": (numbers_in(-80, 80), json_values),
    "note": (st.text(max_size=20), st.text(min_size=499, max_size=502) | json_values),
    "recipient": (st.text(max_size=20), json_values),
    "pod": (st.text(max_size=20), json_values),
    "future_field": (json_values, json_values),
}
REQUIRED = ("type", "seq", "ts", "lat", "lon", "package", "event")


@st.composite
def phone_events(draw: st.DrawFn) -> dict[str, Any]:
    """pos/scan-like objects: each field usually present and valid, sometimes missing or an edge case."""
    obj: dict[str, Any] = {}
    for key, (valid, edge) in FIELDS.items():
        if draw(st.integers(0, 99)) < (95 if key in REQUIRED else 50):
            obj[key] = draw(valid if draw(st.integers(0, 99)) < 88 else edge)
    return obj


def integer_written_as_float(value: object) -> bool:
    return type(value) is float and value.is_integer()


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(phone_events())
def test_schema_and_server_agree(obj: dict[str, Any]) -> None:
    server = server_accepts(obj)
    kind = obj.get("type")
    label(f"{kind if kind in ('pos', 'scan') else 'other type'} {'accepted' if server else 'refused'}")
    if integer_written_as_float(obj.get("seq")) or integer_written_as_float(obj.get("ts")):
        assert not server  # the documented exception: see test_integers_written_with_a_fraction_...
        return
    assert schema_accepts(obj) is server


def test_generator_makes_both_verdicts_for_both_types() -> None:
    """The property above is only as good as its inputs: they must reach both verdicts for pos and scan."""
    seen: set[tuple[object, bool]] = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(phone_events())
    def collect(obj: dict[str, Any]) -> None:
        seen.add((obj.get("type") if obj.get("type") in ("pos", "scan") else None, server_accepts(obj)))

    collect()
    assert {("pos", True), ("pos", False), ("scan", True), ("scan", False)} <= seen


# ---------------------------------------------------------------- server frames match their schemas


def test_frames_ack() -> None:
    frame = orjson.loads(frames.ack([1, 2, 3, 7]))
    assert frame == {"type": "ack", "ranges": [[1, 3], [7, 7]]}
    assert_frame_valid(frame, "ack")
    assert_frame_valid(orjson.loads(frames.ack([SEQ_LIMIT - 1])), "ack")


@pytest.mark.parametrize(
    "data",
    [
        frames.error("invalid", "lat: must be a number between -90 and 90", seq=5),
        frames.error("unavailable", seqs=[1, 2, 3], retry_ms=2000),
        frames.error("rate_limited", seq=9, retry_ms=100),
        frames.error("conflict", "seq 12 already names another event", seq=12),
        frames.error("too_large", "batch over 300 items"),
        frames.error("unauthorized", "token expired"),
        frames.error("protocol", "frame before hello"),
        frames.error("slow_consumer"),
    ],
)
def test_frames_error(data: bytes) -> None:
    assert_frame_valid(orjson.loads(data), "error")


def test_frames_batch_for_dashboards() -> None:
    pos = check_event(edit(POS, acc=6.5, bat=7), NOW_MS)  # bat out of range: stored as null
    scan = check_event(edit(SCAN, lat=-1.29, temp_c=5.4, note="cold"), NOW_MS)  # lat without lon: no position
    assert isinstance(pos, Position) and isinstance(scan, Scan)
    live_pos = {"type": "pos", "driver": "d-17", "name": "Amina", **dataclasses.asdict(pos)}
    live_scan = {"type": "scan", "driver": "d-17", **dataclasses.asdict(scan)}
    items = [
        live_pos,
        live_scan,
        {"type": "package", "package": "PKG-000123", "state": "picked_up", "driver": "d-17", "client": "c-1",
         "ts": scan.ts},
        {"type": "presence", "driver": "d-17", "online": True, "ts": NOW_MS},
        {"type": "alert", "id": "a-1", "kind": "scan_anomaly", "state": "open", "package": "PKG-000123", "ts": NOW_MS},
        {"type": "status", "live": True},
    ]  # fmt: skip
    assert_frame_valid(live_pos, "live-pos")
    assert_frame_valid(live_scan, "live-scan")
    data = frames.batch([frames.encode(item) for item in items])
    frame = orjson.loads(data)
    assert frame["items"] == items
    assert_frame_valid(frame, "live-batch")
    assert_frame_valid(orjson.loads(frames.batch([])), "live-batch")


# ---------------------------------------------------------------- the other schemas refuse what they should

INVALID_FRAMES = [
    ("hello", {"type": "hello", "token": ""}),
    ("hello", {"type": "hello", "token": 42}),
    ("refresh", {"type": "refresh"}),
    ("batch", {"type": "batch", "items": [POS] * 301}),
    ("batch", {"type": "batch", "items": [edit(POS, type_="foo")]}),
    ("batch", {"type": "batch", "items": [edit(SCAN, package="")]}),
    ("batch", {"type": "batch"}),
    ("welcome", {"type": "welcome", "driver": "d-17", "server_time": NOW_MS, "max_frame": 65536, "max_batch": 300}),
    ("welcome", {"type": "welcome", "driver": "d-17", "last_seq": -1, "server_time": NOW_MS, "max_frame": 65536,
                 "max_batch": 300}),
    ("ack", {"type": "ack", "ranges": []}),
    ("ack", {"type": "ack", "ranges": [[0, 1]]}),
    ("ack", {"type": "ack", "ranges": [[1, 2, 3]]}),
    ("ack", {"type": "ack", "ranges": [[1]]}),
    ("ack", {"type": "ack", "ranges": [[1, SEQ_LIMIT]]}),
    ("error", {"type": "error", "code": "oops"}),
    ("error", {"type": "error", "code": "invalid", "seq": 5, "ranges": [[5, 5]]}),
    ("error", {"type": "error", "code": "unavailable", "ranges": [[1, 3]]}),
    ("error", {"type": "error", "code": "rate_limited", "seq": 4}),
    ("error", {"type": "error", "code": "invalid", "seq": 0}),
    ("subscribe", {"type": "subscribe", "bbox": [36.6, -1.45, 37.1]}),
    ("subscribe", {"type": "subscribe", "bbox": [36.6, -1.45, 37.1, -1.1, 0]}),
    ("subscribe", {"type": "subscribe", "bbox": [36.6, -91, 37.1, -1.1]}),
    ("subscribe", {"type": "subscribe", "drivers": "d-17"}),
    ("live-welcome", {"type": "welcome", "role": "driver", "org": "acme"}),
    ("snapshot", {"type": "snapshot", "drivers": [], "packages": []}),
    ("snapshot", {"type": "snapshot", "drivers": [{"driver": "d-1"}], "packages": [], "alerts": []}),
    ("live-pos", {"type": "pos", "driver": "d-17", "seq": 1, "ts": NOW_MS, "lat": None, "lon": 0}),
    ("live-pos", {"type": "pos", "seq": 1, "ts": NOW_MS, "lat": 0, "lon": 0}),
    ("live-pos", {"type": "pos", "driver": "d-17", "seq": 1, "ts": NOW_MS, "lat": 0, "lon": 0, "bat": 1.5}),
    ("live-scan", {"type": "scan", "driver": "d-17", "seq": 1, "ts": NOW_MS, "package": "P", "event": "lost"}),
    ("package", {"type": "package", "package": "P", "state": "in_transit", "ts": NOW_MS}),
    ("package", {"type": "package", "package": "P", "state": "created"}),
    ("presence", {"type": "presence", "driver": "d-17", "online": "false", "ts": NOW_MS}),
    ("alert", {"type": "alert", "id": "a", "kind": "driver_offline", "state": "closed", "ts": NOW_MS}),
    ("alert", {"type": "alert", "id": "a", "kind": "driver_offline", "state": "open"}),
    ("status", {"type": "status", "live": "true"}),
    ("live-batch", {"type": "batch", "items": [{"type": "ack", "ranges": [[1, 1]]}]}),
    ("live-batch", {"type": "batch", "items": [POS]}),  # a phone's pos has no `driver`
]  # fmt: skip


@pytest.mark.parametrize(("name", "frame"), INVALID_FRAMES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(INVALID_FRAMES)])
def test_invalid_frame_is_refused(name: str, frame: dict[str, Any]) -> None:
    with pytest.raises(AssertionError):
        assert_frame_valid(frame, name)


def test_welcome_answering_refresh_may_omit_last_seq() -> None:
    welcome = {"type": "welcome", "driver": "d-17", "server_time": NOW_MS, "max_frame": 65536, "max_batch": 300}
    assert_frame_valid({**welcome, "refreshed": True}, "welcome")
    with pytest.raises(AssertionError, match="last_seq"):
        assert_frame_valid(welcome, "welcome")
    with pytest.raises(AssertionError, match="last_seq"):
        assert_frame_valid({**welcome, "refreshed": False}, "welcome")


def test_hello_token_is_optional_on_the_driver_endpoint() -> None:
    """With an `Authorization` header the phone's hello carries no token; the schema cannot know the headers."""
    assert_frame_valid({"type": "hello", "device": "android-8f2c", "app": "1.4.2"}, "hello")
    assert_frame_valid({"type": "hello", "token": "a.b.c"}, "hello")
