// Tracker dispatcher dashboard.
//
// One ES module, no build step, no dependency, no CDN: it must work offline and behind a strict
// CSP (no inline script or style; element.style set from here is fine). Server text is only ever
// written with textContent, never parsed as HTML.
//
//   1. constants and helpers
//   2. session: token from the fragment or the sign-in form, JWT claims, refresh before expiry
//   3. state and frame handling: handleFrame(frame) is the one entry point for server frames
//   4. the live connection (WS /v1/live): hello, subscribe by map view, close codes, backoff
//   5. the map: Web Mercator view, basemap, optional tiles, render loop, pan and zoom
//   6. the side panel: virtual driver and package lists, alert feed, driver details and trail
//   7. chrome: connection status, banners, announcements, sign-in, tabs
//   8. the test hook (window.trackerDebug) and boot
//
// Rendering never happens per message: handlers update state and set dirty flags, and one
// requestAnimationFrame callback draws. Side lists refresh on a timer, at most twice a second.

// ---------------------------------------------------------------------------------------------
// 1. Constants and helpers

const LIVE_PATH = '/v1/live';
const BASEMAP_URL = '/static/basemap.json';
const TRAIL_POINTS = 20; // short live trail kept per driver
const HISTORY_MAX_POINTS = 20000;
const RECONNECT_BASE_MS = 500;
const RECONNECT_CAP_MS = 30000;
const STABLE_CONNECTION_MS = 30000;
const WELCOME_TIMEOUT_MS = 15000;
const SUBSCRIBE_DEBOUNCE_MS = 400;
const SUBSCRIBE_PAD = 0.25; // subscribe a bit beyond the view so small pans need no new snapshot
const LIST_REFRESH_MS = 500; // side lists refresh at most twice a second
const EXPIRY_WARNING_MS = 2 * 60 * 1000;
const MIN_ZOOM = 2;
const MAX_ZOOM = 18;
const BASEMAP_MAX_LEVEL = 12; // the basemap is simplified to ~1 km: deeper levels reuse level 12
const MAX_TRAIL_VERTICES = 30000; // per frame, all short trails together
const AFRICA_BOUNDS = [-18.5, -35.5, 52.5, 37.8];
const MAX_LAT = 85.0511287798;
const EARTH_CIRCUMFERENCE_M = 40075016.686;
const MAX_ALERTS = 500;

const STORAGE = { token: 'tracker.token', refreshUrl: 'tracker.refreshUrl', view: 'tracker.view' };

// Marker colours; the legend in style.css uses the same ones. Shape says "carries packages"
// (diamond) so colour is never the only cue.
const COLORS = {
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
};

// Package states in which nobody holds the package (any other state with a driver means held).
const TERMINAL_STATES = new Set(['delivered', 'failed', 'returned', 'cancelled', 'canceled', 'lost']);
const PRE_PICKUP_STATES = new Set(['created', 'consigned', 'registered', 'pending', 'assigned', 'ready']);

const $ = (id) => document.getElementById(id);
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function relativeTime(ts, now = Date.now()) {
  if (!isNum(ts) || ts <= 0) return 'never';
  const s = Math.round((now - ts) / 1000);
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

const formatSpeed = (spd) => (isNum(spd) ? `${Math.round(spd * 3.6)} km/h` : '–');
// bat is 0..1 on the wire; tolerate a percentage too.
const batteryPercent = (bat) => (isNum(bat) ? Math.round(bat <= 1 ? bat * 100 : bat) : null);
const formatBattery = (bat) => (batteryPercent(bat) === null ? '–' : `${batteryPercent(bat)}%`);
const formatTime = (ts) => (isNum(ts) && ts > 0 ? new Date(ts).toLocaleString() : '–');
const humanise = (s) => String(s ?? '').replace(/[_-]+/g, ' ').replace(/^\w/, (c) => c.toUpperCase());

// Web Mercator in "world units": x, y in [0, 1], origin at the north-west corner.
const mercX = (lon) => (lon + 180) / 360;
function mercY(lat) {
  const s = Math.sin((clamp(lat, -MAX_LAT, MAX_LAT) * Math.PI) / 180);
  return 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI);
}
const lonOf = (x) => x * 360 - 180;
const latOf = (y) => (Math.atan(Math.sinh(Math.PI * (1 - 2 * y))) * 180) / Math.PI;

// ---------------------------------------------------------------------------------------------
// 2. Session: token, claims, refresh

const session = {
  token: null,
  refreshUrl: null,
  claims: null,
  role: null,
  org: null,
  refreshTimer: 0,
  refreshFailed: false,
  warnTimer: 0,
  expireTimer: 0,
};

/** Decode a JWT's payload without verifying it (the server verifies; we only read exp/role/name). */
function decodeJwt(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64.padEnd(Math.ceil(b64.length / 4) * 4, '=');
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}

/** A refresh URL is only honoured on this origin: the current token is sent to it. */
function sameOriginUrl(raw) {
  try {
    const url = new URL(raw, location.href);
    return url.origin === location.origin ? url.href : null;
  } catch {
    return null;
  }
}

/**
 * Read `#token=...&refresh_url=...` and wipe it from the address bar (history, bookmarks, screen
 * shares). A token in the query string is refused: it would already sit in server and proxy logs.
 * Returns a message for the sign-in form when something was refused.
 */
function takeTokenFromUrl() {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  let message = null;
  let dirty = false;
  if (query.has('token')) {
    query.delete('token');
    dirty = true;
    message =
      'A token in the address query string is not accepted (it leaks into logs). Use #token=… or paste it here.';
  }
  if (fragment.has('token')) {
    storeToken(fragment.get('token'), fragment.get('refresh_url'));
    dirty = true;
  }
  if (dirty) {
    const search = query.toString();
    history.replaceState(history.state, '', location.pathname + (search ? `?${search}` : ''));
  }
  return message;
}

function storeToken(token, refreshUrl) {
  token = String(token || '').trim().replace(/^Bearer\s+/i, '');
  session.token = token;
  session.claims = decodeJwt(token);
  sessionStorage.setItem(STORAGE.token, token);
  if (refreshUrl !== undefined) {
    session.refreshUrl = refreshUrl ? sameOriginUrl(refreshUrl) : null;
    if (session.refreshUrl) sessionStorage.setItem(STORAGE.refreshUrl, session.refreshUrl);
    else sessionStorage.removeItem(STORAGE.refreshUrl);
  }
}

function loadStoredToken() {
  const token = sessionStorage.getItem(STORAGE.token);
  if (!token) return false;
  session.token = token;
  session.claims = decodeJwt(token);
  session.refreshUrl = sessionStorage.getItem(STORAGE.refreshUrl);
  return true;
}

function forgetToken() {
  sessionStorage.removeItem(STORAGE.token);
  sessionStorage.removeItem(STORAGE.refreshUrl);
  Object.assign(session, { token: null, refreshUrl: null, claims: null, role: null, org: null });
  clearExpiryTimers();
}

const tokenExpiry = () => (isNum(session.claims?.exp) ? session.claims.exp * 1000 : null);
const authHeaders = () => (session.token ? { Authorization: `Bearer ${session.token}` } : {});

/** Why a pasted token cannot be used, or null. The server has the final word. */
function tokenProblem(token) {
  const claims = decodeJwt(token);
  if (!claims) return 'That does not look like an access token (expected three dot-separated parts).';
  if (isNum(claims.exp) && claims.exp * 1000 <= Date.now()) {
    return `This token expired at ${formatTime(claims.exp * 1000)}.`;
  }
  if (claims.role === 'driver') return 'This is a driver token; the dashboard needs a dispatcher or client token.';
  return null;
}

function clearExpiryTimers() {
  clearTimeout(session.refreshTimer);
  clearTimeout(session.warnTimer);
  clearTimeout(session.expireTimer);
}

// setTimeout overflows past ~24.8 days; a token that long-lived needs no timer yet.
function later(fn, ms) {
  return ms > 2 ** 31 - 1 ? 0 : setTimeout(fn, Math.max(0, ms));
}

/** Plan the refresh (when a refresh URL is known) and the 2-minute warning for the current token. */
function scheduleExpiry() {
  clearExpiryTimers();
  showExpiryWarning(false);
  const exp = tokenExpiry();
  if (!exp) return;
  const now = Date.now();
  session.refreshFailed = false;
  if (session.refreshUrl) {
    // Refresh well before the 2-minute warning would be due, but never sooner than halfway
    // through the time left, so a service minting short tokens cannot make us loop.
    const issued = isNum(session.claims.iat) ? session.claims.iat * 1000 : now;
    const lead = clamp((exp - issued) * 0.25, EXPIRY_WARNING_MS + 30000, 10 * 60000);
    session.refreshTimer = later(refreshToken, Math.max(exp - lead - now, (exp - now) / 2));
  }
  // Without a way to refresh (or when refreshing keeps failing) the user is warned instead.
  const warn = () => (!session.refreshUrl || session.refreshFailed) && showExpiryWarning(true);
  session.warnTimer = later(warn, exp - EXPIRY_WARNING_MS - now);
  session.expireTimer = later(() => showExpiryWarning(true), exp - now);
}

