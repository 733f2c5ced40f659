"""Settings.from_env(): the one place that reads os.environ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


def _env_name(name: str) -> str:
    if name in ("database_url", "redis_url"):
        return name.upper()
    return "TRACKER_" + name.upper()


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service, with its safe default. Environment: `TRACKER_<NAME>`."""

    database_url: str | None = None  # DATABASE_URL; None -> embedded PostgreSQL under data_dir
    redis_url: str | None = None  # REDIS_URL; None -> embedded Redis under data_dir
    data_dir: Path = Path(".tracker")
    host: str = "127.0.0.1"
    port: int = 8080
    instance_id: str = ""  # defaults to host:pid
    log_level: str = "info"

    # Tokens: HS256 with a secret, or RS256/ES256 with a PEM public key (or a JWKS file).
    jwt_secret: str | None = None
    jwt_public_key: str | None = None  # PEM text, or a path to a PEM or JWKS file
    jwt_alg: str = "HS256"
    jwt_leeway_s: float = 30.0

    # Driver ingest
    max_frame: int = 65_536
    max_batch: int = 300
    ack_delay_ms: int = 1000  # cumulative acks (a phone's opt-in): at most one ack frame per delay, <= 1 s
    # Session resumption (a phone's opt-in, PROTOCOL.md "Resuming a session"): the HMAC key of resume
    # tokens (shared by every instance); None -> derived from TRACKER_JWT_SECRET with HS256, else off.
    resume_key: str | None = None
    resume_ttl_s: float = 86_400.0  # a resume token's longest life (never past its JWT's); 0: off
    rate_per_s: float = 10.0
    rate_burst: int = 20_000
    hello_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    ws_deflate: bool = False
    ws_fast_path: bool = True  # frames read and written beside uvicorn's protocol (transport/uvicorn_fast.py)
    max_connections: int = 50_000

    # Batch writer
    flush_interval_ms: int = 20
    flush_max_events: int = 5_000
    writer_concurrency: int = 2
    writer_buffer_max: int = 200_000  # events waiting for PostgreSQL; beyond it -> `unavailable`
    answer_deadline_s: float = 25.0  # every event is answered within 30 s (PROTOCOL.md)
    pg_pool_size: int = 8
    # Positions older than this many days are dropped a whole UTC day at a time (tracker/partitions.py);
    # 0 keeps every position. Scans, custody and alerts are never dropped.
    retention_days: int = 0

    # Dashboards
    live_flush_ms: int = 25
    live_window_ms: float = 5.0  # live frames go to Redis at most this often, one round trip per window
    dashboard_backlog: int = 5_000  # frames waiting before positions are conflated (~750 KB)
    dashboard_queue_max: int = 10_000  # non-position frames waiting before slow_consumer
    snapshot_chunk: int = 2_000
    allowed_origins: tuple[str, ...] = ()  # empty: same-origin pages and originless clients only

    # Presence
    presence_ttl_s: float = 30.0
    presence_refresh_s: float = 10.0
    ready_probe_s: float = 5.0  # how often tracker_ready (and the backend error counters) are probed

    # Deploys
    shutdown_grace_s: float = 10.0

    # Dashboard map (docs/OPERATIONS.md "Map tiles"). Unset: the bundled Natural Earth borders, offline.
    # An XYZ raster tile URL template, e.g. https://tiles.example.org/{z}/{x}/{y}.png, or a PMTiles v3 raster
    # archive tracker serves itself: `maps/kenya.pmtiles` (relative to data_dir) or an absolute path.
    map_tiles: str | None = None
    map_tiles_attribution: str = "© OpenStreetMap contributors"  # shown under the map with the tiles
    map_tiles_max_zoom: int = 19  # the deepest zoom level the tile server has
    tile_url: str | None = None  # TRACKER_TILE_URL: the older name of TRACKER_MAP_TILES (used when that is unset)

    # Packages and chain of custody
    custody_key: str | None = None  # HMAC key of the custody chain; None -> generated once under data_dir
    delivery_max_m: float = 500.0  # a delivery farther than this from the destination raises an alert
    custody_batch_max: int = 2_000  # scans chained per transaction
    custody_sweep_s: float = 30.0  # how often to look for stored scans no instance chained (a crash)
    custody_grace_s: float = 30.0  # ...received at least this long ago (younger ones are on their way)
    custody_lookback_s: float = 7 * 86_400.0  # ...and at most this long ago
    custody_checkpoint_dir: Path | None = None  # signed chain heads, outside PostgreSQL; None -> <data_dir>/checkpoints
    custody_checkpoint_s: float = 60.0  # how often each instance appends the heads of the chains it extended
    package_recent_s: float = 86_400.0  # a snapshot lists finished packages changed this recently

    # Time-based alerts (custody/watch.py): the defaults of the per-org thresholds (PUT /v1/alerts/thresholds)
    alert_data_gap_s: float = 900.0  # no fix this long while carrying packages
    alert_arrival_radius_m: float = 150.0  # arrival at the destination: within this radius ...
    alert_arrival_dwell_s: float = 60.0  # ... for this long (and departure: outside it as long)
    alert_temp_consecutive_s: float = 1800.0  # one temperature excursion this long
    alert_temp_cumulative_s: float = 3600.0  # excursions adding up to this
    alert_long_stop_s: float = 1200.0  # a stop this long while carrying cold-chain goods ...
    alert_stop_radius_m: float = 100.0  # ... within this radius
    watch_interval_s: float = 30.0  # how often one instance checks them
    watch_lookback_s: float = 86_400.0  # packages finished this recently, fixes this old, are still looked at

    # Webhooks (tracker/webhooks/, docs/PROTOCOL.md "Webhooks")
    webhook_allow: tuple[str, ...] = ()  # IPs, CIDRs or host names a webhook may reach though not public
    webhook_concurrency: int = 32  # deliveries in flight per instance; 0: this instance delivers none
    webhook_endpoint_concurrency: int = 4  # ...of them to one endpoint (a slow one never takes them all)
    webhook_connect_timeout_s: float = 5.0  # resolving and connecting
    webhook_timeout_s: float = 10.0  # from the request sent to the response's status line
    webhook_backoff_base_s: float = 5.0  # the first retry after ~this; doubling, with jitter
    webhook_backoff_max_s: float = 6 * 3_600.0  # the longest wait between two attempts
    webhook_retry_window_s: float = 3 * 86_400.0  # retried this long after the event, then dead-lettered
    webhook_retention_days: int = 30  # events and their delivery log are deleted after this (0: kept)
    webhook_rotate_grace_s: float = 86_400.0  # after a rotation, the old secret signs too for this long
    webhook_poll_s: float = 1.0  # how often a worker looks for due deliveries when not woken

    # Abuse limits (SECURITY.md). Counts are per instance.
    jwt_max_ttl_s: float = 86_400.0  # a token whose exp - iat is longer is refused; 0: no cap
    handshake_timeout_s: float = 10.0  # a TCP connection must send its HTTP request head within this
    max_pending: int = 10_000  # accepted websockets still waiting for hello (both endpoints)
    max_dashboards: int = 10_000  # open /v1/live connections
    max_dashboards_per_user: int = 50  # open /v1/live connections of one (org, sub)
    subscribe_max_ids: int = 10_000  # drivers + packages named in one subscribe; beyond: protocol error
    subscribe_rate_per_s: float = 2.0  # snapshots per second per dashboard; faster subscribes are coalesced
    subscribe_burst: int = 20

    # ETA of packages in transit (tracker/eta; PROTOCOL.md "ETA")
    eta_road_factor: float = 1.35  # road distance over straight-line distance
    eta_road_factors: tuple[str, ...] = ()  # per org, `org=factor` entries, e.g. `acme=1.5,lagos-1=1.6`
    eta_stop_s: float = 180.0  # time at each delivery the driver makes first
    eta_half_life_s: float = 300.0  # a position's weight in the moving speed halves with this age
    eta_floor_mps: float = 1.5  # the moving speed never counts as lower (a stopped or creeping driver)
    eta_default_mps: float = 8.0  # the speed of a driver with no recent moving position

    # Recipient tracking links (tracker/share; PROTOCOL.md "Tracking links")
    share_grace_s: float = 3_600.0  # a link works this long after its package's delivery
    share_max_s: float = 14 * 86_400.0  # and never longer than this after it was made
    share_rate_per_s: float = 1.0  # requests per second per link (burst below), then 429
    share_ip_rate_per_s: float = 5.0  # requests per second per client address, all links together
    share_burst: int = 30
    share_live_s: float = 1.0  # how often the live feed (SSE) looks for a change
    share_driver_name_orgs: tuple[str, ...] = ()  # orgs whose links show the driver's display name

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from `environ` (default: os.environ); keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, cls.__dataclass_fields__[f.name].type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check_values()
        return settings

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def check(self) -> None:
        """Everything `serve` needs: sane values and, in a deployment, the keys instances share."""
        self.check_values()
        self.check_shared_keys()

    def check_shared_keys(self) -> None:
        """With an external PostgreSQL (a deployment: several instances, containers with read-only
        folders) the keys every instance must share are required; each instance generating its own
        under data_dir would refuse the others' tokens and break the others' chains. Only commands
        that sign or verify need them (`serve`), not `migrate`."""
        shared = "the same on every instance, from your secret store (e.g. `openssl rand -hex 32`)"
        if self.database_url and self.jwt_alg == "HS256" and not self.jwt_secret:
            raise ConfigError(
                f"DATABASE_URL is set (a deployment), so TRACKER_JWT_SECRET is required (or TRACKER_JWT_ALG="
                f"RS256/ES256 with TRACKER_JWT_PUBLIC_KEY): {shared}; only the embedded development mode generates one"
            )
        if self.database_url and not self.custody_key:
            raise ConfigError(
                f"DATABASE_URL is set (a deployment), so TRACKER_CUSTODY_KEY is required: {shared}, kept away from "
                "the database's operators; only the embedded development mode generates one"
            )

    def check_values(self) -> None:
        if self.jwt_alg not in ("HS256", "RS256", "ES256"):
            raise ConfigError(f"TRACKER_JWT_ALG must be HS256, RS256 or ES256, not {self.jwt_alg!r}")
        if self.jwt_alg != "HS256" and not self.jwt_public_key:
            raise ConfigError(f"TRACKER_JWT_ALG={self.jwt_alg} needs TRACKER_JWT_PUBLIC_KEY")
        if not 1 <= self.max_batch <= 10_000 or self.max_frame < 1024:
            raise ConfigError("TRACKER_MAX_BATCH must be 1..10000 and TRACKER_MAX_FRAME at least 1024")
        if self.resume_ttl_s < 0 or (self.resume_key is not None and len(self.resume_key) < 32):
            raise ConfigError("TRACKER_RESUME_TTL_S must be >= 0 and TRACKER_RESUME_KEY 32 characters at least")
        if not 0 <= self.ack_delay_ms <= 1000:
            raise ConfigError("TRACKER_ACK_DELAY_MS must be 0..1000 (acks stay prompt)")
        if not 0 <= self.jwt_leeway_s <= 300:
            raise ConfigError("TRACKER_JWT_LEEWAY_S must be 0..300 (a small clock skew allowance)")
        if self.watch_interval_s <= 0 or self.watch_lookback_s <= 0:
            raise ConfigError("TRACKER_WATCH_INTERVAL_S and TRACKER_WATCH_LOOKBACK_S must be > 0")
        if not 0.05 <= self.ready_probe_s <= 300:
            raise ConfigError("TRACKER_READY_PROBE_S must be 0.05..300")
        if self.retention_days < 0:
            raise ConfigError("TRACKER_RETENTION_DAYS must be >= 0 (0 keeps every position)")
        if self.custody_checkpoint_s <= 0:
            raise ConfigError("TRACKER_CUSTODY_CHECKPOINT_S must be > 0")
        if (
            min(
                self.webhook_connect_timeout_s, self.webhook_timeout_s, self.webhook_backoff_base_s, self.webhook_poll_s
            )
            <= 0
        ):
            raise ConfigError("TRACKER_WEBHOOK_*_TIMEOUT_S, _BACKOFF_BASE_S and _POLL_S must be > 0")
        if self.webhook_retention_days < 0 or 0 < self.webhook_retention_days * 86_400 < self.webhook_retry_window_s:
            raise ConfigError("TRACKER_WEBHOOK_RETENTION_DAYS must be 0 (keep) or cover the retry window")
        if self.webhook_concurrency < 0 or self.webhook_endpoint_concurrency < 1:
            raise ConfigError("TRACKER_WEBHOOK_CONCURRENCY must be >= 0, _ENDPOINT_CONCURRENCY >= 1")
        if self.jwt_max_ttl_s < 0 or self.handshake_timeout_s <= 0 or self.subscribe_rate_per_s <= 0:
            raise ConfigError("TRACKER_JWT_MAX_TTL_S must be >= 0; handshake timeout and subscribe rate > 0")
        if (
            min(
                self.max_pending,
                self.max_dashboards,
                self.max_dashboards_per_user,
                self.subscribe_max_ids,
                self.subscribe_burst,
            )
            < 1
        ):
            raise ConfigError("connection, subscription and burst limits must be at least 1")
        self.eta_road_factor_orgs()
        if not 1.0 <= self.eta_road_factor <= 5.0 or self.eta_stop_s < 0 or self.eta_half_life_s <= 0:
            raise ConfigError("TRACKER_ETA_ROAD_FACTOR must be 1..5, TRACKER_ETA_STOP_S >= 0, half-life > 0")
        if min(self.eta_floor_mps, self.eta_default_mps, self.share_rate_per_s, self.share_ip_rate_per_s) <= 0:
            raise ConfigError("TRACKER_ETA_FLOOR_MPS, TRACKER_ETA_DEFAULT_MPS and the share rates must be > 0")
        if self.share_grace_s < 0 or self.share_max_s <= 0 or self.share_burst < 1 or self.share_live_s <= 0:
            raise ConfigError("TRACKER_SHARE_GRACE_S must be >= 0; share max, burst and live interval > 0")
        tiles = self.tiles
        if tiles is not None:
            problem = archive_path_problem(tiles) if is_archive(tiles) else tile_template_problem(tiles)
            if problem:
                raise ConfigError(f"TRACKER_MAP_TILES={tiles!r}: {problem}")
        if not 0 <= self.map_tiles_max_zoom <= 24:
            raise ConfigError("TRACKER_MAP_TILES_MAX_ZOOM must be 0..24")

    def eta_road_factor_orgs(self) -> list[tuple[str, float]]:
        """TRACKER_ETA_ROAD_FACTORS as (org, factor) pairs; a malformed entry is a ConfigError."""
        out = []
        for entry in self.eta_road_factors:
            org, sep, raw = entry.rpartition("=")
            try:
                factor = float(raw)
            except ValueError:
                factor = 0.0
            if not sep or not org or not 1.0 <= factor <= 5.0:
                raise ConfigError(f"TRACKER_ETA_ROAD_FACTORS: {entry!r} is not org=factor with a factor of 1..5")
            out.append((org, factor))
        return out

    @property
    def tiles(self) -> str | None:
        """TRACKER_MAP_TILES, else the older TRACKER_TILE_URL: an XYZ tile URL template or the path
        of a PMTiles archive (see tiles_archive)."""
        return self.map_tiles or self.tile_url or None

    @property
    def tile_template(self) -> str | None:
        """The XYZ tile URL template of another server, or None (no tiles, or an archive tracker serves)."""
        tiles = self.tiles
        return None if tiles is None or is_archive(tiles) else tiles

    def tiles_archive(self) -> Path | None:
        """The PMTiles archive tracker serves the tiles from, or None: a path relative to data_dir (it
        may not climb out of it) or an absolute one, as TRACKER_MAP_TILES names it."""
        tiles = self.tiles
        if tiles is None or not is_archive(tiles):
            return None
        path = Path(tiles).expanduser()
        return path if path.is_absolute() else self.data_dir.expanduser() / path

    def tile_origins(self) -> tuple[str, ...]:
        """The origins the dashboard fetches tiles from besides its own: what the CSP's img-src names
        after 'self', nothing more. A `{s}` in the host is Leaflet's subdomain placeholder; it takes
        `a`, `b` and `c`. An archive's tiles come from tracker itself: no other origin."""
        tiles = self.tile_template
        if not tiles:
            return ()
        parts = urlsplit(tiles)
        hosts = [parts.netloc.replace("{s}", s) for s in "abc"] if "{s}" in parts.netloc else [parts.netloc]
        return tuple(f"{parts.scheme}://{host}" for host in hosts)


