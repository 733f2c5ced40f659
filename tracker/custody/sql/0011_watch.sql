-- Time-based alerts (custody/watch.py, custody/rules.py): what an alert found, as structured
-- details (an excursion's start, duration, min and max; a gap's real extent); per-org thresholds;
-- a package's arrival at and departure from its destination.
ALTER TABLE alerts ADD COLUMN details jsonb;
CREATE INDEX alerts_open_kind ON alerts (kind, org) WHERE state = 'open';
CREATE TABLE alert_thresholds (
    org text PRIMARY KEY,
    thresholds jsonb NOT NULL,  -- overrides of the documented defaults (custody/rules.py Thresholds)
    updated_by text NOT NULL,
    updated_at bigint NOT NULL
);
ALTER TABLE packages ADD COLUMN arrived_at bigint, ADD COLUMN departed_at bigint;
CREATE INDEX packages_window ON packages (window_to) WHERE window_to IS NOT NULL AND consigned_at IS NOT NULL;
CREATE INDEX packages_state_ts ON packages (state_ts);
