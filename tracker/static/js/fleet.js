// The whole fleet, not only the map view: every driver in scope (GET /v1/drivers, kept current by
// the live frames) and the consignment terms of the packages on their way (GET /v1/packages),
// refreshed every FLEET_REFRESH_MS. The fleet summary, the fleet-wide driver search, the
// destination pins and a client administrator's first view come from here.

import { FLEET_REFRESH_MS, TERMINAL_STATES } from './constants.js';
import { isNum } from './util.js';
import { authHeaders, session } from './session.js';
import { roster, setName, state } from './store.js';
import { fitBounds, markData, restored, view } from './map.js';

const timers = { fleet: 0, generation: 0 }; // a refresh in flight when the fleet stops must not restart it
const UNFINISHED = ['created', 'picked_up', 'failed'];

/** A fleet entry shaped like a driver record (store.js), so the lists can show either. */
function fleetEntry(id) {
  let f = state.fleet.get(id);
  if (!f) {
    const name = state.names.get(id) ?? '';
    f = { id, name, search: `${name} ${id}`.toLowerCase(), online: false, ts: 0, lat: null, lon: null };
    f.spd = f.bat = null;
    state.fleet.set(id, f);
    roster.version += 1;
  }
  return f;
}

/** Start (or restart, after a reconnect) the periodic fleet refresh. */
export function startFleet() {
  clearTimeout(timers.fleet);
  const generation = ++timers.generation;
  const tick = async () => {
    await Promise.all([loadDrivers(), loadPackageInfo()]);
    if (generation === timers.generation) timers.fleet = setTimeout(tick, FLEET_REFRESH_MS);
  };
  tick();
}

export function stopFleet() {
  timers.generation += 1;
  clearTimeout(timers.fleet);
  state.fleet.clear();
  state.packageInfo.clear();
  state.fleetLoaded = false;
}

async function getJson(url) {
  const res = await fetch(url, { headers: authHeaders(), cache: 'no-store' });
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  return res.json();
}

/** GET /v1/drivers: every driver in scope with presence and newest position, and names. */
async function loadDrivers() {
  try {
    const body = await getJson('/v1/drivers');
    const list = Array.isArray(body?.drivers) ? body.drivers : [];
    const seen = new Set();
    for (const item of list) {
      const id = item?.driver ?? item?.id;
      if (id == null) continue;
      const key = String(id);
      seen.add(key);
      const f = fleetEntry(key);
      if (typeof item.name === 'string' && item.name) {
        state.names.set(key, item.name);
        if (f.name !== item.name) roster.version += 1;
        f.name = item.name;
        f.search = `${item.name} ${key}`.toLowerCase();
        const d = state.drivers.get(key);
        if (d) setName(d, item.name);
      }
      if (typeof item.online === 'boolean') f.online = item.online;
      const last = item.last;
      if (last && isNum(last.lat) && isNum(last.lon) && (!isNum(f.ts) || !(f.ts > (last.ts ?? 0)))) {
        Object.assign(f, { lat: last.lat, lon: last.lon, ts: isNum(last.ts) ? last.ts : f.ts });
        if (isNum(last.spd)) f.spd = last.spd;
        if (isNum(last.bat)) f.bat = last.bat;
      }
    }
    // A client's scope shrinks when a delivery closes its window on a driver: forget those.
    for (const key of [...state.fleet.keys()]) {
      if (!seen.has(key) && !state.drivers.has(key) && state.fleet.delete(key)) roster.version += 1;
    }
    state.fleetLoaded = true;
    markData();
  } catch {
    // optional: the list then covers the drivers the live feed has shown
  }
}

