"""Pure tests of the shared RFC 6455 codec: no network, no event loop, no sleeps.

The property tests encode random frame sequences (opcodes, fragmentation, sizes across the
125/126/65535/65536 length boundaries, masked or not), feed them to the parser in random
chunks and expect the same frames back; and they break a stream in each way the RFC forbids
and expect the right close code, and no exception but :class:`WsProtocolError`.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.protocol.wscodec import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameCollector,
    FrameParser,
    WsProtocolError,
    apply_mask,
    close_body,
    encode_frame,
    parse_close,
)

Frame = tuple[int, bool, bytes]
MASK = b"\x01\x02\x03\x04"


class Sink:
    """Collects what a parser delivers."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def __call__(self, opcode: int, fin: bool, payload: bytes) -> None:
        self.frames.append((opcode, fin, payload))


def parser(*, masked: bool = True, max_size: int = 1 << 20, assemble: bool = True) -> tuple[FrameParser, Sink]:
    sink = Sink()
    return FrameParser(sink, max_size=max_size, masked=masked, assemble=assemble), sink


def raw_frame(b0: int, payload: bytes, *, mask: bytes | None = MASK, length: int | None = None) -> bytes:
    """A frame with a hand-made first byte (any opcode, RSV bits, FIN) and an optional forged length."""
    n = len(payload) if length is None else length
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", b0, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mask_bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


def unmask_client_frame(frame: bytes) -> tuple[int, bool, bytes]:
    b0, b1 = frame[0], frame[1]
    assert b1 & 0x80, "client frames must be masked"
    n, pos_ = b1 & 0x7F, 2
    if n == 126:
        n, pos_ = struct.unpack_from("!H", frame, 2)[0], 4
    elif n == 127:
        n, pos_ = struct.unpack_from("!Q", frame, 2)[0], 10
    mask = frame[pos_ : pos_ + 4]
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(frame[pos_ + 4 :]))
    assert len(payload) == n
    return b0 & 0x0F, bool(b0 & 0x80), payload


