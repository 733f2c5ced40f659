"""PMTiles v3, the single-file tile archive (https://github.com/protomaps/PMTiles/blob/main/spec/v3/spec.md):
its header, its varint directories and the Hilbert-curve tile ids. Pure: bytes in, values out; the
file is read by tracker/tiles/archive.py.

An archive is a 127-byte header, a root directory, JSON metadata, leaf directories and the tile data.
A directory is a list of entries sorted by tile id; an entry either addresses `run_length` tiles with
the same bytes (offset and length in the tile data) or, with a run length of 0, a leaf directory
(offset and length in the leaf-directory section) holding the entries from its tile id on.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import zlib
from array import array
from dataclasses import dataclass

HEADER_LEN = 127
MAGIC = b"PMTiles"
MAX_ZOOM = 30  # 4**31 tile ids would overflow the format's 64-bit ids a level later; no raster set goes near

COMPRESSION = {0: "unknown", 1: "none", 2: "gzip", 3: "brotli", 4: "zstd"}
TILE_TYPE = {0: "unknown", 1: "mvt", 2: "png", 3: "jpeg", 4: "webp", 5: "avif"}
# The raster types a browser draws in an <img>, with the URL extension and media type each is served as.
RASTER = {"png": ("png", "image/png"), "jpeg": ("jpg", "image/jpeg"), "webp": ("webp", "image/webp")}
RASTER["avif"] = ("avif", "image/avif")

_OFFSET_FIELDS = (  # the header's eleven 64-bit numbers, in their order
    "root_offset",
    "root_length",
    "metadata_offset",
    "metadata_length",
    "leaf_offset",
    "leaf_length",
    "data_offset",
    "data_length",
    "addressed_tiles",
    "tile_entries",
    "tile_contents",
)
_HEADER = struct.Struct("<7sB8Q3Q6B4iB2i")
assert _HEADER.size == HEADER_LEN


class FormatError(ValueError):
    """The bytes are not a PMTiles v3 archive the dashboard can use; the message says why."""


@dataclass(frozen=True, slots=True)
class Header:
    root_offset: int
    root_length: int
    metadata_offset: int
    metadata_length: int
    leaf_offset: int
    leaf_length: int
    data_offset: int
    data_length: int
    addressed_tiles: int
    tile_entries: int
    tile_contents: int
    clustered: bool
    internal_compression: str
    tile_compression: str
    tile_type: str
    min_zoom: int
    max_zoom: int
    bounds: tuple[float, float, float, float]  # west, south, east, north (degrees)
    center: tuple[int, float, float]  # zoom, lon, lat

    def sections(self) -> list[tuple[str, int, int]]:
        """(name, offset, length) of each section, to check against the file's size."""
        return [
            ("root directory", self.root_offset, self.root_length),
            ("metadata", self.metadata_offset, self.metadata_length),
            ("leaf directories", self.leaf_offset, self.leaf_length),
            ("tile data", self.data_offset, self.data_length),
        ]


def parse_header(buf: bytes) -> Header:
    """The header of an archive from its first 127 bytes; FormatError if they are not PMTiles v3."""
    if len(buf) < HEADER_LEN:
        raise FormatError(f"too short for a PMTiles header ({len(buf)} bytes, 127 needed)")
    if buf[:2] == b"PM" and buf[:7] != MAGIC:
        raise FormatError(f"PMTiles version {buf[2]} (an old format): convert it to v3 (`pmtiles convert`)")
    if buf[:7] != MAGIC:
        raise FormatError("not a PMTiles archive (no 'PMTiles' magic at its start)")
    v = _HEADER.unpack(buf[:HEADER_LEN])
    if v[1] != 3:
        raise FormatError(f"PMTiles version {v[1]}: only version 3 is supported")
    offsets = dict(zip(_OFFSET_FIELDS, v[2:13], strict=True))
    return Header(
        **offsets,
        clustered=v[13] == 1,
        internal_compression=COMPRESSION.get(v[14], f"code {v[14]}"),
        tile_compression=COMPRESSION.get(v[15], f"code {v[15]}"),
        tile_type=TILE_TYPE.get(v[16], f"code {v[16]}"),
        min_zoom=v[17],
        max_zoom=v[18],
        bounds=(v[19] / 1e7, v[20] / 1e7, v[21] / 1e7, v[22] / 1e7),
        center=(v[23], v[24] / 1e7, v[25] / 1e7),
    )


def raster_problem(h: Header) -> str | None:
    """Why the dashboard cannot serve this archive's tiles, or None."""
    if h.tile_type == "mvt":
        return "holds vector tiles (MVT); the dashboard draws raster tiles only (png, jpeg, webp, avif)"
    if h.tile_type not in RASTER:
        return f"tile type {h.tile_type}; the dashboard draws raster tiles only (png, jpeg, webp, avif)"
    if h.internal_compression not in ("none", "gzip"):
        return f"its directories are compressed with {h.internal_compression}; only gzip or none are supported"
    if h.tile_compression not in ("none", "unknown", "gzip"):
        return f"its tiles are compressed with {h.tile_compression}; only gzip or none are supported"
    if not h.min_zoom <= h.max_zoom <= MAX_ZOOM:
        return f"zoom levels {h.min_zoom}..{h.max_zoom} are not a range within 0..{MAX_ZOOM}"
    if h.root_length == 0:
        return "has no root directory"
    return None


