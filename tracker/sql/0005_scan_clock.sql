-- The clock offset of the phone's connection when a scan was received (ms to add to its `ts` to
-- get the server's clock, an upper bound: DriverConn.clock_offset), or null before any fix of that
-- connection. Written at ingest and never changed, so that whatever orders scans by corrected
-- time (custody/state.py) stays a pure function of the stored rows, whatever order they came in.
ALTER TABLE scans ADD COLUMN offset_ms bigint;
