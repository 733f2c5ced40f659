"""Frame decoding and the server's outgoing frames (PROTOCOL.md). Pure: no I/O.

Outgoing frames are encoded here, once, as bytes; the hub joins pre-encoded frames into a
`batch` without decoding them again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Final

import orjson

MAX_FRAME: Final = 65_536
MAX_BATCH: Final = 300

Ranges = list[list[int]]


class ProtocolError(Exception):
    """The peer broke the protocol: the connection closes with `close_code`."""

    def __init__(self, message: str, *, close_code: int = 1008) -> None:
        super().__init__(message)
        self.close_code = close_code


def decode(data: str | bytes) -> dict[str, Any]:
    """Parse one frame: a JSON object with a string `type`, else ProtocolError (1008).

    orjson refuses some valid JSON: a number beyond a double (`1e400`) and a lone surrogate escape
    (`"\\ud83d"`, an emoji cut in half). Only then does the stdlib parser try (the hot path stays on
    orjson): such a value reaches the validators, which store a bad optional field as null and refuse
    an event whose required field is bad; a valid frame is never called "not JSON".
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = _decode_slowly(data)
    if type(obj) is not dict:
        raise ProtocolError("frame must be a JSON object")
    if type(obj.get("type")) is not str:
        raise ProtocolError("frame has no type")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN, Infinity, -Infinity: Python's json accepts them, JSON does not


def _parse_int(text: str) -> int | float:
    # Python refuses to parse more than 4300 digits; no field takes an integer of over 100 (seq < 2^53):
    # as a float it is out of range, like 1e400, so the field's validator decides.
    return int(text) if len(text) <= 100 else float(text)


def _decode_slowly(data: str | bytes) -> Any:
    """What orjson refused, parsed by the stdlib: valid JSON it takes, anything else is not JSON."""
    if not isinstance(data, str):
        try:
            data = data.decode("utf-8")  # never the UTF-16/32 guessing of json.loads(bytes)
        except UnicodeDecodeError:
            raise ProtocolError("frame is not UTF-8") from None  # 1008, like every frame not JSON
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_int=_parse_int)
    except RecursionError:
        raise ProtocolError("frame nests too deeply") from None
    except ValueError:  # JSONDecodeError, NaN or Infinity
        raise ProtocolError("frame is not JSON") from None


def seq_ranges(seqs: Iterable[int]) -> Ranges:
    """Merge seqs into as few inclusive `[a, b]` ranges as possible, ascending."""
    ranges: Ranges = []
    for seq in sorted(set(seqs)):
        if ranges and ranges[-1][1] + 1 == seq:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def ack(seqs: Iterable[int]) -> bytes:
    return orjson.dumps({"type": "ack", "ranges": seq_ranges(seqs)})


def error(
    code: str,
    message: str | None = None,
    *,
    seq: int | None = None,
    seqs: Sequence[int] = (),
    retry_ms: int | None = None,
) -> bytes:
    """An `error` frame naming one `seq`, or several as `ranges`."""
    frame: dict[str, Any] = {"type": "error", "code": code}
    if seq is not None:
        frame["seq"] = seq
    elif seqs:
        frame["ranges"] = seq_ranges(seqs)
    if message:
        frame["message"] = message
    if retry_ms is not None:
        frame["retry_ms"] = retry_ms
    return orjson.dumps(frame)


def encode(frame: dict[str, Any]) -> bytes:
    return orjson.dumps(frame)


def batch(items: Sequence[bytes]) -> bytes:
    """Join pre-encoded frames into one `batch` frame without re-encoding them."""
    return b'{"type":"batch","items":[' + b",".join(items) + b"]}"
