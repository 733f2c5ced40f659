"""The tamper-evident chain of custody: keyed hashes over each package's scan records. Pure.

Each package's scans are chained in the order they were stored: record `i` carries
`mac_i = HMAC-SHA256(key, "custody" | org | package | i | mac_{i-1} | the scan's content |
chained_at | recovered)`, and the package row carries the chain head (its length and last mac)
together with the consignment, MACed as well (`head_tag`). The key never enters the database.

Without the key, someone who can write the database cannot change a record (its mac no longer
matches), insert or reorder one (the index and the previous mac are inside every mac), delete one
in the middle (the next record's previous mac breaks) or at the tail (the head no longer matches,
and the head's tag cannot be recomputed), nor alter the consignment (the cold-chain range a
temperature is judged by, the client who may see the package). Recomputing every later hash does
not help: each is keyed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

GENESIS: Final = bytes(32)
_RECORD: Final = b"trk-custody-v1\x00"
_HEAD: Final = b"trk-head-v1\x00"
_SEAL: Final = b"trk-seal-v1\x00"
_CHECKPOINT: Final = b"trk-checkpoint-v1\x00"
TAMPER: Final = "tamper_suspected"  # the alert kind of a scan row the service did not write


@dataclass(frozen=True, slots=True)
class Content:
    """A scan as stored in `scans` (what a record's mac covers besides its place in the chain)."""

    package: str
    driver: str
    seq: int
    ts: int
    received_at: int
    event: str
    lat: float | None
    lon: float | None
    temp_c: float | None
    note: str | None
    recipient: str | None
    pod: str | None
    offset_ms: int | None = None  # the connection's clock offset at receipt: it orders the scan (state.py)

    def as_list(self) -> list[Any]:
        out = [
            self.package,
            self.driver,
            self.seq,
            self.ts,
            self.received_at,
            self.event,
            self.lat,
            self.lon,
            self.temp_c,
            self.note,
            self.recipient,
            self.pod,
        ]
        if self.offset_ms is not None:  # rows stored before offsets existed keep the macs they had
            out.append(self.offset_ms)
        return out


@dataclass(frozen=True, slots=True)
class Consignment:
    """The consignment fields the head tag covers (all None for a package never consigned)."""

    client: str | None = None
    consigned_at: int | None = None
    dest_name: str | None = None
    dest_lat: float | None = None
    dest_lon: float | None = None
    window_from: int | None = None
    window_to: int | None = None
    temp_min: float | None = None
    temp_max: float | None = None
    notes: str | None = None

    def as_list(self) -> list[Any]:
        return [
            self.client,
            self.consigned_at,
            self.dest_name,
            self.dest_lat,
            self.dest_lon,
            self.window_from,
            self.window_to,
            self.temp_min,
            self.temp_max,
            self.notes,
        ]


@dataclass(frozen=True, slots=True)
class Record:
    """One stored custody record; `content` is None when its scan row has disappeared."""

    index: int
    driver: str
    seq: int
    chained_at: int
    recovered: bool
    mac: bytes
    content: Content | None


def _mac(key: bytes, domain: bytes, parts: list[Any]) -> bytes:
    # orjson: deterministic, and floats in their shortest round-trip form.
    return hmac.new(key, domain + orjson.dumps(parts), hashlib.sha256).digest()


def record_mac(
    key: bytes, org: str, package: str, index: int, prev: bytes, content: Content, chained_at: int, recovered: bool
) -> bytes:
    return _mac(key, _RECORD, [org, package, index, prev.hex(), content.as_list(), chained_at, recovered])


def head_tag(key: bytes, org: str, package: str, length: int, head: bytes, consignment: Consignment) -> bytes:
    return _mac(key, _HEAD, [org, package, length, head.hex(), consignment.as_list()])


def as_stored(value: float | None, *, real: bool = False) -> float | None:
    """A number as PostgreSQL gives it back: a double, or a float32 widened (`real`)."""
    if value is None:
        return None
    return struct.unpack("f", struct.pack("f", value))[0] if real else float(value)


def seal(key: bytes, org: str, content: Content) -> bytes:
    """A scan row's seal: computed by the service before the INSERT, over the whole row as stored,
    so that only rows it wrote can enter a chain: a row written or altered behind its back has no
    valid seal without the key."""
    return _mac(key, _SEAL, [org, content.as_list()])


def sealed(key: bytes, org: str, content: Content, stored: bytes | None) -> bool:
    return stored is not None and hmac.compare_digest(seal(key, org, content), stored)


def checkpoint_sig(key: bytes, org: str, at: int, instance: str, heads: Sequence[Sequence[Any]]) -> bytes:
    """The signature of a checkpoint: (package, length, head hex) of an org's chains at `at`."""
    return _mac(key, _CHECKPOINT, [org, at, instance, [list(h) for h in heads]])


def against_checkpoint(
    records: Sequence[Record], length: int, checkpoint: tuple[int, bytes, int] | None
) -> list[Problem]:
    """Compare the chain with the latest signed checkpoint of its head, (length, head, at), kept
    outside the database: a chain shorter than it was, or whose record at that length is not the
    one checkpointed, lost its newest records (restoring an older head and tag is not enough)."""
    if checkpoint is None:
        return []
    cp_length, cp_head, at = checkpoint
    if length < cp_length:
        return [
            Problem(
                None,
                f"the chain has {length} records but the checkpoint of {at} recorded {cp_length} records "
                "(its newest records were deleted)",
            )
        ]
    rec = next((r for r in records if r.index == cp_length), None)
    if cp_length and (rec is None or not hmac.compare_digest(rec.mac, cp_head)):
        return [Problem(cp_length, f"record {cp_length} is not the one the checkpoint of {at} recorded")]
    return []


def extend(
    key: bytes,
    org: str,
    package: str,
    length: int,
    head: bytes,
    contents: Sequence[Content],
    chained_at: int,
    recovered: Sequence[bool],
) -> list[tuple[int, bytes]]:
    """The (index, mac) of `contents` appended, in order, to a chain of `length` ending in `head`."""
    out = []
    for i, (content, rec) in enumerate(zip(contents, recovered, strict=True), start=length + 1):
        head = record_mac(key, org, package, i, head, content, chained_at, rec)
        out.append((i, head))
    return out


@dataclass(frozen=True, slots=True)
class Problem:
    index: int | None  # the record concerned; None for the head, the consignment or an unchained scan
    problem: str
    scan: tuple[str, int] | None = None  # (driver, seq) of a scan row that is not in the chain

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "problem": self.problem}
        if self.scan is not None:
            out["driver"], out["seq"] = self.scan
        return out


