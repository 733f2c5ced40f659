// The overlay, two canvases over the Leaflet map (map.js). Trails canvas: country labels (over
// the bundled basemap only), destination pins, the drivers' short trails, the selected driver's
// route and its replay. Markers canvas: driver sprites blitted into an ImageData (sprites.js),
// then cluster badges, alert rings, the selection ring, names, the replay position and the
// scale bar as vectors on top.
//
// Clusters: below CLUSTER_BELOW_ZOOM, visible drivers fall into a grid of CLUSTER_CELL_PX cells
// fixed to the world (a pan does not reshuffle them); a cell with two or more becomes one badge
// with the count. The selected driver and drivers with an open alert are never hidden in one.

import {
  CLUSTER_BELOW_ZOOM,
  CLUSTER_CELL_PX,
  COLORS,
  EARTH_CIRCUMFERENCE_M,
  MAX_DESTINATION_PINS,
  MAX_TRAIL_VERTICES,
  STALE_AFTER_MS,
} from './constants.js';
import { $ } from './util.js';
import { latOf, mercX, mercY } from './geo.js';
import { heldCount, openAlertDrivers, openAlertPackages, packageFacts, state } from './store.js';
import { canvases, render, toScreenX, toScreenY, view, worldPx } from './map.js';
import { basemapShown, base } from './basemap.js';
import { MARKER_KINDS, MARKER_R, badgeFor, blit, spritesFor } from './sprites.js';

// One array of screen positions per kind, in MARKER_KINDS order: index = fresh * 4 + online * 2 + !pkg.
const markerBuckets = MARKER_KINDS.map(() => []);
const TRAIL_CHUNK = 50;
const markerLayer = { image: null, pixels: null };
/** What the last frame drew, for picking (map-input.js) and the test hook. */
export const drawn = { clusters: [], pins: [], alerted: new Set(), alertedPackages: new Set() };

export function drawOverlay() {
  const W = worldPx();
  const t0 = performance.now();
  const trails = canvases.trailsCtx;
  trails.setTransform(view.dpr, 0, 0, view.dpr, 0, 0);
  trails.clearRect(0, 0, view.width, view.height);
  drawn.alerted = openAlertDrivers();
  drawn.alertedPackages = openAlertPackages();
  if (basemapShown()) drawLabels(trails, W);
  drawPins(trails, W);
  if ($('show-trails').checked) drawTrails(trails, W);
  drawHistory(trails, W);
  const t1 = performance.now();
  const ctx = canvases.ctx;
  bucketMarkers(W);
  render.parts.bucket += performance.now() - t1;
  blitMarkers(ctx);
  render.parts.trails += t1 - t0;
  ctx.setTransform(view.dpr, 0, 0, view.dpr, 0, 0);
  drawClusters(ctx);
  render.parts.markers += performance.now() - t1;
  drawAlertRings(ctx, W);
  drawNames(ctx, W);
  drawSelection(ctx, W);
  drawReplayPosition(ctx, W);
  drawScaleBar(ctx);
}

function drawLabels(ctx, W) {
  if (view.zoom < 3 || view.zoom > 7.5) return;
  ctx.font = '600 11px system-ui, sans-serif';
  ctx.textAlign = 'center';
  ctx.textBaseline = 'middle';
  ctx.fillStyle = COLORS.label;
  for (const f of base.labels) {
    const x = toScreenX(f.x, W);
    const y = toScreenY(f.y, W);
    if (x < -50 || y < -20 || x > view.width + 50 || y > view.height + 20) continue;
    // Only where the country is wide enough on screen for its name.
    if (f.width * W < ctx.measureText(f.name).width * 1.1) continue;
    ctx.fillText(f.name, x, y);
  }
}