def server_frame(op: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | op
    if n < 126:
        return struct.pack("!BB", b0, n) + payload
    if n < 65536:
        return struct.pack("!BBH", b0, 126, n) + payload
    return struct.pack("!BBQ", b0, 127, n) + payload


# --- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_client_frames_are_masked_with_the_right_length_encoding(size: int) -> None:
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    frame = encode_frame(OP_TEXT, payload, b"\x01\x02\x03\x04")
    assert unmask_client_frame(frame) == (OP_TEXT, True, payload)
    header = 2 + (0 if size < 126 else 2 if size < 65536 else 8) + 4
    assert len(frame) == header + size


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_server_frames_are_unmasked_with_the_right_length_encoding(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    assert encode_frame(OP_BINARY, payload) == server_frame(OP_BINARY, payload)
    assert encode_frame(OP_TEXT, payload, fin=False) == server_frame(OP_TEXT, payload, fin=False)


def test_apply_mask_is_an_involution() -> None:
    data = b"hello websocket"
    masked = apply_mask(data, b"\xaa\xbb\xcc\xdd")
    assert masked != data and apply_mask(masked, b"\xaa\xbb\xcc\xdd") == data
    assert apply_mask(b"", b"abcd") == b""


def test_encoding_refuses_what_the_rfc_forbids() -> None:
    with pytest.raises(ValueError):
        encode_frame(OP_PING, b"x" * 126)
    with pytest.raises(ValueError):
        encode_frame(OP_CLOSE, b"", fin=False)
    with pytest.raises(ValueError):
        encode_frame(OP_TEXT, b"x", b"abc")  # a mask is 4 bytes
    with pytest.raises(ValueError):
        encode_frame(0x3, b"x")
    with pytest.raises(ValueError):
        close_body(1005)  # reserved: never on the wire


def test_close_payload_parsing() -> None:
    assert parse_close(struct.pack("!H", 4001) + b"replaced") == (4001, "replaced")
    assert parse_close(b"") == (1005, "")
    assert OP_CLOSE == 8


def test_close_body_fits_a_control_frame_and_cuts_on_a_character() -> None:
    body = close_body(1009, "é" * 100)  # 200 bytes of UTF-8
    assert len(body) <= 125 and parse_close(body) == (1009, "é" * 61)
    assert parse_close(close_body(1000)) == (1000, "")
    encode_frame(OP_CLOSE, body)  # fits


# --- parsing: the simulator's cases (a server's stream) ------------------------------------


def test_decoder_handles_split_and_coalesced_frames() -> None:
    stream = server_frame(OP_TEXT, b'{"type":"ack"}') + server_frame(OP_TEXT, b"x" * 300) + server_frame(OP_PING, b"p")
    for cut in (1, 2, 3, 7, 100, len(stream)):
        dec = FrameCollector()
        got = []
        for i in range(0, len(stream), cut):
            got += dec.feed(stream[i : i + cut])
        assert got == [(OP_TEXT, b'{"type":"ack"}'), (OP_TEXT, b"x" * 300), (OP_PING, b"p")]
        assert dec.parser.buffered == 0


def test_decoder_reassembles_fragments_around_control_frames() -> None:
    dec = FrameCollector()
    data = (
        server_frame(OP_TEXT, b"ab", fin=False)
        + server_frame(OP_PING, b"")
        + server_frame(OP_CONT, b"cd", fin=False)
        + server_frame(OP_CONT, b"ef")
    )
    assert dec.feed(data) == [(OP_PING, b""), (OP_TEXT, b"abcdef")]


def test_decoder_rejects_masked_oversize_and_orphan_frames() -> None:
    with pytest.raises(WsProtocolError) as err:
        FrameCollector().feed(encode_frame(OP_TEXT, b"hi", b"abcd"))  # masked: a client frame
    assert err.value.code == 1002
    with pytest.raises(WsProtocolError) as err:
        FrameCollector(max_size=10).feed(server_frame(OP_TEXT, b"x" * 11))
    assert err.value.code == 1009
    with pytest.raises(WsProtocolError) as err:
        FrameCollector().feed(server_frame(OP_CONT, b"x"))
    assert err.value.code == 1002


# --- parsing: the server's cases (a client's stream) ---------------------------------------


def test_small_masked_frames_arrive_whole_and_in_order() -> None:
    p, sink = parser()
    frames = [encode_frame(OP_TEXT, b'{"type":"pos","seq":%d}' % i, MASK) for i in range(50)]
    p.feed(b"".join(frames))
    assert sink.frames == [(OP_TEXT, True, b'{"type":"pos","seq":%d}' % i) for i in range(50)]
    assert p.buffered == 0


def test_large_masked_frames_split_over_reads() -> None:
    payload = random.Random(1).randbytes(200_000)
    stream = encode_frame(OP_BINARY, payload, MASK) + encode_frame(OP_TEXT, b"after", MASK)
    p, sink = parser()
    for i in range(0, len(stream), 4096):
        p.feed(stream[i : i + 4096])
    assert sink.frames == [(OP_BINARY, True, payload), (OP_TEXT, True, b"after")]


def test_any_bytes_like_input_is_accepted() -> None:
    p, sink = parser()
    frame = encode_frame(OP_TEXT, b"hello", MASK)
    p.feed(bytearray(frame[:3]))
    p.feed(memoryview(frame)[3:])
    assert sink.frames == [(OP_TEXT, True, b"hello")] and type(sink.frames[0][2]) is bytes


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode_frame(OP_TEXT, b"hi"), 1002),  # unmasked, from a client
        (raw_frame(0x80 | 0x40 | OP_TEXT, b"x"), 1002),  # RSV1 (compressed) without negotiation
        (raw_frame(0x80 | 0x20 | OP_TEXT, b"x"), 1002),
        (raw_frame(0x80 | 0x10 | OP_TEXT, b"x"), 1002),
        *[(raw_frame(0x80 | op, b"x"), 1002) for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)],
        (raw_frame(0x80 | OP_CONT, b"x"), 1002),  # continuation without a message
        (raw_frame(0x80 | OP_PING, b"x" * 126), 1002),  # control frame over 125 bytes
        (raw_frame(OP_PING, b"x"), 1002),  # fragmented control frame
        (raw_frame(OP_TEXT, b"a") + raw_frame(0x80 | OP_TEXT, b"b"), 1002),  # new message inside one
        (raw_frame(0x80 | OP_CLOSE, b"\x03"), 1002),  # close payload of one byte
        (raw_frame(0x80 | OP_CLOSE, struct.pack("!H", 1005)), 1002),  # a code never sent
        (raw_frame(0x80 | OP_CLOSE, struct.pack("!H", 999)), 1002),
        (raw_frame(0x80 | OP_CLOSE, struct.pack("!H", 5000)), 1002),
        (raw_frame(0x80 | OP_TEXT, b"", length=1 << 63)[:14], 1002),  # 64-bit length, top bit set
        (raw_frame(0x80 | OP_BINARY, b"", length=1025)[:8], 1009),  # refused from its header alone
        (raw_frame(OP_TEXT, b"x" * 600) + raw_frame(0x80 | OP_CONT, b"", length=600)[:8], 1009),
    ],
)
def test_violations_give_their_close_code_and_stop_the_parser(data: bytes, code: int) -> None:
    p, sink = parser(max_size=1024)
    with pytest.raises(WsProtocolError) as err:
        p.feed(data)
    assert err.value.code == code and err.value.reason and str(err.value).startswith(str(code))
    assert p.stopped and p.buffered == 0
    p.feed(encode_frame(OP_TEXT, b"ignored", MASK))  # a stopped parser ignores input, never raises
    assert all(op != OP_TEXT or payload != b"ignored" for op, _, payload in sink.frames)


