// The package view: what a dispatcher (or the package's client) asks about one package. From
// GET /v1/packages/{id}: destination, delivery window, cold-chain range, a temperature chart of
// the scans' readings, the custody timeline, proof of delivery (recipient, pod reference, distance
// from the destination), and an ETA when the package data carries one. Refetched when a live
// frame changes the package.

import { COLORS } from './constants.js';
import { $, el, formatTime, humanise, isNum, setText } from './util.js';
import { authHeaders, session } from './session.js';
import { displayName, packageFacts, state } from './store.js';
import { setCenter, view } from './map.js';
import { selectDriver } from './detail.js';

const current = { id: null, data: null, abort: null, version: '' };

/** Open the package view for `id` (null closes it). */
export function openPackage(id) {
  current.abort?.abort();
  state.selectedPackage = id;
  current.id = id;
  current.data = null;
  current.version = '';
  $('package-detail').hidden = !id;
  if (!id) return;
  setText($('package-title'), `Package ${id}`);
  render(null, 'Loading…');
  load(id);
}

/** Called by the panel refresh: refetch when the live state of the open package changed. */
export function updatePackageView() {
  const p = state.packages.get(current.id);
  const version = p ? `${p.state}|${p.driver}|${p.lastEventTs ?? p.ts}` : '';
  if (current.id && version && version !== current.version && current.data) load(current.id);
  else if (current.data) render(current.data); // relative times, a window turning late
}

async function load(id) {
  current.abort?.abort();
  const ctrl = new AbortController();
  current.abort = ctrl;
  const p = state.packages.get(id);
  current.version = p ? `${p.state}|${p.driver}|${p.lastEventTs ?? p.ts}` : '';
  try {
    const res = await fetch(`/v1/packages/${encodeURIComponent(id)}`, {
      headers: authHeaders(),
      signal: ctrl.signal,
      cache: 'no-store',
    });
    if (!res.ok) throw new Error(res.status === 404 ? 'not found' : `HTTP ${res.status}`);
    const data = await res.json();
    if (current.id !== id) return;
    current.data = data;
    render(data);
  } catch (err) {
    if (ctrl.signal.aborted || current.id !== id) return;
    render(null, `Details unavailable (${err.message}).`);
  }
}

function render(data, note = '') {
  setText($('package-note'), note);
  const facts = { ...packageFacts(current.id), ...(data ?? {}) };
  const live = state.packages.get(current.id);
  if (live?.state) facts.state = live.state; // the live frame may be newer than the response
  renderFacts(facts);
  const custody = Array.isArray(data?.custody) ? data.custody : [];
  renderChart(custody, facts.cold_chain);
  renderTimeline(custody);
  renderProof(custody, facts.destination);
  $('package-show-driver').hidden = facts.driver == null;
  $('package-show-destination').hidden = !isNum(facts.destination?.lat);
  // The printable, signed custody report (report.html): the token goes in the fragment, never the query.
  const report = $('package-report');
  report.href = `/static/report.html#package=${encodeURIComponent(current.id)}&token=${encodeURIComponent(session.token ?? '')}`;
  report.hidden = !data;
}

function renderFacts(p) {
  const now = Date.now();
  const dest = p.destination;
  const rows = [['State', p.state ? humanise(p.state) : '–']];
  if (p.client != null) rows.push(['Client', String(p.client)]);
  if (dest) {
    const where = isNum(dest.lat) ? `${dest.lat.toFixed(4)}, ${dest.lon.toFixed(4)}` : '';
    rows.push(['Destination', [dest.name, dest.address, where].filter(Boolean).join(' · ')]);
  }
  const w = p.window;
  if (w && (isNum(w.from) || isNum(w.to))) {
    const late = isNum(w.to) && w.to < now && !['delivered', 'returned'].includes(p.state);
    const text = `${isNum(w.from) ? formatTime(w.from) : '…'} – ${isNum(w.to) ? formatTime(w.to) : '…'}`;
    rows.push(['Delivery window', late ? `${text} (late)` : text]);
  }
  const c = p.cold_chain;
  if (c && (isNum(c.min_c) || isNum(c.max_c))) {
    rows.push(['Cold chain', `${isNum(c.min_c) ? c.min_c : '…'} to ${isNum(c.max_c) ? c.max_c : '…'} °C`]);
  }
  if (p.driver != null) rows.push([p.state === 'picked_up' ? 'With' : 'Last driver', displayName(String(p.driver))]);
  const eta = etaOf(p);
  if (eta) {
    const mins = Math.round((eta - now) / 60000);
    const when = mins >= 1 ? `in ${mins} min` : mins <= -1 ? `${-mins} min ago` : 'now';
    const after = isNum(w?.to) && eta > w.to ? ', after the delivery window' : '';
    rows.push(['ETA', `${formatTime(eta)} (${when}${after})`]);
  }
  if (p.notes) rows.push(['Notes', String(p.notes)]);
  const grid = $('package-grid');
  grid.replaceChildren(...rows.flatMap(([k, v]) => [el('dt', '', k), el('dd', '', v)]));
}

/** An ETA in the package data (ms, an ISO time, or {at}), when the service provides one. */
function etaOf(p) {
  const raw = p.eta?.at ?? p.eta?.ts ?? p.eta;
  const ts = isNum(raw) ? raw : typeof raw === 'string' ? Date.parse(raw) : NaN;
  return isNum(ts) ? ts : null;
}