/** Destinations of the packages on their way (not delivered yet) that fall in the view. */
function drawPins(ctx, W) {
  drawn.pins = [];
  if (view.zoom < 5) return; // a continent of pins says nothing
  for (const p of state.packages.values()) {
    if (p.stub || ['delivered', 'returned', 'cancelled'].includes(p.state)) continue;
    const dest = packageFacts(p.package).destination;
    if (!dest || typeof dest.lat !== 'number' || typeof dest.lon !== 'number') continue;
    const x = toScreenX(mercX(dest.lon), W);
    const y = toScreenY(mercY(dest.lat), W);
    if (x < -10 || y < -20 || x > view.width + 10 || y > view.height + 10) continue;
    drawn.pins.push({ package: p.package, x, y, name: dest.name ?? '' });
    if (drawn.pins.length >= MAX_DESTINATION_PINS) break;
  }
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = '#ffffff';
  for (const pin of drawn.pins) {
    const alert = drawn.alertedPackages.has(pin.package);
    ctx.beginPath(); // a pin: a square flag on a short pole, its foot on the destination
    ctx.moveTo(pin.x, pin.y);
    ctx.lineTo(pin.x, pin.y - 14);
    ctx.lineTo(pin.x + 9, pin.y - 14);
    ctx.lineTo(pin.x + 9, pin.y - 6);
    ctx.lineTo(pin.x + 1.5, pin.y - 6);
    ctx.lineTo(pin.x + 1.5, pin.y);
    ctx.closePath();
    ctx.fillStyle = alert ? COLORS.alert : COLORS.destination;
    ctx.fill();
    ctx.stroke();
  }
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
    vertices += addPolyline(ctx, d.trail, W, d.trail.length / 2);
    if (++inPath === TRAIL_CHUNK) {
      ctx.stroke();
      ctx.beginPath();
      inPath = 0;
    }
    if (vertices > MAX_TRAIL_VERTICES) break; // a budget, so a dense view cannot stall the frame
  }
  ctx.stroke();
}

/** Add the first `count` points of a flat [mx, my, ...] polyline to the path, skipping sub-pixel steps. */
function addPolyline(ctx, flat, W, count) {
  let lx = toScreenX(flat[0], W);
  let ly = toScreenY(flat[1], W);
  let added = 0;
  for (let i = 2; i < count * 2; i += 2) {
    const x = toScreenX(flat[i], W);
    const y = toScreenY(flat[i + 1], W);
    if (Math.abs(x - lx) + Math.abs(y - ly) < 1.5 && i < count * 2 - 2) continue;
    if (added === 0) ctx.moveTo(lx, ly);
    ctx.lineTo(x, y);
    lx = x;
    ly = y;
    added += 1;
  }
  return added;
}

/** The selected driver's route: all of it faint, and up to the replay position strong. */
function drawHistory(ctx, W) {
  const h = state.history;
  if (!h || h.points.length < 2) return;
  if (!h.flat || h.flat.length !== h.points.length * 2) {
    h.flat = new Float64Array(h.points.length * 2);
    h.points.forEach((p, i) => {
      h.flat[2 * i] = p.mx;
      h.flat[2 * i + 1] = p.my;
    });
  }
  const n = h.points.length;
  const upTo = state.replay.index >= 0 ? Math.min(state.replay.index + 1, n) : n;
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  if (upTo < n) {
    ctx.beginPath();
    addPolyline(ctx, h.flat, W, n);
    ctx.strokeStyle = 'rgba(123, 31, 162, 0.35)';
    ctx.lineWidth = 3;
    ctx.stroke();
  }
  if (upTo < 2) return;
  ctx.beginPath();
  addPolyline(ctx, h.flat, W, upTo);
  ctx.strokeStyle = 'rgba(255, 255, 255, 0.9)';
  ctx.lineWidth = 5;
  ctx.stroke();
  ctx.strokeStyle = COLORS.history;
  ctx.lineWidth = 3;
  ctx.stroke();
}

/** Screen positions of the visible markers by kind, and the clusters of the ones close together. */
function bucketMarkers(W) {
  for (const b of markerBuckets) b.length = 0;
  const m = MARKER_R + 2;
  const now = Date.now();
  const alerted = drawn.alerted;
  const clustering = view.zoom < CLUSTER_BELOW_ZOOM;
  const cells = clustering ? new Map() : null;
  const cell = CLUSTER_CELL_PX;
  for (const d of state.drivers.values()) {
    if (d.cluster !== null) d.cluster = null;
    if (!(d.mx === d.mx)) continue; // NaN: no position yet
    const x = toScreenX(d.mx, W);
    const y = toScreenY(d.my, W);
    if (x < -m || y < -m || x > view.width + m || y > view.height + m) continue;
    if (clustering && d.id !== state.selected && !alerted.has(d.id)) {
      const key = Math.floor((x + view.ox) / cell) * 65536 + Math.floor((y + view.oy) / cell);
      const c = cells.get(key);
      if (c) {
        c.members.push(d);
        c.sx += x;
        c.sy += y;
      } else {
        cells.set(key, { key, members: [d], sx: x, sy: y });
      }
      continue;
    }
    bucket(d, x, y, now);
  }
  drawn.clusters = [];
  if (!clustering) return;
  for (const c of cells.values()) {
    if (c.members.length === 1) {
      bucket(c.members[0], c.sx, c.sy, now);
      continue;
    }
    const n = c.members.length;
    for (const d of c.members) d.cluster = c.key;
    drawn.clusters.push({ key: c.key, x: c.sx / n, y: c.sy / n, count: n, members: c.members });
  }
}

