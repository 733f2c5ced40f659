// Marker sprites and the blit that copies them into an ImageData (overlay.js), and the cluster
// badges. Measured in Chromium's software rasteriser (what runs without a GPU: headless tests,
// VMs, remote desktops): filling and stroking one path of 5,000 circles costs ~240 ms a frame;
// copying 5,000 pre-rendered sprites into an ImageData costs ~5 ms.

import { COLORS } from './constants.js';

export const MARKER_R = 4.5;
// Drawn in this order: stale (faded) under fresh, online on top.
export const MARKER_KINDS = ['offPkgStale', 'offStale', 'onPkgStale', 'onStale', 'offPkg', 'off', 'onPkg', 'on'];
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
const ALPHA_SHIFT = LITTLE_ENDIAN ? 24 : 0; // RGBA bytes read as one 32-bit pixel
const OPAQUE = 255 << ALPHA_SHIFT; // as an int32: the pixel buffers are Int32Arrays (faster than Uint32 in V8)
const STALE_ALPHA = 0.38;
const sprites = { dpr: 0, kinds: {} };

/** One sprite per marker kind at this pixel ratio: a white halo under the coloured shape. */
export function spritesFor(dpr) {
  if (sprites.dpr === dpr) return sprites.kinds;
  for (const kind of MARKER_KINDS) {
    const stale = kind.endsWith('Stale');
    const colour = kind.replace('Stale', '');
    const diamond = colour.endsWith('Pkg');
    const halo = MARKER_R + 1.2;
    const size = Math.ceil(2 * (diamond ? halo * 1.3 : halo) * dpr) + 2;
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = size;
    const c = canvas.getContext('2d');
    c.setTransform(dpr, 0, 0, dpr, size / 2, size / 2);
    const shape = diamond ? diamondAt : circleAt;
    c.beginPath();
    shape(c, 0, 0, halo);
    c.fillStyle = COLORS.outline;
    c.fill();
    c.beginPath();
    shape(c, 0, 0, MARKER_R);
    c.fillStyle = COLORS[colour];
    c.fill();
    const image = c.getImageData(0, 0, size, size);
    if (stale) for (let i = 3; i < image.data.length; i += 4) image.data[i] = Math.round(image.data[i] * STALE_ALPHA);
    const pixels = new Int32Array(image.data.buffer); // a driver silent for a while: the whole sprite fades
    sprites.kinds[kind] = { size, pixels, spans: rowSpans(pixels, size), ...rowParts(pixels, size) };
  }
  sprites.dpr = dpr;
  badges.clear();
  return sprites.kinds;
}

/** Per row, the [first, last + 1) columns that are not transparent: the blit skips the rest. */
function rowSpans(pixels, size) {
  const spans = new Int16Array(size * 2);
  for (let y = 0; y < size; y++) {
    let first = size;
    let last = -1;
    for (let x = 0; x < size; x++) {
      if ((pixels[y * size + x] >>> ALPHA_SHIFT) & 255) {
        first = Math.min(first, x);
        last = x;
      }
    }
    spans[2 * y] = first;
    spans[2 * y + 1] = last + 1;
  }
  return spans;
}

/**
 * Per row, the opaque middle [solid[2y], solid[2y+1]) copied without a test, and the columns of the
 * other visible pixels (the anti-aliased edge), edgeX[edgeAt[y] .. edgeAt[y + 1]). Marker shapes are
 * convex, so a row's opaque pixels are one run.
 */
function rowParts(pixels, size) {
  const solid = new Int16Array(size * 2);
  const edgeAt = new Int16Array(size + 1);
  const edgeX = [];
  for (let y = 0; y < size; y++) {
    let first = -1;
    let last = -1;
    for (let x = 0; x < size; x++) {
      if (((pixels[y * size + x] >>> ALPHA_SHIFT) & 255) === 255) {
        if (first < 0) first = x;
        last = x + 1;
      }
    }
    solid[2 * y] = first < 0 ? 0 : first;
    solid[2 * y + 1] = first < 0 ? 0 : last;
    edgeAt[y] = edgeX.length;
    for (let x = 0; x < size; x++) {
      const a = (pixels[y * size + x] >>> ALPHA_SHIFT) & 255;
      if (a !== 0 && (first < 0 || x < first || x >= last)) edgeX.push(x);
    }
  }
  edgeAt[size] = edgeX.length;
  return { solid, edgeAt, edgeX: Int16Array.from(edgeX) };
}