/** Temperature readings over time, the cold-chain range shaded, readings outside it in red. */
function renderChart(custody, range) {
  const canvas = $('package-temperature');
  const readings = custody.filter((r) => isNum(r.temp_c) && isNum(r.ts)).sort((a, b) => a.ts - b.ts);
  canvas.hidden = readings.length === 0;
  canvas.dataset.points = String(readings.length);
  setText($('package-temperature-note'), readings.length ? '' : 'No temperature readings yet.');
  if (!readings.length) return;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 320;
  const h = 110;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const lo = Math.min(...readings.map((r) => r.temp_c), isNum(range?.min_c) ? range.min_c : Infinity) - 1;
  const hi = Math.max(...readings.map((r) => r.temp_c), isNum(range?.max_c) ? range.max_c : -Infinity) + 1;
  const t0 = readings[0].ts;
  const t1 = Math.max(readings[readings.length - 1].ts, t0 + 1);
  const left = 34;
  const X = (ts) => left + ((ts - t0) / (t1 - t0)) * (w - left - 8);
  const Y = (c) => 8 + ((hi - c) / (hi - lo)) * (h - 26);
  if (isNum(range?.min_c) && isNum(range?.max_c)) {
    ctx.fillStyle = 'rgba(43, 122, 61, 0.15)';
    ctx.fillRect(left, Y(range.max_c), w - left - 8, Y(range.min_c) - Y(range.max_c));
  }
  ctx.fillStyle = COLORS.label;
  ctx.font = '11px system-ui, sans-serif';
  ctx.textBaseline = 'middle';
  ctx.fillText(`${Math.round(hi)}°`, 2, Y(hi));
  ctx.fillText(`${Math.round(lo)}°`, 2, Y(lo));
  ctx.textBaseline = 'alphabetic';
  ctx.fillText(new Date(t0).toLocaleTimeString(), left, h - 3);
  ctx.beginPath();
  readings.forEach((r, i) => (i ? ctx.lineTo(X(r.ts), Y(r.temp_c)) : ctx.moveTo(X(r.ts), Y(r.temp_c))));
  ctx.strokeStyle = COLORS.onPkg;
  ctx.lineWidth = 2;
  ctx.stroke();
  for (const r of readings) {
    const out = (isNum(range?.min_c) && r.temp_c < range.min_c) || (isNum(range?.max_c) && r.temp_c > range.max_c);
    ctx.beginPath();
    ctx.arc(X(r.ts), Y(r.temp_c), out ? 4 : 3, 0, 2 * Math.PI);
    ctx.fillStyle = out ? COLORS.alert : COLORS.onPkg;
    ctx.fill();
  }
  canvas.setAttribute(
    'aria-label',
    `Temperature readings: ${readings.map((r) => `${r.temp_c} °C at ${new Date(r.ts).toLocaleTimeString()}`).join(', ')}`,
  );
}

function renderTimeline(custody) {
  const list = $('package-timeline');
  const items = custody.map((r) => {
    const li = el('li', `tl-item${r.alerts?.length ? ' tl-alert' : ''}`);
    li.dataset.testid = 'custody-item';
    li.dataset.event = String(r.event ?? '');
    if (r.missing) {
      li.append(el('strong', '', `#${r.index} record missing`));
      return li;
    }
    li.append(el('strong', '', humanise(r.event ?? 'scan')), el('span', 'tl-time', formatTime(r.ts)));
    const bits = [r.driver != null ? displayName(String(r.driver)) : null];
    if (isNum(r.temp_c)) bits.push(`${r.temp_c} °C`);
    if (r.note) bits.push(String(r.note));
    if (r.recipient) bits.push(`received by ${r.recipient}`);
    if (r.alerts?.length) bits.push(`${r.alerts.length} alert${r.alerts.length === 1 ? '' : 's'}`);
    li.append(el('p', 'tl-meta', bits.filter(Boolean).join(' · ')));
    return li;
  });
  list.replaceChildren(...items);
  if (!items.length) list.append(el('li', 'empty', 'No scans yet.'));
}

/** Proof of delivery: the deliver scan's recipient and pod, and how far from the destination it was. */
function renderProof(custody, dest) {
  const box = $('package-pod');
  const d = [...custody].reverse().find((r) => r.event === 'deliver');
  box.hidden = !d;
  if (!d) return;
  const rows = [
    ['Delivered', formatTime(d.ts)],
    ['Recipient', d.recipient ? String(d.recipient) : '–'],
    ['Proof reference', d.pod ? String(d.pod) : '–'],
  ];
  if (isNum(d.lat) && isNum(dest?.lat)) rows.push(['From destination', formatDistance(haversine(d, dest))]);
  $('package-pod-grid').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', '', k), el('dd', '', v)]));
}

export function haversine(a, b) {
  const R = 6371008.8;
  const rad = Math.PI / 180;
  const dLat = (b.lat - a.lat) * rad;
  const dLon = (b.lon - a.lon) * rad;
  const s = Math.sin(dLat / 2) ** 2 + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * R * Math.asin(Math.min(1, Math.sqrt(s)));
}

const formatDistance = (m) => (m < 1000 ? `${Math.round(m)} m` : `${(m / 1000).toFixed(1)} km`);

export function setupPackageView() {
  $('package-close').addEventListener('click', () => openPackage(null));
  $('package-show-driver').addEventListener('click', () => {
    const p = { ...packageFacts(current.id), ...(current.data ?? {}) };
    if (p.driver != null) selectDriver(String(p.driver));
  });
  $('package-show-destination').addEventListener('click', () => {
    const dest = { ...packageFacts(current.id), ...(current.data ?? {}) }.destination;
    if (isNum(dest?.lat)) setCenter(dest.lon, dest.lat, Math.max(view.zoom, 15));
  });
}
