// The map: the Web Mercator view (centre, zoom, size; pan and zoom arithmetic), the three stacked
// canvases and the one render loop. Handlers never draw: they call markData / markBase /
// markOverlay, and drawFrame runs at most once per animation frame, drawing the base layer
// (basemap.js) and the overlay (overlay.js) only when they are dirty.

import { AFRICA_BOUNDS, MAX_ZOOM, MIN_ZOOM, STORAGE } from './constants.js';
import { $, clamp, isNum } from './util.js';
import { latOf, lonOf, mercX, mercY } from './geo.js';
import { scheduleSubscribe } from './live.js';
import { drawBase } from './basemap.js';
import { drawOverlay } from './overlay.js';

export const view = { x: 0.5, y: 0.5, zoom: 3, width: 0, height: 0, dpr: 1, ready: false };

export const worldPx = (zoom = view.zoom) => 256 * 2 ** zoom;

export function toScreenX(mx, W) {
  return (mx - view.x) * W + view.width / 2;
}
export function toScreenY(my, W) {
  return (my - view.y) * W + view.height / 2;
}
export function screenToMerc(px, py) {
  const W = worldPx();
  return { x: view.x + (px - view.width / 2) / W, y: view.y + (py - view.height / 2) / W };
}
export function project(lon, lat) {
  const W = worldPx();
  return { x: toScreenX(mercX(lon), W), y: toScreenY(mercY(lat), W) };
}

export function fitBounds([w, s, e, n]) {
  const dx = mercX(e) - mercX(w);
  const dy = mercY(s) - mercY(n);
  const zoom = Math.log2(Math.min(view.width / (dx * 256), view.height / (dy * 256)));
  view.zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
  view.x = (mercX(w) + mercX(e)) / 2;
  view.y = (mercY(n) + mercY(s)) / 2;
  viewChanged();
}

export function setCenter(lon, lat, zoom = view.zoom) {
  view.x = mercX(lon);
  view.y = mercY(lat);
  view.zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
  viewChanged();
}

/** Zoom so that the world point under the screen point (px, py) stays under it. */
export function zoomAround(zoom, px, py, anchor = screenToMerc(px, py)) {
  view.zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
  const W = worldPx();
  view.x = anchor.x - (px - view.width / 2) / W;
  view.y = anchor.y - (py - view.height / 2) / W;
  viewChanged();
}

let saveViewTimer = 0;
export function viewChanged() {
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

/** The current map view as [west, south, east, north], clamped to what Mercator can show. */
export function viewBbox() {
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

// --- Canvases and the render loop

export const render = { requested: false, base: true, overlay: true, lastFrameTs: 0, count: 0, totalMs: 0, maxMs: 0 };
render.parts = { trails: 0, markers: 0, bucket: 0, put: 0 }; // cumulative ms, for trackerDebug.perf()
export const canvases = { base: null, trails: null, overlay: null, baseCtx: null, trailsCtx: null, ctx: null };

function requestRender() {
  if (render.requested) return;
  render.requested = true;
  requestAnimationFrame(drawFrame);
}
export function markBase() {
  render.base = true;
  render.overlay = true;
  requestRender();
}
export function markOverlay() {
  render.overlay = true;
  requestRender();
}

export const dirty = { drivers: true, packages: true, alerts: true };
/** State changed: redraw the markers next frame, refresh the lists at their next tick. */
export function markData({ packages = false, alerts = false } = {}) {
  dirty.drivers = true;
  if (packages) dirty.packages = true;
  if (alerts) dirty.alerts = true;
  markOverlay();
}

/** The one render: at most once per animation frame, whatever the message rate. */
export function drawFrame() {
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

export function resizeCanvases() {
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
