"""The compact live form and cumulative acks, pure (docs/PROTOCOL.md, "Compact live frames",
"Cumulative acks"): no network, no loop. The end-to-end tests are in tests/test_acks_ws.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.protocol import compact_live
from tracker.protocol.acks import MAX_SPANS, CumulativeAcks, decode_binary
from tracker.protocol.frames import ProtocolError

FIELDS = {"acc": 0.05, "spd": 0.05, "hdg": 0.5, "alt": 0.5, "bat": 0.005}


def fix(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "pos",
        "seq": 1042 + i,
        "ts": 1764240001000 + 1000 * i + (i * 37) % 23,
        "lat": -1.2920731 + i * 0.0000917,
        "lon": 36.8219462 + i * 0.0000853,
        "acc": 4.0 + (i % 5) * 0.5,
        "spd": 13.9 + (i % 3) * 0.1,
        "hdg": 43 + (i % 4),
        "alt": 1661 + i % 3,
        "bat": 0.81,
        **extra,
    }


def test_the_worked_example_of_protocol_md() -> None:
    phone = compact_live.LiveContext()
    frames = [phone.encode(fix(i)) for i in range(3)]
    assert frames[0].hex(" ") == "c2 a4 10 d0 9f b0 ce d8 66 b5 9e a9 0c 8c d5 94 df 02 1f 50 96 02 56 fa 19 a2 01"
    assert frames[1].hex(" ") == "c2 02 ec 0f aa 0e aa 0d 1f 0a 02 02 02 00"
    assert frames[2].hex(" ") == "c2 00 2d 00 00 1f 0a 02 02 02 00"
    server = compact_live.LiveContext()
    assert server.decode(frames[1 - 1])["seq"] == 1042
    second = server.decode(frames[1])
    assert second == {
        "type": "pos", "seq": 1043, "ts": 1764240002014, "lat": -1.2919814, "lon": 36.8220315,
        "acc": 4.5, "spd": 14.0, "hdg": 44, "alt": 1662, "bat": 0.81,
    }  # fmt: skip


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "seq": st.integers(1, 2**53 - 1),
                "ts": st.integers(1577836800000, 4102444800000),
                "lat": st.floats(-90, 90),
                "lon": st.floats(-180, 180),
            },
            optional={
                "acc": st.floats(0, 100000),
                "spd": st.floats(0, 300),
                "hdg": st.floats(0, 360),
                "alt": st.floats(-1000, 10000),
                "bat": st.floats(0, 1),
            },
        ),
        min_size=1,
        max_size=30,
    )
)
def test_decode_of_encode_is_the_fix_within_the_stated_precision(fixes: list[dict[str, Any]]) -> None:
    phone, server = compact_live.LiveContext(), compact_live.LiveContext()
    for sent in fixes:
        got = server.decode(phone.encode({"type": "pos", **sent}))
        assert got["seq"] == sent["seq"] and got["ts"] == sent["ts"]
        assert abs(got["lat"] - sent["lat"]) <= 0.5e-7 + 1e-12 and abs(got["lon"] - sent["lon"]) <= 0.5e-7 + 1e-12
        assert set(got) - {"type", "seq", "ts", "lat", "lon"} == set(sent) - {"seq", "ts", "lat", "lon"}
        for key, precision in FIELDS.items():
            if key in sent:
                assert abs(got[key] - sent[key]) <= precision + 1e-9, (key, got[key], sent[key])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5))
def test_any_bytes_decode_or_are_a_protocol_error(frames: list[bytes]) -> None:
    server = compact_live.LiveContext()
    for data in frames:
        before = (server.count, list(server.prev), list(server.step), list(server.last))
        try:
            item = server.decode(b"\xc2" + data)
        except ProtocolError as exc:
            assert str(exc).startswith("compact: ")
            assert (server.count, server.prev, server.step, server.last) == before  # nothing of it kept
        else:
            assert item["type"] == "pos" and all(abs(v) < 2**62 for v in server.prev)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1\x00\x00\x00\x00\x00", "compact: the first byte of a live frame must be 0xC2"),
        (b"\xc2\x02\x02\x02", "compact: frame ends inside lon"),
        (b"\xc2\x02\x02\x02\x02\x20", "compact: presence bits set beyond the 5 optional fields"),
        (b"\xc2\x02\x02\x02\x02\x00\x00", "compact: 1 bytes after the last field"),
        (
            b"\xc2" + b"\xfe" + b"\xff" * 8 + b"\x01" + b"\x02\x02\x02\x00",
            "compact: seq: a value beyond 2^62 units",
        ),
    ],
)
def test_malformed_live_frames(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        compact_live.LiveContext().decode(data)
    assert str(exc.value) == message and exc.value.close_code == 1008


# -- cumulative acks -------------------------------------------------------------------------


def frame(ledger: CumulativeAcks) -> dict[str, Any] | None:
    data = ledger.frame()
    return None if data is None else orjson.loads(data)


def test_contiguous_seqs_are_one_through_and_nothing_else() -> None:
    ledger = CumulativeAcks(1041, 1000)
    assert frame(ledger) is None  # nothing stored: no frame
    for seq in range(1042, 1062):
        ledger.stored(seq)
    assert frame(ledger) == {"type": "ack", "through": 1061}
    assert frame(ledger) is None


def test_a_gap_holds_through_and_what_lies_beyond_goes_as_ranges() -> None:
    ledger = CumulativeAcks(0, 1000)
    for seq in (1, 2, 4, 5, 9):
        ledger.stored(seq)
    assert frame(ledger) == {"type": "ack", "through": 2, "ranges": [[4, 5], [9, 9]]}
    ledger.stored(3)  # the gap fills: through jumps over what was acked by ranges
    assert frame(ledger) == {"type": "ack", "through": 5}
    ledger.refused(6)  # a final refusal (its error was written before) lets through pass it
    ledger.refused(8)
    ledger.stored(7)
    assert frame(ledger) == {"type": "ack", "through": 9}


def test_seqs_at_or_below_the_welcomes_last_seq_go_as_ranges() -> None:
    ledger = CumulativeAcks(100, 1000)
    for seq in (7, 8, 101):
        ledger.stored(seq)
    assert frame(ledger) == {"type": "ack", "through": 101, "ranges": [[7, 8]]}
    ledger.stored(50)
    assert frame(ledger) == {"type": "ack", "through": 101, "ranges": [[50, 50]]}


def test_unavailable_or_rate_limited_seqs_are_never_passed() -> None:
    ledger = CumulativeAcks(0, 1000)
    ledger.stored(1)
    ledger.stored(3)  # 2 was refused unavailable: never marked until stored
    assert frame(ledger) == {"type": "ack", "through": 1, "ranges": [[3, 3]]}
    ledger.stored(2)
    assert frame(ledger) == {"type": "ack", "through": 3}


def test_the_ledger_is_bounded_whatever_the_numbering() -> None:
    ledger = CumulativeAcks(0, 1000)
    for seq in range(2, 2 + 4 * MAX_SPANS, 2):  # every other seq: a span each
        ledger.stored(seq)
    assert len(ledger.spans) == MAX_SPANS
    got = frame(ledger)
    assert got is not None and "through" not in got and len(got["ranges"]) == 2 * MAX_SPANS  # every one acked


def test_compact_acks_stand_for_the_json_ones() -> None:
    ledger = CumulativeAcks(1041, 1000, binary=True)
    for seq in (7, 8, *range(1042, 1062), 1064, 1065):
        ledger.stored(seq)
    data = ledger.frame()
    assert data is not None and data.hex(" ") == "a1 14 02 07 01 a0 08 01"  # through 1061 (+20), [7, 8], [1064, 1065]
    assert decode_binary(data, 1041) == {"type": "ack", "through": 1061, "ranges": [[7, 8], [1064, 1065]]}
    ledger.stored(1062)
    data = ledger.frame()
    assert data == b"\xa1\x15\x00" and decode_binary(data, 1041) == {"type": "ack", "through": 1062}


@pytest.mark.parametrize(
    "data", [b"", b"\xa2\x00\x00", b"\xa1\x01", b"\xa1\x00\x05\x01\x01", b"\xa1\x00\x00\x00", b"\xa1\x80\x00\x00"]
)
def test_malformed_compact_acks_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_binary(data, 0)
