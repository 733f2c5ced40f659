// The base layers under the overlay, both Leaflet layers: street tiles when the service names a
// tile URL template (GET /v1/config, TRACKER_MAP_TILES: another server's, or /tiles/... when tracker
// serves a PMTiles archive itself), otherwise the bundled offline basemap
// (basemap.json: African country borders from Natural Earth) on Leaflet's canvas renderer, with
// country labels drawn by overlay.js. The credits under the map are written as text.

import * as L from '../vendor/leaflet/leaflet-src.esm.js';
import { BASEMAP_URL, COLORS, MAX_ZOOM } from './constants.js';
import { $, isNum, setText } from './util.js';
import { mercX, mercY } from './geo.js';
import { authHeaders } from './session.js';
import { leaflet, markOverlay } from './map.js';

export const base = { layer: null, labels: [], tiles: null, tileUrl: null, tileOrigin: null, data: null };

/** Fetch the bundled basemap and show it, unless street tiles replaced it. */
export async function loadBasemap() {
  try {
    const res = await fetch(BASEMAP_URL);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    base.data = await res.json();
    base.labels = (base.data.features ?? []).map(labelOf).filter(Boolean);
    if (!base.tiles) showBasemap();
  } catch (err) {
    console.warn('tracker: basemap unavailable', err);
  }
}

function labelOf(f) {
  const p = f?.properties ?? {};
  if (!Array.isArray(p.label) || !Array.isArray(f.bbox)) return null;
  return {
    x: mercX(p.label[0]),
    y: mercY(p.label[1]),
    name: String(p.name ?? ''),
    width: mercX(f.bbox[2]) - mercX(f.bbox[0]),
  };
}

function showBasemap() {
  if (base.layer || !base.data || !leaflet.map) return;
  const map = leaflet.map;
  if (!map.getPane('basemap')) map.createPane('basemap').style.zIndex = '150'; // under the tile pane (200)
  base.layer = L.geoJSON(base.data, {
    pane: 'basemap',
    renderer: L.canvas({ pane: 'basemap', padding: 0.3 }),
    interactive: false,
    smoothFactor: 1.5,
    style: (f) => ({
      stroke: true,
      color: COLORS.border,
      weight: 1,
      fill: true,
      fillColor: f?.properties?.africa === false ? COLORS.contextLand : COLORS.land,
      fillOpacity: 1,
      fillRule: 'evenodd', // South Africa's hole is Lesotho
    }),
  }).addTo(map);
  markOverlay();
}

function hideBasemap() {
  base.layer?.remove();
  base.layer = null;
  markOverlay();
}

/** Country labels are drawn only over the bundled basemap (street tiles carry their own). */
export const basemapShown = () => base.layer !== null;

// --- Street tiles (only when GET /v1/config names a template)

/** GET /v1/config: street tiles only when the service names a template; no answer means none. */
export async function loadConfig() {
  let body = null;
  try {
    const res = await fetch('/v1/config', { headers: authHeaders(), cache: 'no-store' });
    body = res.ok ? await res.json() : null;
  } catch {
    body = null;
  }
  useTiles(body);
}

/** Show the tiles a config names (or the bundled basemap when it names none). */
export function useTiles(config) {
  // Another server's template (https://...), or tracker's own tiles from a PMTiles archive (/tiles/...).
  const raw = typeof config?.tile_url === 'string' ? config.tile_url : '';
  const url = /^https?:\/\//.test(raw) || /^\/tiles\//.test(raw) ? raw : null;
  if (url === base.tileUrl) return;
  base.tiles?.remove();
  base.tiles = null;
  base.tileUrl = url;
  base.tileOrigin = url ? new URL(url.replace(/\{s\}/g, 'a').replace(/[{}]/g, ''), location.href).origin : null;
  const credit = url && typeof config.tile_attribution === 'string' ? config.tile_attribution : '';
  if (url) {
    const maxNative = isNum(config.tile_max_zoom) ? config.tile_max_zoom : 19;
    const b = Array.isArray(config.tile_bounds) && config.tile_bounds.length === 4 ? config.tile_bounds : null;
    base.tiles = L.tileLayer(url, {
      maxZoom: MAX_ZOOM,
      maxNativeZoom: Math.min(maxNative, MAX_ZOOM), // deeper views scale the deepest tiles up
      minZoom: isNum(config.tile_min_zoom) ? config.tile_min_zoom : 0, // an archive may start deeper
      bounds: b ? L.latLngBounds([b[1], b[0]], [b[3], b[2]]) : undefined, // no requests outside an archive's area
      subdomains: 'abc',
      referrerPolicy: 'no-referrer',
      keepBuffer: 1,
      updateWhenZooming: false,
    }).addTo(leaflet.map);
    hideBasemap();
  } else {
    showBasemap();
  }
  // The tiles' own credit (their licence requires it), and what draws the map.
  $('map-credits-borders').hidden = !!url;
  setText($('tile-attribution'), url ? `Map: ${credit || new URL(base.tileOrigin).host}` : '');
}
