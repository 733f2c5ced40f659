-- Webhooks (tracker/webhooks/): endpoints, the outbox of events and one delivery per (endpoint, event).
-- Events are written in the transaction of the fact they report, and only for an org that has an
-- endpoint; each is fanned out at once to the endpoints that subscribe to its type.
CREATE TABLE webhooks (
    id text PRIMARY KEY,
    org text NOT NULL,
    url text NOT NULL,
    events text[] NOT NULL,
    secret text NOT NULL,          -- whsec_...: HMAC keys must be readable to sign (SECURITY.md)
    old_secret text,               -- the secret before the last rotation: still signs until old_until
    old_until bigint,
    enabled boolean NOT NULL DEFAULT true,
    disabled_reason text,
    created_at bigint NOT NULL,
    created_by text NOT NULL
);
CREATE INDEX webhooks_org ON webhooks (org);

CREATE TABLE webhook_events (
    n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the order events were written in
    id text NOT NULL UNIQUE,       -- webhook-id: the same for every attempt and replay
    org text NOT NULL,
    type text NOT NULL,
    okey text NOT NULL,            -- ordering key (the package): delivered in n order per endpoint and key
    created_at bigint NOT NULL,
    body bytea NOT NULL            -- the exact bytes signed and posted
);
CREATE INDEX webhook_events_org ON webhook_events (org, created_at);

CREATE TABLE webhook_deliveries (
    n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id text NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_n bigint NOT NULL REFERENCES webhook_events (n) ON DELETE CASCADE,
    okey text NOT NULL,
    state text NOT NULL,           -- pending | sending | delivered | dead | disabled
    attempts integer NOT NULL DEFAULT 0,
    next_at bigint NOT NULL,       -- pending: not before; sending: the claim's lease ends
    created_at bigint NOT NULL,
    delivered_at bigint,
    last_status integer,
    last_latency_ms integer,
    last_error text,
    last_response text,            -- a short prefix of the response body, never more
    UNIQUE (endpoint_id, event_n)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE state IN ('pending', 'sending');
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (endpoint_id, okey, event_n)
    WHERE state IN ('pending', 'sending');
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, n);

CREATE TABLE webhook_attempts (
    delivery_n bigint NOT NULL REFERENCES webhook_deliveries (n) ON DELETE CASCADE,
    at bigint NOT NULL,
    status integer,                -- null: no HTTP answer (refused, timed out, blocked address)
    latency_ms integer NOT NULL,
    error text,
    response text
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_n, at);