def test_valid_close_frames_are_delivered_and_end_the_stream() -> None:
    p, sink = parser()
    close = encode_frame(OP_CLOSE, close_body(4001, "replaced"), MASK)
    p.feed(encode_frame(OP_TEXT, b"a", MASK) + close + encode_frame(OP_TEXT, b"late", MASK))
    assert sink.frames == [(OP_TEXT, True, b"a"), (OP_CLOSE, True, close_body(4001, "replaced"))]
    assert p.stopped
    q, sink = parser()
    q.feed(encode_frame(OP_CLOSE, b"", MASK))  # no code at all is allowed
    assert sink.frames == [(OP_CLOSE, True, b"")]


def test_stop_from_the_callback_leaves_the_rest_unread() -> None:
    seen: list[bytes] = []

    def on_frame(opcode: int, fin: bool, payload: bytes) -> None:
        seen.append(payload)
        p.stop()

    p = FrameParser(on_frame, max_size=100, masked=True)
    p.feed(encode_frame(OP_TEXT, b"1", MASK) + encode_frame(OP_TEXT, b"2", MASK))
    assert seen == [b"1"] and p.stopped


def test_a_callback_exception_propagates_and_stops_the_parser() -> None:
    def on_frame(opcode: int, fin: bool, payload: bytes) -> None:
        raise KeyError(payload)

    p = FrameParser(on_frame, max_size=100, masked=True)
    with pytest.raises(KeyError):
        p.feed(encode_frame(OP_TEXT, b"1", MASK) + encode_frame(OP_TEXT, b"2", MASK)[:3])
    assert p.stopped and p.buffered == 0
    p.feed(encode_frame(OP_TEXT, b"3", MASK))


