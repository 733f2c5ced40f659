"""A minimal PMTiles v3 writer for tests (https://github.com/protomaps/PMTiles/blob/main/spec/v3/spec.md):
raster tiles in, one archive file out. Written from the spec apart from tracker's reader (only the
Hilbert tile id is shared, and tests/test_tiles.py checks that against the curve built the other way
round), so a misreading of the format on one side shows up as a failing test.

`leaf_size` splits the entries into leaf directories (the root then points at them), so small test
archives exercise the leaf path that real country-size archives take.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from tracker.tiles.pmtiles import tile_id

TYPES = {"unknown": 0, "mvt": 1, "png": 2, "jpeg": 3, "webp": 4, "avif": 5}
COMPRESSIONS = {"unknown": 0, "none": 1, "gzip": 2, "brotli": 3, "zstd": 4}


def varints(*values: int) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            low, v = v & 0x7F, v >> 7
            out.append(low | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def directory(entries: list[tuple[int, int, int, int]], compression: str = "gzip") -> bytes:
    """(tile_id, offset, length, run_length) entries, sorted by id, as stored."""
    ids = [e[0] for e in entries]
    body = varints(len(entries))
    body += varints(*(b - a for a, b in zip([0, *ids], ids, strict=False)))
    body += varints(*(e[3] for e in entries))
    body += varints(*(e[2] for e in entries))
    offsets = []
    for i, (_, offset, _, _) in enumerate(entries):
        prev = entries[i - 1] if i else None
        offsets.append(0 if prev and offset == prev[1] + prev[2] else offset + 1)
    body += varints(*offsets)
    return gzip.compress(body, mtime=0) if compression == "gzip" else body


def header(
    *,
    sections: list[tuple[int, int]],
    counts: tuple[int, int, int],
    internal: str,
    tile_type: str,
    zooms: tuple[int, int],
    bounds: tuple[float, float, float, float],
    magic: bytes = b"PMTiles",
    version: int = 3,
    tile_compression: str = "none",
) -> bytes:
    e7 = [round(c * 1e7) for c in bounds]
    out = magic + bytes([version])
    for offset, length in sections:  # root, metadata, leaves, tile data
        out += struct.pack("<QQ", offset, length)
    out += struct.pack("<QQQ", *counts)
    out += bytes([1, COMPRESSIONS[internal], COMPRESSIONS[tile_compression], TYPES[tile_type], zooms[0], zooms[1]])
    out += struct.pack("<iiii", *e7)
    out += bytes([zooms[0]]) + struct.pack("<ii", (e7[0] + e7[2]) // 2, (e7[1] + e7[3]) // 2)
    assert len(out) == 127
    return out


def write_archive(
    path: Path,
    tiles: dict[tuple[int, int, int], bytes],
    *,
    tile_type: str = "png",
    internal: str = "gzip",
    leaf_size: int | None = None,
    bounds: tuple[float, float, float, float] = (-180.0, -85.0, 180.0, 85.0),
    attribution: str = "",
    tile_compression: str = "none",
) -> Path:
    """Write `tiles` ({(z, x, y): bytes}) as a PMTiles v3 archive at `path`. Equal tiles are stored
    once; neighbours in curve order with equal bytes become one entry with a run length. With
    `tile_compression="gzip"` each tile is stored gzipped (as vector archives do)."""
    if tile_compression == "gzip":
        tiles = {k: gzip.compress(v, mtime=0) for k, v in tiles.items()}
    by_id = sorted((tile_id(z, x, y), data) for (z, x, y), data in tiles.items())
    blobs: dict[bytes, int] = {}
    data = bytearray()
    entries: list[tuple[int, int, int, int]] = []
    for tid, blob in by_id:
        if blob not in blobs:
            blobs[blob] = len(data)
            data += blob
        offset = blobs[blob]
        last = entries[-1] if entries else None
        if last and last[1] == offset and last[0] + last[3] == tid:
            entries[-1] = (last[0], last[1], last[2], last[3] + 1)
        else:
            entries.append((tid, offset, len(blob), 1))
    if leaf_size:
        leaves = b""
        root_entries = []
        for i in range(0, len(entries), leaf_size):
            leaf = directory(entries[i : i + leaf_size], internal)
            root_entries.append((entries[i][0], len(leaves), len(leaf), 0))
            leaves += leaf
        root = directory(root_entries, internal)
    else:
        root, leaves = directory(entries, internal), b""
    meta = f'{{"attribution": "{attribution}"}}'.encode()
    meta = gzip.compress(meta, mtime=0) if internal == "gzip" else meta
    zs = [z for z, _, _ in tiles] or [0]  # an empty archive (a test of one the service refuses)
    at = 127
    sections = []
    for part in (root, meta, leaves, bytes(data)):
        sections.append((at, len(part)))
        at += len(part)
    head = header(
        sections=sections,
        counts=(len(by_id), len(entries), len(blobs)),
        internal=internal,
        tile_type=tile_type,
        zooms=(min(zs), max(zs)),
        bounds=bounds,
        tile_compression=tile_compression,
    )
    path.write_bytes(head + root + meta + leaves + bytes(data))
    return path
