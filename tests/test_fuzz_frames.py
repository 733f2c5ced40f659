"""Fuzzing the frame decoder: `frames.decode` then `events.check_event`, on frames generated from the
JSON Schemas of schemas/ and then mutated (as objects and as bytes), and on arbitrary bytes.

Properties: decode raises nothing but ProtocolError; check_event never raises; whatever it accepts is
storable as is (the columns of positions/scans take it: ranges, finite numbers, bounded UTF-8 text
without NUL, float32 where the column is `real`).

`schema_frames(name)` turns a schema into a Hypothesis strategy. It covers the keywords our schemas
use (`$ref`, `const`, `enum`, `type`, `properties`/`required`, numeric and length bounds, `pattern`
(characters to avoid, applied as a filter), `items`/`prefixItems`/`maxItems`, `oneOf`, and the
documentation keywords `x-type`/`x-range`/`x-maxLength` of optional fields); hypothesis-jsonschema
does not run on the Hypothesis this project uses (nor knows draft 2020-12's `prefixItems`), so this
small walker stands in for it.
Other test modules import it (tests/test_fuzz_endpoints.py).
"""

from __future__ import annotations

import math
import re
import struct
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.protocol import frames
from tracker.protocol.events import (
    NOTE_MAX,
    PACKAGE_MAX,
    POD_MAX,
    POS_OPTIONAL,
    RECIPIENT_MAX,
    SCAN_EVENTS,
    SEQ_MAX,
    TEMP_RANGE,
    TS_FUTURE_MS,
    TS_MIN,
    Position,
    Refusal,
    Scan,
    check_event,
)

from .schema_check import schemas, validator

CLIENT_FRAMES = ("hello", "pos", "scan", "batch", "refresh", "subscribe")
MAX_ITEMS = 4  # arrays generated from a schema stay short (batch allows 300)
NOW_MS = int(time.time() * 1000)

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson encodes
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
NASTY = st.one_of(
    JSON,
    st.sampled_from(
        [
            0,
            -1,
            1.0,
            -0.0,
            1e308,
            -1e308,
            5e-324,
            2**53,
            2**63,
            2**64 - 1,
            SEQ_MAX - 1,
            "",
            "\x00",
            "a\x00b",
            "\u202e",
            "\U0001f4e6" * 70,
            "x" * 600,
            True,
            None,
            [],
            {},
            [[[[]]]],
        ]
    ),
)


def _resolve(ref: str, base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema `ref` names, the document it lives in): "#/$defs/x", "pos.json", "pos.json#/$defs/x"."""
    doc_name, _, pointer = ref.partition("#")
    doc = schemas()[doc_name.removesuffix(".json")] if doc_name else base
    node: Any = doc
    for part in [p for p in pointer.split("/") if p]:
        node = node[part]
    return node, doc


def from_schema(schema: dict[str, Any] | bool, doc: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for `schema` (a part of the document `doc`), for the keywords listed above."""
    if schema is True:
        return JSON
    if schema is False:
        return st.nothing()
    if "$ref" in schema:
        target, target_doc = _resolve(schema["$ref"], doc)
        return from_schema(target, target_doc)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of(*(from_schema(s, doc) for s in schema["oneOf"]))
    kind = schema.get("type", schema.get("x-type"))
    if kind == "object":
        return _object(schema, doc)
    if kind == "array":
        return _array(schema, doc)
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if "x-range" in schema:
            lo, hi = schema["x-range"]
        ints = st.integers(min_value=lo, max_value=hi)
        if kind == "integer":
            return ints
        return ints | st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)
    if kind == "string":
        alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
        size = schema.get("maxLength", schema.get("x-maxLength", 80))
        text = st.text(alphabet=alphabet, min_size=schema.get("minLength", 0), max_size=min(size, 80) if size else 0)
        if "pattern" in schema:  # "no NUL", and for ids no bidi control nor zero-width character either
            return text.filter(re.compile(schema["pattern"]).search)
        return text
    return JSON


