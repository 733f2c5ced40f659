// The printable custody report (report.html): GET /v1/packages/{id}/report, rendered as it was
// signed. Opened from the dashboard's package view with `#package=<id>&token=<jwt>` in the
// fragment (never the query string); the fragment is wiped from the address bar at once and the
// token kept in this tab's sessionStorage, so a reload still works.

const KEY = 'tracker.report';

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text != null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function time(ms) {
  return Number.isFinite(ms) ? new Date(ms).toISOString().replace('T', ' ').replace('Z', ' UTC') : '–';
}

function facts(dl, rows) {
  dl.replaceChildren();
  for (const [k, v] of rows) {
    dl.append(el('dt', k), el('dd', v == null || v === '' ? '–' : v));
  }
}

function target() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has('package')) {
    const saved = { package: fragment.get('package'), token: fragment.get('token') || '' };
    sessionStorage.setItem(KEY, JSON.stringify(saved));
    history.replaceState(history.state, '', location.pathname);
    return saved;
  }
  try {
    return JSON.parse(sessionStorage.getItem(KEY) || 'null');
  } catch {
    return null;
  }
}

function renderVerify(r) {
  const v = r.verify;
  const verdict = $('report-verdict');
  verdict.textContent = v.ok ? 'Chain of custody intact' : 'Chain of custody NOT intact';
  verdict.className = `verdict ${v.ok ? 'ok' : 'bad'}`;
  verdict.dataset.ok = String(v.ok);
  const cp = r.checkpoint;
  facts($('report-verify'), [
    ['Records', v.length],
    ['Chained by the recovery sweep', v.recovered],
    ['Stored, not chained yet', v.unchained],
    ['Chain head', r.head.head ? `${r.head.length} · ${r.head.head}` : 'none'],
    ['Latest signed checkpoint', cp ? `${cp.length} records at ${time(cp.at)} · ${cp.head}` : 'none yet'],
  ]);
  $('report-problems').replaceChildren(
    ...v.problems.map((p) => el('li', `${p.index == null ? 'chain' : `record ${p.index}`}: ${p.problem}`)),
  );
}

function renderPackage(r) {
  const p = r.package;
  const dest = p.destination;
  const win = p.window;
  const cold = p.cold_chain;
  facts($('report-package'), [
    ['Package', p.package],
    ['Client', p.client],
    ['State', p.state],
    ['Driver', p.driver],
    ['Consigned', time(p.consigned_at)],
    ['Destination', dest ? `${dest.name ?? ''} (${dest.lat}, ${dest.lon})` : null],
    ['Delivery window', win ? `${time(win.from)} to ${time(win.to)}` : null],
    ['Cold chain', cold ? `${cold.min_c ?? ''} to ${cold.max_c ?? ''} °C` : null],
    ['Arrived at the destination', p.arrived_at ? time(p.arrived_at) : null],
    ['Left the destination', p.departed_at ? time(p.departed_at) : null],
    ['Notes', p.notes],
  ]);
}

function renderCustody(r) {
  $('report-custody').replaceChildren(
    ...r.custody.map((c) => {
      const tr = el('tr');
      tr.dataset.testid = 'report-record';
      tr.dataset.event = c.event ?? 'missing';
      const where = c.lat == null ? '' : `${c.lat}, ${c.lon}`;
      const pod = [c.recipient, c.pod].filter(Boolean).join(' · ');
      const flags = `${c.recovered ? ' (recovered)' : ''}${c.missing ? ' (scan row missing)' : ''}`;
      tr.append(
        el('td', c.index),
        el('td', `${c.event ?? '–'}${flags}`),
        el('td', `${c.driver} #${c.seq}`),
        el('td', time(c.ts)),
        el('td', time(c.received_at)),
        el('td', where),
        el('td', c.temp_c ?? ''),
        el('td', pod),
        el('td', (c.alerts || []).join(' ')),
      );
      return tr;
    }),
  );
}

function renderAlerts(r) {
  $('report-alerts').replaceChildren(
    ...r.alerts.map((a) => {
      const tr = el('tr');
      tr.append(el('td', a.id), el('td', a.kind), el('td', a.state), el('td', time(a.opened_at)), el('td', a.message));
      return tr;
    }),
  );
}

function render(body) {
  const r = body.report;
  const s = body.signature;
  document.title = `Custody report · ${r.package.package}`;
  $('report-title').textContent = `Custody report · package ${r.package.package}`;
  $('report-note').textContent = `Organisation ${r.org}; generated ${time(r.generated_at)} for ${r.generated_for.sub} (${r.generated_for.role}).`;
  renderVerify(r);
  renderPackage(r);
  renderCustody(r);
  renderAlerts(r);
  const sig = $('report-signature');
  facts(sig, [
    ['Algorithm', s.alg],
    ['Key id', s.key_id],
    ['Public key (base64)', s.public_key],
    ['Signature (base64)', s.value],
  ]);
  const blob = new Blob([JSON.stringify(body, null, 1)], { type: 'application/json' });
  const link = $('report-download');
  link.href = URL.createObjectURL(blob);
  link.download = `custody-report-${r.package.package.replace(/[^A-Za-z0-9._-]/g, '_')}.json`;
  link.hidden = false;
  $('report-print').disabled = false;
  $('report').setAttribute('aria-busy', 'false');
  $('report').dataset.loaded = 'true';
}

async function main() {
  $('report-print').addEventListener('click', () => window.print());
  const t = target();
  if (!t || !t.package) {
    $('report-note').textContent = 'No package named: open this page from the dashboard\'s package view.';
    return;
  }
  try {
    const res = await fetch(`/v1/packages/${encodeURIComponent(t.package)}/report`, {
      headers: t.token ? { Authorization: `Bearer ${t.token}` } : {},
      cache: 'no-store',
    });
    if (!res.ok) throw new Error(res.status === 404 ? 'no such package in your scope' : `HTTP ${res.status}`);
    render(await res.json());
  } catch (err) {
    $('report-note').textContent = `Report unavailable (${err.message}).`;
  }
}

main();