/** GET refresh_url with the current token; on success use the new token on the open connection. */
async function refreshToken() {
  if (!session.refreshUrl || !session.token) return false;
  try {
    const res = await fetch(session.refreshUrl, { headers: authHeaders(), cache: 'no-store' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    if (typeof body?.token !== 'string' || !decodeJwt(body.token)) throw new Error('no token in the response');
    adoptToken(body.token);
    return true;
  } catch (err) {
    console.warn('tracker: token refresh failed', err);
    session.refreshFailed = true;
    // Try again while there is time, and warn the user once expiry is close.
    const left = (tokenExpiry() ?? 0) - Date.now();
    if (left > 10000) session.refreshTimer = later(refreshToken, clamp(left / 4, 5000, 30000));
    if (left <= EXPIRY_WARNING_MS) showExpiryWarning(true);
    return false;
  }
}

/** A new token (refreshed, or pasted into the renew form): swap it in without reconnecting. */
function adoptToken(token) {
  storeToken(token);
  scheduleExpiry();
  if (conn.ws && conn.welcomed) send({ type: 'refresh', token });
  else if (conn.wanted && !conn.ws) connectNow();
}

// ---------------------------------------------------------------------------------------------
// 3. State and frame handling

const state = {
  drivers: new Map(), // id -> driver record (see driverRecord)
  packages: new Map(), // id -> package record
  heldBy: new Map(), // driver id -> Set of package ids it holds: the one index of custody
  alerts: new Map(), // id -> alert
  names: new Map(), // driver id -> display name, kept when a driver leaves scope
  selected: null, // selected driver id
  history: null, // { driver, points: [{mx, my, ts}], source, note } for the selected driver
  interrupted: false,
  pendingSnapshot: null, // snapshot parts gathered until the frame without "more"
  frames: 0,
  lastMessageTs: 0,
};

function driverRecord(id) {
  let d = state.drivers.get(id);
  if (!d) {
    const name = state.names.get(id) ?? '';
    d = {
      id,
      name,
      search: `${name} ${id}`.toLowerCase(),
      seq: 0,
      ts: 0,
      lat: null,
      lon: null,
      mx: NaN,
      my: NaN,
      online: false,
      spd: null,
      bat: null,
      hdg: null,
      trail: [], // flat [mx, my, mx, my, ...], the last TRAIL_POINTS positions seen
    };
    state.drivers.set(id, d);
  }
  return d;
}

function setName(d, name) {
  if (typeof name !== 'string' || !name || name === d.name) return;
  d.name = name;
  d.search = `${name} ${d.id}`.toLowerCase();
  state.names.set(d.id, name);
}

const displayName = (id) => state.drivers.get(id)?.name || state.names.get(id) || id;

function applyOptional(d, f) {
  if (isNum(f.spd) || f.spd === null) d.spd = f.spd;
  if (isNum(f.bat) || f.bat === null) d.bat = f.bat;
  if (isNum(f.hdg) || f.hdg === null) d.hdg = f.hdg;
  if (isNum(f.seq)) d.seq = f.seq;
  if (typeof f.online === 'boolean') d.online = f.online;
}

function setPosition(d, lat, lon, ts) {
  const mx = mercX(lon);
  const my = mercY(lat);
  if (mx !== d.mx || my !== d.my) {
    d.trail.push(mx, my);
    if (d.trail.length > TRAIL_POINTS * 2) d.trail.splice(0, d.trail.length - TRAIL_POINTS * 2);
  }
  d.lat = lat;
  d.lon = lon;
  d.mx = mx;
  d.my = my;
  if (isNum(ts)) d.ts = ts;
}

// The details panel of a removed, selected driver stays open and says it is out of view.
function removeDriver(id) {
  state.drivers.delete(id);
}

function packageRecord(id) {
  let p = state.packages.get(id);
  if (!p) {
    p = { package: id, state: undefined, driver: undefined, holder: null, stub: true };
    state.packages.set(id, p);
  }
  return p;
}

const heldState = (p) => !p.state || (!TERMINAL_STATES.has(p.state) && !PRE_PICKUP_STATES.has(p.state));
const heldCount = (id) => state.heldBy.get(id)?.size ?? 0;

/**
 * Move custody of a package. The only writer of heldBy, so the counts on markers, rows and
 * details always agree. `fromEvent`: a live event (not a snapshot) changed custody; for a client
 * admin that closes the window in which it may see the previous holder, so that marker goes.
 */
function setHolder(p, driverId, fromEvent = false) {
  const prev = p.holder ?? null;
  const next = driverId ?? null;
  if (prev === next) return;
  if (prev) {
    const set = state.heldBy.get(prev);
    set?.delete(p.package);
    if (set && set.size === 0) {
      state.heldBy.delete(prev);
      if (fromEvent && session.role === 'client') removeDriver(prev);
    }
  }
  if (next) {
    if (!state.heldBy.has(next)) state.heldBy.set(next, new Set());
    state.heldBy.get(next).add(p.package);
  }
  p.holder = next;
}

const HANDLERS = {
  welcome: onWelcome,
  snapshot: onSnapshot,
  pos: onPos,
  scan: onScan,
  package: onPackage,
  presence: onPresence,
  alert: onAlert,
  status: onStatus,
  error: onError,
  batch: onBatch,
};

/**
 * Apply one server frame to the page state. Never draws: it only marks what changed. Unknown
 * frame types and unknown fields are ignored (the protocol lets servers add them).
 */
export function handleFrame(frame) {
  if (!frame || typeof frame !== 'object') return;
  state.frames += 1;
  const handler = Object.hasOwn(HANDLERS, frame.type) ? HANDLERS[frame.type] : null;
  if (handler) handler(frame);
}

function onBatch(f) {
  if (!Array.isArray(f.items)) return;
  for (const item of f.items) if (item?.type !== 'batch') handleFrame(item); // items are plain frames, in order
}

function onSnapshot(f) {
  const part = (state.pendingSnapshot ??= { drivers: [], packages: [], alerts: [] });
  for (const key of ['drivers', 'packages', 'alerts']) {
    if (Array.isArray(f[key])) for (const item of f[key]) if (item && typeof item === 'object') part[key].push(item);
  }
  if (f.more === true) return; // wait for the last part: applying half a snapshot would flash
  state.pendingSnapshot = null;
  applySnapshot(part);
}

/** A snapshot replaces the state. What we saw of a driver that stays in scope (its trail) is kept. */
function applySnapshot({ drivers, packages, alerts }) {
  const previous = state.drivers;
  state.drivers = new Map();
  state.packages = new Map();
  state.heldBy = new Map();
  for (const raw of packages) if (raw.package != null) mergePackage(raw);
  for (const raw of drivers) if (raw.driver != null) snapshotDriver(raw, previous.get(String(raw.driver)));
  for (const p of state.packages.values()) {
    if (p.holder === null && p.driver != null && heldState(p)) setHolder(p, String(p.driver));
  }
  replaceAlerts(alerts);
  // Not a sign the feed is live again: the server may send status live:false just before it.
  markData({ packages: true, alerts: true });
  onSnapshotApplied();
}

function snapshotDriver(raw, prev) {
  const d = driverRecord(String(raw.driver));
  if (prev) {
    d.trail = prev.trail;
    d.mx = prev.mx;
    d.my = prev.my;
  }
  setName(d, raw.name);
  d.online = raw.online === true;
  applyOptional(d, raw);
  if (isNum(raw.lat) && isNum(raw.lon)) setPosition(d, raw.lat, raw.lon, raw.ts);
  else if (isNum(raw.ts)) d.ts = raw.ts;
  // A driver's own list of what it holds: ids, or package objects.
  if (Array.isArray(raw.packages)) {
    for (const item of raw.packages) {
      const pid = typeof item === 'string' ? item : item?.package;
      if (pid == null) continue;
      const p = typeof item === 'object' ? mergePackage(item) : packageRecord(String(pid));
      setHolder(p, d.id);
    }
  }
}

function mergePackage(raw) {
  const p = packageRecord(String(raw.package));
  for (const [k, v] of Object.entries(raw)) if (k !== 'type' && k !== 'holder') p[k] = v;
  p.package = String(raw.package);
  p.stub = false;
  return p;
}

function replaceAlerts(alerts) {
  // Resolved alerts already in the feed stay (it is a feed); the open ones are what the server says.
  const kept = [...state.alerts.values()].filter((a) => a.state === 'resolved');
  state.alerts = new Map(kept.map((a) => [a.id, a]));
  for (const raw of alerts) if (raw.id != null) state.alerts.set(String(raw.id), normaliseAlert(raw));
  trimAlerts();
}

function onPos(f) {
  if (f.driver == null || !isNum(f.lat) || !isNum(f.lon)) return;
  const id = String(f.driver);
  const known = state.drivers.get(id);
  // Only a newer fix moves a marker: late positions belong to the trail API, not the live map.
  if (known && isNum(f.ts) && f.ts < known.ts) return;
  const d = known ?? driverRecord(id);
  if (!known) d.online = true; // it is sending; a presence frame corrects this
  setName(d, f.name);
  applyOptional(d, f);
  setPosition(d, f.lat, f.lon, f.ts);
  if (state.history?.driver === id) appendHistory(d);
  // The server sends one last position outside the box, then nothing: forget the driver rather
  // than keep a marker that would silently go stale.
  if (id !== state.selected && outsideSubscription(f.lon, f.lat)) removeDriver(id);
  markData();
}

function onScan(f) {
  if (f.package == null) return;
  const p = packageRecord(String(f.package));
  p.stub = false;
  p.lastEvent = f.event;
  if (isNum(f.ts)) p.lastEventTs = f.ts;
  const driver = f.driver != null ? String(f.driver) : null;
  if (driver && typeof f.name === 'string' && f.name) {
    state.names.set(driver, f.name);
    if (state.drivers.has(driver)) setName(state.drivers.get(driver), f.name);
  }
  if (f.event === 'pickup' || f.event === 'handover') {
    if (driver) p.driver = driver;
    setHolder(p, driver, true);
  } else if (f.event === 'deliver' || f.event === 'fail' || f.event === 'return') {
    setHolder(p, null, true);
  }
  markData({ packages: true });
}

function onPackage(f) {
  if (f.package == null) return;
  const p = mergePackage(f);
  if ('state' in f || 'driver' in f) setHolder(p, heldState(p) && p.driver != null ? String(p.driver) : null, true);
  markData({ packages: true });
}

function onPresence(f) {
  if (f.driver == null) return;
  const id = String(f.driver);
  if (typeof f.name === 'string' && f.name) state.names.set(id, f.name);
  // The box narrows positions only, so presence comes for drivers outside it too: those are
  // not on this map. Without a box (everything in scope), a driver may be listed before its
  // first position.
  if (!state.drivers.has(id) && conn.subscribedBbox) return;
  const d = driverRecord(id);
  d.online = f.online === true;
  setName(d, f.name);
  markData();
}

function normaliseAlert(raw) {
  const a = { ...raw, id: String(raw.id) };
  delete a.type;
  return a;
}

function onAlert(f) {
  if (f.id == null) return;
  const id = String(f.id);
  const prev = state.alerts.get(id);
  const a = { ...prev, ...normaliseAlert(f) };
  state.alerts.set(id, a);
  if (!prev && a.state !== 'resolved') queueAlertAnnouncement(a);
  trimAlerts();
  markData({ alerts: true });
}

function trimAlerts() {
  if (state.alerts.size <= MAX_ALERTS) return;
  const byAge = [...state.alerts.values()].sort((a, b) => (a.ts ?? 0) - (b.ts ?? 0));
  for (const a of byAge) {
    if (state.alerts.size <= MAX_ALERTS) break;
    if (a.state === 'resolved') state.alerts.delete(a.id);
  }
}

function onStatus(f) {
  if (f.live === false) {
    state.interrupted = true;
    showInterrupted(typeof f.reason === 'string' ? f.reason : '');
    setConnection('interrupted');
  } else if (f.live === true) {
    state.interrupted = false;
    showInterrupted(null);
    // A fresh snapshot follows. (Without a socket at all, frames come from a test harness.)
    if (conn.welcomed || !conn.wanted) setConnection('live');
  }
}

function onError(f) {
  const code = typeof f.code === 'string' ? f.code : 'error';
  const messages = {
    slow_consumer: 'The dashboard fell behind the live feed; reconnecting.',
    unauthorized: 'The service refused the access token.',
    forbidden: 'Not allowed for this token.',
  };
  showError(messages[code] ?? `Service error (${code})${f.message ? `: ${f.message}` : ''}`);
}

// ---------------------------------------------------------------------------------------------
// 4. The live connection

const conn = {
  ws: null,
  wanted: false, // false once signed out: no reconnecting
  welcomed: false,
  attempt: 0, // consecutive failed attempts, for the backoff
  liveSince: 0, // when the current connection delivered its first snapshot
  retryTimer: 0,
  countdownTimer: 0,
  welcomeTimer: 0,
  retryAt: 0,
  subscribedBbox: null,
  subscribeTimer: 0,
  state: 'signed-out',
  sent: [], // the last frames sent, tokens redacted, for the test hook
  directoryLoaded: false,
};

const liveUrl = () => `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${LIVE_PATH}`;

function send(frame) {
  if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
  conn.ws.send(JSON.stringify(frame));
  conn.sent.push('token' in frame ? { ...frame, token: '<redacted>' } : frame);
  if (conn.sent.length > 50) conn.sent.shift();
  return true;
}

function connectNow() {
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  if (!session.token) return showSignIn();
  conn.wanted = true;
  conn.welcomed = false;
  conn.subscribedBbox = null;
  setConnection('connecting');
  const ws = new WebSocket(liveUrl());
  conn.ws = ws;
  // Each handler checks it still belongs to the current socket: an old socket's late events
  // must not touch the new one's state.
  ws.onopen = () => ws === conn.ws && send({ type: 'hello', token: session.token });
  ws.onmessage = (e) => ws === conn.ws && onMessage(e.data);
  ws.onclose = (e) => ws === conn.ws && onClose(e.code, e.reason);
  // A handshake that stalls (a proxy holding the upgrade, a wedged instance) is retried, not waited on.
  clearTimeout(conn.welcomeTimer);
  conn.welcomeTimer = setTimeout(() => {
    if (ws !== conn.ws || conn.welcomed) return;
    ws.close();
    onClose(1006, 'no welcome');
  }, WELCOME_TIMEOUT_MS);
}

function onMessage(data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    console.warn('tracker: ignored a frame that is not JSON');
    return;
  }
  state.lastMessageTs = Date.now();
  handleFrame(frame);
}

function onWelcome(f) {
  if (f.refreshed === true) return; // a refresh on the open connection: nothing else changes
  conn.welcomed = true;
  session.role = typeof f.role === 'string' ? f.role : session.claims?.role ?? null;
  session.org = typeof f.org === 'string' ? f.org : session.claims?.org ?? null;
  showWho();
  state.pendingSnapshot = null;
  state.interrupted = false; // a new connection: the server repeats live:false if still so
  showInterrupted(null);
  subscribe(true);
  loadDirectory();
}

function onSnapshotApplied() {
  if (!conn.liveSince) conn.liveSince = Date.now();
  if (conn.ws || conn.state === 'connecting') setConnection(state.interrupted ? 'interrupted' : 'live');
}

/**
 * What to do after a close (PROTOCOL.md "Close codes"): 4000 means the token is refused, so sign
 * in again; 4001 means another session replaced this one, so wait for the user; 4003 means the
 * token expired, so refresh it if we can; anything else reconnects with backoff.
 */
function onClose(code, reason) {
  clearTimeout(conn.welcomeTimer);
  conn.ws = null;
  conn.welcomed = false;
  // Only a connection that stayed up a while resets the backoff: one closed soon after its
  // snapshot (1013, slow consumer) must not come back every half second.
  if (conn.liveSince && Date.now() - conn.liveSince > STABLE_CONNECTION_MS) conn.attempt = 0;
  conn.liveSince = 0;
  if (!conn.wanted) return;
  if (code === 4000) {
    signOut('The service refused this access token (unauthorized). Sign in again.');
  } else if (code === 4001) {
    setConnection('disconnected');
  } else if (code === 4003) {
    onTokenExpiredClose();
  } else {
    if (code === 1013 && reason) showError(`Disconnected: ${reason}`);
    scheduleReconnect();
  }
}

async function onTokenExpiredClose() {
  // adoptToken has usually reconnected already; scheduleReconnect then does nothing.
  if (session.refreshUrl && (await refreshToken())) return scheduleReconnect(0);
  const exp = tokenExpiry();
  if (exp && exp <= Date.now()) return signOut('Your session expired. Paste a new access token to continue.');
  scheduleReconnect();
}

/** Exponential backoff with full jitter: a random delay in [0, min(cap, base * 2^attempt)]. */
function scheduleReconnect(delay) {
  if (conn.ws || !conn.wanted) return;
  const ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** conn.attempt);
  const wait = delay ?? Math.random() * ceiling;
  conn.attempt = Math.min(conn.attempt + 1, 16);
  conn.retryAt = Date.now() + wait;
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  conn.retryTimer = setTimeout(connectNow, wait);
  conn.countdownTimer = setInterval(updateCountdown, 1000);
  setConnection('reconnecting');
}