/** GET /v1/packages for the packages on their way: destinations, delivery windows, cold chain. */
async function loadPackageInfo() {
  const next = new Map();
  try {
    for (const st of UNFINISHED) {
      let after = '';
      for (let page = 0; page < 10; page++) {
        const q = `state=${st}&limit=1000${after ? `&after=${encodeURIComponent(after)}` : ''}`;
        const body = await getJson(`/v1/packages?${q}`);
        for (const p of body?.packages ?? []) if (p?.package != null) next.set(String(p.package), p);
        if (!body?.next) break;
        after = body.next;
      }
    }
  } catch {
    return; // keep what we had
  }
  const first = state.packageInfo.size === 0;
  state.packageInfo = next;
  markData({ packages: true });
  if (first) openOnDeliveries();
}

/**
 * A client administrator opens on its own deliveries (their destinations and the drivers carrying
 * them), not on a continent. Only once, and never over a view restored from this tab's last visit.
 */
let opened = false;
function openOnDeliveries() {
  if (opened || session.role !== 'client' || restored.view || !view.ready) return;
  const pts = [];
  for (const p of state.packageInfo.values()) {
    const dest = p.destination;
    if (dest && isNum(dest.lat) && isNum(dest.lon)) pts.push([dest.lon, dest.lat]);
  }
  for (const d of state.drivers.values()) if (isNum(d.lat)) pts.push([d.lon, d.lat]);
  if (!pts.length) return;
  opened = true;
  const lons = pts.map((p) => p[0]);
  const lats = pts.map((p) => p[1]);
  const pad = 0.01;
  fitBounds(
    [Math.min(...lons) - pad, Math.min(...lats) - pad, Math.max(...lons) + pad, Math.max(...lats) + pad],
    14,
  );
}

/** Keep the fleet current from the live frames between two refreshes. */
export function fleetSaw(d) {
  const f = fleetEntry(d.id);
  f.online = d.online;
  if (d.name && d.name !== f.name) {
    f.name = d.name;
    f.search = d.search;
    roster.version += 1;
  }
  if (isNum(d.lat) && isNum(d.ts) && d.ts >= (f.ts ?? 0)) {
    f.lat = d.lat;
    f.lon = d.lon;
    f.ts = d.ts;
    f.spd = d.spd;
    f.bat = d.bat;
  }
}

export function fleetPresence(id, online, name) {
  const f = fleetEntry(id);
  f.online = online;
  if (typeof name === 'string' && name && name !== f.name) {
    roster.version += 1;
    f.name = name;
    f.search = `${name} ${id}`.toLowerCase();
  }
}

/** The record to show for a driver: the live one when the map has it, else the fleet entry. */
export const driverView = (id) => state.drivers.get(id) ?? state.fleet.get(id) ?? null;

/** Every driver in scope: the fleet, plus any the live feed showed before the fleet was loaded. */
export function allDrivers() {
  const out = [];
  for (const d of state.drivers.values()) out.push(d);
  for (const f of state.fleet.values()) if (!state.drivers.has(f.id)) out.push(f);
  return out;
}

/** Counts for the whole org (or the client's scope), whatever the map shows. */
export function fleetSummary(now = Date.now()) {
  let count = 0;
  let online = 0;
  for (const d of state.drivers.values()) {
    count += 1;
    if (d.online) online += 1;
  }
  for (const f of state.fleet.values()) {
    if (state.drivers.has(f.id)) continue;
    count += 1;
    if (f.online) online += 1;
  }
  const carriers = new Set();
  for (const id of state.heldBy.keys()) carriers.add(id);
  for (const p of state.packageInfo.values()) if (p.state === 'picked_up' && p.driver != null) carriers.add(String(p.driver));
  let late = 0;
  const ids = new Set([...state.packageInfo.keys(), ...state.packages.keys()]);
  for (const id of ids) {
    const live = state.packages.get(id);
    const info = state.packageInfo.get(id);
    const st = live?.state ?? info?.state;
    const to = info?.window?.to;
    if (isNum(to) && to < now && !TERMINAL_STATES.has(st)) late += 1;
  }
  let alerts = 0;
  for (const a of state.alerts.values()) if (a.state !== 'resolved') alerts += 1;
  return { drivers: count, online, offline: count - online, carrying: carriers.size, late, alerts };
}