# --- directories ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    tile_id: int
    offset: int
    length: int
    run_length: int  # 0: a leaf directory at `offset` in the leaf section

    @property
    def leaf(self) -> bool:
        return self.run_length == 0


class Directory:
    """A decoded directory, searchable by tile id: four arrays of 64-bit numbers (32 bytes an entry;
    a list of Entry objects would take about five times that, and archive.py caches 64 leaves of
    thousands of entries)."""

    __slots__ = ("ids", "lengths", "offsets", "runs")

    def __init__(self, ids: list[int], offsets: list[int], lengths: list[int], runs: list[int]) -> None:
        self.ids, self.offsets = array("Q", ids), array("Q", offsets)
        self.lengths, self.runs = array("Q", lengths), array("Q", runs)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def entries(self) -> list[Entry]:
        return [Entry(*e) for e in zip(self.ids, self.offsets, self.lengths, self.runs, strict=True)]

    def find(self, tile_id: int) -> Entry | None:
        """The entry holding `tile_id`: a tile entry whose run covers it, or the leaf directory that
        may hold it (the last leaf starting at or before it); None if the archive has no such tile."""
        i = bisect.bisect_right(self.ids, tile_id) - 1
        if i < 0:
            return None
        first, run = self.ids[i], self.runs[i]
        if run == 0 or tile_id - first < run:
            return Entry(first, self.offsets[i], self.lengths[i], run)
        return None


def decompress(buf: bytes, compression: str, *, limit: int) -> bytes:
    """`buf` as stored with `compression` (none or gzip), at most `limit` bytes once decompressed."""
    if compression == "none":
        return buf
    if compression != "gzip":
        raise FormatError(f"{compression} compression is not supported")
    d = zlib.decompressobj(wbits=31)  # gzip framing only
    try:
        out = d.decompress(buf, limit)
    except zlib.error as exc:
        raise FormatError(f"a directory is not valid gzip: {exc}") from None
    if d.unconsumed_tail:
        raise FormatError(f"a directory decompresses to more than {limit} bytes")
    if not d.eof:
        raise FormatError("a directory's gzip stream is truncated")
    return out


def decode_directory(buf: bytes, compression: str, *, limit: int = 64 << 20) -> Directory:
    """A directory from its stored bytes; FormatError when they do not decode to sorted entries."""
    raw = decompress(buf, compression, limit=limit)
    (n,), pos = _varints(raw, 0, 1)
    if n > len(raw):  # each entry takes at least 4 bytes: a count this large is garbage
        raise FormatError(f"a directory claims {n} entries in {len(raw)} bytes")
    deltas, pos = _varints(raw, pos, n)
    runs, pos = _varints(raw, pos, n)
    lengths, pos = _varints(raw, pos, n)
    raw_offsets, pos = _varints(raw, pos, n)
    if pos != len(raw):
        raise FormatError(f"a directory has {len(raw) - pos} bytes after its entries")
    ids = list(itertools.accumulate(deltas))
    if n and (raw_offsets[0] == 0):
        raise FormatError("a directory's first entry has no offset")
    offsets: list[int] = []
    end = 0
    for i in range(n):
        if lengths[i] == 0:
            raise FormatError(f"a directory entry for tile id {ids[i]} has a length of 0")
        if i and deltas[i] == 0:
            raise FormatError("a directory's tile ids are not increasing")
        offset = raw_offsets[i] - 1 if raw_offsets[i] else end  # 0: right after the previous entry's bytes
        offsets.append(offset)
        end = offset + lengths[i]
    if any(v >= 1 << 64 for v in (*ids[-1:], *offsets, *lengths, *runs)):
        raise FormatError("a directory has a number beyond 64 bits")
    return Directory(ids, offsets, lengths, runs)


def _varints(raw: bytes, pos: int, count: int) -> tuple[list[int], int]:
    """`count` unsigned LEB128 varints from raw[pos:], and the position after them."""
    out = []
    size = len(raw)
    for _ in range(count):
        value = shift = 0
        while True:
            if pos >= size:
                raise FormatError("a directory ends inside a varint")
            b = raw[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 63:
                raise FormatError("a directory has a varint longer than 64 bits")
        out.append(value)
    return out, pos


# --- tile ids --------------------------------------------------------------------------------------


def tile_id(z: int, x: int, y: int) -> int:
    """The archive's id of tile z/x/y: the tiles of every lower zoom level, then the position of
    (x, y) along the Hilbert curve over the 2**z x 2**z grid."""
    if not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"zoom {z} outside 0..{MAX_ZOOM}")
    n = 1 << z
    if not (0 <= x < n and 0 <= y < n):
        raise ValueError(f"tile {x}/{y} outside zoom {z}'s {n}x{n} grid")
    before = (n * n - 1) // 3  # 4**0 + 4**1 + ... + 4**(z-1)
    d = 0
    s = n >> 1
    while s:
        rx = 1 if x & s else 0
        ry = 1 if y & s else 0
        d += s * s * ((3 * rx) ^ ry)
        x, y = x & (s - 1), y & (s - 1)  # the position inside the quadrant, then turned to its frame
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        s >>= 1
    return before + d