ARCHIVE_SUFFIX = ".pmtiles"


def is_archive(tiles: str) -> bool:
    """TRACKER_MAP_TILES names a PMTiles archive (a file path ending in .pmtiles), not a URL template."""
    return tiles.lower().endswith(ARCHIVE_SUFFIX) and urlsplit(tiles).scheme not in ("http", "https")


def archive_path_problem(tiles: str) -> str | None:
    """Why `tiles` is not a usable archive path, or None. A relative path stays inside the data folder."""
    if "\x00" in tiles:
        return "must not contain NUL"
    path = Path(tiles).expanduser()
    if not path.is_absolute() and ".." in path.parts:
        return "a relative archive path is inside the data folder and may not contain '..' (or give an absolute path)"
    return None


def tile_template_problem(template: str) -> str | None:
    """Why `template` is not an XYZ tile URL template the dashboard can use, or None."""
    parts = urlsplit(template)
    if parts.path.lower().endswith(ARCHIVE_SUFFIX):
        return "a remote PMTiles archive is not supported: download it into the data folder and name the file"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an http:// or https:// URL template, or the path of a .pmtiles archive"
    if any(c in template for c in " \"'<>;,") or parts.username or parts.password:
        return "must not contain spaces, quotes, ';', ',' or credentials (it goes into the page's CSP)"
    if not all(f"{{{k}}}" in template for k in "zxy"):
        return "must contain {z}, {x} and {y}"
    host = parts.netloc.replace("{s}", "a")
    if "{" in host or "}" in host:
        return "only {s} may appear in the host"
    return None


def _parse(name: str, raw: str, type_: Any) -> Any:
    text = str(type_)
    try:
        if "bool" in text:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "tuple" in text:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if "Path" in text:
            return Path(raw)
        if "float" in text:
            return float(raw)
        if "int" in text:
            return int(raw)
    except ValueError:
        raise ConfigError(f"{_env_name(name)}={raw!r} is not a valid {text}") from None
    return raw


def describe() -> list[tuple[str, str]]:
    """(environment variable, default) for every setting: the README's configuration table."""
    defaults = Settings()
    return [(_env_name(f.name), repr(getattr(defaults, f.name))) for f in fields(Settings)]