function stopConnection() {
  conn.wanted = false;
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  clearTimeout(conn.subscribeTimer);
  clearTimeout(conn.welcomeTimer);
  const ws = conn.ws;
  conn.ws = null;
  conn.welcomed = false;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, 'signed out');
}

/** The current map view as [west, south, east, north], clamped to what Mercator can show. */
function viewBbox() {
  const W = worldPx();
  const halfW = view.width / 2 / W;
  const halfH = view.height / 2 / W;
  return [
    lonOf(clamp(view.x - halfW, 0, 1)),
    latOf(clamp(view.y + halfH, 0, 1)),
    lonOf(clamp(view.x + halfW, 0, 1)),
    latOf(clamp(view.y - halfH, 0, 1)),
  ];
}

function padBbox([w, s, e, n], pad) {
  const dx = (e - w) * pad;
  const dy = (n - s) * pad;
  const r = (v) => Math.round(v * 1e4) / 1e4;
  return [
    r(clamp(w - dx, -180, 180)),
    r(clamp(s - dy, -MAX_LAT, MAX_LAT)),
    r(clamp(e + dx, -180, 180)),
    r(clamp(n + dy, -MAX_LAT, MAX_LAT)),
  ];
}

const bboxContains = (o, i) => o[0] <= i[0] && o[1] <= i[1] && o[2] >= i[2] && o[3] >= i[3];
const bboxArea = (b) => Math.max(0, b[2] - b[0]) * Math.max(0, b[3] - b[1]);

function outsideSubscription(lon, lat) {
  const b = conn.subscribedBbox;
  return !!b && (lon < b[0] || lat < b[1] || lon > b[2] || lat > b[3]);
}

/**
 * Subscribe to what the map shows. A new subscribe costs a full snapshot, so it is only sent
 * when the view left the subscribed box, or when the box is far larger than the view (zoomed in
 * a lot: no need to receive a continent's positions).
 */
function subscribe(force = false) {
  if (!conn.welcomed || !view.ready) return;
  const current = viewBbox();
  const sub = conn.subscribedBbox;
  if (!force && sub && bboxContains(sub, current) && bboxArea(sub) < 16 * Math.max(bboxArea(current), 1e-9)) return;
  const bbox = padBbox(current, SUBSCRIBE_PAD);
  if (send({ type: 'subscribe', bbox })) conn.subscribedBbox = bbox;
}

function scheduleSubscribe() {
  clearTimeout(conn.subscribeTimer);
  conn.subscribeTimer = setTimeout(() => subscribe(false), SUBSCRIBE_DEBOUNCE_MS);
}

/** Names for drivers from GET /v1/drivers (optional: the live frames carry names too). */
async function loadDirectory() {
  if (conn.directoryLoaded) return;
  try {
    const res = await fetch('/v1/drivers', { headers: authHeaders(), cache: 'no-store' });
    if (!res.ok) return;
    const body = await res.json();
    const list = Array.isArray(body?.drivers) ? body.drivers : [];
    for (const item of list) {
      const id = item?.driver ?? item?.id ?? item?.sub;
      if (id == null || typeof item.name !== 'string') continue;
      state.names.set(String(id), item.name);
      const d = state.drivers.get(String(id));
      if (d) setName(d, item.name);
    }
    conn.directoryLoaded = true;
    markData();
  } catch {
    // optional: names still come with the live frames
  }
}

// ---------------------------------------------------------------------------------------------
// 5. The map

const view = { x: 0.5, y: 0.5, zoom: 3, width: 0, height: 0, dpr: 1, ready: false };
const render = { requested: false, base: true, overlay: true, lastFrameTs: 0, count: 0, totalMs: 0, maxMs: 0 };
render.parts = { trails: 0, markers: 0, bucket: 0, put: 0 }; // cumulative ms, for trackerDebug.perf()
const canvases = { base: null, trails: null, overlay: null, baseCtx: null, trailsCtx: null, ctx: null };
const basemap = { features: null, levels: new Map(), labels: [] };
const tiles = { url: null, cache: new Map() };

const worldPx = (zoom = view.zoom) => 256 * 2 ** zoom;

function toScreenX(mx, W) {
  return (mx - view.x) * W + view.width / 2;
}
function toScreenY(my, W) {
  return (my - view.y) * W + view.height / 2;
}
function screenToMerc(px, py) {
  const W = worldPx();
  return { x: view.x + (px - view.width / 2) / W, y: view.y + (py - view.height / 2) / W };
}
function project(lon, lat) {
  const W = worldPx();
  return { x: toScreenX(mercX(lon), W), y: toScreenY(mercY(lat), W) };
}

function requestRender() {
  if (render.requested) return;
  render.requested = true;
  requestAnimationFrame(drawFrame);
}
function markBase() {
  render.base = true;
  render.overlay = true;
  requestRender();
}
function markOverlay() {
  render.overlay = true;
  requestRender();
}

const dirty = { drivers: true, packages: true, alerts: true };
/** State changed: redraw the markers next frame, refresh the lists at their next tick. */
function markData({ packages = false, alerts = false } = {}) {
  dirty.drivers = true;
  if (packages) dirty.packages = true;
  if (alerts) dirty.alerts = true;
  markOverlay();
}

/** The one render: at most once per animation frame, whatever the message rate. */
function drawFrame() {
  render.requested = false;
  if (!view.ready) return;
  const t0 = performance.now();
  if (render.base) drawBase();
  if (render.overlay) drawOverlay();
  render.base = false;
  render.overlay = false;
  const ms = performance.now() - t0;
  render.count += 1;
  render.totalMs += ms;
  render.maxMs = Math.max(render.maxMs, ms);
  render.lastFrameTs = Date.now();
}

function resizeCanvases() {
  const box = $('map').getBoundingClientRect();
  if (box.width < 1 || box.height < 1) return;
  view.width = box.width;
  view.height = box.height;
  view.dpr = window.devicePixelRatio || 1;
  for (const c of [canvases.base, canvases.trails, canvases.overlay]) {
    c.width = Math.round(box.width * view.dpr);
    c.height = Math.round(box.height * view.dpr);
  }
  if (!view.ready) {
    view.ready = true;
    if (!restoreView()) fitBounds(AFRICA_BOUNDS);
  }
  viewChanged();
}

function fitBounds([w, s, e, n]) {
  const dx = mercX(e) - mercX(w);
  const dy = mercY(s) - mercY(n);
  const zoom = Math.log2(Math.min(view.width / (dx * 256), view.height / (dy * 256)));
  view.zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
  view.x = (mercX(w) + mercX(e)) / 2;
  view.y = (mercY(n) + mercY(s)) / 2;
  viewChanged();
}

function setCenter(lon, lat, zoom = view.zoom) {
  view.x = mercX(lon);
  view.y = mercY(lat);
  view.zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
  viewChanged();
}

/** Zoom so that the world point under the screen point (px, py) stays under it. */
function zoomAround(zoom, px, py, anchor = screenToMerc(px, py)) {
  view.zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
  const W = worldPx();
  view.x = anchor.x - (px - view.width / 2) / W;
  view.y = anchor.y - (py - view.height / 2) / W;
  viewChanged();
}

