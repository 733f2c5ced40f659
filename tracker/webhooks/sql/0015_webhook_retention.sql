-- Deleting an event (retention, tracker/webhooks/service.py) cascades to its deliveries: without
-- this index each cascade scans every delivery.
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_n);
