-- Drivers and their events: positions and scans, keyed by (org, driver_id, seq).
CREATE TABLE drivers (
    org text NOT NULL,
    driver_id text NOT NULL,
    name text,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_connected_at timestamptz,
    PRIMARY KEY (org, driver_id)
);
-- (org, driver_id, seq) names one event across positions and scans. Partitioning positions by
-- time later means the primary key must include ts; dedupe then keeps (org, driver_id, seq)
-- unique through the writer's existence check, which reads both tables.
CREATE TABLE positions (
    org text NOT NULL,
    driver_id text NOT NULL,
    seq bigint NOT NULL,
    ts bigint NOT NULL,
    received_at bigint NOT NULL,
    lat double precision NOT NULL,
    lon double precision NOT NULL,
    acc real,
    spd real,
    hdg real,
    alt real,
    bat real,
    PRIMARY KEY (org, driver_id, seq)
);
CREATE INDEX positions_trail ON positions (org, driver_id, ts);
CREATE TABLE scans (
    org text NOT NULL,
    driver_id text NOT NULL,
    seq bigint NOT NULL,
    ts bigint NOT NULL,
    received_at bigint NOT NULL,
    package text NOT NULL,
    event text NOT NULL,
    lat double precision,
    lon double precision,
    temp_c real,
    note text,
    recipient text,
    pod text,
    PRIMARY KEY (org, driver_id, seq)
);
CREATE INDEX scans_package ON scans (org, package, ts);
