-- A scan's seal: a MAC of the row's content computed by the service before its INSERT, with a key
-- the database never sees (`Extension.seal`; the custody extension's is custody/chain.py `seal`).
-- Null when no extension seals (the core alone) and for rows stored before this migration. Only a
-- row whose seal verifies may enter a chain of custody: a row written behind the service's back
-- cannot (custody/process.py).
ALTER TABLE scans ADD COLUMN seal bytea;
