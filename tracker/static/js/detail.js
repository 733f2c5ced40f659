// The selected driver: selection, the details panel, and its trail history from
// GET /v1/drivers/{id}/trail (falling back to the positions seen live when that fails). The map
// draws the history (overlay.js); parseTrail reads the tolerated response shapes.

import { HISTORY_MAX_POINTS } from './constants.js';
import { $, el, formatBattery, formatSpeed, formatTime, isNum, plural, relativeTime, setText } from './util.js';
import { mercX, mercY } from './geo.js';
import { authHeaders } from './session.js';
import { displayName, state } from './store.js';
import { centreOn, dirty, markOverlay, setCenter, view } from './map.js';
import { driverView } from './fleet.js';
import { resetReplay, syncReplay } from './replay.js';

/** Select a driver: highlight it, centre the map on it, load its recent trail from the service. */
export function selectDriver(id, { centre = true } = {}) {
  state.selected = id;
  state.history = null;
  resetReplay();
  const panel = $('driver-detail');
  panel.hidden = !id;
  if (!id) {
    historyAbort?.abort();
    markOverlay();
    dirty.drivers = true;
    return;
  }
  const d = state.drivers.get(id);
  const far = driverView(id);
  if (centre && d && d.mx === d.mx) {
    centreOn(d.mx, d.my);
  } else if (centre && far && isNum(far.lat) && isNum(far.lon)) {
    // Found by the fleet-wide search, outside the map view: go there, close enough to see the street.
    setCenter(far.lon, far.lat, Math.max(view.zoom, 14));
  }
  updateDetails();
  loadHistory(id);
  dirty.drivers = true;
  markOverlay();
}


function describeHeld(held) {
  if (!held.length) return 'none';
  return held.slice(0, 12).join(', ') + (held.length > 12 ? ` +${held.length - 12} more` : '');
}

export function updateDetails() {
  const id = state.selected;
  const d = driverView(id);
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

export async function loadHistory(id) {
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
  syncReplay();
  markOverlay();
}

function seenTrail(d) {
  const out = [];
  if (!d) return out;
  for (let i = 0; i < d.trail.length; i += 2) out.push({ mx: d.trail[i], my: d.trail[i + 1], ts: null });
  return out;
}

export function appendHistory(d) {
  const pts = state.history.points;
  const last = pts[pts.length - 1];
  if (last && last.mx === d.mx && last.my === d.my) return;
  pts.push({ mx: d.mx, my: d.my, ts: d.ts });
  if (pts.length > HISTORY_MAX_POINTS) pts.splice(0, pts.length - HISTORY_MAX_POINTS);
  if (state.history.source !== 'loading') syncReplay();
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