function bucket(d, x, y, now) {
  const stale = now - d.ts > STALE_AFTER_MS;
  if (d.stale !== stale) d.stale = stale;
  // Numbers, not kind names: a string built per driver per frame cost 3-4 ms at 5,000 drivers.
  markerBuckets[(stale ? 0 : 4) + (d.online ? 2 : 0) + (heldCount(d.id) > 0 ? 0 : 1)].push(x, y);
}

function blitMarkers(ctx) {
  const w = ctx.canvas.width;
  const h = ctx.canvas.height;
  if (!markerLayer.image || markerLayer.image.width !== w || markerLayer.image.height !== h) {
    markerLayer.image = ctx.createImageData(w, h);
    markerLayer.pixels = new Int32Array(markerLayer.image.data.buffer);
  }
  const sprites = spritesFor(view.dpr);
  const buf = markerLayer.pixels;
  buf.fill(0);
  for (let k = 0; k < MARKER_KINDS.length; k++) {
    const pts = markerBuckets[k];
    const sprite = sprites[MARKER_KINDS[k]];
    for (let i = 0; i < pts.length; i += 2) blit(buf, w, h, sprite, pts[i] * view.dpr, pts[i + 1] * view.dpr);
  }
  const t = performance.now();
  ctx.putImageData(markerLayer.image, 0, 0); // replaces the whole layer: no clearRect needed
  render.parts.put += performance.now() - t;
}

function drawClusters(ctx) {
  for (const c of drawn.clusters) {
    const badge = badgeFor(c.count, view.dpr, false);
    ctx.drawImage(badge.canvas, c.x - badge.size / 2, c.y - badge.size / 2, badge.size, badge.size);
  }
}

/** A red ring around every driver named by an open alert: the first thing a dispatcher looks for. */
function drawAlertRings(ctx, W) {
  if (!drawn.alerted.size) return;
  ctx.beginPath();
  for (const id of drawn.alerted) {
    const d = state.drivers.get(id);
    if (!d || !(d.mx === d.mx)) continue;
    const x = toScreenX(d.mx, W);
    const y = toScreenY(d.my, W);
    if (x < -20 || y < -20 || x > view.width + 20 || y > view.height + 20) continue;
    ctx.moveTo(x + MARKER_R + 3.5, y);
    ctx.arc(x, y, MARKER_R + 3.5, 0, 2 * Math.PI); // inside the selection ring, which is drawn after it
  }
  ctx.lineWidth = 2.5;
  ctx.strokeStyle = COLORS.alert;
  ctx.stroke();
}

/** Names next to markers once few enough are on screen for them to be readable. */
function drawNames(ctx, W) {
  const count = markerBuckets.reduce((n, b) => n + b.length / 2, 0);
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
    if (!(d.mx === d.mx) || d.cluster !== null || (d !== selected && d.id === state.selected)) continue;
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

function ring(ctx, x, y) {
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

function drawSelection(ctx, W) {
  const d = state.selected ? state.drivers.get(state.selected) : null;
  if (!d || !(d.mx === d.mx)) return;
  ring(ctx, toScreenX(d.mx, W), toScreenY(d.my, W));
}

/** Where the replayed driver was at the slider's time: a yellow disc with a dark edge. */
function drawReplayPosition(ctx, W) {
  const h = state.history;
  const i = state.replay.index;
  if (!h || i < 0 || i >= h.points.length - 1) return; // at the end it is where the marker is
  const p = h.points[i];
  const x = toScreenX(p.mx, W);
  const y = toScreenY(p.my, W);
  ctx.beginPath();
  ctx.arc(x, y, 7, 0, 2 * Math.PI);
  ctx.fillStyle = COLORS.replay;
  ctx.fill();
  ctx.lineWidth = 2;
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
