"""The compact-2 batch encoding (tracker/protocol/compact2.py, tracker/protocol/bits.py) and its
negotiation in the sans-I/O driver session: test vectors both ways, a round-trip property within
the stated precision for any batch of positions and scans, the decoder fuzzed with arbitrary bytes
and mutated frames. No event loop, no socket."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.protocol import compact, compact2
from tracker.protocol.bits import BitReader, BitWriter
from tracker.protocol.events import SEQ_MAX, TS_MIN, check_event
from tracker.protocol.frames import ProtocolError

from .test_compact import EDITS, mutate, session_with
from .test_sessions import NOW_MS, sent

VECTORS = json.loads((Path(__file__).parent / "data" / "compact-2.json").read_text(encoding="utf-8"))
# docs/PROTOCOL.md: half a unit of each field's fixed point (values are rounded); seq, ts, strings exact.
PRECISION = {"lat": 0.5e-7, "lon": 0.5e-7, "acc": 0.005, "spd": 0.005, "hdg": 0.05, "alt": 0.05, "bat": 0.0005}
PRECISION_SCAN = {"lat": 0.5e-7, "lon": 0.5e-7, "temp_c": 0.005}
FLOAT_SLACK = 1e-9


# -- test vectors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vectors_encode_and_decode_exactly(vector: dict[str, Any]) -> None:
    assert compact2.encode(vector["items"]).hex() == vector["hex"]
    assert compact2.decode(bytes.fromhex(vector["hex"]), VECTORS["max_batch"]) == vector["items"]


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_are_refused_with_their_message(vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as caught:
        compact2.decode(bytes.fromhex(vector["hex"]), VECTORS["max_batch"])
    assert str(caught.value) == vector["error"] and caught.value.close_code == 1008


def test_the_worked_example_of_the_protocol_doc_is_the_first_vector() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    dump = bytes.fromhex(VECTORS["valid"][0]["hex"]).hex(" ")
    assert dump in doc and len(dump.split()) == 77


# -- the bit codes ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(
        st.one_of(
            st.tuples(st.just("u"), st.integers(0, 2**64 - 1), st.just(0)),
            st.tuples(st.just("s"), st.integers(-(2**63), 2**63 - 1), st.just(0)),
            st.tuples(st.just("r"), st.integers(0, 2**64 - 1), st.integers(0, 63)),
            st.tuples(st.just("b"), st.integers(0, 2**20 - 1), st.just(20)),
        ),
        max_size=40,
    )
)
def test_bit_codes_read_back_what_was_written(fields: list[tuple[str, int, int]]) -> None:
    w = BitWriter()
    for kind, value, k in fields:
        if kind == "u":
            w.uvar(value)
        elif kind == "s":
            w.svar(value)
        elif kind == "r":
            w.rice(value, k)
        else:
            w.bits(value, k)
    r = BitReader(w.bytes())
    for kind, value, k in fields:
        if kind == "u":
            assert r.uvar("x") == value
        elif kind == "s":
            assert r.svar("x") == value
        elif kind == "r":
            assert r.rice(k, "x") == value
        else:
            assert r.bits(k, "x") == value
    r.finish()


# -- round trip ---------------------------------------------------------------------------------------


def _opt(lo: float, hi: float) -> st.SearchStrategy[float | None]:
    return st.none() | st.floats(lo, hi, allow_nan=False)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@st.composite
def events(draw: st.DrawFn, max_size: int = 120) -> list[dict[str, Any]]:
    """Any batch of valid positions and scans, consecutive seqs or not, smooth tracks or not."""
    n = draw(st.integers(1, max_size))
    seq = draw(st.integers(1, SEQ_MAX - 1 - 2 * max_size))
    ts = draw(st.integers(TS_MIN, NOW_MS))
    out = []
    for _ in range(n):
        seq += draw(st.sampled_from([1, 1, 1, 2]))
        ts += draw(st.sampled_from([1000, 1000, 999, 0])) if draw(st.booleans()) else draw(st.integers(0, 10**6))
        item: dict[str, Any] = {"seq": seq, "ts": min(ts, NOW_MS + 86_400_000)}
        if draw(st.integers(0, 4)):
            item |= {"type": "pos", "lat": draw(st.floats(-90, 90)), "lon": draw(st.floats(-180, 180))}
            for key, lo, hi in (
                ("acc", 0, 100_000),
                ("spd", 0, 300),
                ("hdg", 0, 360),
                ("alt", -1000, 10_000),
                ("bat", 0, 1),
            ):
                value = draw(_opt(lo, hi))
                if value is not None:
                    item[key] = value
        else:
            item |= {
                "type": "scan",
                "package": draw(_TEXT.filter(bool)),
                "event": draw(st.sampled_from(compact2.SCAN_EVENTS)),
            }
            if draw(st.booleans()):
                item |= {"lat": draw(st.floats(-90, 90)), "lon": draw(st.floats(-180, 180))}
            temp = draw(_opt(-80, 80))
            if temp is not None:
                item["temp_c"] = temp
            for key in compact2.SCAN_STRINGS:
                text = draw(st.none() | _TEXT)
                if text is not None:
                    item[key] = text
        out.append(item)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=events())
def test_decode_of_encode_is_the_batch_within_the_stated_precision(batch: list[dict[str, Any]]) -> None:
    decoded = compact2.decode(compact2.encode(batch), 300)
    assert len(decoded) == len(batch)
    for got, want in zip(decoded, batch, strict=True):
        assert got.keys() == want.keys()
        precision = PRECISION if want["type"] == "pos" else PRECISION_SCAN
        for key, value in want.items():
            if key in precision:
                assert abs(got[key] - value) <= precision[key] + FLOAT_SLACK, (key, got[key], value)
            else:
                assert got[key] == value and type(got[key]) is type(value), key
        # The one validator judges both encodings alike: what JSON stores, compact-2 stores.
        ev, ref = check_event(got, NOW_MS), check_event(want, NOW_MS)
        assert type(ev) is type(ref) and ev.seq == ref.seq  # type: ignore[union-attr]


def test_a_driver_a_second_apart_costs_under_half_of_compact_1() -> None:
    """The point of compact-2: seq and ts nearly free, smooth tracks in a few bits."""
    fixes = [
        {
            "type": "pos",
            "seq": 100 + i,
            "ts": NOW_MS + 1000 * i + (i * 7919) % 23,
            "lat": round(52.52 + i * 9e-5 + ((i * 31) % 7) * 1e-6, 7),
            "lon": round(13.405 + i * 1.4e-4, 7),
            "acc": 5.0 + (i % 3) * 0.5,
            "spd": 10.0,
            "hdg": 90,
            "bat": 0.8,
        }
        for i in range(60)
    ]
    size1, size2 = len(compact.encode(fixes)), len(compact2.encode(fixes))
    assert size2 * 2 < size1 and size2 / 60 < 5.0, (size1, size2)


# -- fuzzing ----------------------------------------------------------------------------------------


def _decode_bounded(data: bytes, max_batch: int = 300) -> None:
    """Only the documented answers, quickly: the items, ProtocolError or TooLarge."""
    t0 = time.perf_counter()
    try:
        items = compact2.decode(data, max_batch)
    except ProtocolError as exc:
        assert exc.close_code == 1008 and str(exc).startswith("compact: ")
    except compact.TooLarge as exc:
        assert exc.count > max_batch and len(exc.seqs) == exc.count
    else:
        assert 1 <= len(items) <= max_batch
        for item in items:
            check_event(item, NOW_MS)  # never raises
    assert time.perf_counter() - t0 < 1.0


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=2000) | st.binary(max_size=200).map(lambda b: bytes([compact2.MAGIC]) + b))
def test_decoder_answers_arbitrary_bytes_with_a_refusal_never_an_exception(data: bytes) -> None:
    _decode_bounded(data)
    _decode_bounded(data, max_batch=1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    batch=events(max_size=30),
    edits=EDITS,
)
def test_decoder_answers_mutated_frames_with_a_refusal_never_an_exception(
    batch: list[dict[str, Any]], edits: list[tuple[int, int, str]]
) -> None:
    _decode_bounded(mutate(compact2.encode(batch), edits))


def test_a_count_over_max_batch_is_too_large_naming_the_seqs_and_a_huge_one_is_refused() -> None:
    data = compact2.encode([{"type": "pos", "seq": s, "ts": NOW_MS, "lat": 0.0, "lon": 0.0} for s in range(1, 11)])
    with pytest.raises(compact.TooLarge) as caught:
        compact2.decode(data, 9)
    assert caught.value.seqs == list(range(1, 11))
    # Constant columns cost no bits per item: a short frame may claim any count. Beyond SEQS_MAX it
    # is refused without building anything per item.
    w = BitWriter()
    w.uvar(10**15)
    with pytest.raises(ProtocolError, match="more than any batch may carry"):
        compact2.decode(bytes([compact2.MAGIC]) + w.bytes(), 300)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"type": "pos", "seq": 1, "ts": NOW_MS, "lat": float("nan"), "lon": 0.0}, "lat: not a finite number"),
        ({"type": "scan", "seq": 1, "ts": NOW_MS, "package": "p", "event": "lost"}, "event: not one of"),
        ({"type": "scan", "seq": 1, "ts": NOW_MS, "package": "\ud800", "event": "fail"}, "surrogates not allowed"),
        ({"type": "ping", "seq": 1, "ts": NOW_MS}, "an event must be pos or scan"),
    ],
)
def test_the_encoder_refuses_what_the_format_cannot_carry(item: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compact2.encode([item])


# -- negotiation and the session ---------------------------------------------------------------------


def test_welcome_names_compact_2_first_then_compact_1_and_json() -> None:
    assert session_with(encodings=["compact-1", "compact-2", "json"])[1]["encoding"] == "compact-2"
    assert session_with(encodings=["compact-1", "json"])[1]["encoding"] == "compact-1"
    _, welcome = session_with(encodings=["compact-2"], acks="compact")
    assert welcome["encoding"] == "compact-2" and welcome["acks"] == "compact"


def test_a_compact_2_batch_yields_the_events_a_json_batch_would_and_compact_1_frames_still_work() -> None:
    vector = VECTORS["valid"][0]
    session, _ = session_with(encodings=["compact-2"])
    events = session.receive_binary(bytes.fromhex(vector["hex"]), NOW_MS, 1.0)
    twin, _ = session_with()
    assert events == twin.receive(orjson.dumps({"type": "batch", "items": vector["items"]}), NOW_MS, 1.0)
    assert [(e.kind, e.seq) for e in events] == [("pos", 1042), ("pos", 1043), ("scan", 1044), ("pos", 1045)]
    one = {"type": "pos", "seq": 2000, "ts": NOW_MS, "lat": 1.0, "lon": 2.0}
    assert [e.seq for e in session.receive_binary(compact.encode([one]), NOW_MS, 1.0)] == [2000]
    assert sent(session) == []


def test_a_compact_2_frame_on_a_compact_1_connection_is_a_protocol_error() -> None:
    session, _ = session_with(encodings=["compact-1"])
    assert session.receive_binary(bytes.fromhex(VECTORS["valid"][0]["hex"]), NOW_MS, 1.0) == []
    [error] = sent(session)
    assert error["code"] == "protocol" and "0xC1" in error["message"] and session.close_code == 1008


def test_compact_2_refusals_are_those_of_json() -> None:
    session, _ = session_with(encodings=["compact-2"])
    bad = [
        {"type": "pos", "seq": 1, "ts": NOW_MS, "lat": 91.0, "lon": 0.0},  # invalid: refused alone
        {"type": "scan", "seq": 2, "ts": NOW_MS, "package": "a\u200bb", "event": "pickup"},  # invalid id
        {"type": "pos", "seq": 3, "ts": NOW_MS, "lat": 1.0, "lon": 0.0, "bat": 3.0},  # bad optional: null
    ]
    events = session.receive_binary(compact2.encode(bad), NOW_MS, 1.0)
    assert [(e.seq, e.bat) for e in events] == [(3, None)]  # type: ignore[union-attr]
    assert [(f["code"], f["seq"]) for f in sent(session)] == [("invalid", 1), ("invalid", 2)]
    many = [{"type": "pos", "seq": s, "ts": NOW_MS, "lat": 0.0, "lon": 0.0} for s in range(10, 311)]
    assert session.receive_binary(compact2.encode(many), NOW_MS, 1.0) == []
    [too_large] = sent(session)
    assert too_large["code"] == "too_large" and too_large["ranges"] == [[10, 310]] and session.close_code is None
    assert session.receive_binary(b"\xc3\x05", NOW_MS, 1.0) == []
    [error] = sent(session)
    assert error["code"] == "protocol" and error["message"].startswith("compact: ") and session.close_code == 1008


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(0, 63),
    values=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 300), max_size=50),
    cut=st.integers(0, 8),
)
def test_a_run_of_rice_codes_reads_back_and_a_cut_one_is_refused(k: int, values: list[int], cut: int) -> None:
    w = BitWriter()
    for u in values:
        w.rice(u, k)
    assert BitReader(w.bytes()).rices(len(values), k, "x") == values
    data = w.bytes()
    if values and cut and len(data) > cut:
        with pytest.raises(ProtocolError, match="compact: "):
            BitReader(data[: len(data) - cut]).rices(len(values), k, "x")
