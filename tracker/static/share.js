// The recipient's tracking page: the link token is the URL fragment (/share#<token>), sent only
// as an Authorization header, never in a URL. Live by server-sent events read with fetch (so the
// token stays in a header); if the feed breaks, polling every 10 s until the feed is back.
const POLL_MS = 10000;
const RETRY_LIVE_MS = 30000;
const EARTH_M = 6371008.8;

const $ = (id) => document.getElementById(id);
const token = decodeURIComponent(location.hash.slice(1));
const headers = { Authorization: `Bearer ${token}` };
let pollTimer = null;
let retryTimer = null;

const HEADLINES = {
  created: 'Your delivery is being prepared',
  picked_up: 'Your delivery is on its way',
  delivered: 'Delivered',
  failed: 'The delivery could not be made',
  returned: 'Your delivery went back to the depot',
};

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function distanceM(a, b) {
  const rad = Math.PI / 180;
  const h = Math.sin((b.lat - a.lat) * rad / 2) ** 2
    + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin((b.lon - a.lon) * rad / 2) ** 2;
  return 2 * EARTH_M * Math.asin(Math.min(1, Math.sqrt(h)));
}

function renderRadar(view) {
  const radar = $('radar');
  const d = view.driver;
  const dest = view.destination;
  if (!d || !dest) {
    radar.hidden = true;
    $('radar-text').textContent = '';
    return;
  }
  const dist = distanceM(d, dest);
  // The destination in the centre; the van on a scale whose outer ring is the next "round" distance.
  const scale = [500, 1000, 2000, 5000, 10000, 20000, 50000, 1e9].find((m) => dist <= m);
  const dx = (d.lon - dest.lon) * Math.cos(dest.lat * Math.PI / 180);
  const dy = d.lat - dest.lat;
  const norm = Math.hypot(dx, dy) || 1;
  const r = Math.min(90, (dist / scale) * 90);
  $('van').setAttribute('cx', String((dx / norm) * r));
  $('van').setAttribute('cy', String((-dy / norm) * r));
  const km = dist >= 1000 ? `${(dist / 1000).toFixed(1)} km` : `${Math.round(dist / 10) * 10} m`;
  const who = d.name ? `${d.name} is` : 'The driver is';
  $('radar-text').textContent = `${who} ${km} away (as of ${clock(d.ts)})`;
  radar.hidden = false;
}

function render(view) {
  const card = $('card');
  card.dataset.state = view.state;
  $('package').textContent = view.package;
  $('headline').textContent = HEADLINES[view.state] || view.state;
  const eta = $('eta');
  if (view.eta) {
    const minutes = Math.max(1, Math.round((view.eta.ts - Date.now()) / 60000));
    eta.textContent = `Arriving around ${clock(view.eta.ts)} (in about ${minutes} min)`;
    eta.hidden = false;
  } else {
    eta.textContent = '';
    eta.hidden = true;
  }
  renderRadar(view);
  const dest = view.destination;
  $('dest').textContent = dest ? (dest.name || `${dest.lat.toFixed(4)}, ${dest.lon.toFixed(4)}`) : '—';
  const win = view.window;
  const showWindow = Boolean(win && (win.from || win.to));
  $('window').hidden = !showWindow;
  $('window-label').hidden = !showWindow;
  if (showWindow) {
    $('window').textContent = [win.from && clock(win.from), win.to && clock(win.to)].filter(Boolean).join(' – ');
  }
  if (view.state === 'delivered' && view.ts) {
    $('headline').textContent = `Delivered at ${clock(view.ts)}`;
  }
}

function renderGone(message) {
  $('card').dataset.state = 'gone';
  $('headline').textContent = message || 'This tracking link no longer works';
  $('eta').hidden = true;
  $('radar').hidden = true;
  stopPolling();
  $('status').textContent = 'Ask the sender for a new link if you still need one.';
}

async function poll() {
  try {
    const res = await fetch('/v1/share', { headers, cache: 'no-store' });
    if (res.status === 404 || res.status === 410 || res.status === 401) {
      const body = await res.json().catch(() => ({}));
      renderGone(body.error && body.error.message);
      return false;
    }
    if (res.ok) {
      render(await res.json());
      $('status').textContent = `Updated ${clock(Date.now())} (refreshing every ${POLL_MS / 1000} s)`;
    }
  } catch (err) {
    $('status').textContent = 'Offline: trying again…';
  }
  return true;
}

function stopPolling() {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = null;
}

function startPolling() {
  if (!pollTimer) {
    poll();
    pollTimer = setInterval(poll, POLL_MS);
  }
  if (!retryTimer) {
    retryTimer = setTimeout(() => {
      retryTimer = null;
      live();
    }, RETRY_LIVE_MS);
  }
}

function handleEvent(name, data) {
  if (name === 'view') {
    render(JSON.parse(data));
    $('status').textContent = `Live · updated ${clock(Date.now())}`;
  } else if (name === 'gone') {
    const body = JSON.parse(data);
    renderGone(body.error && body.error.message);
  }
}

async function live() {
  if ($('card').dataset.state === 'gone') return;
  let res;
  try {
    res = await fetch('/v1/share/events', { headers, cache: 'no-store' });
  } catch (err) {
    startPolling();
    return;
  }
  if (res.status === 404 || res.status === 410 || res.status === 401) {
    const body = await res.json().catch(() => ({}));
    renderGone(body.error && body.error.message);
    return;
  }
  if (!res.ok || !res.body) {
    startPolling();
    return;
  }
  stopPolling();
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event: ')) name = line.slice(7);
          else if (line.startsWith('data: ')) data.push(line.slice(6));
        }
        if (data.length) handleEvent(name, data.join('\n'));
      }
    }
  } catch (err) {
    // The feed broke: fall through to polling.
  }
  if ($('card').dataset.state !== 'gone') startPolling();
}

if (!token) {
  renderGone('This link is incomplete: open the whole link you were sent.');
} else {
  live();
}
