// Route replay of the selected driver: a time slider over its trail (GET /v1/drivers/{id}/trail,
// loaded by detail.js) and a play button. The map draws the route up to the slider's position
// strong, the rest faint, and a disc where the driver was then (overlay.js).

import { REPLAY_STEP_MS } from './constants.js';
import { $, formatTime, isNum, setText } from './util.js';
import { latOf, lonOf } from './geo.js';
import { state } from './store.js';
import { markOverlay } from './map.js';

const timers = { play: 0 };

/** The history changed (loaded, or grew live): size the slider, keep a replay in progress. */
export function syncReplay() {
  const n = state.history?.points.length ?? 0;
  const box = $('replay');
  box.hidden = n < 2;
  const slider = $('replay-slider');
  slider.max = String(Math.max(0, n - 1));
  if (state.replay.index < 0 || state.replay.index >= n) slider.value = slider.max;
  showTime();
}

/** Stop replaying and show the whole route again. */
export function resetReplay() {
  stop();
  state.replay.index = -1;
  $('replay').hidden = true;
}

function showTime() {
  const pts = state.history?.points ?? [];
  const i = state.replay.index >= 0 ? state.replay.index : pts.length - 1;
  const p = pts[i];
  const text = !p ? '' : isNum(p.ts) ? formatTime(p.ts) : `position ${i + 1} of ${pts.length}`;
  setText($('replay-time'), state.replay.index >= 0 ? text : text && `${text} (latest)`);
}

function seek(i) {
  const n = state.history?.points.length ?? 0;
  if (n < 2) return;
  state.replay.index = Math.max(0, Math.min(n - 1, i));
  $('replay-slider').value = String(state.replay.index);
  showTime();
  markOverlay();
}

function stop() {
  clearInterval(timers.play);
  timers.play = 0;
  state.replay.playing = false;
  setText($('replay-play'), 'Play');
}

function play() {
  const n = state.history?.points.length ?? 0;
  if (n < 2) return;
  if (state.replay.index < 0 || state.replay.index >= n - 1) seek(0);
  state.replay.playing = true;
  setText($('replay-play'), 'Pause');
  const step = Math.max(1, Math.round(n / 300)); // a whole route plays in about 20 s
  timers.play = setInterval(() => {
    const last = (state.history?.points.length ?? 0) - 1;
    if (state.replay.index >= last) return stop();
    seek(state.replay.index + step);
  }, REPLAY_STEP_MS);
}

/** The replay as the test hook reports it. */
export function replayState() {
  const pts = state.history?.points ?? [];
  const i = state.replay.index;
  const p = i >= 0 ? pts[i] : null;
  return {
    index: i,
    count: pts.length,
    playing: state.replay.playing,
    ts: p?.ts ?? null,
    lon: p ? lonOf(p.mx) : null,
    lat: p ? latOf(p.my) : null,
  };
}

export function setupReplay() {
  $('replay-slider').addEventListener('input', (e) => {
    stop();
    seek(Number(e.target.value));
  });
  $('replay-play').addEventListener('click', () => (state.replay.playing ? stop() : play()));
  $('replay-live').addEventListener('click', () => {
    stop();
    state.replay.index = -1;
    syncReplay();
    markOverlay();
  });
}
