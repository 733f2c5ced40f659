// Small helpers with no state: DOM lookups and text, numbers, and the formats the panels show.
// Imports nothing. el and setText write text with textContent: server text is never parsed as HTML.

export const $ = (id) => document.getElementById(id);
export const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
export const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
export const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function relativeTime(ts, now = Date.now()) {
  if (!isNum(ts) || ts <= 0) return 'never';
  const s = Math.round((now - ts) / 1000);
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export const formatSpeed = (spd) => (isNum(spd) ? `${Math.round(spd * 3.6)} km/h` : '–');
// bat is 0..1 on the wire; tolerate a percentage too.
export const batteryPercent = (bat) => (isNum(bat) ? Math.round(bat <= 1 ? bat * 100 : bat) : null);
export const formatBattery = (bat) => (batteryPercent(bat) === null ? '–' : `${batteryPercent(bat)}%`);
export const formatTime = (ts) => (isNum(ts) && ts > 0 ? new Date(ts).toLocaleString() : '–');
export const humanise = (s) => String(s ?? '').replace(/[_-]+/g, ' ').replace(/^\w/, (c) => c.toUpperCase());

// Avoids touching text nodes that did not change: a refresh of 30 rows then costs almost nothing.
export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

export const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
