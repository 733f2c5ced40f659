// The page chrome: the connection status in the top bar, the banners (interrupted feed, session
// expiry, errors), screen-reader announcements, and the sign-in form, starting a session and
// signing out.

import { $, el, humanise, setText } from './util.js';
import { adoptToken, forgetToken, scheduleExpiry, session, storeToken, tokenExpiry, tokenProblem } from './session.js';
import { displayName, state } from './store.js';
import { conn, connectNow, stopConnection } from './live.js';
import { markData, resizeCanvases } from './map.js';
import { loadConfig } from './basemap.js';
import { stopFleet } from './fleet.js';
import { openPackage } from './package-view.js';

const CONNECTION_TEXT = {
  'signed-out': 'Signed out',
  connecting: 'Connecting…',
  live: 'Live',
  reconnecting: 'Reconnecting…',
  interrupted: 'Live feed interrupted',
  disconnected: 'Disconnected: replaced by another session',
};

export function setConnection(next) {
  const changed = conn.state !== next;
  conn.state = next;
  const status = $('conn');
  status.dataset.state = next;
  $('retry-now').hidden = next !== 'reconnecting' && next !== 'disconnected';
  updateCountdown();
  if (changed && next !== 'reconnecting') announce(`Connection: ${CONNECTION_TEXT[next]}`);
  else if (changed) announce('Connection lost, reconnecting');
}

export function updateCountdown() {
  let text = CONNECTION_TEXT[conn.state] ?? conn.state;
  if (conn.state === 'reconnecting') {
    const s = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
    text = s > 0 ? `Reconnecting in ${s} s` : 'Reconnecting…';
  }
  setText($('conn-text'), text);
}

export function showWho() {
  const who = $('who');
  const role = { dispatcher: 'Dispatcher', client: 'Client administrator' }[session.role] ?? session.role ?? '';
  const name = session.claims?.name ?? session.claims?.sub ?? '';
  who.textContent = [name, role, session.org].filter(Boolean).join(' · ');
  who.hidden = !who.textContent;
  // A client administrator's page is about its own deliveries: titled for its organisation.
  const client = session.role === 'client' ? session.client ?? session.claims?.client ?? null : null;
  document.title = client ? `${client} deliveries · Tracker` : 'Tracker · Dispatch';
  setText($('brand-sub'), client ? `deliveries for ${client}` : 'dispatch');
}

export function showInterrupted(reason) {
  $('interrupted-banner').hidden = reason === null;
  if (reason === null) return;
  setText($('interrupted-reason'), `Positions may be stale until it resumes${reason ? ` (${reason})` : ''}.`);
}

export function showExpiryWarning(on) {
  const banner = $('expiry-warning');
  const exp = tokenExpiry();
  banner.hidden = !on || !exp;
  if (banner.hidden) return;
  const left = exp - Date.now();
  const text =
    left > 0
      ? `Your session expires at ${new Date(exp).toLocaleTimeString()}. Paste a new token to stay connected.`
      : 'Your session has expired. Paste a new token to reconnect.';
  setText($('expiry-text'), text);
  if (left > 0) announce('Your session expires in about two minutes.');
}

let errorTimer = 0;
export function showError(text) {
  const banner = $('error-banner');
  banner.textContent = text;
  banner.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => (banner.hidden = true), 10000);
}

/** Screen-reader announcements: appended, not replaced, so two in quick succession are both read. */
export function announce(text) {
  const region = $('announcer');
  const p = el('p', '', text);
  region.append(p);
  setTimeout(() => p.remove(), 15000);
}

const alertQueue = [];
let alertFlushTimer = 0;
// New alerts are announced in groups, so a burst is one sentence and not a flood.
export function queueAlertAnnouncement(a) {
  alertQueue.push(a);
  if (!alertFlushTimer) alertFlushTimer = setTimeout(flushAlertAnnouncements, 1500);
}
function flushAlertAnnouncements() {
  alertFlushTimer = 0;
  const items = alertQueue.splice(0);
  if (items.length > 3) return announce(`${items.length} new alerts.`);
  for (const a of items) {
    const about = a.driver != null ? `, ${displayName(String(a.driver))}` : a.package != null ? `, ${a.package}` : '';
    announce(`New alert: ${humanise(a.kind ?? 'alert')}${about}${a.message ? `. ${a.message}` : ''}`);
  }
}

// --- Sign-in, starting a session, signing out

export function showSignIn(message) {
  $('app').hidden = true;
  $('signin').hidden = false;
  $('sign-out').hidden = true;
  $('who').hidden = true;
  const err = $('signin-error');
  err.hidden = !message;
  err.textContent = message ?? '';
  setConnection('signed-out');
  $('token-input').focus();
}

export function startSession() {
  $('signin').hidden = true;
  $('app').hidden = false;
  $('sign-out').hidden = false;
  showWho();
  resizeCanvases();
  scheduleExpiry();
  loadConfig();
  connectNow();
}

export function signOut(message) {
  stopConnection();
  forgetToken();
  clearState();
  showInterrupted(null);
  showExpiryWarning(false);
  showSignIn(message);
}

export function clearState() {
  state.drivers.clear();
  state.packages.clear();
  state.heldBy.clear();
  state.alerts.clear();
  state.selected = null;
  state.history = null;
  state.pendingSnapshot = null;
  state.interrupted = false;
  stopFleet();
  openPackage(null);
  $('driver-detail').hidden = true;
  markData({ packages: true, alerts: true });
}

export function onSignInSubmit(e) {
  e.preventDefault();
  const input = $('token-input');
  const token = input.value.trim().replace(/^Bearer\s+/i, '');
  const problem = tokenProblem(token);
  if (problem) return showSignIn(problem);
  input.value = '';
  storeToken(token, null);
  startSession();
}

export function onRenewSubmit(e) {
  e.preventDefault();
  const input = $('renew-token');
  const token = input.value.trim().replace(/^Bearer\s+/i, '');
  const problem = tokenProblem(token);
  if (problem) return showError(problem);
  input.value = '';
  adoptToken(token);
}
