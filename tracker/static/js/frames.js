// Server frames: handleFrame(frame) is the one entry point, from the socket (live.js) and from
// the test hook (trackerDebug.feed). Handlers change the state (store.js) and set dirty flags; they
// never draw. Frame types and fields are in PROTOCOL.md.

import { isNum } from './util.js';
import {
  applyOptional,
  driverRecord,
  heldState,
  mergePackage,
  normaliseAlert,
  packageRecord,
  removeDriver,
  setHolder,
  setName,
  setPosition,
  state,
  trimAlerts,
} from './store.js';
import { conn, onSnapshotApplied, onWelcome, outsideSubscription } from './live.js';
import { markData } from './map.js';
import { appendHistory } from './detail.js';
import { fleetPresence, fleetSaw } from './fleet.js';
import { queueAlertAnnouncement, setConnection, showError, showInterrupted } from './chrome.js';

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
  fleetSaw(d);
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
  fleetSaw(d);
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
  fleetPresence(id, f.online === true, f.name);
  // The box narrows positions only, so presence comes for drivers outside it too: those are
  // not on this map. Without a box (everything in scope), a driver may be listed before its
  // first position.
  if (!state.drivers.has(id) && conn.subscribedBbox) return;
  const d = driverRecord(id);
  d.online = f.online === true;
  setName(d, f.name);
  markData();
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
