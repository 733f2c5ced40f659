// VirtualList: the scrolling list behind the driver and package panels (panels.js).

import { clamp } from './util.js';

/**
 * A virtualised list: only the rows in (and just around) the scrolled window exist in the DOM,
 * so 5,000 drivers cost the same as 30. Rows are keyed, so a row keeps its element while it
 * stays visible (focus and hover survive a refresh).
 */
export class VirtualList {
  constructor(container, { rowHeight, createRow, updateRow, keyOf, onActivate }) {
    Object.assign(this, { container, rowHeight, createRow, updateRow, keyOf, onActivate });
    this.spacer = container.querySelector('.vlist-spacer');
    this.items = [];
    this.rows = new Map();
    this.pool = [];
    this.activeKey = null;
    this.revealKey = null; // scroll to this row at the next setItems (selected on the map)
    this.frame = 0;
    container.tabIndex = 0;
    container.addEventListener('scroll', () => this.renderSoon(), { passive: true });
    container.addEventListener('click', (e) => this.onClick(e));
    container.addEventListener('keydown', (e) => this.onKey(e));
  }

  setItems(items) {
    this.items = items;
    this.spacer.style.height = `${items.length * this.rowHeight}px`;
    if (this.revealKey != null && this.container.clientHeight > 0) {
      const i = items.findIndex((it) => this.keyOf(it) === this.revealKey);
      this.revealKey = null;
      if (i >= 0) this.scrollToIndex(i);
    }
    this.render();
  }

  scrollToIndex(i) {
    const h = this.rowHeight;
    const c = this.container;
    if (i * h < c.scrollTop) c.scrollTop = i * h;
    else if ((i + 1) * h > c.scrollTop + c.clientHeight) c.scrollTop = (i + 1) * h - c.clientHeight;
  }

  renderSoon() {
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    const { scrollTop, clientHeight } = this.container;
    if (clientHeight === 0) return; // hidden tab: render when shown
    const h = this.rowHeight;
    const first = Math.max(0, Math.floor(scrollTop / h) - 5);
    const last = Math.min(this.items.length, Math.ceil((scrollTop + clientHeight) / h) + 5);
    const next = new Map();
    for (let i = first; i < last; i++) {
      const item = this.items[i];
      const key = this.keyOf(item);
      let row = this.rows.get(key);
      if (row) this.rows.delete(key);
      else row = this.pool.pop() ?? this.createRow();
      next.set(key, row);
      this.place(row, i, key);
      this.updateRow(row, item);
      if (!row.isConnected) this.container.appendChild(row);
    }
    for (const row of this.rows.values()) this.recycle(row);
    this.rows = next;
  }

  place(row, i, key) {
    row.dataset.index = String(i);
    row.style.transform = `translateY(${i * this.rowHeight}px)`;
    row.setAttribute('aria-posinset', String(i + 1));
    row.setAttribute('aria-setsize', String(this.items.length));
    row.tabIndex = -1; // the list itself is the one tab stop; arrows move between rows
    row.classList.toggle('active', key === this.activeKey);
  }

  recycle(row) {
    if (row.contains(document.activeElement)) this.container.focus({ preventScroll: true });
    row.remove();
    this.pool.push(row);
  }

  onClick(e) {
    const row = e.target.closest('[data-index]');
    if (!row) return;
    const item = this.items[Number(row.dataset.index)];
    if (item) {
      this.activeKey = this.keyOf(item);
      this.onActivate(item);
    }
  }

  onKey(e) {
    const n = this.items.length;
    if (!n) return;
    const page = Math.max(1, Math.floor(this.container.clientHeight / this.rowHeight) - 1);
    const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: page, PageUp: -page, Home: -n, End: n };
    const current = this.activeKey == null ? -1 : this.items.findIndex((it) => this.keyOf(it) === this.activeKey);
    if (e.key in moves) {
      e.preventDefault();
      this.focusIndex(clamp(current < 0 ? 0 : current + moves[e.key], 0, n - 1));
    } else if ((e.key === 'Enter' || e.key === ' ') && current >= 0) {
      e.preventDefault();
      this.onActivate(this.items[current]);
    }
  }

  focusIndex(i) {
    this.scrollToIndex(i);
    this.activeKey = this.keyOf(this.items[i]);
    this.render();
    this.rows.get(this.activeKey)?.focus({ preventScroll: true });
  }
}
