// Tunables and fixed values shared by the dashboard's modules: paths, timings, limits, colours.
// Imports nothing, so every module may import it.

export const LIVE_PATH = '/v1/live';
export const BASEMAP_URL = '/static/basemap.json';
export const TRAIL_POINTS = 20; // short live trail kept per driver
export const HISTORY_MAX_POINTS = 20000;
export const RECONNECT_BASE_MS = 500;
export const RECONNECT_CAP_MS = 30000;
export const STABLE_CONNECTION_MS = 30000;
export const WELCOME_TIMEOUT_MS = 15000;
export const SUBSCRIBE_DEBOUNCE_MS = 400;
export const SUBSCRIBE_PAD = 0.25; // subscribe a bit beyond the view so small pans need no new snapshot
export const LIST_REFRESH_MS = 500; // side lists refresh at most twice a second
export const EXPIRY_WARNING_MS = 2 * 60 * 1000;
export const MIN_ZOOM = 2;
export const MAX_ZOOM = 18;
export const BASEMAP_MAX_LEVEL = 12; // the basemap is simplified to ~1 km: deeper levels reuse level 12
export const MAX_TRAIL_VERTICES = 30000; // per frame, all short trails together
export const AFRICA_BOUNDS = [-18.5, -35.5, 52.5, 37.8];
export const MAX_LAT = 85.0511287798;
export const EARTH_CIRCUMFERENCE_M = 40075016.686;
export const MAX_ALERTS = 500;
export const STALE_AFTER_MS = 2 * 60 * 1000; // a marker fades when its newest fix is older than this
export const CLUSTER_BELOW_ZOOM = 13; // drivers close together on screen are grouped below this zoom
export const CLUSTER_CELL_PX = 56; // ...into grid cells of this many CSS pixels
export const FLEET_REFRESH_MS = 15000; // GET /v1/drivers and /v1/packages: the whole fleet, for summary and search
export const MAX_DESTINATION_PINS = 400;
export const REPLAY_STEP_MS = 60; // one replay step per this many ms while playing

export const STORAGE = { token: 'tracker.token', refreshUrl: 'tracker.refreshUrl', view: 'tracker.view' };

// Marker colours; the legend in style.css uses the same ones. Shape says "carries packages"
// (diamond) so colour is never the only cue.
export const COLORS = {
  onPkg: '#1558b0',
  on: '#2b7a3d',
  offPkg: '#c24e00',
  off: '#6b7280',
  outline: '#ffffff',
  selected: '#ffb300',
  trail: 'rgba(21, 88, 176, 0.45)',
  history: '#7b1fa2',
  ocean: '#cddfeb',
  land: '#f6f3ea',
  contextLand: '#e7e4dc',
  border: '#9c9385',
  label: '#5d564b',
  alert: '#d92d20',
  cluster: '#14213d',
  destination: '#0e7490',
  replay: '#ffb300',
};

// Package states in which nobody holds the package (any other state with a driver means held).
export const TERMINAL_STATES = new Set(['delivered', 'failed', 'returned', 'cancelled', 'canceled', 'lost']);
export const PRE_PICKUP_STATES = new Set(['created', 'consigned', 'registered', 'pending', 'assigned', 'ready']);
