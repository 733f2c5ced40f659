// The session: the access token (from the URL fragment or the sign-in form), its claims, and
// refreshing it before it expires. The token lives in sessionStorage (this tab only); the JWT
// payload is decoded, not verified, to read exp, role and name. A refreshed token is sent on the
// open connection (live.js) without reconnecting.

import { EXPIRY_WARNING_MS, STORAGE } from './constants.js';
import { clamp, formatTime, isNum } from './util.js';
import { conn, connectNow, send } from './live.js';
import { showExpiryWarning } from './chrome.js';

export const session = {
  token: null,
  refreshUrl: null,
  claims: null,
  role: null,
  org: null,
  client: null, // a client administrator's client organisation (welcome)
  refreshTimer: 0,
  refreshFailed: false,
  warnTimer: 0,
  expireTimer: 0,
};

/** Decode a JWT's payload without verifying it (the server verifies; we only read exp/role/name). */
function decodeJwt(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64.padEnd(Math.ceil(b64.length / 4) * 4, '=');
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}

/** A refresh URL is only honoured on this origin: the current token is sent to it. */
function sameOriginUrl(raw) {
  try {
    const url = new URL(raw, location.href);
    return url.origin === location.origin ? url.href : null;
  } catch {
    return null;
  }
}

/**
 * Read `#token=...&refresh_url=...` and wipe it from the address bar (history, bookmarks, screen
 * shares). A token in the query string is refused: it would already sit in server and proxy logs.
 * Returns a message for the sign-in form when something was refused.
 */
export function takeTokenFromUrl() {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  let message = null;
  let dirty = false;
  if (query.has('token')) {
    query.delete('token');
    dirty = true;
    message =
      'A token in the address query string is not accepted (it leaks into logs). Use #token=… or paste it here.';
  }
  if (fragment.has('token')) {
    storeToken(fragment.get('token'), fragment.get('refresh_url'));
    dirty = true;
  }
  if (dirty) {
    const search = query.toString();
    history.replaceState(history.state, '', location.pathname + (search ? `?${search}` : ''));
  }
  return message;
}

export function storeToken(token, refreshUrl) {
  token = String(token || '').trim().replace(/^Bearer\s+/i, '');
  session.token = token;
  session.claims = decodeJwt(token);
  sessionStorage.setItem(STORAGE.token, token);
  if (refreshUrl !== undefined) {
    session.refreshUrl = refreshUrl ? sameOriginUrl(refreshUrl) : null;
    if (session.refreshUrl) sessionStorage.setItem(STORAGE.refreshUrl, session.refreshUrl);
    else sessionStorage.removeItem(STORAGE.refreshUrl);
  }
}

export function loadStoredToken() {
  const token = sessionStorage.getItem(STORAGE.token);
  if (!token) return false;
  session.token = token;
  session.claims = decodeJwt(token);
  session.refreshUrl = sessionStorage.getItem(STORAGE.refreshUrl);
  return true;
}

export function forgetToken() {
  sessionStorage.removeItem(STORAGE.token);
  sessionStorage.removeItem(STORAGE.refreshUrl);
  Object.assign(session, { token: null, refreshUrl: null, claims: null, role: null, org: null, client: null });
  clearExpiryTimers();
}

export const tokenExpiry = () => (isNum(session.claims?.exp) ? session.claims.exp * 1000 : null);
export const authHeaders = () => (session.token ? { Authorization: `Bearer ${session.token}` } : {});

/** Why a pasted token cannot be used, or null. The server has the final word. */
export function tokenProblem(token) {
  const claims = decodeJwt(token);
  if (!claims) return 'That does not look like an access token (expected three dot-separated parts).';
  if (isNum(claims.exp) && claims.exp * 1000 <= Date.now()) {
    return `This token expired at ${formatTime(claims.exp * 1000)}.`;
  }
  if (claims.role === 'driver') return 'This is a driver token; the dashboard needs a dispatcher or client token.';
  return null;
}

function clearExpiryTimers() {
  clearTimeout(session.refreshTimer);
  clearTimeout(session.warnTimer);
  clearTimeout(session.expireTimer);
}

// setTimeout overflows past ~24.8 days; a token that long-lived needs no timer yet.
function later(fn, ms) {
  return ms > 2 ** 31 - 1 ? 0 : setTimeout(fn, Math.max(0, ms));
}

/** Plan the refresh (when a refresh URL is known) and the 2-minute warning for the current token. */
export function scheduleExpiry() {
  clearExpiryTimers();
  showExpiryWarning(false);
  const exp = tokenExpiry();
  if (!exp) return;
  const now = Date.now();
  session.refreshFailed = false;
  if (session.refreshUrl) {
    // Refresh well before the 2-minute warning would be due, but never sooner than halfway
    // through the time left, so a service minting short tokens cannot make us loop.
    const issued = isNum(session.claims.iat) ? session.claims.iat * 1000 : now;
    const lead = clamp((exp - issued) * 0.25, EXPIRY_WARNING_MS + 30000, 10 * 60000);
    session.refreshTimer = later(refreshToken, Math.max(exp - lead - now, (exp - now) / 2));
  }
  // Without a way to refresh (or when refreshing keeps failing) the user is warned instead.
  const warn = () => (!session.refreshUrl || session.refreshFailed) && showExpiryWarning(true);
  session.warnTimer = later(warn, exp - EXPIRY_WARNING_MS - now);
  session.expireTimer = later(() => showExpiryWarning(true), exp - now);
}

/** GET refresh_url with the current token; on success use the new token on the open connection. */
export async function refreshToken() {
  if (!session.refreshUrl || !session.token) return false;
  try {
    const res = await fetch(session.refreshUrl, { headers: authHeaders(), cache: 'no-store' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    if (typeof body?.token !== 'string' || !decodeJwt(body.token)) throw new Error('no token in the response');
    adoptToken(body.token);
    return true;
  } catch (err) {
    console.warn('tracker: token refresh failed', err);
    session.refreshFailed = true;
    // Try again while there is time, and warn the user once expiry is close.
    const left = (tokenExpiry() ?? 0) - Date.now();
    if (left > 10000) session.refreshTimer = later(refreshToken, clamp(left / 4, 5000, 30000));
    if (left <= EXPIRY_WARNING_MS) showExpiryWarning(true);
    return false;
  }
}

/** A new token (refreshed, or pasted into the renew form): swap it in without reconnecting. */
export function adoptToken(token) {
  storeToken(token);
  scheduleExpiry();
  if (conn.ws && conn.welcomed) send({ type: 'refresh', token });
  else if (conn.wanted && !conn.ws) connectNow();
}
