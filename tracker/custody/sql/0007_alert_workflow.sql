-- The alert workflow (custody/alerts_http.py): a person acknowledges an open alert (who, when, a
-- comment) and resolves one (who, a reason); `resolved_by` is null for an automatic resolution (a
-- replay no longer finds the anomaly). A reopened alert starts unacknowledged; what happened before
-- stays in `alert_events`, which is only ever appended to.
ALTER TABLE alerts
    ADD COLUMN acknowledged_by text,
    ADD COLUMN acknowledged_at bigint,
    ADD COLUMN ack_comment text,
    ADD COLUMN resolved_by text,
    ADD COLUMN resolved_reason text;
CREATE TABLE alert_events (
    n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org text NOT NULL,
    alert_id text NOT NULL,
    event text NOT NULL,  -- opened | acknowledged | resolved | reopened
    actor text,           -- the person (token subject); null: the service
    ts bigint NOT NULL,
    note text             -- the acknowledgement's comment, the resolution's reason
);
CREATE INDEX alert_events_alert ON alert_events (org, alert_id, n);
-- The history of the alerts that exist already: when they opened and, if resolved, when.
INSERT INTO alert_events (org, alert_id, event, actor, ts, note)
SELECT org, id, 'opened', NULL, opened_at, NULL FROM alerts ORDER BY opened_at, id;
INSERT INTO alert_events (org, alert_id, event, actor, ts, note)
SELECT org, id, 'resolved', NULL, ts, 'automatic: the anomaly no longer holds' FROM alerts WHERE state = 'resolved'
ORDER BY ts, id;
UPDATE alerts SET resolved_reason = 'automatic: the anomaly no longer holds' WHERE state = 'resolved';
