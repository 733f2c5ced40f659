"""Frame decoding and the server's outgoing frames (PROTOCOL.md). Pure: no I/O.

Outgoing frames are encoded here, once, as bytes; the hub joins pre-encoded frames into a
`batch` without decoding them again.
"""

from __future__ import annotations

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
    """Parse one frame: a JSON object with a string `type`, else ProtocolError (1008)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("frame is not JSON") from None
    if type(obj) is not dict:
        raise ProtocolError("frame must be a JSON object")
    if type(obj.get("type")) is not str:
        raise ProtocolError("frame has no type")
    return obj


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