let saveViewTimer = 0;
function viewChanged() {
  view.x = clamp(view.x, 0, 1);
  view.y = clamp(view.y, 0, 1);
  markBase();
  scheduleSubscribe();
  clearTimeout(saveViewTimer);
  const save = () => sessionStorage.setItem(STORAGE.view, JSON.stringify([view.x, view.y, view.zoom]));
  saveViewTimer = setTimeout(save, 500);
}

function restoreView() {
  try {
    const [x, y, zoom] = JSON.parse(sessionStorage.getItem(STORAGE.view) ?? 'null') ?? [];
    if (![x, y, zoom].every(isNum)) return false;
    Object.assign(view, { x, y, zoom: clamp(zoom, MIN_ZOOM, MAX_ZOOM) });
    return true;
  } catch {
    return false;
  }
}

// --- Basemap: features in Mercator once, then one Path2D per integer zoom level, in that level's
// pixel space with points closer than a pixel dropped. Drawing a level is a transform + fill.

async function loadBasemap() {
  try {
    const res = await fetch(BASEMAP_URL);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const data = await res.json();
    basemap.features = (data.features ?? []).map(prepareFeature).filter(Boolean);
    basemap.labels = basemap.features.filter((f) => f.label);
    basemap.levels.clear();
    markBase();
  } catch (err) {
    console.warn('tracker: basemap unavailable', err);
  }
}

function prepareFeature(f) {
  const g = f?.geometry;
  const polygons = g?.type === 'Polygon' ? [g.coordinates] : g?.type === 'MultiPolygon' ? g.coordinates : null;
  if (!polygons) return null;
  const rings = [];
  for (const polygon of polygons) {
    for (const ring of polygon) {
      const flat = new Float64Array(ring.length * 2);
      ring.forEach(([lon, lat], i) => {
        flat[2 * i] = mercX(lon);
        flat[2 * i + 1] = mercY(lat);
      });
      rings.push(flat);
    }
  }
  const p = f.properties ?? {};
  const label = Array.isArray(p.label)
    ? { x: mercX(p.label[0]), y: mercY(p.label[1]), name: String(p.name ?? '') }
    : null;
  const bbox = Array.isArray(f.bbox) ? f.bbox : null;
  const width = bbox ? mercX(bbox[2]) - mercX(bbox[0]) : 0;
  return { africa: p.africa !== false, rings, label, width };
}

function basemapLevel(level) {
  let cached = basemap.levels.get(level);
  if (cached) return cached;
  const scale = worldPx(level);
  const africa = new Path2D();
  const context = new Path2D();
  for (const f of basemap.features) {
    const path = f.africa ? africa : context;
    for (const ring of f.rings) addRing(path, ring, scale);
  }
  cached = { africa, context, scale };
  basemap.levels.set(level, cached);
  return cached;
}

function addRing(path, ring, scale) {
  let lx = ring[0] * scale;
  let ly = ring[1] * scale;
  path.moveTo(lx, ly);
  for (let i = 2; i < ring.length; i += 2) {
    const x = ring[i] * scale;
    const y = ring[i + 1] * scale;
    if (Math.abs(x - lx) + Math.abs(y - ly) < 0.75 && i < ring.length - 2) continue;
    path.lineTo(x, y);
    lx = x;
    ly = y;
  }
  path.closePath();
}

function drawBase() {
  const ctx = canvases.baseCtx;
  ctx.setTransform(view.dpr, 0, 0, view.dpr, 0, 0);
  ctx.fillStyle = COLORS.ocean;
  ctx.fillRect(0, 0, view.width, view.height);
  if (basemap.features) drawBasemap(ctx);
  if (tiles.url) drawTiles(ctx);
  if (basemap.features && !tiles.url) drawLabels(ctx);
}

function drawBasemap(ctx) {
  const level = clamp(Math.floor(view.zoom), 0, BASEMAP_MAX_LEVEL);
  const { africa, context, scale } = basemapLevel(level);
  const W = worldPx();
  const k = W / scale;
  ctx.save();
  const dx = view.dpr * (view.width / 2 - view.x * W);
  const dy = view.dpr * (view.height / 2 - view.y * W);
  ctx.setTransform(view.dpr * k, 0, 0, view.dpr * k, dx, dy);
  ctx.lineWidth = 1 / k; // one CSS pixel whatever the zoom
  ctx.lineJoin = 'round';
  ctx.fillStyle = COLORS.contextLand;
  ctx.fill(context, 'evenodd');
  ctx.fillStyle = COLORS.land;
  ctx.fill(africa, 'evenodd'); // even-odd: South Africa's hole is Lesotho
  ctx.strokeStyle = COLORS.border;
  ctx.stroke(context);
  ctx.stroke(africa);
  ctx.restore();
}

function drawLabels(ctx) {
  if (view.zoom < 3 || view.zoom > 7.5) return;
  const W = worldPx();
  ctx.font = '600 11px system-ui, sans-serif';
  ctx.textAlign = 'center';
  ctx.textBaseline = 'middle';
  ctx.fillStyle = COLORS.label;
  for (const f of basemap.labels) {
    const x = toScreenX(f.label.x, W);
    const y = toScreenY(f.label.y, W);
    if (x < -50 || y < -20 || x > view.width + 50 || y > view.height + 20) continue;
    // Only where the country is wide enough on screen for its name.
    if (f.width * W < ctx.measureText(f.label.name).width * 1.1) continue;
    ctx.fillText(f.label.name, x, y);
  }
}

// --- Optional online tiles (only when GET /v1/config names a tile URL)

function tileUrl(z, x, y) {
  return tiles.url.replace('{z}', z).replace('{x}', x).replace('{y}', y).replace('{s}', 'abc'[(x + y) % 3]);
}

function getTile(z, x, y) {
  const key = `${z}/${x}/${y}`;
  let tile = tiles.cache.get(key);
  if (tile) {
    tiles.cache.delete(key); // re-insert: Map order doubles as least-recently-used order
    tiles.cache.set(key, tile);
    return tile;
  }
  const img = new Image();
  tile = { img, ready: false };
  img.decoding = 'async';
  img.referrerPolicy = 'no-referrer';
  img.onload = () => {
    tile.ready = true;
    markBase();
  };
  img.src = tileUrl(z, x, y);
  tiles.cache.set(key, tile);
  while (tiles.cache.size > 400) tiles.cache.delete(tiles.cache.keys().next().value);
  return tile;
}

function drawTiles(ctx) {
  const z = clamp(Math.round(view.zoom), 0, 19);
  const n = 2 ** z;
  const size = 256 * 2 ** (view.zoom - z);
  const W = worldPx();
  const left = view.x * W - view.width / 2;
  const top = view.y * W - view.height / 2;
  const x0 = Math.max(0, Math.floor(left / size));
  const x1 = Math.min(n - 1, Math.floor((left + view.width) / size));
  const y0 = Math.max(0, Math.floor(top / size));
  const y1 = Math.min(n - 1, Math.floor((top + view.height) / size));
  for (let x = x0; x <= x1; x++) {
    for (let y = y0; y <= y1; y++) {
      const tile = getTile(z, x, y);
      if (tile.ready) ctx.drawImage(tile.img, x * size - left, y * size - top, size + 0.5, size + 0.5);
    }
  }
}

// --- Overlay: trails, markers, selection, scale bar

// --- Overlay. Three stacked canvases: base (basemap, tiles), trails (short trails and the
// selected driver's history, as hairline vectors), markers (sprites blitted into an ImageData,
// then the selection ring, names and scale bar as vectors on top).
//
// Why sprites and not paths: measured in Chromium's software rasteriser (what runs without a
// GPU: headless tests, VMs, remote desktops), filling and stroking one path of 5,000 circles
// costs ~240 ms a frame; copying 5,000 pre-rendered sprites into an ImageData costs ~5 ms.
// Trails are hairlines (1 device pixel) in chunks of 50 drivers per path for the same reason.

const MARKER_R = 4.5;
const MARKER_KINDS = ['offPkg', 'off', 'onPkg', 'on']; // drawn in this order: online on top
const markerBuckets = { offPkg: [], off: [], onPkg: [], on: [] };
const TRAIL_CHUNK = 50;
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
const ALPHA_SHIFT = LITTLE_ENDIAN ? 24 : 0; // RGBA bytes read as one 32-bit pixel
const OPAQUE = (255 << ALPHA_SHIFT) >>> 0;
const sprites = { dpr: 0, kinds: {} };
const markerLayer = { image: null, pixels: null };

function drawOverlay() {
  const W = worldPx();
  const t0 = performance.now();
  const trails = canvases.trailsCtx;
  trails.setTransform(view.dpr, 0, 0, view.dpr, 0, 0);
  trails.clearRect(0, 0, view.width, view.height);
  if ($('show-trails').checked) drawTrails(trails, W);
  drawHistory(trails, W);
  const t1 = performance.now();
  const ctx = canvases.ctx;
  bucketMarkers(W);
  render.parts.bucket += performance.now() - t1;
  blitMarkers(ctx);
  render.parts.trails += t1 - t0;
  render.parts.markers += performance.now() - t1;
  ctx.setTransform(view.dpr, 0, 0, view.dpr, 0, 0);
  drawNames(ctx, W);
  drawSelection(ctx, W);
  drawScaleBar(ctx);
}

function drawTrails(ctx, W) {
  const margin = 40;
  let vertices = 0;
  let inPath = 0;
  ctx.strokeStyle = COLORS.trail;
  ctx.lineWidth = 1 / view.dpr; // a hairline: far cheaper to rasterise than anything wider
  ctx.beginPath();
  for (const d of state.drivers.values()) {
    if (d.trail.length < 4) continue;
    const x = toScreenX(d.mx, W);
    const y = toScreenY(d.my, W);
    if (x < -margin || y < -margin || x > view.width + margin || y > view.height + margin) continue;
    vertices += addPolyline(ctx, d.trail, W);
    if (++inPath === TRAIL_CHUNK) {
      ctx.stroke();
      ctx.beginPath();
      inPath = 0;
    }
    if (vertices > MAX_TRAIL_VERTICES) break; // a budget, so a dense view cannot stall the frame
  }
  ctx.stroke();
}

/** Add a flat [mx, my, ...] polyline to the current path, skipping sub-pixel steps. */
function addPolyline(ctx, flat, W) {
  let lx = toScreenX(flat[0], W);
  let ly = toScreenY(flat[1], W);
  let added = 0;
  for (let i = 2; i < flat.length; i += 2) {
    const x = toScreenX(flat[i], W);
    const y = toScreenY(flat[i + 1], W);
    if (Math.abs(x - lx) + Math.abs(y - ly) < 1.5) continue;
    if (added === 0) ctx.moveTo(lx, ly);
    ctx.lineTo(x, y);
    lx = x;
    ly = y;
    added += 1;
  }
  return added;
}

function drawHistory(ctx, W) {
  const h = state.history;
  if (!h || h.points.length < 2) return;
  const flat = new Float64Array(h.points.length * 2);
  h.points.forEach((p, i) => {
    flat[2 * i] = p.mx;
    flat[2 * i + 1] = p.my;
  });
  ctx.beginPath();
  addPolyline(ctx, flat, W);
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  ctx.strokeStyle = 'rgba(255, 255, 255, 0.9)';
  ctx.lineWidth = 5;
  ctx.stroke();
  ctx.strokeStyle = COLORS.history;
  ctx.lineWidth = 3;
  ctx.stroke();
}

