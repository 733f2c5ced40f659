// Map interaction: drag to pan, wheel / pinch / buttons / keys to zoom, click or Enter to select
// the nearest driver.

import { AFRICA_BOUNDS } from './constants.js';
import { $, clamp } from './util.js';
import { state } from './store.js';
import {
  canvases,
  fitBounds,
  markOverlay,
  screenToMerc,
  toScreenX,
  toScreenY,
  view,
  viewChanged,
  worldPx,
  zoomAround,
} from './map.js';
import { lists } from './panels.js';
import { selectDriver } from './detail.js';

export function setupMapInput() {
  const canvas = canvases.overlay;
  const pointers = new Map();
  let gesture = null;
  const pointOf = (e) => {
    const r = canvas.getBoundingClientRect();
    return { x: e.clientX - r.left, y: e.clientY - r.top };
  };
  canvas.addEventListener('pointerdown', (e) => {
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    canvas.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, pointOf(e));
    gesture = startGesture(pointers);
  });
  canvas.addEventListener('pointermove', (e) => {
    if (!pointers.has(e.pointerId)) return;
    pointers.set(e.pointerId, pointOf(e));
    moveGesture(gesture, pointers);
  });
  const end = (e) => {
    if (!pointers.has(e.pointerId)) return;
    const click = e.type === 'pointerup' && gesture?.kind === 'pan' && !gesture.moved;
    pointers.delete(e.pointerId);
    gesture = pointers.size ? startGesture(pointers) : null;
    if (click) selectAt(pointOf(e));
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  canvas.addEventListener('wheel', onWheel, { passive: false });
  canvas.addEventListener('dblclick', (e) => {
    const p = pointOf(e);
    zoomAround(view.zoom + 1, p.x, p.y);
  });
  canvas.addEventListener('keydown', onMapKey);
  $('zoom-in').addEventListener('click', () => zoomAround(view.zoom + 1, view.width / 2, view.height / 2));
  $('zoom-out').addEventListener('click', () => zoomAround(view.zoom - 1, view.width / 2, view.height / 2));
  $('zoom-fit').addEventListener('click', () => fitBounds(AFRICA_BOUNDS));
  $('show-trails').addEventListener('change', markOverlay);
}

function startGesture(pointers) {
  const pts = [...pointers.values()];
  if (pts.length === 1) return { kind: 'pan', start: pts[0], x: view.x, y: view.y, moved: false };
  const [a, b] = pts;
  const mid = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
  const dist = Math.hypot(a.x - b.x, a.y - b.y) || 1;
  return { kind: 'pinch', dist, zoom: view.zoom, anchor: screenToMerc(mid.x, mid.y) };
}

function moveGesture(g, pointers) {
  if (!g) return;
  const pts = [...pointers.values()];
  if (g.kind === 'pan') {
    const dx = pts[0].x - g.start.x;
    const dy = pts[0].y - g.start.y;
    if (!g.moved && Math.hypot(dx, dy) < 4) return; // a click may wobble a little
    g.moved = true;
    const W = worldPx();
    view.x = g.x - dx / W;
    view.y = g.y - dy / W;
    viewChanged();
  } else if (pts.length >= 2) {
    const [a, b] = pts;
    const zoom = g.zoom + Math.log2(Math.hypot(a.x - b.x, a.y - b.y) / g.dist);
    zoomAround(zoom, (a.x + b.x) / 2, (a.y + b.y) / 2, g.anchor);
  }
}

function onWheel(e) {
  e.preventDefault();
  const unit = e.deltaMode === 1 ? 40 : e.deltaMode === 2 ? 800 : 1; // lines, pages, pixels
  const step = clamp((-e.deltaY * unit) / 250, -1, 1);
  const r = canvases.overlay.getBoundingClientRect();
  zoomAround(view.zoom + step, e.clientX - r.left, e.clientY - r.top);
}

function onMapKey(e) {
  const pan = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[e.key];
  if (pan) {
    const W = worldPx();
    view.x += (pan[0] * 100) / W;
    view.y += (pan[1] * 100) / W;
    viewChanged();
  } else if (e.key === '+' || e.key === '=') {
    zoomAround(view.zoom + 1, view.width / 2, view.height / 2);
  } else if (e.key === '-' || e.key === '_') {
    zoomAround(view.zoom - 1, view.width / 2, view.height / 2);
  } else if (e.key === 'Enter') {
    selectAt({ x: view.width / 2, y: view.height / 2 }, 60);
  } else if (e.key === 'Escape') {
    selectDriver(null);
  } else {
    return;
  }
  e.preventDefault();
}

/** The driver nearest to a screen point, within `radius` pixels. */
function driverAt(p, radius = 12) {
  const W = worldPx();
  let best = null;
  let bestDist = radius * radius;
  for (const d of state.drivers.values()) {
    if (!(d.mx === d.mx)) continue;
    const dx = toScreenX(d.mx, W) - p.x;
    const dy = toScreenY(d.my, W) - p.y;
    const dist = dx * dx + dy * dy;
    if (dist <= bestDist) {
      best = d;
      bestDist = dist;
    }
  }
  return best;
}

function selectAt(p, radius) {
  const d = driverAt(p, radius);
  if (!d) return;
  selectDriver(d.id, { centre: false });
  lists.drivers.revealKey = d.id;
}
