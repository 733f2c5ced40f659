// The side panel: the driver and package lists (virtualised, filtered, sorted), the alert feed,
// the tabs, and refreshPanels, which main.js runs on a timer (at most twice a second): it refreshes
// what the dirty flags (map.js) mark as changed, and the relative times once a second.

import {
  $,
  batteryPercent,
  collator,
  el,
  formatBattery,
  formatSpeed,
  formatTime,
  humanise,
  isNum,
  plural,
  relativeTime,
  setText,
} from './util.js';
import { displayName, heldCount, packageFacts, roster, state } from './store.js';
import { dirty } from './map.js';
import { VirtualList } from './virtual-list.js';
import { selectDriver, updateDetails } from './detail.js';
import { allDrivers, fleetSummary } from './fleet.js';
import { openPackage, updatePackageView } from './package-view.js';

// --- Driver and package lists

export const lists = { drivers: null, packages: null };

const DRIVER_SORTS = {
  name: (a, b) => collator.compare(a.name || a.id, b.name || b.id),
  seen: (a, b) => b.ts - a.ts,
  status: (a, b) => b.online - a.online || collator.compare(a.name || a.id, b.name || b.id),
  speed: (a, b) => (b.spd ?? -1) - (a.spd ?? -1),
  battery: (a, b) => (batteryPercent(a.bat) ?? 101) - (batteryPercent(b.bat) ?? 101),
  packages: (a, b) => heldCount(b.id) - heldCount(a.id) || collator.compare(a.name || a.id, b.name || b.id),
};

function createDriverRow() {
  const row = el('div', 'row drv');
  row.setAttribute('role', 'option');
  row.dataset.testid = 'driver-row';
  for (const cls of ['sym', 'r-name', 'r-stats', 'r-meta', 'r-pkgs']) row.append(el('span', cls));
  return row;
}

function updateDriverRow(row, d) {
  const held = heldCount(d.id);
  const now = Date.now();
  const inView = state.drivers.get(d.id) === d;
  row.dataset.driver = d.id;
  row.dataset.online = String(d.online);
  row.dataset.inView = String(inView);
  row.setAttribute('aria-selected', String(d.id === state.selected));
  const [sym, name, stats, meta, pkgs] = row.children;
  sym.className = `sym ${symClass(d.online, held > 0)}`;
  setText(name, d.name || d.id);
  setText(stats, `${formatSpeed(d.spd)} · ${formatBattery(d.bat)}`);
  const where = inView ? '' : ' · elsewhere';
  setText(meta, `${d.online ? 'online' : 'offline'} · ${d.name ? `${d.id} · ` : ''}${relativeTime(d.ts, now)}${where}`);
  setText(pkgs, held ? plural(held, 'pkg') : '');
  row.title = `Last position ${formatTime(d.ts)}`;
}


const symClass = (online, pkg) => `sym-${online ? 'on' : 'off'}${pkg ? '-pkg' : ''}`;

function refreshDriverList() {
  const query = $('driver-filter').value.trim().toLowerCase();
  const sort = DRIVER_SORTS[$('driver-sort').value] ?? DRIVER_SORTS.name;
  // The whole fleet, not only the drivers in the map view: a search finds a driver in another city.
  const all = allDrivers();
  const items = sortDrivers(query ? all.filter((d) => d.search.includes(query)) : all, sort, query);
  lists.drivers.setItems(items);
  const online = all.reduce((n, d) => n + (d.online ? 1 : 0), 0);
  setText($('count-drivers'), String(all.length));
  const inView = state.drivers.size;
  setText(
    $('driver-summary'),
    query
      ? `${items.length} of ${plural(all.length, 'driver')} match`
      : `${plural(all.length, 'driver')} · ${online} online · ${inView} in this area`,
  );
}

// Sorting 5,000 drivers by name with Intl.Collator takes ~15 ms, twice a second: a dropped frame
// each time. Names do not move, so the name order is reused until the roster changes.
const nameOrder = { version: -1, query: null, items: null };
function sortDrivers(items, sort, query) {
  if (sort !== DRIVER_SORTS.name) return items.sort(sort);
  if (nameOrder.version === roster.version && nameOrder.query === query && nameOrder.items.length === items.length) {
    return nameOrder.items;
  }
  items.sort(sort);
  Object.assign(nameOrder, { version: roster.version, query, items });
  return items;
}