def _object(schema: dict[str, Any], doc: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    props = schema.get("properties", {})
    required = {k: from_schema(v, doc) for k, v in props.items() if k in schema.get("required", ())}
    optional = {k: from_schema(v, doc) for k, v in props.items() if k not in required}
    return st.fixed_dictionaries(required, optional=optional)


def _array(schema: dict[str, Any], doc: dict[str, Any]) -> st.SearchStrategy[list[Any]]:
    if "prefixItems" in schema:  # a tuple (bbox): exactly the prefix when `items` is false
        return st.tuples(*(from_schema(s, doc) for s in schema["prefixItems"])).map(list)
    items = from_schema(schema.get("items", True), doc)
    return st.lists(
        items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS)
    )


def schema_frames(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Frames valid for schemas/<name>.json. `ts` is kept at most a day past now (the server's bound)."""
    doc = schemas()[name]
    strategy: st.SearchStrategy[dict[str, Any]] = from_schema(doc, doc)
    return strategy.map(_clamp_ts)


def _clamp_ts(frame: Any) -> Any:
    if isinstance(frame, dict):
        if type(frame.get("ts")) is int and frame["ts"] > NOW_MS:
            frame["ts"] = TS_MIN + frame["ts"] % (NOW_MS - TS_MIN)
        for item in frame.get("items", []) if type(frame.get("items")) is list else []:
            _clamp_ts(item)
    return frame


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid frame with 1 to 3 edits: a field removed, replaced by something nasty, an identity
    field added (driver/org), the type changed, or a batch item edited the same way."""
    frame = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        target = frame
        if type(frame.get("items")) is list and frame["items"] and draw(st.booleans()):
            target = draw(st.sampled_from(frame["items"]))
            if type(target) is not dict:
                continue
        op = draw(st.sampled_from(["drop", "nasty", "identity", "type", "extra"]))
        keys = sorted(target)
        if op == "drop" and keys:
            target.pop(draw(st.sampled_from(keys)))
        elif op == "nasty" and keys:
            target[draw(st.sampled_from(keys))] = draw(NASTY)
        elif op == "identity":
            target[draw(st.sampled_from(["driver", "org", "sub", "client", "role"]))] = draw(st.text(max_size=8))
        elif op == "type":
            target["type"] = draw(st.sampled_from([*CLIENT_FRAMES, "welcome", "ack", "teleport", "POS"]) | JSON)
        else:
            target[draw(st.text(max_size=6))] = draw(JSON)
    return frame


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """What a peer may put in a frame: an encoded (mutated) frame, edited as bytes, or just bytes."""
    kind = draw(st.sampled_from(["frame", "edited", "bytes", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    data = orjson.dumps(draw(mutated(st.sampled_from(CLIENT_FRAMES).flatmap(schema_frames))))
    if kind == "edited" and data:
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 4))
        insert = draw(
            st.sampled_from(
                [
                    b"",
                    b"\x00",
                    b"\xff",
                    b"\xed\xa0\x80",
                    b"1e999",
                    b".5",
                    b"-",
                    b"\\ud800",
                    b'"',
                    b"{",
                    b"]",
                    b"NaN",
                    b"Infinity",
                    b"\\u0000",
                    b"99999999999999999999",
                ]
            )
        )
        data = data[:at] + insert + data[at + cut :]
    return data


# -- properties ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLIENT_FRAMES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_generated_frames_are_valid_for_their_schema(name: str, data: st.DataObject) -> None:
    frame = data.draw(schema_frames(name))
    errors = list(validator(name).iter_errors(frame))
    assert errors == [], (frame, errors[0].message)


def _f32(value: float) -> bool:
    """Storable in a `real` column without becoming infinite."""
    return math.isinf(struct.unpack("f", struct.pack("f", value))[0]) is False


def assert_storable(ev: Position | Scan, now_ms: int) -> None:
    """What the writer will store: the constraints of the positions and scans tables, and our ranges."""
    assert type(ev.seq) is int and 1 <= ev.seq < SEQ_MAX
    assert type(ev.ts) is int and TS_MIN <= ev.ts <= now_ms + TS_FUTURE_MS
    if isinstance(ev, Position):
        assert type(ev.lat) is float and -90 <= ev.lat <= 90 and type(ev.lon) is float and -180 <= ev.lon <= 180
        for key, (lo, hi) in POS_OPTIONAL.items():
            value = getattr(ev, key)
            assert value is None or (type(value) is float and lo <= value <= hi and _f32(value)), (key, value)
        return
    assert type(ev.package) is str and 1 <= len(ev.package) <= PACKAGE_MAX and "\x00" not in ev.package
    ev.package.encode("utf-8")  # no lone surrogate: PostgreSQL text is UTF-8
    assert ev.event in SCAN_EVENTS
    assert (ev.lat is None) == (ev.lon is None)
    if ev.lat is not None:
        assert ev.lon is not None and -90 <= ev.lat <= 90 and -180 <= ev.lon <= 180
    assert ev.temp_c is None or (TEMP_RANGE[0] <= ev.temp_c <= TEMP_RANGE[1] and _f32(ev.temp_c))
    for key, limit in (("note", NOTE_MAX), ("recipient", RECIPIENT_MAX), ("pod", POD_MAX)):
        value = getattr(ev, key)
        assert value is None or (type(value) is str and len(value) <= limit and "\x00" not in value), key
        if value is not None:
            value.encode("utf-8")
    if ev.event != "deliver":
        assert ev.recipient is None and ev.pod is None


def decode_and_check(data: bytes | str, now_ms: int) -> list[Position | Scan | Refusal] | None:
    """The server's path for one frame: None if the frame is a protocol error, else the verdicts on its
    events (empty for frames that carry none)."""
    try:
        obj = frames.decode(data)
    except frames.ProtocolError as exc:
        assert exc.close_code == 1008 and str(exc)
        return None
    assert type(obj) is dict and type(obj["type"]) is str
    if obj["type"] in ("pos", "scan"):
        items: list[Any] = [obj]
    elif obj["type"] == "batch" and type(obj.get("items")) is list:
        items = obj["items"]
    else:
        return []
    verdicts = [check_event(item, now_ms) for item in items]
    for ev in verdicts:
        if isinstance(ev, Refusal):
            assert ev.code == "invalid" and ev.message and (ev.seq is None or 1 <= ev.seq < SEQ_MAX)
        else:
            assert_storable(ev, now_ms)
    return verdicts


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire_bytes())
def test_decoder_raises_only_protocol_error_and_accepts_only_storable_events(data: bytes) -> None:
    now = int(time.time() * 1000)
    decode_and_check(data, now)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    decode_and_check(text, now)  # a text frame reaches decode as str


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["pos", "scan", "batch"]).flatmap(schema_frames))
def test_schema_valid_events_are_accepted_as_sent(frame: dict[str, Any]) -> None:
    verdicts = decode_and_check(orjson.dumps(frame), int(time.time() * 1000))
    assert verdicts is not None
    items = frame["items"] if frame["type"] == "batch" else [frame]
    assert len(verdicts) == len(items)
    for item, ev in zip(items, verdicts, strict=True):
        assert not isinstance(ev, Refusal), (item, ev)
        assert (ev.kind, ev.seq, ev.ts) == (item["type"], item["seq"], item["ts"])
        if isinstance(ev, Position):
            assert (ev.lat, ev.lon) == (item["lat"], item["lon"])
        else:
            assert (ev.package, ev.event) == (item["package"], item["event"])


def test_the_mutations_reach_every_verdict() -> None:
    """The fuzzing is only as good as its inputs: they must produce protocol errors, refused and
    accepted events, and frames without events."""
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @given(wire_bytes())
    def collect(data: bytes) -> None:
        verdicts = decode_and_check(data, int(time.time() * 1000))
        if verdicts is None:
            seen.add("protocol")
        elif not verdicts:
            seen.add("no event")
        for ev in verdicts or []:
            seen.add("refused" if isinstance(ev, Refusal) else "accepted")

    collect()
    assert seen == {"protocol", "no event", "refused", "accepted"}
