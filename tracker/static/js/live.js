// The live connection (WS /v1/live, PROTOCOL.md): hello -> welcome -> subscribe with the map view
// plus 25 %, close codes, reconnecting with exponential backoff and full jitter, and a handshake
// deadline. Received frames go to handleFrame (frames.js); the connection state shown in the top
// bar is set through chrome.js.

import {
  LIVE_PATH,
  RECONNECT_BASE_MS,
  RECONNECT_CAP_MS,
  STABLE_CONNECTION_MS,
  SUBSCRIBE_DEBOUNCE_MS,
  SUBSCRIBE_PAD,
  WELCOME_TIMEOUT_MS,
} from './constants.js';
import { bboxArea, bboxContains, padBbox } from './geo.js';
import { refreshToken, session, tokenExpiry } from './session.js';
import { state } from './store.js';
import { startFleet } from './fleet.js';
import { handleFrame } from './frames.js';
import { view, viewBbox } from './map.js';
import { setConnection, showError, showInterrupted, showSignIn, showWho, signOut, updateCountdown } from './chrome.js';

export const conn = {
  ws: null,
  wanted: false, // false once signed out: no reconnecting
  welcomed: false,
  attempt: 0, // consecutive failed attempts, for the backoff
  liveSince: 0, // when the current connection delivered its first snapshot
  retryTimer: 0,
  countdownTimer: 0,
  welcomeTimer: 0,
  retryAt: 0,
  subscribedBbox: null,
  subscribeTimer: 0,
  state: 'signed-out',
  sent: [], // the last frames sent, tokens redacted, for the test hook
};

const liveUrl = () => `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${LIVE_PATH}`;

export function send(frame) {
  if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
  conn.ws.send(JSON.stringify(frame));
  conn.sent.push('token' in frame ? { ...frame, token: '<redacted>' } : frame);
  if (conn.sent.length > 50) conn.sent.shift();
  return true;
}

export function connectNow() {
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  if (!session.token) return showSignIn();
  conn.wanted = true;
  conn.welcomed = false;
  conn.subscribedBbox = null;
  setConnection('connecting');
  const ws = new WebSocket(liveUrl());
  conn.ws = ws;
  // Each handler checks it still belongs to the current socket: an old socket's late events
  // must not touch the new one's state.
  ws.onopen = () => ws === conn.ws && send({ type: 'hello', token: session.token });
  ws.onmessage = (e) => ws === conn.ws && onMessage(e.data);
  ws.onclose = (e) => ws === conn.ws && onClose(e.code, e.reason);
  // A handshake that stalls (a proxy holding the upgrade, a wedged instance) is retried, not waited on.
  clearTimeout(conn.welcomeTimer);
  conn.welcomeTimer = setTimeout(() => {
    if (ws !== conn.ws || conn.welcomed) return;
    ws.close();
    onClose(1006, 'no welcome');
  }, WELCOME_TIMEOUT_MS);
}

function onMessage(data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    console.warn('tracker: ignored a frame that is not JSON');
    return;
  }
  state.lastMessageTs = Date.now();
  handleFrame(frame);
}

export function onWelcome(f) {
  if (f.refreshed === true) return; // a refresh on the open connection: nothing else changes
  conn.welcomed = true;
  session.role = typeof f.role === 'string' ? f.role : session.claims?.role ?? null;
  session.org = typeof f.org === 'string' ? f.org : session.claims?.org ?? null;
  session.client = typeof f.client === 'string' ? f.client : session.claims?.client ?? null;
  showWho();
  state.pendingSnapshot = null;
  state.interrupted = false; // a new connection: the server repeats live:false if still so
  showInterrupted(null);
  subscribe(true);
  startFleet();
}

export function onSnapshotApplied() {
  if (!conn.liveSince) conn.liveSince = Date.now();
  if (conn.ws || conn.state === 'connecting') setConnection(state.interrupted ? 'interrupted' : 'live');
}

/**
 * What to do after a close (PROTOCOL.md "Close codes"): 4000 means the token is refused, so sign
 * in again; 4001 means another session replaced this one, so wait for the user; 4003 means the
 * token expired, so refresh it if we can; anything else reconnects with backoff.
 */
function onClose(code, reason) {
  clearTimeout(conn.welcomeTimer);
  conn.ws = null;
  conn.welcomed = false;
  // Only a connection that stayed up a while resets the backoff: one closed soon after its
  // snapshot (1013, slow consumer) must not come back every half second.
  if (conn.liveSince && Date.now() - conn.liveSince > STABLE_CONNECTION_MS) conn.attempt = 0;
  conn.liveSince = 0;
  if (!conn.wanted) return;
  if (code === 4000) {
    signOut('The service refused this access token (unauthorized). Sign in again.');
  } else if (code === 4001) {
    setConnection('disconnected');
  } else if (code === 4003) {
    onTokenExpiredClose();
  } else {
    if (code === 1013 && reason) showError(`Disconnected: ${reason}`);
    scheduleReconnect();
  }
}

async function onTokenExpiredClose() {
  // adoptToken has usually reconnected already; scheduleReconnect then does nothing.
  if (session.refreshUrl && (await refreshToken())) return scheduleReconnect(0);
  const exp = tokenExpiry();
  if (exp && exp <= Date.now()) return signOut('Your session expired. Paste a new access token to continue.');
  scheduleReconnect();
}

/** Exponential backoff with full jitter: a random delay in [0, min(cap, base * 2^attempt)]. */
function scheduleReconnect(delay) {
  if (conn.ws || !conn.wanted) return;
  const ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** conn.attempt);
  const wait = delay ?? Math.random() * ceiling;
  conn.attempt = Math.min(conn.attempt + 1, 16);
  conn.retryAt = Date.now() + wait;
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  conn.retryTimer = setTimeout(connectNow, wait);
  conn.countdownTimer = setInterval(updateCountdown, 1000);
  setConnection('reconnecting');
}

export function stopConnection() {
  conn.wanted = false;
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  clearTimeout(conn.subscribeTimer);
  clearTimeout(conn.welcomeTimer);
  const ws = conn.ws;
  conn.ws = null;
  conn.welcomed = false;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, 'signed out');
}

// --- Subscription by map view

export function outsideSubscription(lon, lat) {
  const b = conn.subscribedBbox;
  return !!b && (lon < b[0] || lat < b[1] || lon > b[2] || lat > b[3]);
}

/**
 * Subscribe to what the map shows. A new subscribe costs a full snapshot, so it is only sent
 * when the view left the subscribed box, or when the box is far larger than the view (zoomed in
 * a lot: no need to receive a continent's positions).
 */
function subscribe(force = false) {
  if (!conn.welcomed || !view.ready) return;
  const current = viewBbox();
  const sub = conn.subscribedBbox;
  if (!force && sub && bboxContains(sub, current) && bboxArea(sub) < 16 * Math.max(bboxArea(current), 1e-9)) return;
  const bbox = padBbox(current, SUBSCRIBE_PAD);
  if (send({ type: 'subscribe', bbox })) conn.subscribedBbox = bbox;
}

export function scheduleSubscribe() {
  clearTimeout(conn.subscribeTimer);
  conn.subscribeTimer = setTimeout(() => subscribe(false), SUBSCRIBE_DEBOUNCE_MS);
}
