"""The compact batch encoding (tracker/protocol/compact.py) and its negotiation in the sans-I/O
driver session: test vectors both ways, a round-trip property within the stated precision, the
decoder fuzzed with arbitrary bytes and mutated frames. No event loop, no socket."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.protocol import compact
from tracker.protocol.bucket import TokenBucket
from tracker.protocol.driver import DriverSession
from tracker.protocol.events import SEQ_MAX, TS_MIN, Position, check_event
from tracker.protocol.frames import ProtocolError

from .test_sessions import NOW_MS, VERIFIER, hello, sent, tok

VECTORS = json.loads((Path(__file__).parent / "data" / "compact-1.json").read_text(encoding="utf-8"))
# The precision docs/PROTOCOL.md states: half a unit of each field's fixed point (values are rounded).
PRECISION = {"lat": 0.5e-7, "lon": 0.5e-7, "acc": 0.05, "spd": 0.05, "hdg": 0.5, "alt": 0.5, "bat": 0.005}
FLOAT_SLACK = 1e-9  # the float arithmetic of rounding and of the division that decodes


# -- test vectors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vectors_encode_and_decode_exactly(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    assert compact.encode(vector["items"]).hex() == vector["hex"]
    assert compact.decode(data, VECTORS["max_batch"]) == vector["items"]


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_are_refused_with_their_message(vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as caught:
        compact.decode(bytes.fromhex(vector["hex"]), VECTORS["max_batch"])
    assert str(caught.value) == vector["error"] and caught.value.close_code == 1008


def test_the_worked_example_of_the_protocol_doc_is_the_first_vector() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    dump = bytes.fromhex(VECTORS["valid"][0]["hex"]).hex(" ")
    assert dump in doc and len(dump.split()) == 50


# -- round trip ---------------------------------------------------------------------------------------


def _opt(lo: float, hi: float) -> st.SearchStrategy[float | None]:
    return st.none() | st.floats(lo, hi, allow_nan=False)


@st.composite
def positions(draw: st.DrawFn, max_size: int = 300) -> list[dict[str, Any]]:
    """Any valid batch of positions (what check_event accepts with every field kept)."""
    n = draw(st.integers(1, max_size))
    out = []
    for _ in range(n):
        item: dict[str, Any] = {
            "type": "pos",
            "seq": draw(st.integers(1, SEQ_MAX - 1)),
            "ts": draw(st.integers(TS_MIN, NOW_MS + 86_400_000)),
            "lat": draw(st.floats(-90, 90)),
            "lon": draw(st.floats(-180, 180)),
        }
        for key, (lo, hi) in (("acc", (0, 100_000)), ("spd", (0, 300)), ("hdg", (0, 360)), ("alt", (-1000, 10_000))):
            value = draw(_opt(lo, hi))
            if value is not None:
                item[key] = value
        bat = draw(_opt(0, 1))
        if bat is not None:
            item["bat"] = bat
        out.append(item)
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=positions())
def test_decode_of_encode_is_the_batch_within_the_stated_precision(batch: list[dict[str, Any]]) -> None:
    decoded = compact.decode(compact.encode(batch), 300)
    assert len(decoded) == len(batch)
    for got, want in zip(decoded, batch, strict=True):
        assert got.keys() == want.keys()
        assert (got["type"], got["seq"], got["ts"]) == (want["type"], want["seq"], want["ts"])
        for key, precision in PRECISION.items():
            if key in want:
                assert abs(got[key] - want[key]) <= precision + FLOAT_SLACK, (key, got[key], want[key])
        # The one validator judges both encodings alike: what JSON stores, compact stores.
        ev, ref = check_event(got, NOW_MS), check_event(want, NOW_MS)
        assert type(ev) is Position and type(ref) is Position
        for key in ("acc", "spd", "hdg", "alt", "bat"):
            assert (getattr(ev, key) is None) == (getattr(ref, key) is None), key


# -- fuzzing ----------------------------------------------------------------------------------------


# Edits of a valid frame: (position, byte, x = xor it in / i = insert it / d = delete there).
EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from("xid")), min_size=1, max_size=8)


def mutate(frame: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    data = bytearray(frame)
    for at, byte, how in edits:
        i = at % (len(data) + 1)
        if how == "x" and i < len(data):
            data[i] ^= byte or 1
        elif how == "i":
            data.insert(i, byte)
        elif how == "d" and i < len(data):
            del data[i]
    return bytes(data)


def _decode_bounded(data: bytes, max_batch: int = 300) -> None:
    """Only the documented answers, quickly: the items, ProtocolError or TooLarge."""
    t0 = time.perf_counter()
    try:
        items = compact.decode(data, max_batch)
    except ProtocolError as exc:
        assert exc.close_code == 1008 and str(exc).startswith("compact: ")
    except compact.TooLarge as exc:
        assert exc.count > max_batch and len(exc.seqs) == exc.count
    else:
        assert 1 <= len(items) <= max_batch and len(items) * compact.MIN_ITEM_BYTES <= len(data)
        for item in items:
            check_event(item, NOW_MS)  # never raises
    assert time.perf_counter() - t0 < 1.0


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=2000) | st.binary(max_size=200).map(lambda b: bytes([compact.MAGIC]) + b))
def test_decoder_answers_arbitrary_bytes_with_a_refusal_never_an_exception(data: bytes) -> None:
    _decode_bounded(data)
    _decode_bounded(data, max_batch=1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    batch=positions(max_size=40),
    edits=EDITS,
)
def test_decoder_answers_mutated_frames_with_a_refusal_never_an_exception(
    batch: list[dict[str, Any]], edits: list[tuple[int, int, str]]
) -> None:
    _decode_bounded(mutate(compact.encode(batch), edits))


def test_a_header_counting_more_items_than_max_batch_is_refused_before_allocating() -> None:
    data = compact.encode([{"type": "pos", "seq": s, "ts": NOW_MS, "lat": 0.0, "lon": 0.0} for s in range(1, 11)])
    with pytest.raises(compact.TooLarge) as caught:
        compact.decode(data, 9)
    assert caught.value.seqs == list(range(1, 11))
    # A count the frame cannot hold is refused from the header alone, whatever max_batch allows.
    with pytest.raises(ProtocolError, match="cannot fit"):
        compact.decode(bytes([compact.MAGIC, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]) + b"\0" * 100, 10**12)


# -- negotiation and the session ---------------------------------------------------------------------


def session_with(**hello_fields: Any) -> tuple[DriverSession, dict[str, Any]]:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    assert session.receive_hello(hello(tok(), **hello_fields)) is not None
    session.welcome(7, NOW_MS, TokenBucket(1000.0, 1000, 0.0))
    [welcome] = sent(session)
    return session, welcome


def test_welcome_names_compact_when_the_phone_lists_it_and_is_unchanged_for_v1_phones() -> None:
    _, welcome = session_with(encodings=["compact-1", "json"])
    assert welcome["encoding"] == "compact-1"
    _, welcome = session_with(encodings=["json", "zstd-9"])
    assert welcome["encoding"] == "json"
    _, welcome = session_with()
    assert "encoding" not in welcome and set(welcome) == {
        "type",
        "driver",
        "last_seq",
        "server_time",
        "max_frame",
        "max_batch",
    }


@pytest.mark.parametrize("bad", ["compact-1", [1], ["x"] * 17, {"compact-1": True}])
def test_a_malformed_encodings_list_is_a_protocol_error(bad: Any) -> None:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30)
    assert session.receive_hello(hello(tok(), encodings=bad)) is None
    assert sent(session)[0]["code"] == "protocol" and session.close_code == 1008 and session.principal is None


def test_binary_frames_without_compact_close_1003() -> None:
    for fields in ({}, {"encodings": ["json"]}):
        session, _ = session_with(**fields)
        frame = bytes.fromhex(VECTORS["valid"][0]["hex"])
        assert session.receive_binary(frame, NOW_MS, 1.0) == []
        assert session.close_code == 1003 and sent(session) == []


def test_a_compact_batch_yields_the_events_a_json_batch_would() -> None:
    vector = VECTORS["valid"][0]
    session, _ = session_with(encodings=["compact-1"])
    events = session.receive_binary(bytes.fromhex(vector["hex"]), NOW_MS, 1.0)
    twin, _ = session_with()
    assert events == twin.receive(orjson.dumps({"type": "batch", "items": vector["items"]}), NOW_MS, 1.0)
    assert [e.seq for e in events] == [1042, 1043, 1044] and sent(session) == []
    # JSON text frames keep working on a compact connection.
    assert session.receive(orjson.dumps({"type": "pos", **vector["items"][0], "seq": 1045}), NOW_MS, 1.0)


def test_compact_refusals_are_those_of_json() -> None:
    session, _ = session_with(encodings=["compact-1"])
    bad = [
        {"type": "pos", "seq": 1, "ts": NOW_MS, "lat": 91.0, "lon": 0.0},  # invalid: refused alone
        {"type": "pos", "seq": 2, "ts": NOW_MS, "lat": 1.0, "lon": 0.0, "bat": 3.0},  # bad optional: null
    ]
    events = session.receive_binary(compact.encode(bad), NOW_MS, 1.0)
    assert [(e.seq, e.bat) for e in events] == [(2, None)]  # type: ignore[union-attr]
    assert [(f["code"], f["seq"]) for f in sent(session)] == [("invalid", 1)]
    many = [{"type": "pos", "seq": s, "ts": NOW_MS, "lat": 0.0, "lon": 0.0} for s in range(10, 311)]
    assert session.receive_binary(compact.encode(many), NOW_MS, 1.0) == []
    [too_large] = sent(session)
    assert too_large["code"] == "too_large" and too_large["ranges"] == [[10, 310]] and session.close_code is None
    assert session.receive_binary(b"\xc1\x05", NOW_MS, 1.0) == []
    [error] = sent(session)
    assert error["code"] == "protocol" and session.close_code == 1008


def test_a_compact_frame_over_max_frame_closes_1009() -> None:
    session, _ = session_with(encodings=["compact-1"])
    assert session.receive_binary(b"\xc1" + b"\0" * 65_536, NOW_MS, 1.0) == []
    assert session.close_code == 1009
