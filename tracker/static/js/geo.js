// Web Mercator and bounding boxes: pure functions of coordinates, no view and no state.

import { MAX_LAT } from './constants.js';
import { clamp } from './util.js';

// Web Mercator in "world units": x, y in [0, 1], origin at the north-west corner.
export const mercX = (lon) => (lon + 180) / 360;
export function mercY(lat) {
  const s = Math.sin((clamp(lat, -MAX_LAT, MAX_LAT) * Math.PI) / 180);
  return 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI);
}
export const lonOf = (x) => x * 360 - 180;
export const latOf = (y) => (Math.atan(Math.sinh(Math.PI * (1 - 2 * y))) * 180) / Math.PI;

export function padBbox([w, s, e, n], pad) {
  const dx = (e - w) * pad;
  const dy = (n - s) * pad;
  const r = (v) => Math.round(v * 1e4) / 1e4;
  return [
    r(clamp(w - dx, -180, 180)),
    r(clamp(s - dy, -MAX_LAT, MAX_LAT)),
    r(clamp(e + dx, -180, 180)),
    r(clamp(n + dy, -MAX_LAT, MAX_LAT)),
  ];
}

export const bboxContains = (o, i) => o[0] <= i[0] && o[1] <= i[1] && o[2] >= i[2] && o[3] >= i[3];
export const bboxArea = (b) => Math.max(0, b[2] - b[0]) * Math.max(0, b[3] - b[1]);
