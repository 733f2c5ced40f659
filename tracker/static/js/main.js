// Tracker dispatcher dashboard: the entry module (index.html loads it with <script type="module">).
//
// Native ES modules, no build step, no dependency, no CDN: the page must work offline and behind a
// strict CSP (no inline script or style; element.style set from script is fine). Server text is
// only ever written with textContent, never parsed as HTML. README.md lists the modules.
//
// Rendering never happens per message: handlers update state and set dirty flags, and one
// requestAnimationFrame callback draws. Side lists refresh on a timer, at most twice a second.
//
// This module wires the page up and starts it: boot() below, and the exports a harness uses
// (boot, handleFrame, parseTrail).

import { LIST_REFRESH_MS } from './constants.js';
import { $ } from './util.js';
import { forgetToken, loadStoredToken, session, takeTokenFromUrl, tokenProblem } from './session.js';
import { state } from './store.js';
import { conn, connectNow, stopConnection } from './live.js';
import { canvases, createMap, dirty, resizeCanvases } from './map.js';
import { loadBasemap } from './basemap.js';
import { setupPackageView } from './package-view.js';
import { setupReplay } from './replay.js';
import { setupMapInput } from './map-input.js';
import { refreshPanels, selectTab, setupLists, TABS } from './panels.js';
import { loadHistory, selectDriver } from './detail.js';
import {
  announce,
  clearState,
  onRenewSubmit,
  onSignInSubmit,
  setConnection,
  showError,
  showSignIn,
  signOut,
  startSession,
} from './chrome.js';
import { installDebugHook } from './debug.js';

export { handleFrame } from './frames.js';
export { parseTrail } from './detail.js';

/** The page's controls outside the map and the lists: forms, buttons, tabs, filters, window events. */
function setupChrome() {
  $('signin-form').addEventListener('submit', onSignInSubmit);
  $('renew-form').addEventListener('submit', onRenewSubmit);
  $('sign-out').addEventListener('click', () => {
    signOut(null);
    announce('Signed out');
  });
  $('retry-now').addEventListener('click', () => {
    conn.wanted = true;
    connectNow();
  });
  $('detail-close').addEventListener('click', () => selectDriver(null));
  $('trail-hours').addEventListener('change', () => state.selected && loadHistory(state.selected));
  for (const t of TABS) {
    const tab = $(`tab-${t}`);
    tab.addEventListener('click', () => selectTab(t));
    tab.addEventListener('keydown', (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) selectTab(TABS[(TABS.indexOf(t) + step + TABS.length) % TABS.length], true);
    });
  }
  const refreshDrivers = () => {
    dirty.drivers = true;
    refreshPanels();
  };
  $('driver-filter').addEventListener('input', refreshDrivers);
  $('driver-sort').addEventListener('change', refreshDrivers);
  $('package-filter').addEventListener('input', () => {
    dirty.packages = true;
    refreshPanels();
  });
  $('alerts-open-only').addEventListener('change', () => {
    dirty.alerts = true;
    refreshPanels();
  });
  // A #token=... link opened in a tab that already shows the page: use the new token.
  window.addEventListener('hashchange', () => {
    if (!new URLSearchParams(location.hash.slice(1)).has('token')) return;
    const old = session.token;
    takeTokenFromUrl();
    if (session.token === old) return;
    const problem = tokenProblem(session.token);
    if (problem) return signOut(problem);
    stopConnection();
    clearState();
    startSession();
  });
  // Back online: do not sit out the rest of a long backoff.
  window.addEventListener('online', () => conn.state === 'reconnecting' && connectNow());
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && state.selected && !e.defaultPrevented) selectDriver(null);
  });
  document.addEventListener('visibilitychange', () => !document.hidden && dirty.drivers && refreshPanels());
}

/**
 * Start the page. Options: `{ connect: false }` shows the dashboard without signing in or
 * connecting (a local visual harness feeds frames through window.trackerDebug.feed).
 */
export function boot({ connect = true } = {}) {
  canvases.trails = $('map-trails');
  canvases.overlay = $('map-overlay');
  canvases.trailsCtx = canvases.trails.getContext('2d');
  canvases.ctx = canvases.overlay.getContext('2d', { willReadFrequently: false });
  createMap($('map'));
  installDebugHook();
  setupChrome();
  setupLists();
  setupMapInput();
  setupPackageView();
  setupReplay();
  new ResizeObserver(resizeCanvases).observe($('map'));
  setInterval(refreshPanels, LIST_REFRESH_MS);
  loadBasemap();
  const refused = takeTokenFromUrl();
  if (!connect) {
    $('signin').hidden = true;
    $('app').hidden = false;
    resizeCanvases();
    setConnection('connecting');
    return;
  }
  const problem = loadStoredToken() ? tokenProblem(session.token) : 'none';
  if (problem === null) {
    startSession();
    if (refused) showError(refused);
  } else {
    if (problem !== 'none') forgetToken();
    showSignIn(refused ?? (problem === 'none' ? null : problem));
  }
}

// A harness sets window.trackerNoAutoBoot before importing this module and calls boot() itself.
if (!window.trackerNoAutoBoot) boot();
