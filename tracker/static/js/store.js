// The page state: drivers, packages, alerts, and custody (which driver holds which package), with
// the functions that create and change records. frames.js decides when to call them. Nothing here
// draws or touches the DOM; callers mark what changed (map.js markData).

import { MAX_ALERTS, PRE_PICKUP_STATES, TERMINAL_STATES, TRAIL_POINTS } from './constants.js';
import { isNum } from './util.js';
import { mercX, mercY } from './geo.js';
import { session } from './session.js';

export const state = {
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
  // The whole fleet, not only the map view (fleet.js, from GET /v1/drivers and the live frames):
  // driver id -> { id, name, online, lat, lon, ts }.
  fleet: new Map(),
  fleetLoaded: false,
  // Consignment terms of the packages in scope (GET /v1/packages): id -> the package representation.
  packageInfo: new Map(),
  replay: { index: -1, playing: false }, // the selected driver's route replay (replay.js)
  selectedPackage: null, // the package whose details are open (package-view.js)
};

/** Bumped when a driver record is created, removed or renamed (the name order may change). */
export const roster = { version: 0 };

export function driverRecord(id) {
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
      cluster: null, // the cluster it is drawn in (overlay.js), or null
      stale: false, // its newest fix is older than STALE_AFTER_MS: drawn faded
    };
    state.drivers.set(id, d);
    roster.version += 1;
  }
  return d;
}

export function setName(d, name) {
  if (typeof name !== 'string' || !name || name === d.name) return;
  d.name = name;
  d.search = `${name} ${d.id}`.toLowerCase();
  state.names.set(d.id, name);
  roster.version += 1;
}

export const displayName = (id) => state.drivers.get(id)?.name || state.names.get(id) || id;

export function applyOptional(d, f) {
  if (isNum(f.spd) || f.spd === null) d.spd = f.spd;
  if (isNum(f.bat) || f.bat === null) d.bat = f.bat;
  if (isNum(f.hdg) || f.hdg === null) d.hdg = f.hdg;
  if (isNum(f.seq)) d.seq = f.seq;
  if (typeof f.online === 'boolean') d.online = f.online;
}

export function setPosition(d, lat, lon, ts) {
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
export function removeDriver(id) {
  if (state.drivers.delete(id)) roster.version += 1;
}

export function packageRecord(id) {
  let p = state.packages.get(id);
  if (!p) {
    p = { package: id, state: undefined, driver: undefined, holder: null, stub: true };
    state.packages.set(id, p);
  }
  return p;
}

/** A package's consignment terms (destination, window, cold chain) merged under its live state. */
export function packageFacts(id) {
  const info = state.packageInfo.get(id);
  const live = state.packages.get(id);
  if (!info) return live ?? {};
  if (!live) return info;
  const out = { ...info };
  for (const [k, v] of Object.entries(live)) if (v !== undefined && v !== null) out[k] = v;
  return out;
}

/** Drivers named by an open alert. */
export function openAlertDrivers() {
  const out = new Set();
  for (const a of state.alerts.values()) if (a.state !== 'resolved' && a.driver != null) out.add(String(a.driver));
  return out;
}

/** Packages named by an open alert. */
export function openAlertPackages() {
  const out = new Set();
  for (const a of state.alerts.values()) if (a.state !== 'resolved' && a.package != null) out.add(String(a.package));
  return out;
}

export const heldState = (p) => !p.state || (!TERMINAL_STATES.has(p.state) && !PRE_PICKUP_STATES.has(p.state));
export const heldCount = (id) => state.heldBy.get(id)?.size ?? 0;

/**
 * Move custody of a package. The only writer of heldBy, so the counts on markers, rows and
 * details always agree. `fromEvent`: a live event (not a snapshot) changed custody; for a client
 * admin that closes the window in which it may see the previous holder, so that marker goes.
 */
export function setHolder(p, driverId, fromEvent = false) {
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

export function mergePackage(raw) {
  const p = packageRecord(String(raw.package));
  for (const [k, v] of Object.entries(raw)) if (k !== 'type' && k !== 'holder') p[k] = v;
  p.package = String(raw.package);
  p.stub = false;
  return p;
}

export function normaliseAlert(raw) {
  const a = { ...raw, id: String(raw.id) };
  delete a.type;
  return a;
}

export function trimAlerts() {
  if (state.alerts.size <= MAX_ALERTS) return;
  const byAge = [...state.alerts.values()].sort((a, b) => (a.ts ?? 0) - (b.ts ?? 0));
  for (const a of byAge) {
    if (state.alerts.size <= MAX_ALERTS) break;
    if (a.state === 'resolved') state.alerts.delete(a.id);
  }
}
