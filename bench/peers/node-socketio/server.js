#!/usr/bin/env node
// The stack a team would otherwise pick, doing tracker's job for the benchmarks: Socket.IO with
// its Redis adapter (so several instances share rooms), positions batched into PostgreSQL with a
// multi-row INSERT ... ON CONFLICT DO NOTHING, and the driver's ack sent after the commit.
//
//   PORT=8101 DATABASE_URL=postgresql://... REDIS_URL=redis://127.0.0.1:6390 JWT_SECRET=... node server.js
//
// Drivers connect with auth {token} (an HS256 JWT, role driver) and emit `pos` events
// ({seq, ts, lat, lon, acc, spd, hdg, alt, bat}) with an ack callback; dashboards (role
// dispatcher) join the room of their org and receive `pos` events ({driver, ...}).
// Written the way the Socket.IO documentation shows it, plus the batching a team would add.
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const { Pool } = require("pg");
const jwt = require("jsonwebtoken");

const PORT = Number(process.env.PORT || 8101);
const SECRET = process.env.JWT_SECRET;
const FLUSH_MS = 20;
const FLUSH_MAX = 5000;
const COLS = ["org", "driver_id", "seq", "ts", "received_at", "lat", "lon", "acc", "spd", "hdg", "alt", "bat"];

const SCHEMA = `
CREATE TABLE IF NOT EXISTS positions (
  org text NOT NULL, driver_id text NOT NULL, seq bigint NOT NULL, ts bigint NOT NULL,
  received_at bigint NOT NULL, lat double precision NOT NULL, lon double precision NOT NULL,
  acc real, spd real, hdg real, alt real, bat real,
  PRIMARY KEY (org, driver_id, seq));
CREATE INDEX IF NOT EXISTS positions_trail ON positions (org, driver_id, ts);`;

const sqlCache = new Map();
function insertSql(n) {
  let sql = sqlCache.get(n);
  if (!sql) {
    const rows = [];
    for (let r = 0; r < n; r++) {
      const p = [];
      for (let c = 0; c < COLS.length; c++) p.push("$" + (r * COLS.length + c + 1));
      rows.push("(" + p.join(",") + ")");
    }
    sql = `INSERT INTO positions (${COLS.join(",")}) VALUES ${rows.join(",")} ON CONFLICT DO NOTHING`;
    sqlCache.set(n, sql);
  }
  return sql;
}

async function main() {
  const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 8 });
  await pool.query(SCHEMA);
  const pub = createClient({ url: process.env.REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, { transports: ["websocket"], perMessageDeflate: false,
    maxHttpBufferSize: 65536, serveClient: false });
  io.adapter(createAdapter(pub, sub));

  // The batch writer: flush on size or after FLUSH_MS, two flushes in flight, ack after commit.
  let buffer = [];
  let timer = null;
  let inFlight = 0;
  const flush = async () => {
    timer = null;
    if (!buffer.length || inFlight >= 2) { if (buffer.length && !timer) timer = setTimeout(flush, FLUSH_MS); return; }
    const batch = buffer.splice(0, FLUSH_MAX);
    inFlight++;
    const params = [];
    for (const it of batch) params.push(...it.row);
    try {
      await pool.query(insertSql(batch.length), params);
      for (const it of batch) it.ack(true);
    } catch (e) {
      console.error("insert failed:", e.message);
      for (const it of batch) it.ack({ error: "unavailable" });
    } finally {
      inFlight--;
      if (buffer.length && !timer) timer = setTimeout(flush, buffer.length >= FLUSH_MAX ? 0 : FLUSH_MS);
    }
  };
  const submit = (item) => {
    buffer.push(item);
    if (buffer.length >= FLUSH_MAX) { if (timer) clearTimeout(timer); timer = null; flush(); }
    else if (!timer) timer = setTimeout(flush, FLUSH_MS);
  };

  io.use((socket, next) => {
    try {
      socket.data.p = jwt.verify(socket.handshake.auth.token, SECRET, { algorithms: ["HS256"], audience: "tracker" });
      next();
    } catch (e) {
      next(new Error("unauthorized"));
    }
  });

  io.on("connection", (socket) => {
    const { role, org, sub: driver } = socket.data.p;
    if (role !== "driver") {
      socket.join("org:" + org);
      return;
    }
    const room = io.to("org:" + org);
    socket.on("pos", (p, ack) => {
      if (typeof ack !== "function" || !p || !Number.isSafeInteger(p.seq) || p.seq < 1 || !Number.isSafeInteger(p.ts) ||
          typeof p.lat !== "number" || Math.abs(p.lat) > 90 || typeof p.lon !== "number" || Math.abs(p.lon) > 180) {
        if (typeof ack === "function") ack({ error: "invalid" });
        return;
      }
      const now = Date.now();
      submit({ row: [org, driver, p.seq, p.ts, now, p.lat, p.lon, p.acc ?? null, p.spd ?? null, p.hdg ?? null,
        p.alt ?? null, p.bat ?? null], ack });
      room.emit("pos", { driver, seq: p.seq, ts: p.ts, lat: p.lat, lon: p.lon, acc: p.acc, spd: p.spd, hdg: p.hdg,
        alt: p.alt, bat: p.bat });
    });
  });

  httpServer.listen(PORT, "127.0.0.1", () => console.log(`node-socketio peer listening on ${PORT}`));
  const stop = () => { io.close(); pool.end().finally(() => process.exit(0)); setTimeout(() => process.exit(0), 2000); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => { console.error(e); process.exit(1); });