/**
 * Copy a sprite centred on (cx, cy) device pixels. Opaque pixels are copied; an anti-aliased
 * edge pixel is copied onto empty pixels (so the edge stays smooth against the map below) and,
 * over another marker, made opaque when mostly covered or else skipped. Exact blending there
 * doubled the frame time in dense views for a difference nobody can see at 5 px. Faded sprites
 * are copied the same way: the map shows through them, not another marker.
 */
export function blit(buf, w, h, sprite, cx, cy) {
  const size = sprite.size;
  const x0 = Math.round(cx - size / 2);
  const y0 = Math.round(cy - size / 2);
  if (x0 >= 0 && y0 >= 0 && x0 + size <= w && y0 + size <= h) return blitInside(buf, w, sprite, x0, y0);
  const { pixels, spans } = sprite; // a sprite cut by the canvas edge: pixel by pixel, clipped
  const xs = Math.max(0, -x0);
  const xe = Math.min(size, w - x0);
  const ye = Math.min(size, h - y0);
  for (let y = Math.max(0, -y0); y < ye; y++) {
    const from = Math.max(xs, spans[2 * y]);
    const to = Math.min(xe, spans[2 * y + 1]);
    let di = (y0 + y) * w + x0 + from;
    let si = y * size + from;
    for (let x = from; x < to; x++, di++, si++) {
      const s = pixels[si];
      const a = (s >>> ALPHA_SHIFT) & 255;
      if (a === 255 || (a !== 0 && buf[di] === 0)) buf[di] = s;
      else if (a >= 128) buf[di] = s | OPAQUE;
    }
  }
}

/** The common case, a sprite wholly inside the canvas: the opaque middle of each row is copied as is
 * (half the time of testing every pixel), only the edge pixels are tested. */
function blitInside(buf, w, sprite, x0, y0) {
  const { size, pixels, solid, edgeAt, edgeX } = sprite;
  for (let y = 0; y < size; y++) {
    const row = (y0 + y) * w + x0;
    const src = y * size;
    for (let k = edgeAt[y], end = edgeAt[y + 1]; k < end; k++) {
      const x = edgeX[k];
      const s = pixels[src + x];
      if (buf[row + x] === 0) buf[row + x] = s;
      else if (((s >>> ALPHA_SHIFT) & 255) >= 128) buf[row + x] = s | OPAQUE;
    }
    for (let x = solid[2 * y], to = solid[2 * y + 1]; x < to; x++) buf[row + x] = pixels[src + x];
  }
}

export function circleAt(ctx, x, y, r) {
  ctx.moveTo(x + r, y);
  ctx.arc(x, y, r, 0, 2 * Math.PI);
}

export function diamondAt(ctx, x, y, r) {
  const s = r * 1.3;
  ctx.moveTo(x, y - s);
  ctx.lineTo(x + s, y);
  ctx.lineTo(x, y + s);
  ctx.lineTo(x - s, y);
  ctx.closePath();
}

// --- Cluster badges: a disc sized by the count, the count in it; one cached canvas per label.

const badges = new Map();

export const badgeRadius = (n) => (n < 10 ? 13 : n < 100 ? 16 : n < 1000 ? 19 : 22);

export function badgeFor(n, dpr, alert) {
  const label = n >= 10000 ? `${Math.floor(n / 1000)}k` : String(n);
  const key = `${label}|${alert ? 1 : 0}`;
  let badge = badges.get(key);
  if (badge) return badge;
  const r = badgeRadius(n);
  const size = Math.ceil((2 * r + 6) * dpr);
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = size;
  const c = canvas.getContext('2d');
  c.setTransform(dpr, 0, 0, dpr, size / 2, size / 2);
  c.beginPath();
  c.arc(0, 0, r + 2, 0, 2 * Math.PI);
  c.fillStyle = alert ? COLORS.alert : 'rgba(255, 255, 255, 0.9)';
  c.fill();
  c.beginPath();
  c.arc(0, 0, r, 0, 2 * Math.PI);
  c.fillStyle = COLORS.cluster;
  c.fill();
  c.font = `700 ${n >= 1000 ? 11 : 12}px system-ui, sans-serif`;
  c.textAlign = 'center';
  c.textBaseline = 'middle';
  c.fillStyle = '#ffffff';
  c.fillText(label, 0, 0.5);
  badge = { canvas, size: size / dpr };
  badges.set(key, badge);
  return badge;
}