def verify(
    key: bytes,
    org: str,
    package: str,
    records: Sequence[Record],
    length: int,
    head: bytes | None,
    tag: bytes | None,
    consignment: Consignment,
) -> list[Problem]:
    """Recompute the chain; every way it fails to match is a Problem (none: intact)."""
    problems: list[Problem] = []
    prev = GENESIS
    expected = 1
    ordered = sorted(records, key=lambda r: r.index)
    for rec in ordered:
        if rec.index != expected:
            problems.append(
                Problem(rec.index, f"record {expected} is missing" if rec.index > expected else "duplicate index")
            )
            expected = rec.index
        if rec.content is None:
            problems.append(Problem(rec.index, "the scan of this record is missing"))
        elif rec.content.driver != rec.driver or rec.content.seq != rec.seq:
            problems.append(Problem(rec.index, "the record names another scan"))
        elif not hmac.compare_digest(
            record_mac(key, org, package, rec.index, prev, rec.content, rec.chained_at, rec.recovered), rec.mac
        ):
            problems.append(Problem(rec.index, "the record does not match its mac (altered, or chained elsewhere)"))
        prev = rec.mac
        expected += 1
    last = ordered[-1].index if ordered else 0
    if tag is None or (head is None and length):
        problems.append(Problem(None, "the chain head is missing"))
    else:
        if length != last or not hmac.compare_digest(head or GENESIS, prev):
            problems.append(Problem(None, f"the chain head ({length} records) does not match the records ({last})"))
        if not hmac.compare_digest(head_tag(key, org, package, length, head or GENESIS, consignment), tag):
            problems.append(Problem(None, "the chain head or the consignment was altered"))
    return problems
