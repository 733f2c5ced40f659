// The base layer: the offline basemap (basemap.json, African country borders) as one cached
// Path2D per integer zoom level, country labels, and optional online tiles when GET /v1/config
// names a tile URL. Drawn by drawBase on the bottom canvas, only when map.js marks it dirty.

import { BASEMAP_MAX_LEVEL, BASEMAP_URL, COLORS } from './constants.js';
import { $, clamp, setText } from './util.js';
import { mercX, mercY } from './geo.js';
import { authHeaders } from './session.js';
import { canvases, markBase, toScreenX, toScreenY, view, worldPx } from './map.js';

const basemap = { features: null, levels: new Map(), labels: [] };

// --- Basemap: features in Mercator once, then one Path2D per integer zoom level, in that level's
// pixel space with points closer than a pixel dropped. Drawing a level is a transform + fill.

export async function loadBasemap() {
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

export function drawBase() {
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

const tiles = { url: null, cache: new Map() };

/** GET /v1/config: an online tile layer only when the service names one; no answer means none. */
export async function loadConfig() {
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