def test_frame_mode_delivers_fragments_as_sent() -> None:
    p, sink = parser(assemble=False, max_size=4)
    p.feed(
        encode_frame(OP_TEXT, b"ab", MASK, fin=False)
        + encode_frame(OP_PONG, b"p", MASK)
        + encode_frame(OP_CONT, b"cd", MASK)
    )
    assert sink.frames == [(OP_TEXT, False, b"ab"), (OP_PONG, True, b"p"), (OP_CONT, True, b"cd")]
    with pytest.raises(WsProtocolError) as err:  # the cap is on the message, fragments summed
        p.feed(encode_frame(OP_TEXT, b"abc", MASK, fin=False) + encode_frame(OP_CONT, b"de", MASK))
    assert err.value.code == 1009


def test_a_frame_split_over_many_reads_costs_linear_time() -> None:
    """Buffering must not re-copy what it holds at each read (16 MB in 2 KB reads: 64 GB if it did)."""
    payload = b"\x00" * (16 << 20)
    stream = encode_frame(OP_BINARY, payload, MASK)
    p, sink = parser(max_size=len(payload))
    t0 = time.process_time()
    for i in range(0, len(stream), 2048):
        p.feed(stream[i : i + 2048])
    assert time.process_time() - t0 < 3.0
    assert sink.frames == [(OP_BINARY, True, payload)]


# --- properties ----------------------------------------------------------------------------

SIZES = st.one_of(
    st.sampled_from([0, 1, 2, 124, 125, 126, 127, 65534, 65535, 65536, 65537]),
    st.integers(0, 300),
    st.integers(0, 70_000),
)
CONTROL_SIZES = st.one_of(st.sampled_from([0, 1, 124, 125]), st.integers(0, 125))


