-- Recipient tracking links (tracker/share). A link's token is never stored: only its SHA-256, so
-- reading this table does not give access. A link shows one package, until `expires_at` (made:
-- now + TRACKER_SHARE_MAX_S) or its package's delivery + TRACKER_SHARE_GRACE_S, whichever is first.
CREATE TABLE package_shares (
    token_sha256 bytea PRIMARY KEY,
    org text NOT NULL,
    package_id text NOT NULL,
    created_by text NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    revoked_at bigint
);
CREATE INDEX package_shares_package ON package_shares (org, package_id);
