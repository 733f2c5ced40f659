// The map: a Leaflet map (vendor/leaflet, raster tiles or the bundled basemap under it) that owns
// the view (centre, zoom, pan and zoom input), and two canvases stacked over it that this page
// draws itself, the trails and the markers, in one render loop. Handlers never draw: they call
// markData / markOverlay, and drawFrame runs at most once per animation frame.
//
// Why the markers are not Leaflet layers: 5,000 moving drivers as Leaflet circle markers cost a
// full canvas path redraw per update (~240 ms in Chromium's software rasteriser); overlay.js blits
// pre-rendered sprites instead (~5 ms). The overlay uses Leaflet's own projection: `view.ox`/`oy`
// are the world pixel at the map container's top-left corner, so a marker lands exactly on the
// tile pixel under it.

import * as L from '../vendor/leaflet/leaflet-src.esm.js';
import { AFRICA_BOUNDS, MAX_ZOOM, MIN_ZOOM, STORAGE } from './constants.js';
import { $, clamp, isNum } from './util.js';
import { latOf, lonOf, mercX, mercY } from './geo.js';
import { scheduleSubscribe } from './live.js';
import { drawOverlay } from './overlay.js';

// x, y: the centre in Web Mercator world units (0..1); ox, oy: world pixels at the container's corner.
export const view = { x: 0.5, y: 0.5, ox: 0, oy: 0, zoom: 3, width: 0, height: 0, dpr: 1, ready: false };
export const leaflet = { map: null, renderer: null };

export const worldPx = (zoom = view.zoom) => 256 * 2 ** zoom;

export function toScreenX(mx, W) {
  return mx * W - view.ox;
}
export function toScreenY(my, W) {
  return my * W - view.oy;
}
export function screenToMerc(px, py) {
  const W = worldPx();
  return { x: (px + view.ox) / W, y: (py + view.oy) / W };
}
export function project(lon, lat) {
  const W = worldPx();
  return { x: toScreenX(mercX(lon), W), y: toScreenY(mercY(lat), W) };
}

/** Create the Leaflet map in `container` (the view is set once the container has a size). */
export function createMap(container) {
  const map = L.map(container, {
    zoomControl: false, // the page's own buttons (index.html), in its own style and language
    attributionControl: false, // credits are written as text by basemap.js, never as HTML
    zoomSnap: 0,
    zoomDelta: 1,
    wheelPxPerZoomLevel: 120,
    zoomAnimation: false, // the overlay canvases follow every move at once; an animated zoom would lag them
    fadeAnimation: false,
    markerZoomAnimation: false,
    minZoom: MIN_ZOOM,
    maxZoom: MAX_ZOOM,
    maxBounds: [
      [-85, -200],
      [85, 200],
    ],
    maxBoundsViscosity: 1,
    keyboardPanDelta: 100,
  });
  leaflet.map = map;
  leaflet.renderer = L.canvas({ padding: 0.3 });
  map.on('move zoom viewreset resize', syncView);
  return map;
}

function syncView() {
  const map = leaflet.map;
  if (!view.ready) return;
  const size = map.getSize();
  const corner = map.containerPointToLayerPoint([0, 0]).add(map.getPixelOrigin());
  view.zoom = map.getZoom();
  view.width = size.x;
  view.height = size.y;
  view.ox = corner.x;
  view.oy = corner.y;
  const W = worldPx();
  view.x = (view.ox + view.width / 2) / W;
  view.y = (view.oy + view.height / 2) / W;
  viewChanged();
}

export function fitBounds([w, s, e, n], maxZoom = MAX_ZOOM) {
  leaflet.map.fitBounds(
    [
      [s, w],
      [n, e],
    ],
    { animate: false, maxZoom, padding: [24, 24] },
  );
}

export function setCenter(lon, lat, zoom = view.zoom) {
  leaflet.map.setView([lat, lon], clamp(zoom, MIN_ZOOM, MAX_ZOOM), { animate: false });
}

/** Zoom so that the world point under the screen point (px, py) stays under it. */
export function zoomAround(zoom, px, py) {
  leaflet.map.setZoomAround(L.point(px, py), clamp(zoom, MIN_ZOOM, MAX_ZOOM), { animate: false });
}

/** Pan the map so the world point (mx, my) is at the centre. */
export function centreOn(mx, my, zoom = view.zoom) {
  setCenter(lonOf(mx), latOf(my), zoom);
}

let saveViewTimer = 0;
export function viewChanged() {
  markOverlay();
  scheduleSubscribe();
  clearTimeout(saveViewTimer);
  const save = () => sessionStorage.setItem(STORAGE.view, JSON.stringify([view.x, view.y, view.zoom]));
  saveViewTimer = setTimeout(save, 500);
}

function restoreView() {
  try {
    const [x, y, zoom] = JSON.parse(sessionStorage.getItem(STORAGE.view) ?? 'null') ?? [];
    if (![x, y, zoom].every(isNum)) return false;
    centreOn(clamp(x, 0, 1), clamp(y, 0, 1), clamp(zoom, MIN_ZOOM, MAX_ZOOM));
    return true;
  } catch {
    return false;
  }
}

/** The view was restored from this tab's last visit (a reload): the page should not move it. */
export const restored = { view: false };

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

export const render = { requested: false, overlay: true, lastFrameTs: 0, count: 0, totalMs: 0, maxMs: 0 };
render.parts = { trails: 0, markers: 0, bucket: 0, put: 0 }; // cumulative ms, for trackerDebug.perf()
render.samples = []; // the last 2,000 render durations (ms), for trackerDebug.perf() percentiles
export const canvases = { trails: null, overlay: null, trailsCtx: null, ctx: null };

function requestRender() {
  if (render.requested) return;
  render.requested = true;
  requestAnimationFrame(drawFrame);
}
export function markOverlay() {
  render.overlay = true;
  requestRender();
}
// The base layers are Leaflet's (tiles, basemap): they redraw themselves. Kept for callers.
export const markBase = markOverlay;

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
  if (render.overlay) drawOverlay();
  render.overlay = false;
  const ms = performance.now() - t0;
  render.count += 1;
  render.totalMs += ms;
  render.maxMs = Math.max(render.maxMs, ms);
  render.samples.push(ms);
  if (render.samples.length > 2000) render.samples.shift();
  render.lastFrameTs = Date.now();
}

export function resizeCanvases() {
  const box = $('map').getBoundingClientRect();
  if (box.width < 1 || box.height < 1) return;
  view.dpr = window.devicePixelRatio || 1;
  for (const c of [canvases.trails, canvases.overlay]) {
    c.width = Math.round(box.width * view.dpr);
    c.height = Math.round(box.height * view.dpr);
  }
  leaflet.map.invalidateSize({ pan: false });
  if (!view.ready) {
    view.ready = true;
    restored.view = restoreView();
    if (!restored.view) fitBounds(AFRICA_BOUNDS);
  }
  syncView();
}