/** Screen positions of the visible markers, by kind (colour and shape). */
function bucketMarkers(W) {
  for (const kind of MARKER_KINDS) markerBuckets[kind].length = 0;
  const m = MARKER_R + 2;
  for (const d of state.drivers.values()) {
    if (!(d.mx === d.mx)) continue; // NaN: no position yet
    const x = toScreenX(d.mx, W);
    const y = toScreenY(d.my, W);
    if (x < -m || y < -m || x > view.width + m || y > view.height + m) continue;
    const pkg = heldCount(d.id) > 0;
    markerBuckets[d.online ? (pkg ? 'onPkg' : 'on') : pkg ? 'offPkg' : 'off'].push(x, y);
  }
}

/** One sprite per marker kind at the current pixel ratio: a white halo under the coloured shape. */
function buildSprites() {
  const dpr = view.dpr;
  if (sprites.dpr === dpr) return;
  for (const kind of MARKER_KINDS) {
    const diamond = kind.endsWith('Pkg');
    const halo = MARKER_R + 1.2;
    const size = Math.ceil(2 * (diamond ? halo * 1.3 : halo) * dpr) + 2;
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = size;
    const c = canvas.getContext('2d');
    c.setTransform(dpr, 0, 0, dpr, size / 2, size / 2);
    const shape = diamond ? diamondAt : circleAt;
    c.beginPath();
    shape(c, 0, 0, halo);
    c.fillStyle = COLORS.outline;
    c.fill();
    c.beginPath();
    shape(c, 0, 0, MARKER_R);
    c.fillStyle = COLORS[kind];
    c.fill();
    const pixels = new Uint32Array(c.getImageData(0, 0, size, size).data.buffer);
    sprites.kinds[kind] = { size, pixels, spans: rowSpans(pixels, size) };
  }
  sprites.dpr = dpr;
}

/** Per row, the [first, last + 1) columns that are not transparent: the blit skips the rest. */
function rowSpans(pixels, size) {
  const spans = new Int16Array(size * 2);
  for (let y = 0; y < size; y++) {
    let first = size;
    let last = -1;
    for (let x = 0; x < size; x++) {
      if ((pixels[y * size + x] >>> ALPHA_SHIFT) & 255) {
        first = Math.min(first, x);
        last = x;
      }
    }
    spans[2 * y] = first;
    spans[2 * y + 1] = last + 1;
  }
  return spans;
}

function blitMarkers(ctx) {
  const w = ctx.canvas.width;
  const h = ctx.canvas.height;
  if (!markerLayer.image || markerLayer.image.width !== w || markerLayer.image.height !== h) {
    markerLayer.image = ctx.createImageData(w, h);
    markerLayer.pixels = new Uint32Array(markerLayer.image.data.buffer);
  }
  buildSprites();
  const buf = markerLayer.pixels;
  buf.fill(0);
  for (const kind of MARKER_KINDS) {
    const pts = markerBuckets[kind];
    const sprite = sprites.kinds[kind];
    for (let i = 0; i < pts.length; i += 2) blit(buf, w, h, sprite, pts[i] * view.dpr, pts[i + 1] * view.dpr);
  }
  const t = performance.now();
  ctx.putImageData(markerLayer.image, 0, 0); // replaces the whole layer: no clearRect needed
  render.parts.put += performance.now() - t;
}

/**
 * Copy a sprite centred on (cx, cy) device pixels. Opaque pixels are copied; an anti-aliased
 * edge pixel is copied onto empty pixels (so the edge stays smooth against the map below) and,
 * over another marker, made opaque when mostly covered or else skipped. Exact blending there
 * doubled the frame time in dense views for a difference nobody can see at 5 px.
 */
function blit(buf, w, h, sprite, cx, cy) {
  const { size, pixels, spans } = sprite;
  const x0 = Math.round(cx - size / 2);
  const y0 = Math.round(cy - size / 2);
  const xs = Math.max(0, -x0);
  const xe = Math.min(size, w - x0);
  const ye = Math.min(size, h - y0);
  for (let y = Math.max(0, -y0); y < ye; y++) {
    const from = Math.max(xs, spans[2 * y]);
    const to = Math.min(xe, spans[2 * y + 1]);
    let di = (y0 + y) * w + x0 + from;
    let si = y * size + from;
    for (let x = from; x < to; x++, di++, si++) {
      const s = pixels[si];
      const a = (s >>> ALPHA_SHIFT) & 255;
      if (a === 255 || (a !== 0 && buf[di] === 0)) buf[di] = s;
      else if (a >= 128) buf[di] = s | OPAQUE;
    }
  }
}

function circleAt(ctx, x, y, r) {
  ctx.moveTo(x + r, y);
  ctx.arc(x, y, r, 0, 2 * Math.PI);
}

function diamondAt(ctx, x, y, r) {
  const s = r * 1.3;
  ctx.moveTo(x, y - s);
  ctx.lineTo(x + s, y);
  ctx.lineTo(x, y + s);
  ctx.lineTo(x - s, y);
  ctx.closePath();
}

/** Names next to markers once few enough are on screen for them to be readable. */
function drawNames(ctx, W) {
  const count = MARKER_KINDS.reduce((n, kind) => n + markerBuckets[kind].length / 2, 0);
  if (count === 0 || count > 60) return;
  ctx.font = '12px system-ui, sans-serif';
  ctx.textAlign = 'left';
  ctx.textBaseline = 'middle';
  ctx.lineWidth = 3;
  ctx.lineJoin = 'round';
  ctx.strokeStyle = 'rgba(255, 255, 255, 0.9)';
  ctx.fillStyle = '#1f2328';
  // A name that would overlap one already drawn is left out: two drivers side by side would
  // otherwise smear both names into one unreadable word. The selected driver's name goes first.
  const placed = [];
  const selected = state.selected ? state.drivers.get(state.selected) : null;
  const drivers = selected ? [selected, ...state.drivers.values()] : state.drivers.values();
  for (const d of drivers) {
    if (!(d.mx === d.mx) || (d !== selected && d.id === state.selected)) continue;
    // Clear of the selection ring for the selected driver.
    const x = toScreenX(d.mx, W) + MARKER_R + (d.id === state.selected ? 12 : 4);
    const y = toScreenY(d.my, W);
    if (x < 0 || y < 0 || x > view.width || y > view.height) continue;
    const label = d.name || d.id;
    const box = [x - 2, y - 8, x + ctx.measureText(label).width + 2, y + 8];
    if (placed.some((b) => b[0] < box[2] && box[0] < b[2] && b[1] < box[3] && box[1] < b[3])) continue;
    placed.push(box);
    ctx.strokeText(label, x, y);
    ctx.fillText(label, x, y);
  }
}

function drawSelection(ctx, W) {
  const d = state.selected ? state.drivers.get(state.selected) : null;
  if (!d || !(d.mx === d.mx)) return;
  const x = toScreenX(d.mx, W);
  const y = toScreenY(d.my, W);
  ctx.beginPath();
  ctx.arc(x, y, MARKER_R + 6, 0, 2 * Math.PI);
  ctx.lineWidth = 3;
  ctx.strokeStyle = COLORS.selected;
  ctx.stroke();
  ctx.beginPath();
  ctx.arc(x, y, MARKER_R + 8.5, 0, 2 * Math.PI);
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = '#1f2328';
  ctx.stroke();
}

/** A scale bar of a round length (1, 2 or 5 x 10^n) at most 120 px long, for the centre latitude. */
function drawScaleBar(ctx) {
  const metresPerPx = (EARTH_CIRCUMFERENCE_M * Math.cos((latOf(view.y) * Math.PI) / 180)) / worldPx();
  const max = metresPerPx * 120;
  const pow = 10 ** Math.floor(Math.log10(max));
  const metres = [5, 2, 1].map((k) => k * pow).find((v) => v <= max) ?? pow;
  const px = metres / metresPerPx;
  const label = metres >= 1000 ? `${metres / 1000} km` : `${metres} m`;
  const x = 12;
  const y = view.height - 14;
  ctx.fillStyle = 'rgba(255, 255, 255, 0.85)';
  ctx.fillRect(x - 6, y - 20, px + 12 + 50, 28);
  ctx.strokeStyle = '#1f2328';
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.moveTo(x, y - 6);
  ctx.lineTo(x, y);
  ctx.lineTo(x + px, y);
  ctx.lineTo(x + px, y - 6);
  ctx.stroke();
  ctx.fillStyle = '#1f2328';
  ctx.font = '12px system-ui, sans-serif';
  ctx.textAlign = 'left';
  ctx.textBaseline = 'alphabetic';
  ctx.fillText(label, x + px + 6, y);
  view.scale = { metres, px, label };
}

// --- Interaction: drag to pan, wheel / pinch / buttons / keys to zoom, click to select

function setupMapInput() {
  const canvas = canvases.overlay;
  const pointers = new Map();
  let gesture = null;
  const pointOf = (e) => {
    const r = canvas.getBoundingClientRect();
    return { x: e.clientX - r.left, y: e.clientY - r.top };
  };
  canvas.addEventListener('pointerdown', (e) => {
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    canvas.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, pointOf(e));
    gesture = startGesture(pointers);
  });
  canvas.addEventListener('pointermove', (e) => {
    if (!pointers.has(e.pointerId)) return;
    pointers.set(e.pointerId, pointOf(e));
    moveGesture(gesture, pointers);
  });
  const end = (e) => {
    if (!pointers.has(e.pointerId)) return;
    const click = e.type === 'pointerup' && gesture?.kind === 'pan' && !gesture.moved;
    pointers.delete(e.pointerId);
    gesture = pointers.size ? startGesture(pointers) : null;
    if (click) selectAt(pointOf(e));
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  canvas.addEventListener('wheel', onWheel, { passive: false });
  canvas.addEventListener('dblclick', (e) => {
    const p = pointOf(e);
    zoomAround(view.zoom + 1, p.x, p.y);
  });
  canvas.addEventListener('keydown', onMapKey);
  $('zoom-in').addEventListener('click', () => zoomAround(view.zoom + 1, view.width / 2, view.height / 2));
  $('zoom-out').addEventListener('click', () => zoomAround(view.zoom - 1, view.width / 2, view.height / 2));
  $('zoom-fit').addEventListener('click', () => fitBounds(AFRICA_BOUNDS));
  $('show-trails').addEventListener('change', markOverlay);
}

function startGesture(pointers) {
  const pts = [...pointers.values()];
  if (pts.length === 1) return { kind: 'pan', start: pts[0], x: view.x, y: view.y, moved: false };
  const [a, b] = pts;
  const mid = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
  const dist = Math.hypot(a.x - b.x, a.y - b.y) || 1;
  return { kind: 'pinch', dist, zoom: view.zoom, anchor: screenToMerc(mid.x, mid.y) };
}

