// The overlay: trails, markers, selection, names, scale bar. Of the three stacked canvases, base
// is basemap.js's (basemap, tiles); this module draws trails (short trails and the selected
// driver's history, as hairline vectors) and markers (sprites blitted into an ImageData, then the
// selection ring, names and scale bar as vectors on top).
//
// Why sprites and not paths: measured in Chromium's software rasteriser (what runs without a
// GPU: headless tests, VMs, remote desktops), filling and stroking one path of 5,000 circles
// costs ~240 ms a frame; copying 5,000 pre-rendered sprites into an ImageData costs ~5 ms.
// Trails are hairlines (1 device pixel) in chunks of 50 drivers per path for the same reason.

import { COLORS, EARTH_CIRCUMFERENCE_M, MAX_TRAIL_VERTICES } from './constants.js';
import { $ } from './util.js';
import { latOf } from './geo.js';
import { heldCount, state } from './store.js';
import { canvases, render, toScreenX, toScreenY, view, worldPx } from './map.js';

const MARKER_R = 4.5;
const MARKER_KINDS = ['offPkg', 'off', 'onPkg', 'on']; // drawn in this order: online on top
const markerBuckets = { offPkg: [], off: [], onPkg: [], on: [] };
const TRAIL_CHUNK = 50;
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
const ALPHA_SHIFT = LITTLE_ENDIAN ? 24 : 0; // RGBA bytes read as one 32-bit pixel
const OPAQUE = (255 << ALPHA_SHIFT) >>> 0;
const sprites = { dpr: 0, kinds: {} };
const markerLayer = { image: null, pixels: null };

export function drawOverlay() {
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