/** The fleet summary above the tabs: the whole org (or the client's scope), never only the view. */
function refreshFleetSummary() {
  const s = fleetSummary();
  const parts = [
    plural(s.drivers, 'driver'),
    `${s.online} online`,
    `${s.offline} offline`,
    `${s.carrying} carrying`,
    `${plural(s.late, 'late package')}`,
    plural(s.alerts, 'open alert'),
  ];
  setText($('fleet-summary'), parts.join(' · '));
  const box = $('fleet-summary');
  box.dataset.drivers = String(s.drivers);
  box.dataset.online = String(s.online);
  box.dataset.offline = String(s.offline);
  box.dataset.carrying = String(s.carrying);
  box.dataset.late = String(s.late);
  box.dataset.alerts = String(s.alerts);
}

function createPackageRow() {
  const row = el('div', 'row pkg');
  row.setAttribute('role', 'option');
  row.dataset.testid = 'package-row';
  row.append(el('span', 'r-name'), el('span', 'badge'), el('span', 'r-meta'), el('span', 'r-pkgs'));
  return row;
}

function updatePackageRow(row, p) {
  row.dataset.package = p.package;
  row.dataset.state = String(p.state ?? '');
  const [name, badge, meta, extra] = row.children;
  setText(name, p.package);
  setText(badge, p.state ? humanise(p.state) : 'Unknown');
  badge.className = `badge state-${String(p.state ?? 'unknown').replace(/[^a-z_]/gi, '')}`;
  const who = p.holder ?? p.driver;
  const parts = [];
  if (who != null) parts.push(`${p.holder ? 'with' : 'driver'} ${displayName(String(who))}`);
  if (p.client != null) parts.push(`client ${p.client}`);
  const facts = packageFacts(p.package);
  const dest = describeDestination(facts.destination);
  if (dest) parts.push(`to ${dest}`);
  if (isNum(facts.window?.to) && facts.window.to < Date.now() && !['delivered', 'returned'].includes(p.state)) {
    parts.push('late');
  }
  const eta = facts.state === 'picked_up' && isNum(facts.eta?.ts) ? facts.eta.ts : null;
  if (eta) parts.push(`ETA ${new Date(eta).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })}`);
  setText(meta, parts.join(' · ') || '–');
  setText(extra, p.lastEvent ? `${humanise(p.lastEvent)} ${relativeTime(p.lastEventTs)}` : '');
}

export function describeDestination(dest) {
  if (!dest) return '';
  if (typeof dest === 'string') return dest;
  for (const key of ['name', 'label', 'address', 'city']) {
    if (typeof dest[key] === 'string' && dest[key]) return dest[key];
  }
  if (isNum(dest.lat) && isNum(dest.lon)) return `${dest.lat.toFixed(3)}, ${dest.lon.toFixed(3)}`;
  return '';
}

function refreshPackageList() {
  const query = $('package-filter').value.trim().toLowerCase();
  const all = [...state.packages.values()].filter((p) => !p.stub);
  const matches = (p) =>
    [p.package, p.state, p.client, p.holder && displayName(p.holder), p.driver, describeDestination(packageFacts(p.package).destination)]
      .filter(Boolean)
      .some((s) => String(s).toLowerCase().includes(query));
  const items = query ? all.filter(matches) : all;
  // Packages in someone's hands first: those are the ones a dispatcher follows.
  items.sort((a, b) => (b.holder ? 1 : 0) - (a.holder ? 1 : 0) || collator.compare(a.package, b.package));
  lists.packages.setItems(items);
  setText($('count-packages'), String(all.length));
  setText(
    $('package-summary'),
    query ? `${items.length} of ${plural(all.length, 'package')} match` : plural(all.length, 'package'),
  );
}

// --- Alert feed