function moveGesture(g, pointers) {
  if (!g) return;
  const pts = [...pointers.values()];
  if (g.kind === 'pan') {
    const dx = pts[0].x - g.start.x;
    const dy = pts[0].y - g.start.y;
    if (!g.moved && Math.hypot(dx, dy) < 4) return; // a click may wobble a little
    g.moved = true;
    const W = worldPx();
    view.x = g.x - dx / W;
    view.y = g.y - dy / W;
    viewChanged();
  } else if (pts.length >= 2) {
    const [a, b] = pts;
    const zoom = g.zoom + Math.log2(Math.hypot(a.x - b.x, a.y - b.y) / g.dist);
    zoomAround(zoom, (a.x + b.x) / 2, (a.y + b.y) / 2, g.anchor);
  }
}

function onWheel(e) {
  e.preventDefault();
  const unit = e.deltaMode === 1 ? 40 : e.deltaMode === 2 ? 800 : 1; // lines, pages, pixels
  const step = clamp((-e.deltaY * unit) / 250, -1, 1);
  const r = canvases.overlay.getBoundingClientRect();
  zoomAround(view.zoom + step, e.clientX - r.left, e.clientY - r.top);
}

function onMapKey(e) {
  const pan = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[e.key];
  if (pan) {
    const W = worldPx();
    view.x += (pan[0] * 100) / W;
    view.y += (pan[1] * 100) / W;
    viewChanged();
  } else if (e.key === '+' || e.key === '=') {
    zoomAround(view.zoom + 1, view.width / 2, view.height / 2);
  } else if (e.key === '-' || e.key === '_') {
    zoomAround(view.zoom - 1, view.width / 2, view.height / 2);
  } else if (e.key === 'Enter') {
    selectAt({ x: view.width / 2, y: view.height / 2 }, 60);
  } else if (e.key === 'Escape') {
    selectDriver(null);
  } else {
    return;
  }
  e.preventDefault();
}

/** The driver nearest to a screen point, within `radius` pixels. */
function driverAt(p, radius = 12) {
  const W = worldPx();
  let best = null;
  let bestDist = radius * radius;
  for (const d of state.drivers.values()) {
    if (!(d.mx === d.mx)) continue;
    const dx = toScreenX(d.mx, W) - p.x;
    const dy = toScreenY(d.my, W) - p.y;
    const dist = dx * dx + dy * dy;
    if (dist <= bestDist) {
      best = d;
      bestDist = dist;
    }
  }
  return best;
}

function selectAt(p, radius) {
  const d = driverAt(p, radius);
  if (!d) return;
  selectDriver(d.id, { centre: false });
  lists.drivers.revealKey = d.id;
}

// ---------------------------------------------------------------------------------------------
// 6. Side panel

/**
 * A virtualised list: only the rows in (and just around) the scrolled window exist in the DOM,
 * so 5,000 drivers cost the same as 30. Rows are keyed, so a row keeps its element while it
 * stays visible (focus and hover survive a refresh).
 */
class VirtualList {
  constructor(container, { rowHeight, createRow, updateRow, keyOf, onActivate }) {
    Object.assign(this, { container, rowHeight, createRow, updateRow, keyOf, onActivate });
    this.spacer = container.querySelector('.vlist-spacer');
    this.items = [];
    this.rows = new Map();
    this.pool = [];
    this.activeKey = null;
    this.revealKey = null; // scroll to this row at the next setItems (selected on the map)
    this.frame = 0;
    container.tabIndex = 0;
    container.addEventListener('scroll', () => this.renderSoon(), { passive: true });
    container.addEventListener('click', (e) => this.onClick(e));
    container.addEventListener('keydown', (e) => this.onKey(e));
  }

  setItems(items) {
    this.items = items;
    this.spacer.style.height = `${items.length * this.rowHeight}px`;
    if (this.revealKey != null && this.container.clientHeight > 0) {
      const i = items.findIndex((it) => this.keyOf(it) === this.revealKey);
      this.revealKey = null;
      if (i >= 0) this.scrollToIndex(i);
    }
    this.render();
  }

  scrollToIndex(i) {
    const h = this.rowHeight;
    const c = this.container;
    if (i * h < c.scrollTop) c.scrollTop = i * h;
    else if ((i + 1) * h > c.scrollTop + c.clientHeight) c.scrollTop = (i + 1) * h - c.clientHeight;
  }

  renderSoon() {
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    const { scrollTop, clientHeight } = this.container;
    if (clientHeight === 0) return; // hidden tab: render when shown
    const h = this.rowHeight;
    const first = Math.max(0, Math.floor(scrollTop / h) - 5);
    const last = Math.min(this.items.length, Math.ceil((scrollTop + clientHeight) / h) + 5);
    const next = new Map();
    for (let i = first; i < last; i++) {
      const item = this.items[i];
      const key = this.keyOf(item);
      let row = this.rows.get(key);
      if (row) this.rows.delete(key);
      else row = this.pool.pop() ?? this.createRow();
      next.set(key, row);
      this.place(row, i, key);
      this.updateRow(row, item);
      if (!row.isConnected) this.container.appendChild(row);
    }
    for (const row of this.rows.values()) this.recycle(row);
    this.rows = next;
  }

  place(row, i, key) {
    row.dataset.index = String(i);
    row.style.transform = `translateY(${i * this.rowHeight}px)`;
    row.setAttribute('aria-posinset', String(i + 1));
    row.setAttribute('aria-setsize', String(this.items.length));
    row.tabIndex = -1; // the list itself is the one tab stop; arrows move between rows
    row.classList.toggle('active', key === this.activeKey);
  }

  recycle(row) {
    if (row.contains(document.activeElement)) this.container.focus({ preventScroll: true });
    row.remove();
    this.pool.push(row);
  }

  onClick(e) {
    const row = e.target.closest('[data-index]');
    if (!row) return;
    const item = this.items[Number(row.dataset.index)];
    if (item) {
      this.activeKey = this.keyOf(item);
      this.onActivate(item);
    }
  }

  onKey(e) {
    const n = this.items.length;
    if (!n) return;
    const page = Math.max(1, Math.floor(this.container.clientHeight / this.rowHeight) - 1);
    const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: page, PageUp: -page, Home: -n, End: n };
    const current = this.activeKey == null ? -1 : this.items.findIndex((it) => this.keyOf(it) === this.activeKey);
    if (e.key in moves) {
      e.preventDefault();
      this.focusIndex(clamp(current < 0 ? 0 : current + moves[e.key], 0, n - 1));
    } else if ((e.key === 'Enter' || e.key === ' ') && current >= 0) {
      e.preventDefault();
      this.onActivate(this.items[current]);
    }
  }

  focusIndex(i) {
    this.scrollToIndex(i);
    this.activeKey = this.keyOf(this.items[i]);
    this.render();
    this.rows.get(this.activeKey)?.focus({ preventScroll: true });
  }
}

const lists = { drivers: null, packages: null };

const DRIVER_SORTS = {
  name: (a, b) => collator.compare(a.name || a.id, b.name || b.id),
  seen: (a, b) => b.ts - a.ts,
  status: (a, b) => b.online - a.online || collator.compare(a.name || a.id, b.name || b.id),
  speed: (a, b) => (b.spd ?? -1) - (a.spd ?? -1),
  battery: (a, b) => (batteryPercent(a.bat) ?? 101) - (batteryPercent(b.bat) ?? 101),
  packages: (a, b) => heldCount(b.id) - heldCount(a.id) || collator.compare(a.name || a.id, b.name || b.id),
};

function createDriverRow() {
  const row = el('div', 'row drv');
  row.setAttribute('role', 'option');
  row.dataset.testid = 'driver-row';
  for (const cls of ['sym', 'r-name', 'r-stats', 'r-meta', 'r-pkgs']) row.append(el('span', cls));
  return row;
}

function updateDriverRow(row, d) {
  const held = heldCount(d.id);
  const now = Date.now();
  row.dataset.driver = d.id;
  row.dataset.online = String(d.online);
  row.setAttribute('aria-selected', String(d.id === state.selected));
  const [sym, name, stats, meta, pkgs] = row.children;
  sym.className = `sym ${symClass(d.online, held > 0)}`;
  setText(name, d.name || d.id);
  setText(stats, `${formatSpeed(d.spd)} · ${formatBattery(d.bat)}`);
  setText(meta, `${d.online ? 'online' : 'offline'} · ${d.name ? `${d.id} · ` : ''}${relativeTime(d.ts, now)}`);
  setText(pkgs, held ? `${held} pkg${held === 1 ? '' : 's'}` : '');
  row.title = `Last position ${formatTime(d.ts)}`;
}

// Avoids touching text nodes that did not change: a refresh of 30 rows then costs almost nothing.
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

const symClass = (online, pkg) => `sym-${online ? 'on' : 'off'}${pkg ? '-pkg' : ''}`;

function refreshDriverList() {
  const query = $('driver-filter').value.trim().toLowerCase();
  const sort = DRIVER_SORTS[$('driver-sort').value] ?? DRIVER_SORTS.name;
  const all = [...state.drivers.values()];
  const items = query ? all.filter((d) => d.search.includes(query)) : all;
  items.sort(sort);
  lists.drivers.setItems(items);
  const online = all.reduce((n, d) => n + (d.online ? 1 : 0), 0);
  setText($('count-drivers'), String(all.length));
  setText(
    $('driver-summary'),
    query ? `${items.length} of ${all.length} drivers match` : `${all.length} drivers in this area · ${online} online`,
  );
}

function createPackageRow() {
  const row = el('div', 'row pkg');
  row.setAttribute('role', 'option');
  row.dataset.testid = 'package-row';
  row.append(el('span', 'r-name'), el('span', 'badge'), el('span', 'r-meta'), el('span', 'r-pkgs'));
  return row;
}

function updatePackageRow(row, p) {
  row.dataset.package = p.package;
  row.dataset.state = String(p.state ?? '');
  const [name, badge, meta, extra] = row.children;
  setText(name, p.package);
  setText(badge, p.state ? humanise(p.state) : 'Unknown');
  badge.className = `badge state-${String(p.state ?? 'unknown').replace(/[^a-z_]/gi, '')}`;
  const who = p.holder ?? p.driver;
  const parts = [];
  if (who != null) parts.push(`${p.holder ? 'with' : 'driver'} ${displayName(String(who))}`);
  if (p.client != null) parts.push(`client ${p.client}`);
  const dest = describeDestination(p.destination);
  if (dest) parts.push(`to ${dest}`);
  setText(meta, parts.join(' · ') || '–');
  setText(extra, p.lastEvent ? `${humanise(p.lastEvent)} ${relativeTime(p.lastEventTs)}` : '');
}

function describeDestination(dest) {
  if (!dest) return '';
  if (typeof dest === 'string') return dest;
  for (const key of ['name', 'label', 'address', 'city']) {
    if (typeof dest[key] === 'string' && dest[key]) return dest[key];
  }
  if (isNum(dest.lat) && isNum(dest.lon)) return `${dest.lat.toFixed(3)}, ${dest.lon.toFixed(3)}`;
  return '';
}

