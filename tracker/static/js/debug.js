// The test hook, window.trackerDebug (documented in README.md): a summary of the state, feeding
// frames, moving the view, selecting, drawing now, and render timings. Tests and the visual harness
// rely on it.

import { latOf, lonOf } from './geo.js';
import { session } from './session.js';
import { heldCount, state } from './store.js';
import { handleFrame } from './frames.js';
import { conn } from './live.js';
import { drawFrame, project, render, setCenter, toScreenX, toScreenY, view, viewBbox, worldPx } from './map.js';
import { refreshPanels } from './panels.js';
import { parseTrail, selectDriver } from './detail.js';
import { drawn } from './overlay.js';
import { base } from './basemap.js';
import { fleetSummary } from './fleet.js';
import { replayState } from './replay.js';
import { openPackage } from './package-view.js';

function debugState() {
  const W = worldPx();
  const markers = [];
  for (const d of state.drivers.values()) {
    if (!(d.mx === d.mx)) continue;
    const x = toScreenX(d.mx, W);
    const y = toScreenY(d.my, W);
    markers.push({
      driver: d.id,
      name: d.name,
      lat: d.lat,
      lon: d.lon,
      online: d.online,
      packages: heldCount(d.id),
      x,
      y,
      visible: x >= 0 && y >= 0 && x <= view.width && y <= view.height,
      cluster: d.cluster, // the cluster badge it is drawn in, or null (drawn as itself)
      stale: d.stale, // drawn faded: its newest fix is older than STALE_AFTER_MS
    });
  }
  const packages = [...state.packages.values()].filter((p) => !p.stub).map((p) => ({ ...p }));
  return {
    connection: conn.state,
    role: session.role,
    org: session.org,
    drivers: state.drivers.size,
    markers,
    packages,
    alerts: [...state.alerts.values()].map((a) => ({ ...a })),
    selected: state.selected,
    history: state.history && {
      driver: state.history.driver,
      points: state.history.points.length,
      source: state.history.source,
    },
    interrupted: state.interrupted,
    subscribedBbox: conn.subscribedBbox,
    view: {
      lon: lonOf(view.x),
      lat: latOf(view.y),
      zoom: view.zoom,
      width: view.width,
      height: view.height,
      bbox: viewBbox(),
      scale: view.scale ?? null, // { metres, px, label } of the scale bar
    },
    lastFrameTs: render.lastFrameTs,
    lastMessageTs: state.lastMessageTs,
    frames: state.frames,
    clusters: drawn.clusters.map((c) => ({ x: c.x, y: c.y, count: c.count, drivers: c.members.map((d) => d.id) })),
    pins: drawn.pins.map((p) => ({ ...p })),
    alerted: [...drawn.alerted],
    replay: replayState(),
    fleet: fleetSummary(),
    fleetDrivers: state.fleet.size,
    selectedPackage: state.selectedPackage,
    base: { tiles: base.tileUrl, tileOrigin: base.tileOrigin, basemap: base.layer !== null },
  };
}

function percentile(values, q) {
  if (!values.length) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.max(0, Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1))];
}

export function installDebugHook() {
  window.trackerDebug = {
    state: debugState,
    feed: handleFrame,
    handleFrame,
    parseTrail,
    project,
    setView: (lon, lat, zoom) => setCenter(lon, lat, zoom),
    select: (id) => selectDriver(id == null ? null : String(id)),
    openPackage: (id) => openPackage(id == null ? null : String(id)),
    sent: () => conn.sent.map((f) => ({ ...f })),
    // Draw now instead of at the next animation frame (headless tests, hidden tabs).
    render: () => {
      render.overlay = true;
      drawFrame();
      refreshPanels();
      return render.lastFrameTs;
    },
    perf: () => {
      const per = (ms) => (render.count ? ms / render.count : 0);
      return {
        renders: render.count,
        avgRenderMs: per(render.totalMs),
        maxRenderMs: render.maxMs,
        avgTrailsMs: per(render.parts.trails),
        avgMarkersMs: per(render.parts.markers),
        avgBucketMs: per(render.parts.bucket),
        avgPutImageDataMs: per(render.parts.put),
        p50RenderMs: percentile(render.samples, 0.5),
        p95RenderMs: percentile(render.samples, 0.95),
        minRenderMs: percentile(render.samples, 0),
        frames: state.frames,
      };
    },
    resetPerf: () => {
      Object.assign(render, { count: 0, totalMs: 0, maxMs: 0, samples: [] });
      render.parts = { trails: 0, markers: 0, bucket: 0, put: 0 };
    },
  };
}
