"""PMTiles archives (tracker/tiles): tile ids along the Hilbert curve, directories and headers, an
archive read back tile by tile (root only, leaf directories, runs of equal tiles, uncompressed
directories), and every archive `tracker serve` must refuse at start: with a ConfigError naming the
file and the problem, and exit code 2.

The archives are written by harness/pmtiles.py, written from the spec apart from the reader.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.pmtiles import directory, header, write_archive
from tracker.config import ConfigError, Settings
from tracker.tiles.archive import open_archive
from tracker.tiles.pmtiles import FormatError, decode_directory, parse_header, tile_id


def hilbert_d2xy(n: int, d: int) -> tuple[int, int]:
    """Position `d` along the Hilbert curve over an n x n grid: the curve walked the other way
    round from tile_id's (index -> cell), so the two agree only if both follow the curve."""
    x = y = 0
    s, t = 1, d
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x, y = x + s * rx, y + s * ry
        t //= 4
        s *= 2
    return x, y


def test_tile_ids_follow_the_hilbert_curve_level_after_level() -> None:
    first = 0
    for z in range(7):
        n = 1 << z
        for d in range(n * n):
            assert tile_id(z, *hilbert_d2xy(n, d)) == first + d, (z, d)
        first += n * n
    # Values from the PMTiles specification's own test suite.
    assert [tile_id(0, 0, 0), tile_id(1, 0, 0), tile_id(1, 0, 1), tile_id(1, 1, 1), tile_id(1, 1, 0)] == [0, 1, 2, 3, 4]
    assert tile_id(2, 0, 0) == 5
    assert tile_id(12, 3423, 1763) == 19_078_479
    for bad in ((1, 2, 0), (3, 0, 8), (-1, 0, 0), (31, 0, 0), (2, -1, 0)):
        with pytest.raises(ValueError):
            tile_id(*bad)


def colour_tiles(max_zoom: int) -> dict[tuple[int, int, int], bytes]:
    """Every tile up to `max_zoom`, most of them distinct; from zoom 3 a quadrant of equal ones (the
    curve walks a quadrant in one go: stored as runs)."""
    tiles = {}
    for z in range(max_zoom + 1):
        half = (1 << z) // 2
        for x in range(1 << z):
            for y in range(1 << z):
                tiles[(z, x, y)] = b"sea" if z > 2 and x < half and y < half else f"tile {z}/{x}/{y}".encode()
    return tiles


@pytest.mark.parametrize(
    ("leaf_size", "internal"), [(None, "gzip"), (7, "gzip"), (None, "none"), (40, "none")], ids=str
)
def test_an_archive_reads_back_every_tile_and_nothing_else(
    tmp_path: Path, leaf_size: int | None, internal: str
) -> None:
    tiles = colour_tiles(5)
    del tiles[(4, 3, 3)]  # a hole: no tile there
    path = write_archive(tmp_path / "a.pmtiles", tiles, leaf_size=leaf_size, internal=internal)
    archive = open_archive(path)
    try:
        assert (archive.header.min_zoom, archive.header.max_zoom, archive.ext) == (0, 5, "png")
        assert archive.header.addressed_tiles == len(tiles) > archive.header.tile_entries  # runs were made
        assert (len(archive.root) < archive.header.tile_entries) == bool(leaf_size)  # leaves when asked
        for z in range(6):
            for x in range(1 << z):
                for y in range(1 << z):
                    assert archive.tile(z, x, y) == tiles.get((z, x, y)), (z, x, y)
        assert archive.tile(6, 0, 0) is None  # deeper than the archive
        with pytest.raises(ValueError):
            archive.tile(3, 8, 0)
    finally:
        archive.close()


def test_directories_refuse_garbage() -> None:
    good = directory([(0, 0, 10, 1), (1, 10, 10, 1)], "none")
    assert [e.tile_id for e in decode_directory(good, "none").entries] == [0, 1]
    cases = {
        "ends inside a varint": good[:-1] + b"\x80",
        "bytes after its entries": good + b"\x00",
        "not increasing": directory([(5, 0, 10, 1), (5, 10, 10, 1)], "none"),
        "length of 0": directory([(0, 0, 0, 1)], "none"),
        "claims": b"\xff\xff\x03" + b"\x00" * 8,
    }
    for said, raw in cases.items():
        with pytest.raises(FormatError, match=said):
            decode_directory(raw, "none")
    with pytest.raises(FormatError, match="gzip"):
        decode_directory(b"\x1f\x8b not gzip at all", "gzip")
    with pytest.raises(FormatError, match="truncated"):
        decode_directory(gzip.compress(good)[:-12], "gzip")
    with pytest.raises(FormatError, match="more than"):
        decode_directory(gzip.compress(b"\x00" * 10_000), "gzip", limit=1000)


def write_with(path: Path, **header_args: object) -> Path:
    """A valid little archive whose header is then rewritten with `header_args`."""
    write_archive(path, {(0, 0, 0): b"tile"})
    raw = path.read_bytes()
    h = parse_header(raw[:127])
    args: dict[str, object] = {
        "sections": [
            (h.root_offset, h.root_length),
            (h.metadata_offset, h.metadata_length),
            (h.leaf_offset, h.leaf_length),
            (h.data_offset, h.data_length),
        ],
        "counts": (1, 1, 1),
        "internal": "gzip",
        "tile_type": "png",
        "zooms": (0, 0),
        "bounds": (-180.0, -85.0, 180.0, 85.0),
    }
    args.update(header_args)
    path.write_bytes(header(**args) + raw[127:])  # type: ignore[arg-type]
    return path


