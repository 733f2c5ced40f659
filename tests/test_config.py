"""Settings: parsed from the environment, checked, and every one documented in README.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracker.config import ConfigError, Settings, describe


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [name for name, _ in describe() if f"`{name}`" not in readme]
    assert missing == []


def test_environment_is_parsed_and_checked() -> None:
    s = Settings.from_env(
        {
            "TRACKER_PORT": "9000",
            "TRACKER_WS_DEFLATE": "yes",
            "TRACKER_ALLOWED_ORIGINS": "a, b",
            "DATABASE_URL": "postgresql://x/y",
            "TRACKER_JWT_SECRET": "s" * 40,  # a deployment (DATABASE_URL) must name its shared keys
            "TRACKER_CUSTODY_KEY": "k" * 40,
            "TRACKER_RATE_PER_S": "2.5",
        }
    )
    assert (s.port, s.ws_deflate, s.allowed_origins, s.database_url, s.rate_per_s) == (
        9000,
        True,
        ("a", "b"),
        "postgresql://x/y",
        2.5,
    )
    with pytest.raises(ConfigError, match="TRACKER_PORT"):
        Settings.from_env({"TRACKER_PORT": "eighty"})
    with pytest.raises(ConfigError, match="RS256"):
        Settings.from_env({"TRACKER_JWT_ALG": "RS256"})
    with pytest.raises(ConfigError):
        Settings.from_env({"TRACKER_JWT_ALG": "none"})


def test_map_tiles_template_is_checked_and_names_the_csp_origins() -> None:
    s = Settings.from_env({"TRACKER_MAP_TILES": "https://tiles.example.org/osm/{z}/{x}/{y}.png"})
    assert s.tiles == "https://tiles.example.org/osm/{z}/{x}/{y}.png"
    assert s.tile_origins() == ("https://tiles.example.org",)
    sub = Settings.from_env({"TRACKER_MAP_TILES": "https://{s}.tile.example.org:8443/{z}/{x}/{y}.png"})
    assert sub.tile_origins() == tuple(f"https://{c}.tile.example.org:8443" for c in "abc")
    old = Settings.from_env({"TRACKER_TILE_URL": "http://127.0.0.1:7000/{z}/{x}/{y}.png"})
    assert old.tiles == "http://127.0.0.1:7000/{z}/{x}/{y}.png"  # the older name still works
    assert Settings().tiles is None and Settings().tile_origins() == ()
    for bad in (
        "tiles.example.org/{z}/{x}/{y}.png",  # no scheme
        "ftp://tiles.example.org/{z}/{x}/{y}.png",
        "https://tiles.example.org/{z}/{x}.png",  # no {y}
        "https://tiles.example.org/{z}/{x}/{y}.png; script-src *",  # would widen the CSP
        "https://{z}.example.org/{z}/{x}/{y}.png",
        "https://user:pw@tiles.example.org/{z}/{x}/{y}.png",
    ):
        with pytest.raises(ConfigError, match="TRACKER_MAP_TILES"):
            Settings.from_env({"TRACKER_MAP_TILES": bad})
    with pytest.raises(ConfigError, match="MAX_ZOOM"):
        Settings.from_env({"TRACKER_MAP_TILES_MAX_ZOOM": "30"})
