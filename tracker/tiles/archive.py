"""A PMTiles archive on disk (TRACKER_MAP_TILES=<file>.pmtiles): opened and checked once at start,
then read tile by tile. The root directory is kept in memory; leaf directories in an LRU cache
bounded by their entries (LEAF_CACHE_ENTRIES).

Reads are blocking `os.pread` calls of a few kilobytes on a local file: the HTTP layer runs them in
the thread pool (tracker/tiles/http.py), so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from ..config import ConfigError
from .pmtiles import (
    HEADER_LEN,
    RASTER,
    Directory,
    FormatError,
    Header,
    decode_directory,
    parse_header,
    raster_problem,
    tile_id,
)

# Decoded leaf directories are kept up to this many entries in all (32 bytes each: 16 MB). A
# country to zoom 15-16 has a few hundred leaves of ~4,000 entries: all of them fit once touched,
# so requests all over the archive cannot keep the server decoding (0.4 us CPU an entry).
LEAF_CACHE_ENTRIES = 500_000
MAX_DEPTH = 4  # root + leaves: the writers make at most 2 levels; a deeper chain is a loop


class Archive:
    """An open archive: `tile(z, x, y)` -> the tile's bytes or None. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            self.header = self._check()
            try:
                self.root = self._directory(self.header.root_offset, self.header.root_length)
            except FormatError as exc:
                raise FormatError(f"its root directory does not decode: {exc}") from None
            if not len(self.root):
                raise FormatError("it holds no tiles (an empty root directory)")
        except BaseException:
            os.close(self._fd)
            raise
        self.ext, self.media_type = RASTER[self.header.tile_type]
        self._leaves: OrderedDict[tuple[int, int], Directory] = OrderedDict()
        self._cached_entries = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        os.close(self._fd)

    @property
    def gzipped(self) -> bool:
        """The tiles are stored gzip-compressed: served as they are, with Content-Encoding: gzip."""
        return self.header.tile_compression == "gzip"

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{length} bytes at offset {offset} run past the end of the file ({self.size} bytes)")
        return data

    def _check(self) -> Header:
        header = parse_header(os.pread(self._fd, HEADER_LEN, 0))
        problem = raster_problem(header)
        if problem:
            raise FormatError(problem)
        for name, offset, length in header.sections():
            if offset + length > self.size:
                raise FormatError(f"its {name} ({length} bytes at {offset}) runs past the end of the file")
        return header

    def _directory(self, offset: int, length: int) -> Directory:
        return decode_directory(self._read(offset, length), self.header.internal_compression)

    def _leaf(self, offset: int, length: int) -> Directory:
        key = (offset, length)
        with self._lock:
            leaf = self._leaves.get(key)
            if leaf is not None:
                self._leaves.move_to_end(key)
                return leaf
        h = self.header
        if offset + length > h.leaf_length:
            raise FormatError(f"a leaf directory ({length} bytes at {offset}) lies outside the leaf section")
        leaf = self._directory(h.leaf_offset + offset, length)
        with self._lock:
            if key not in self._leaves:
                self._leaves[key] = leaf
                self._cached_entries += len(leaf)
            while self._cached_entries > LEAF_CACHE_ENTRIES and len(self._leaves) > 1:
                self._cached_entries -= len(self._leaves.popitem(last=False)[1])
        return leaf

    def tile(self, z: int, x: int, y: int) -> bytes | None:
        """The stored bytes of tile z/x/y, or None if the archive has none. ValueError for a tile
        outside the zoom's grid; FormatError if the archive turns out damaged."""
        h = self.header
        if not h.min_zoom <= z <= h.max_zoom:
            return None
        tid = tile_id(z, x, y)
        directory = self.root
        for _ in range(MAX_DEPTH):
            entry = directory.find(tid)
            if entry is None:
                return None
            if not entry.leaf:
                if entry.offset + entry.length > h.data_length:
                    raise FormatError(f"tile {z}/{x}/{y} lies outside the tile data section")
                return self._read(h.data_offset + entry.offset, entry.length)
            directory = self._leaf(entry.offset, entry.length)
        raise FormatError(f"leaf directories nested deeper than {MAX_DEPTH} levels")


def open_archive(path: Path) -> Archive:
    """Open and check the archive TRACKER_MAP_TILES names; a ConfigError says which file and why not."""
    where = f"TRACKER_MAP_TILES: the PMTiles archive {path}"
    try:
        if not path.exists():
            raise ConfigError(f"{where} does not exist")
        if not path.is_file():
            raise ConfigError(f"{where} is not a regular file")
        return Archive(path)
    except FormatError as exc:
        raise ConfigError(f"{where} cannot be served: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