function refreshPackageList() {
  const query = $('package-filter').value.trim().toLowerCase();
  const all = [...state.packages.values()].filter((p) => !p.stub);
  const matches = (p) =>
    [p.package, p.state, p.client, p.holder && displayName(p.holder), p.driver, describeDestination(p.destination)]
      .filter(Boolean)
      .some((s) => String(s).toLowerCase().includes(query));
  const items = query ? all.filter(matches) : all;
  // Packages in someone's hands first: those are the ones a dispatcher follows.
  items.sort((a, b) => (b.holder ? 1 : 0) - (a.holder ? 1 : 0) || collator.compare(a.package, b.package));
  lists.packages.setItems(items);
  setText($('count-packages'), String(all.length));
  setText($('package-summary'), query ? `${items.length} of ${all.length} packages match` : `${all.length} packages`);
}

function refreshAlerts() {
  const openOnly = $('alerts-open-only').checked;
  const all = [...state.alerts.values()];
  const open = all.filter((a) => a.state !== 'resolved').length;
  setText($('count-alerts'), String(open));
  $('tab-alerts').classList.toggle('has-open', open > 0);
  const shown = all
    .filter((a) => !openOnly || a.state !== 'resolved')
    .sort((a, b) => (b.ts ?? 0) - (a.ts ?? 0))
    .slice(0, 200);
  const list = $('alert-list');
  list.replaceChildren(...shown.map(alertItem));
  if (!shown.length) list.append(el('li', 'empty', openOnly ? 'No open alerts.' : 'No alerts.'));
}

function alertItem(a) {
  const li = el('li', `alert ${a.state === 'resolved' ? 'resolved' : 'open'}`);
  li.dataset.testid = 'alert-item';
  li.dataset.alert = a.id;
  li.dataset.state = String(a.state ?? 'open');
  const head = el('div', 'alert-head');
  const badge = el('span', 'badge', a.state === 'resolved' ? 'Resolved' : 'Open');
  head.append(el('strong', '', humanise(a.kind ?? 'alert')), badge);
  li.append(head);
  if (a.message) li.append(el('p', 'alert-msg', String(a.message)));
  li.append(el('p', 'alert-meta', alertMeta(a)));
  if (a.driver != null) {
    const button = el('button', 'btn btn-quiet btn-small', 'Show driver');
    button.type = 'button';
    button.addEventListener('click', () => selectDriver(String(a.driver)));
    li.append(button);
  }
  return li;
}

function alertMeta(a) {
  const about = [];
  if (a.driver != null) about.push(displayName(String(a.driver)));
  if (a.package != null) about.push(String(a.package));
  return [...about, relativeTime(a.ts)].join(' · ');
}

// Rebuilding the feed would drop keyboard focus from its buttons: only the times change here.
function ageAlertTimes() {
  for (const li of $('alert-list').children) {
    const a = state.alerts.get(li.dataset.alert ?? '');
    const meta = li.querySelector('.alert-meta');
    if (a && meta) setText(meta, alertMeta(a));
  }
}

/** Runs every LIST_REFRESH_MS: lists, counts and details, never more often. */
let lastFullRefresh = 0;
function refreshPanels() {
  const now = Date.now();
  const stale = now - lastFullRefresh >= 1000; // relative times move even when nothing else does
  const tab = activeTab();
  if ((dirty.drivers || stale) && tab === 'drivers') refreshDriverList();
  else if (dirty.drivers) setText($('count-drivers'), String(state.drivers.size));
  if ((dirty.packages || dirty.drivers || stale) && tab === 'packages') refreshPackageList();
  else if (dirty.packages) setText($('count-packages'), String(countPackages()));
  if (dirty.alerts) refreshAlerts();
  else if (stale && tab === 'alerts') ageAlertTimes();
  if (state.selected) updateDetails();
  if (stale) lastFullRefresh = now;
  dirty.drivers = dirty.packages = dirty.alerts = false;
}

function countPackages() {
  let n = 0;
  for (const p of state.packages.values()) if (!p.stub) n += 1;
  return n;
}

// --- Selection, details, trail history

/** Select a driver: highlight it, centre the map on it, load its recent trail from the service. */
function selectDriver(id, { centre = true } = {}) {
  state.selected = id;
  state.history = null;
  const panel = $('driver-detail');
  panel.hidden = !id;
  if (!id) {
    historyAbort?.abort();
    markOverlay();
    dirty.drivers = true;
    return;
  }
  const d = state.drivers.get(id);
  if (centre && d && d.mx === d.mx) {
    view.x = d.mx;
    view.y = d.my;
    viewChanged();
  }
  updateDetails();
  loadHistory(id);
  dirty.drivers = true;
  markOverlay();
}

const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

function describeHeld(held) {
  if (!held.length) return 'none';
  return held.slice(0, 12).join(', ') + (held.length > 12 ? ` +${held.length - 12} more` : '');
}

function updateDetails() {
  const id = state.selected;
  const d = state.drivers.get(id);
  setText($('detail-name'), displayName(id));
  const held = [...(state.heldBy.get(id) ?? [])];
  const rows = d
    ? [
        ['Driver id', id],
        ['Status', d.online ? 'Online' : 'Offline'],
        ['Last seen', `${relativeTime(d.ts)} (${formatTime(d.ts)})`],
        ['Position', isNum(d.lat) ? `${d.lat.toFixed(5)}, ${d.lon.toFixed(5)}` : '–'],
        ['Speed', formatSpeed(d.spd)],
        ['Battery', formatBattery(d.bat)],
        ['Packages', describeHeld(held)],
      ]
    : [
        ['Driver id', id],
        ['Status', 'Not in the current view'],
      ];
  const grid = $('detail-grid');
  const nodes = rows.flatMap(([k, v]) => [el('dt', '', k), el('dd', '', v)]);
  if (grid.textContent !== nodes.map((n) => n.textContent).join('')) grid.replaceChildren(...nodes);
}

let historyAbort = null;

