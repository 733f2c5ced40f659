// Map interaction. Leaflet does the panning and zooming (drag, wheel, pinch, double-click, arrow
// keys and +/- on the focused map); this module adds the page's buttons, picking (a click or Enter
// selects the nearest driver; a click on a cluster zooms into it; a click on a destination pin
// opens its package) and Escape to clear the selection.

import { AFRICA_BOUNDS, CLUSTER_BELOW_ZOOM } from './constants.js';
import { $ } from './util.js';
import { lonOf, latOf } from './geo.js';
import { state } from './store.js';
import { fitBounds, leaflet, markOverlay, toScreenX, toScreenY, view, worldPx, zoomAround } from './map.js';
import { lists } from './panels.js';
import { selectDriver } from './detail.js';
import { drawn } from './overlay.js';
import { badgeRadius } from './sprites.js';
import { openPackage } from './package-view.js';

export function setupMapInput() {
  const map = leaflet.map;
  const container = $('map');
  map.on('click', (e) => pick({ x: e.containerPoint.x, y: e.containerPoint.y }));
  container.addEventListener('keydown', onMapKey);
  $('zoom-in').addEventListener('click', () => zoomAround(view.zoom + 1, view.width / 2, view.height / 2));
  $('zoom-out').addEventListener('click', () => zoomAround(view.zoom - 1, view.width / 2, view.height / 2));
  $('zoom-fit').addEventListener('click', () => fitBounds(AFRICA_BOUNDS));
  $('show-trails').addEventListener('change', markOverlay);
}

function onMapKey(e) {
  if (e.key === 'Enter') {
    pick({ x: view.width / 2, y: view.height / 2 }, 60);
  } else if (e.key === 'Escape') {
    selectDriver(null);
  } else {
    return;
  }
  e.preventDefault();
}

/** The driver nearest to a screen point, within `radius` pixels, among those drawn on their own. */
function driverAt(p, radius = 12) {
  const W = worldPx();
  let best = null;
  let bestDist = radius * radius;
  for (const d of state.drivers.values()) {
    if (!(d.mx === d.mx) || d.cluster !== null) continue;
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

function clusterAt(p) {
  return drawn.clusters.find((c) => Math.hypot(c.x - p.x, c.y - p.y) <= badgeRadius(c.count) + 2) ?? null;
}

/** Zoom into a cluster: to the box of its drivers, at least far enough for it to break up. */
export function openCluster(c) {
  // World units: y grows southwards, so the north edge is the smallest y.
  let [w, e, top, bottom] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const d of c.members) {
    w = Math.min(w, d.mx);
    e = Math.max(e, d.mx);
    top = Math.min(top, d.my);
    bottom = Math.max(bottom, d.my);
  }
  // The members fit in one grid cell, so fitting them on screen always zooms in.
  fitBounds([lonOf(w), latOf(bottom), lonOf(e), latOf(top)], CLUSTER_BELOW_ZOOM + 1);
}

function pick(p, radius) {
  const c = clusterAt(p);
  if (c) return openCluster(c);
  const d = driverAt(p, radius);
  if (d) {
    selectDriver(d.id, { centre: false });
    lists.drivers.revealKey = d.id;
    return;
  }
  const pin = drawn.pins.find((q) => p.x >= q.x - 3 && p.x <= q.x + 11 && p.y >= q.y - 16 && p.y <= q.y + 2);
  if (pin) openPackage(pin.package);
}