function refreshAlerts() {
  const openOnly = $('alerts-open-only').checked;
  const all = [...state.alerts.values()];
  const open = all.filter((a) => a.state !== 'resolved').length;
  setText($('count-alerts'), String(open));
  $('tab-alerts').classList.toggle('has-open', open > 0);
  const shown = all
    .filter((a) => !openOnly || a.state !== 'resolved')
    .sort((a, b) => (b.ts ?? 0) - (a.ts ?? 0))
    .slice(0, 200);
  const list = $('alert-list');
  list.replaceChildren(...shown.map(alertItem));
  if (!shown.length) list.append(el('li', 'empty', openOnly ? 'No open alerts.' : 'No alerts.'));
}

function alertItem(a) {
  const li = el('li', `alert ${a.state === 'resolved' ? 'resolved' : 'open'}`);
  li.dataset.testid = 'alert-item';
  li.dataset.alert = a.id;
  li.dataset.state = String(a.state ?? 'open');
  const head = el('div', 'alert-head');
  const badge = el('span', 'badge', a.state === 'resolved' ? 'Resolved' : 'Open');
  head.append(el('strong', '', humanise(a.kind ?? 'alert')), badge);
  li.append(head);
  if (a.message) li.append(el('p', 'alert-msg', String(a.message)));
  li.append(el('p', 'alert-meta', alertMeta(a)));
  if (a.driver != null) {
    const button = el('button', 'btn btn-quiet btn-small', 'Show driver');
    button.type = 'button';
    button.addEventListener('click', () => selectDriver(String(a.driver)));
    li.append(button);
  }
  return li;
}

function alertMeta(a) {
  const about = [];
  if (a.driver != null) about.push(displayName(String(a.driver)));
  if (a.package != null) about.push(String(a.package));
  return [...about, relativeTime(a.ts)].join(' · ');
}

// Rebuilding the feed would drop keyboard focus from its buttons: only the times change here.
function ageAlertTimes() {
  for (const li of $('alert-list').children) {
    const a = state.alerts.get(li.dataset.alert ?? '');
    const meta = li.querySelector('.alert-meta');
    if (a && meta) setText(meta, alertMeta(a));
  }
}

// --- Refresh and tabs

/** Runs every LIST_REFRESH_MS: lists, counts and details, never more often. */
let lastFullRefresh = 0;
export function refreshPanels() {
  const now = Date.now();
  const stale = now - lastFullRefresh >= 1000; // relative times move even when nothing else does
  const tab = activeTab();
  if ((dirty.drivers || stale) && tab === 'drivers') refreshDriverList();
  else if (dirty.drivers) setText($('count-drivers'), String(allDrivers().length));
  if ((dirty.packages || dirty.drivers || stale) && tab === 'packages') refreshPackageList();
  else if (dirty.packages) setText($('count-packages'), String(countPackages()));
  if (dirty.alerts) refreshAlerts();
  else if (stale && tab === 'alerts') ageAlertTimes();
  if (state.selected) updateDetails();
  if (state.selectedPackage && (dirty.packages || stale)) updatePackageView();
  if (dirty.drivers || dirty.packages || dirty.alerts || stale) refreshFleetSummary();
  if (stale) lastFullRefresh = now;
  dirty.drivers = dirty.packages = dirty.alerts = false;
}

function countPackages() {
  let n = 0;
  for (const p of state.packages.values()) if (!p.stub) n += 1;
  return n;
}

export const TABS = ['drivers', 'packages', 'alerts'];
const activeTab = () => TABS.find((t) => $(`tab-${t}`).getAttribute('aria-selected') === 'true');

export function selectTab(name, focus = false) {
  for (const t of TABS) {
    const on = t === name;
    const tab = $(`tab-${t}`);
    tab.setAttribute('aria-selected', String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  dirty.drivers = dirty.packages = dirty.alerts = true;
  refreshPanels();
}

export function setupLists() {
  lists.drivers = new VirtualList($('driver-list'), {
    rowHeight: 52,
    createRow: createDriverRow,
    updateRow: updateDriverRow,
    keyOf: (d) => d.id,
    onActivate: (d) => selectDriver(d.id),
  });
  lists.packages = new VirtualList($('package-list'), {
    rowHeight: 52,
    createRow: createPackageRow,
    updateRow: updatePackageRow,
    keyOf: (p) => p.package,
    onActivate: (p) => openPackage(p.package),
  });
}