async function loadHistory(id) {
  historyAbort?.abort();
  const ctrl = new AbortController();
  historyAbort = ctrl;
  const hours = Number($('trail-hours').value) || 4;
  const to = Date.now();
  const from = to - hours * 3600 * 1000;
  state.history = { driver: id, points: [], source: 'loading', note: 'Loading history…' };
  setText($('trail-note'), state.history.note);
  try {
    const url = `/v1/drivers/${encodeURIComponent(id)}/trail?from=${from}&to=${to}`;
    const res = await fetch(url, { headers: authHeaders(), signal: ctrl.signal, cache: 'no-store' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const points = parseTrail(await res.json());
    if (ctrl.signal.aborted || state.history?.driver !== id) return;
    // Live fixes that arrived while loading are newer than the response: keep them after it.
    const lastTs = points.length ? points[points.length - 1].ts ?? 0 : 0;
    const live = state.history.points.filter((p) => !isNum(p.ts) || p.ts > lastTs);
    const note = `${plural(points.length, 'stored position')}, last ${hours} h`;
    state.history = { driver: id, points: points.concat(live), source: 'service', note };
  } catch (err) {
    if (ctrl.signal.aborted || state.history?.driver !== id) return;
    const seen = seenTrail(state.drivers.get(id));
    const note = `History unavailable (${err.message}); showing ${plural(seen.length, 'position')} seen live.`;
    state.history = { driver: id, points: seen.concat(state.history.points), source: 'local', note };
  }
  setText($('trail-note'), state.history.note);
  markOverlay();
}

function seenTrail(d) {
  const out = [];
  if (!d) return out;
  for (let i = 0; i < d.trail.length; i += 2) out.push({ mx: d.trail[i], my: d.trail[i + 1], ts: null });
  return out;
}

function appendHistory(d) {
  const pts = state.history.points;
  const last = pts[pts.length - 1];
  if (last && last.mx === d.mx && last.my === d.my) return;
  pts.push({ mx: d.mx, my: d.my, ts: d.ts });
  if (pts.length > HISTORY_MAX_POINTS) pts.splice(0, pts.length - HISTORY_MAX_POINTS);
}

/**
 * Positions from a trail response, oldest first. Tolerant: a Feature or FeatureCollection (or a
 * bare geometry) of LineString, MultiLineString, Point or MultiPoint; times as a `ts` (or
 * `times`/`timestamps`/`coordTimes`) array for lines, or `ts` per Point feature; ms or ISO strings.
 */
export function parseTrail(json) {
  const out = [];
  const toTs = (v) => (isNum(v) ? v : typeof v === 'string' ? Date.parse(v) : NaN);
  const push = (c, ts) => {
    if (Array.isArray(c) && isNum(c[0]) && isNum(c[1])) out.push({ mx: mercX(c[0]), my: mercY(c[1]), ts: toTs(ts) });
  };
  const timesOf = (props) => [props.ts, props.times, props.timestamps, props.coordTimes].find(Array.isArray);
  const visit = (geom, props) => {
    if (!geom || typeof geom !== 'object') return;
    const times = timesOf(props);
    switch (geom.type) {
      case 'Point':
        return push(geom.coordinates, Array.isArray(props.ts) ? props.ts[0] : props.ts ?? props.time);
      case 'MultiPoint':
      case 'LineString':
        return (geom.coordinates ?? []).forEach((c, i) => push(c, times?.[i]));
      case 'MultiLineString': {
        let i = 0;
        for (const line of geom.coordinates ?? []) for (const c of line) push(c, times?.[i++]);
        return;
      }
      case 'GeometryCollection':
        return (geom.geometries ?? []).forEach((g) => visit(g, props));
      default:
    }
  };
  if (json?.type === 'FeatureCollection') for (const f of json.features ?? []) visit(f?.geometry, f?.properties ?? {});
  else if (json?.type === 'Feature') visit(json.geometry, json.properties ?? {});
  else visit(json, {});
  if (out.every((p) => isNum(p.ts))) out.sort((a, b) => a.ts - b.ts);
  return out;
}

// ---------------------------------------------------------------------------------------------
// 7. Chrome: status, banners, announcements, sign-in, tabs

const CONNECTION_TEXT = {
  'signed-out': 'Signed out',
  connecting: 'Connecting…',
  live: 'Live',
  reconnecting: 'Reconnecting…',
  interrupted: 'Live feed interrupted',
  disconnected: 'Disconnected: replaced by another session',
};

function setConnection(next) {
  const changed = conn.state !== next;
  conn.state = next;
  const status = $('conn');
  status.dataset.state = next;
  $('retry-now').hidden = next !== 'reconnecting' && next !== 'disconnected';
  updateCountdown();
  if (changed && next !== 'reconnecting') announce(`Connection: ${CONNECTION_TEXT[next]}`);
  else if (changed) announce('Connection lost, reconnecting');
}

function updateCountdown() {
  let text = CONNECTION_TEXT[conn.state] ?? conn.state;
  if (conn.state === 'reconnecting') {
    const s = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
    text = s > 0 ? `Reconnecting in ${s} s` : 'Reconnecting…';
  }
  setText($('conn-text'), text);
}

function showWho() {
  const who = $('who');
  const role = { dispatcher: 'Dispatcher', client: 'Client administrator' }[session.role] ?? session.role ?? '';
  const name = session.claims?.name ?? session.claims?.sub ?? '';
  who.textContent = [name, role, session.org].filter(Boolean).join(' · ');
  who.hidden = !who.textContent;
}

function showInterrupted(reason) {
  $('interrupted-banner').hidden = reason === null;
  if (reason === null) return;
  setText($('interrupted-reason'), `Positions may be stale until it resumes${reason ? ` (${reason})` : ''}.`);
}

function showExpiryWarning(on) {
  const banner = $('expiry-warning');
  const exp = tokenExpiry();
  banner.hidden = !on || !exp;
  if (banner.hidden) return;
  const left = exp - Date.now();
  const text =
    left > 0
      ? `Your session expires at ${new Date(exp).toLocaleTimeString()}. Paste a new token to stay connected.`
      : 'Your session has expired. Paste a new token to reconnect.';
  setText($('expiry-text'), text);
  if (left > 0) announce('Your session expires in about two minutes.');
}

let errorTimer = 0;
function showError(text) {
  const banner = $('error-banner');
  banner.textContent = text;
  banner.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => (banner.hidden = true), 10000);
}

/** Screen-reader announcements: appended, not replaced, so two in quick succession are both read. */
function announce(text) {
  const region = $('announcer');
  const p = el('p', '', text);
  region.append(p);
  setTimeout(() => p.remove(), 15000);
}

const alertQueue = [];
let alertFlushTimer = 0;
// New alerts are announced in groups, so a burst is one sentence and not a flood.
function queueAlertAnnouncement(a) {
  alertQueue.push(a);
  if (!alertFlushTimer) alertFlushTimer = setTimeout(flushAlertAnnouncements, 1500);
}
function flushAlertAnnouncements() {
  alertFlushTimer = 0;
  const items = alertQueue.splice(0);
  if (items.length > 3) return announce(`${items.length} new alerts.`);
  for (const a of items) {
    const about = a.driver != null ? `, ${displayName(String(a.driver))}` : a.package != null ? `, ${a.package}` : '';
    announce(`New alert: ${humanise(a.kind ?? 'alert')}${about}${a.message ? `. ${a.message}` : ''}`);
  }
}

function showSignIn(message) {
  $('app').hidden = true;
  $('signin').hidden = false;
  $('sign-out').hidden = true;
  $('who').hidden = true;
  const err = $('signin-error');
  err.hidden = !message;
  err.textContent = message ?? '';
  setConnection('signed-out');
  $('token-input').focus();
}

function startSession() {
  $('signin').hidden = true;
  $('app').hidden = false;
  $('sign-out').hidden = false;
  showWho();
  resizeCanvases();
  scheduleExpiry();
  loadConfig();
  connectNow();
}

function signOut(message) {
  stopConnection();
  forgetToken();
  clearState();
  showInterrupted(null);
  showExpiryWarning(false);
  showSignIn(message);
}

function clearState() {
  state.drivers.clear();
  state.packages.clear();
  state.heldBy.clear();
  state.alerts.clear();
  state.selected = null;
  state.history = null;
  state.pendingSnapshot = null;
  state.interrupted = false;
  conn.directoryLoaded = false;
  $('driver-detail').hidden = true;
  markData({ packages: true, alerts: true });
}

function onSignInSubmit(e) {
  e.preventDefault();
  const input = $('token-input');
  const token = input.value.trim().replace(/^Bearer\s+/i, '');
  const problem = tokenProblem(token);
  if (problem) return showSignIn(problem);
  input.value = '';
  storeToken(token, null);
  startSession();
}

function onRenewSubmit(e) {
  e.preventDefault();
  const input = $('renew-token');
  const token = input.value.trim().replace(/^Bearer\s+/i, '');
  const problem = tokenProblem(token);
  if (problem) return showError(problem);
  input.value = '';
  adoptToken(token);
}

/** GET /v1/config: an online tile layer only when the service names one; no answer means none. */
async function loadConfig() {
  try {
    const res = await fetch('/v1/config', { headers: authHeaders(), cache: 'no-store' });
    const body = res.ok ? await res.json() : null;
    const url = typeof body?.tile_url === 'string' && /^(https?:)?\/\//.test(body.tile_url) ? body.tile_url : null;
    tiles.url = url;
    tiles.cache.clear();
    const host = url ? new URL(url.replace(/[{}]/g, ''), location.href).host : '';
    const credit = url && typeof body.tile_attribution === 'string' ? body.tile_attribution : host;
    setText($('tile-attribution'), credit ? ` · Tiles: ${credit}` : '');
    markBase();
  } catch {
    tiles.url = null;
  }
}

const TABS = ['drivers', 'packages', 'alerts'];
const activeTab = () => TABS.find((t) => $(`tab-${t}`).getAttribute('aria-selected') === 'true');

function selectTab(name, focus = false) {
  for (const t of TABS) {
    const on = t === name;
    const tab = $(`tab-${t}`);
    tab.setAttribute('aria-selected', String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  dirty.drivers = dirty.packages = dirty.alerts = true;
  refreshPanels();
}

function setupChrome() {
  $('signin-form').addEventListener('submit', onSignInSubmit);
  $('renew-form').addEventListener('submit', onRenewSubmit);
  $('sign-out').addEventListener('click', () => {
    signOut(null);
    announce('Signed out');
  });
  $('retry-now').addEventListener('click', () => {
    conn.wanted = true;
    connectNow();
  });
  $('detail-close').addEventListener('click', () => selectDriver(null));
  $('trail-hours').addEventListener('change', () => state.selected && loadHistory(state.selected));
  for (const t of TABS) {
    const tab = $(`tab-${t}`);
    tab.addEventListener('click', () => selectTab(t));
    tab.addEventListener('keydown', (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) selectTab(TABS[(TABS.indexOf(t) + step + TABS.length) % TABS.length], true);
    });
  }
  const refreshDrivers = () => {
    dirty.drivers = true;
    refreshPanels();
  };
  $('driver-filter').addEventListener('input', refreshDrivers);
  $('driver-sort').addEventListener('change', refreshDrivers);
  $('package-filter').addEventListener('input', () => {
    dirty.packages = true;
    refreshPanels();
  });
  $('alerts-open-only').addEventListener('change', () => {
    dirty.alerts = true;
    refreshPanels();
  });
  // A #token=... link opened in a tab that already shows the page: use the new token.
  window.addEventListener('hashchange', () => {
    if (!new URLSearchParams(location.hash.slice(1)).has('token')) return;
    const old = session.token;
    takeTokenFromUrl();
    if (session.token === old) return;
    const problem = tokenProblem(session.token);
    if (problem) return signOut(problem);
    stopConnection();
    clearState();
    startSession();
  });
  // Back online: do not sit out the rest of a long backoff.
  window.addEventListener('online', () => conn.state === 'reconnecting' && connectNow());
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && state.selected && !e.defaultPrevented) selectDriver(null);
  });
}

function setupLists() {
  lists.drivers = new VirtualList($('driver-list'), {
    rowHeight: 52,
    createRow: createDriverRow,
    updateRow: updateDriverRow,
    keyOf: (d) => d.id,
    onActivate: (d) => selectDriver(d.id),
  });
  lists.packages = new VirtualList($('package-list'), {
    rowHeight: 52,
    createRow: createPackageRow,
    updateRow: updatePackageRow,
    keyOf: (p) => p.package,
    onActivate: (p) => {
      const who = p.holder ?? p.driver;
      if (who != null) selectDriver(String(who));
    },
  });
}

// ---------------------------------------------------------------------------------------------
// 8. Test hook and boot

function debugState() {
  const W = worldPx();
  const markers = [];
  for (const d of state.drivers.values()) {
    if (!(d.mx === d.mx)) continue;
    const x = toScreenX(d.mx, W);
    const y = toScreenY(d.my, W);
    markers.push({
      driver: d.id,
      name: d.name,
      lat: d.lat,
      lon: d.lon,
      online: d.online,
      packages: heldCount(d.id),
      x,
      y,
      visible: x >= 0 && y >= 0 && x <= view.width && y <= view.height,
    });
  }
  const packages = [...state.packages.values()].filter((p) => !p.stub).map((p) => ({ ...p }));
  return {
    connection: conn.state,
    role: session.role,
    org: session.org,
    drivers: state.drivers.size,
    markers,
    packages,
    alerts: [...state.alerts.values()].map((a) => ({ ...a })),
    selected: state.selected,
    history: state.history && {
      driver: state.history.driver,
      points: state.history.points.length,
      source: state.history.source,
    },
    interrupted: state.interrupted,
    subscribedBbox: conn.subscribedBbox,
    view: {
      lon: lonOf(view.x),
      lat: latOf(view.y),
      zoom: view.zoom,
      width: view.width,
      height: view.height,
      bbox: viewBbox(),
      scale: view.scale ?? null, // { metres, px, label } of the scale bar
    },
    lastFrameTs: render.lastFrameTs,
    lastMessageTs: state.lastMessageTs,
    frames: state.frames,
  };
}

function installDebugHook() {
  window.trackerDebug = {
    state: debugState,
    feed: handleFrame,
    handleFrame,
    parseTrail,
    project,
    setView: (lon, lat, zoom) => setCenter(lon, lat, zoom),
    select: (id) => selectDriver(id == null ? null : String(id)),
    sent: () => conn.sent.map((f) => ({ ...f })),
    // Draw now instead of at the next animation frame (headless tests, hidden tabs).
    render: () => {
      render.base = render.overlay = true;
      drawFrame();
      refreshPanels();
      return render.lastFrameTs;
    },
    perf: () => {
      const per = (ms) => (render.count ? ms / render.count : 0);
      return {
        renders: render.count,
        avgRenderMs: per(render.totalMs),
        maxRenderMs: render.maxMs,
        avgTrailsMs: per(render.parts.trails),
        avgMarkersMs: per(render.parts.markers),
        avgBucketMs: per(render.parts.bucket),
        avgPutImageDataMs: per(render.parts.put),
        frames: state.frames,
      };
    },
    resetPerf: () => {
      Object.assign(render, { count: 0, totalMs: 0, maxMs: 0 });
      render.parts = { trails: 0, markers: 0, bucket: 0, put: 0 };
    },
  };
}

/**
 * Start the page. Options: `{ connect: false }` shows the dashboard without signing in or
 * connecting (a local visual harness feeds frames through window.trackerDebug.feed).
 */
export function boot({ connect = true } = {}) {
  canvases.base = $('map-base');
  canvases.trails = $('map-trails');
  canvases.overlay = $('map-overlay');
  canvases.baseCtx = canvases.base.getContext('2d');
  canvases.trailsCtx = canvases.trails.getContext('2d');
  canvases.ctx = canvases.overlay.getContext('2d');
  installDebugHook();
  setupChrome();
  setupLists();
  setupMapInput();
  new ResizeObserver(resizeCanvases).observe($('map'));
  setInterval(refreshPanels, LIST_REFRESH_MS);
  loadBasemap();
  const refused = takeTokenFromUrl();
  if (!connect) {
    $('signin').hidden = true;
    $('app').hidden = false;
    resizeCanvases();
    setConnection('connecting');
    return;
  }
  const problem = loadStoredToken() ? tokenProblem(session.token) : 'none';
  if (problem === null) {
    startSession();
    if (refused) showError(refused);
  } else {
    if (problem !== 'none') forgetToken();
    showSignIn(refused ?? (problem === 'none' ? null : problem));
  }
}

// A harness sets window.trackerNoAutoBoot before importing this module and calls boot() itself.
if (!window.trackerNoAutoBoot) boot();