def refused_archives(tmp: Path) -> dict[str, tuple[Path, str]]:
    """(archive, what the error must say) for each archive the service refuses."""
    (tmp / "folder.pmtiles").mkdir()
    (tmp / "text.pmtiles").write_text("hello, I am not a tile archive\n" * 10)
    (tmp / "short.pmtiles").write_bytes(b"PMTiles\x03")
    (tmp / "v2.pmtiles").write_bytes(b"PM\x02\x00" + bytes(200))
    good = write_archive(tmp / "good.pmtiles", {(0, 0, 0): b"tile"})
    (tmp / "truncated.pmtiles").write_bytes(good.read_bytes()[:-2])
    return {
        "missing": (tmp / "absent.pmtiles", "does not exist"),
        "a folder": (tmp / "folder.pmtiles", "not a regular file"),
        "not pmtiles": (tmp / "text.pmtiles", "not a PMTiles archive"),
        "short": (tmp / "short.pmtiles", "too short"),
        "v2": (tmp / "v2.pmtiles", "version 2"),
        "v4": (write_with(tmp / "v4.pmtiles", version=4), "version 4: only version 3"),
        "vector": (write_with(tmp / "mvt.pmtiles", tile_type="mvt"), "vector tiles"),
        "brotli": (write_with(tmp / "br.pmtiles", internal="brotli"), "brotli"),
        "zooms": (write_with(tmp / "zoom.pmtiles", zooms=(5, 2)), "zoom levels 5..2"),
        "truncated": (tmp / "truncated.pmtiles", "runs past the end of the file"),
        "bad root": (write_with(tmp / "root.pmtiles", internal="none"), "its root directory does not decode"),
        "no tiles": (write_archive(tmp / "empty.pmtiles", {}), "holds no tiles"),
        "unknown type": (write_with(tmp / "unknown.pmtiles", tile_type="unknown"), "tile type unknown"),
        "zstd tiles": (write_with(tmp / "zstd.pmtiles", tile_compression="zstd"), "tiles are compressed with zstd"),
    }


def test_archives_the_service_cannot_serve_are_refused_naming_the_file_and_the_problem(tmp_path: Path) -> None:
    for case, (path, said) in refused_archives(tmp_path).items():
        with pytest.raises(ConfigError) as err:
            open_archive(path)
        assert str(path) in str(err.value) and said in str(err.value), (case, str(err.value))
        assert "TRACKER_MAP_TILES" in str(err.value)


def test_tracker_serve_exits_2_saying_why_it_cannot_serve_the_archive(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("TRACKER_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    (tmp_path / "maps").mkdir()
    write_with(tmp_path / "maps" / "streets.pmtiles", tile_type="mvt")
    cases = [
        ("maps/streets.pmtiles", f"{tmp_path}/maps/streets.pmtiles cannot be served: holds vector tiles (MVT)"),
        ("maps/absent.pmtiles", f"{tmp_path}/maps/absent.pmtiles does not exist"),
        ("../outside.pmtiles", "may not contain '..'"),
        ("https://tiles.example.org/kenya.pmtiles", "a remote PMTiles archive is not supported"),
    ]
    for value, said in cases:
        done = subprocess.run(
            [sys.executable, "-m", "tracker", "serve", "--data-dir", str(tmp_path), "--port", "0"],
            env=env | {"TRACKER_MAP_TILES": value, "PYTHONWARNINGS": "ignore"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (value, done.stdout, done.stderr)
        assert "tracker: configuration error: TRACKER_MAP_TILES" in done.stderr and said in done.stderr, done.stderr
    assert os.listdir(tmp_path) == ["maps"]  # refused before anything started: no lock, no database


def test_the_setting_names_an_archive_in_the_data_folder_or_at_an_absolute_path(tmp_path: Path) -> None:
    s = Settings.from_env({"TRACKER_MAP_TILES": "maps/kenya.pmtiles", "TRACKER_DATA_DIR": str(tmp_path)})
    assert s.tiles_archive() == tmp_path / "maps" / "kenya.pmtiles"
    assert s.tile_template is None and s.tile_origins() == ()  # the tiles are tracker's own: 'self' only
    s = Settings.from_env({"TRACKER_MAP_TILES": "/srv/maps/Kenya.PMTiles"})
    assert s.tiles_archive() == Path("/srv/maps/Kenya.PMTiles")
    s = Settings.from_env({"TRACKER_TILE_URL": "kenya.pmtiles"})  # the older name works too
    assert s.tiles_archive() == Path(".tracker/kenya.pmtiles")
    s = Settings.from_env({"TRACKER_MAP_TILES": "https://tiles.example.org/{z}/{x}/{y}.png"})
    assert s.tiles_archive() is None and s.tile_template == "https://tiles.example.org/{z}/{x}/{y}.png"
    for bad, said in [
        ("../kenya.pmtiles", "'..'"),
        ("maps/../../kenya.pmtiles", "'..'"),
        ("kenya.mbtiles", "or the path of a .pmtiles archive"),
        ("http://tiles.example.org/kenya.pmtiles", "remote PMTiles"),
    ]:
        with pytest.raises(ConfigError, match=said):
            Settings.from_env({"TRACKER_MAP_TILES": bad})


def test_the_leaf_cache_is_bounded_by_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracker.tiles import archive as archive_mod

    monkeypatch.setattr(archive_mod, "LEAF_CACHE_ENTRIES", 50)
    tiles = colour_tiles(4)
    archive = open_archive(write_archive(tmp_path / "a.pmtiles", tiles, leaf_size=20))
    try:
        for _ in range(2):  # the second pass reads leaves the first one evicted
            for (z, x, y), data in tiles.items():
                assert archive.tile(z, x, y) == data
                assert archive._cached_entries <= 50 and len(archive._leaves) <= 3
        assert archive._cached_entries == sum(len(d) for d in archive._leaves.values())
    finally:
        archive.close()