@dataclass(frozen=True)
class Wire:
    """Frames as sent, and what the parser must deliver for them in each mode."""

    stream: bytes
    frames: list[Frame]  # assemble=False
    messages: list[Frame]  # assemble=True
    largest: int  # the largest data message, in bytes


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@st.composite
def wires(draw: st.DrawFn, *, masked: bool) -> Wire:
    rng_seed = draw(st.integers(0, 2**32 - 1))
    out: list[bytes] = []
    frames: list[Frame] = []
    messages: list[Frame] = []
    largest = 0

    def send(opcode: int, fin: bool, payload: bytes) -> None:
        mask = draw(st.binary(min_size=4, max_size=4)) if masked else None
        out.append(encode_frame(opcode, payload, mask, fin=fin))
        frames.append((opcode, fin, payload))

    def control() -> None:
        opcode = draw(st.sampled_from([OP_PING, OP_PONG]))
        payload = _payload(draw(CONTROL_SIZES), rng_seed + len(out))
        send(opcode, True, payload)
        messages.append((opcode, True, payload))

    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            control()
            continue
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        parts = [_payload(draw(SIZES), rng_seed + len(out) + k) for k in range(draw(st.integers(1, 3)))]
        for k, part in enumerate(parts):
            send(opcode if k == 0 else OP_CONT, k == len(parts) - 1, part)
            if k < len(parts) - 1 and draw(st.booleans()):
                control()  # control frames may come between fragments
        message = b"".join(parts)
        largest = max(largest, len(message))
        messages.append((opcode, True, message))
    if draw(st.booleans()):  # a close ends the stream
        body = close_body(draw(st.sampled_from([1000, 1001, 1009, 1013, 4000, 4001])), "bye")
        send(OP_CLOSE, True, body)
        messages.append((OP_CLOSE, True, body))
        out.append(draw(st.binary(max_size=20)))  # after a close, anything is ignored
    return Wire(b"".join(out), frames, messages, largest)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes, in turn (the last piece may be shorter)."""
    out, pos, k = [], 0, 0
    while pos < len(data):
        out.append(data[pos : pos + sizes[k % len(sizes)]])
        pos += sizes[k % len(sizes)]
        k += 1
    return out


CHUNKS = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 70_000)), min_size=1, max_size=8)
PROPERTY = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.data(), st.booleans(), st.booleans(), CHUNKS)
def test_frames_survive_any_chunking(data: st.DataObject, masked: bool, assemble: bool, sizes: list[int]) -> None:
    wire = data.draw(wires(masked=masked))
    p, sink = parser(masked=masked, max_size=max(wire.largest, 1), assemble=assemble)
    for chunk in chunked(wire.stream, sizes):
        p.feed(chunk)
    assert sink.frames == (wire.messages if assemble else wire.frames)
    assert p.buffered == 0


@PROPERTY
@given(st.data(), st.booleans(), CHUNKS)
def test_a_message_one_byte_over_the_limit_gives_1009(data: st.DataObject, masked: bool, sizes: list[int]) -> None:
    wire = data.draw(wires(masked=masked))
    if wire.largest == 0:
        return
    p, sink = parser(masked=masked, max_size=wire.largest - 1)
    with pytest.raises(WsProtocolError) as err:
        for chunk in chunked(wire.stream, sizes):
            p.feed(chunk)
    assert err.value.code == 1009
    delivered = [f for f in sink.frames if f[0] in (OP_TEXT, OP_BINARY)]
    assert all(len(f[2]) < wire.largest for f in delivered)


def _bad_frames(kind: str, masked: bool, max_size: int) -> tuple[bytes, int]:
    """A stretch of frames breaking the RFC in one way, and the close code it must get."""
    mask = MASK if masked else None
    wrong = None if masked else MASK
    if kind == "wrong masking":
        return raw_frame(0x80 | OP_TEXT, b"hello", mask=wrong), 1002
    if kind == "rsv":
        return raw_frame(0x80 | 0x40 | OP_TEXT, b"x", mask=mask), 1002
    if kind == "opcode":
        return raw_frame(0x80 | 0x3, b"x", mask=mask), 1002
    if kind == "oversize":
        return raw_frame(0x80 | OP_BINARY, b"y" * (max_size + 1), mask=mask), 1009
    if kind == "orphan continuation":
        return raw_frame(0x80 | OP_CONT, b"x", mask=mask), 1002
    if kind == "long control":
        return raw_frame(0x80 | OP_PING, b"p" * 126, mask=mask), 1002
    if kind == "fragmented control":
        return raw_frame(OP_PONG, b"p", mask=mask), 1002
    if kind == "message inside a message":
        return raw_frame(OP_TEXT, b"a", mask=mask) + raw_frame(0x80 | OP_BINARY, b"b", mask=mask), 1002
    raise AssertionError(kind)


BAD = st.sampled_from(
    [
        "wrong masking",
        "rsv",
        "opcode",
        "oversize",
        "orphan continuation",
        "long control",
        "fragmented control",
        "message inside a message",
    ]
)


@PROPERTY
@given(st.data(), st.booleans(), BAD, CHUNKS)
def test_violations_anywhere_give_their_close_code(
    data: st.DataObject, masked: bool, kind: str, sizes: list[int]
) -> None:
    before = data.draw(wires(masked=masked).filter(lambda w: not w.messages or w.messages[-1][0] != OP_CLOSE))
    after = data.draw(wires(masked=masked))
    max_size = max(before.largest, after.largest, 1)
    bad, code = _bad_frames(kind, masked, max_size)
    p, sink = parser(masked=masked, max_size=max_size)
    with pytest.raises(WsProtocolError) as err:
        for chunk in chunked(before.stream + bad + after.stream, sizes):
            p.feed(chunk)
    assert err.value.code == code, (kind, err.value)
    assert sink.frames == before.messages  # everything before the violation, nothing of it or after
    assert p.stopped


@settings(max_examples=500, deadline=None, database=None)
@given(st.binary(max_size=600), st.booleans(), st.booleans(), st.integers(1, 64))
def test_garbage_raises_nothing_but_protocol_errors(data: bytes, masked: bool, assemble: bool, cut: int) -> None:
    p, _ = parser(masked=masked, max_size=300, assemble=assemble)
    try:
        for i in range(0, len(data), cut):
            p.feed(data[i : i + cut])
    except WsProtocolError as exc:
        assert exc.code in (1002, 1009)
