"""Prometheus metrics (`GET /metrics`). One registry per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("tracker_connections", "Open websocket connections", ["role"])
EVENTS_RECEIVED = Counter("tracker_events_received_total", "Driver events accepted for storage", ["kind"])
POSITIONS_RECEIVED = EVENTS_RECEIVED.labels("pos")  # bound once: .labels() costs a lock and a lookup
SCANS_RECEIVED = EVENTS_RECEIVED.labels("scan")
EVENTS_STORED = Counter("tracker_events_stored_total", "Driver events acknowledged after commit")
EVENTS_REFUSED = Counter("tracker_events_refused_total", "Driver events refused, by error code", ["code"])
ACK_SECONDS = Histogram(
    "tracker_ack_latency_seconds",
    "Receipt to ack sent",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FLUSH_SECONDS = Histogram(
    "tracker_flush_seconds",
    "One batch write to PostgreSQL, commit included",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
BATCH_SIZE = Histogram(
    "tracker_batch_events", "Events per PostgreSQL batch", buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
)
FANOUT_LAG = Histogram(
    "tracker_fanout_lag_seconds",
    "Publish on the ingesting instance to hub delivery here",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
FRAMES_CONFLATED = Counter(
    "tracker_positions_conflated_total", "Position frames replaced by a newer one for a slow dashboard"
)
DASHBOARDS_DROPPED = Counter("tracker_dashboards_dropped_total", "Dashboards closed as slow consumers")
LIVE_PUBLISHED = Counter("tracker_live_published_total", "Live frames published to the broker")
LIVE_FAILED = Counter("tracker_live_publish_failed_total", "Live frames lost because the broker was unavailable")
WRITER_BUFFERED = Gauge("tracker_writer_buffered_events", "Events waiting for PostgreSQL")
GC_PAUSE = Histogram(
    "tracker_gc_pause_seconds",
    "Cyclic garbage collections: how long the event loop stood still",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
LIVE_RECEIVED_BYTES = Counter(
    "tracker_live_received_bytes_total", "Live bytes received from the broker (only orgs with a dashboard here)"
)
LIVE_RECEIVED_MESSAGES = Counter("tracker_live_received_messages_total", "Live messages received from the broker")
CONTROL_RECEIVED_MESSAGES = Counter(
    "tracker_control_received_messages_total",
    "Control messages received from the broker (kicks, stamps: only orgs with a driver here)",
)
BROKER_LIVE = Gauge("tracker_broker_live", "1 when the Redis subscriber is proven to receive")

# Day-two operations (docs/OPERATIONS.md; deploy/prometheus/alerts.yml alerts on these).
LOOP_LAG = Histogram(
    "tracker_loop_lag_seconds",
    "How late the event loop ran a timer due every 50 ms (tracker/looplag.py)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
WRITER_BUFFER_MAX = Gauge("tracker_writer_buffer_max_events", "Capacity of the writer's buffer (then: unavailable)")
READY = Gauge("tracker_ready", "1 when the checks of /readyz pass (probed every 5 s) and the instance is not draining")
BACKEND_ERRORS = Counter(
    "tracker_backend_errors_total", "Failed probes of PostgreSQL or Redis (every 5 s)", ["backend"]
)
POSTGRES_ERRORS = BACKEND_ERRORS.labels("postgres")  # bound once, so both series exist from the start
REDIS_ERRORS = BACKEND_ERRORS.labels("redis")
CUSTODY_VERIFY_FAILED = Counter(
    "tracker_custody_verify_failures_total", "Package verifications (GET .../verify) that found problems"
)
RESUMES = Counter("tracker_driver_resumes_total", "Resume hellos (0xA3) by outcome: resumed or refused", ["outcome"])
