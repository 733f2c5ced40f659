-- Packages and chain of custody (tracker/custody/). A package row exists for every package
-- scanned or consigned: `consigned_at` is null for one scanned but never consigned. `state`,
-- `holder` and `state_ts` are derived (a replay of the chained scans); `chain_len`/`chain_head`
-- are the custody chain's head and `head_tag` MACs them with the consignment (custody/chain.py).
CREATE TABLE packages (
    org text NOT NULL,
    package_id text NOT NULL,
    client text,
    consigned_at bigint,
    consigned_by text,
    dest_name text,
    dest_lat double precision,
    dest_lon double precision,
    window_from bigint,
    window_to bigint,
    temp_min double precision,
    temp_max double precision,
    notes text,
    state text NOT NULL DEFAULT 'created',
    holder text,
    state_ts bigint,
    chain_len integer NOT NULL DEFAULT 0,
    chain_head bytea,
    head_tag bytea,
    PRIMARY KEY (org, package_id)
);
CREATE INDEX packages_client ON packages (org, client, package_id);
CREATE INDEX packages_holder ON packages (org, holder) WHERE state = 'picked_up';
-- One record per chained scan, in the order the scans were stored; the scan's content stays in
-- `scans` and is covered by `mac` (HMAC-SHA256 with a key kept outside the database).
CREATE TABLE custody (
    org text NOT NULL,
    package_id text NOT NULL,
    idx integer NOT NULL,
    driver_id text NOT NULL,
    seq bigint NOT NULL,
    chained_at bigint NOT NULL,
    recovered boolean NOT NULL DEFAULT false,
    mac bytea NOT NULL,
    PRIMARY KEY (org, package_id, idx),
    UNIQUE (org, driver_id, seq)
);
CREATE TABLE alerts (
    org text NOT NULL,
    id text NOT NULL,
    kind text NOT NULL,
    reason text NOT NULL DEFAULT '',
    state text NOT NULL,
    package_id text,
    driver_id text,
    seq bigint,
    message text,
    opened_at bigint NOT NULL,
    ts bigint NOT NULL,
    PRIMARY KEY (org, id)
);
CREATE INDEX alerts_open ON alerts (org, package_id) WHERE state = 'open';
CREATE INDEX alerts_package ON alerts (org, package_id);
-- Scans committed but not chained (a crash between commit and chaining) are found by receipt time.
CREATE INDEX scans_received ON scans (received_at);
