-- Snapshots of sandboxes (POST /sandboxes/{id}/snapshot, fork): the
-- provider holds the data, this row holds who owns it and its shape.
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    source_sandbox_id TEXT NOT NULL DEFAULT '',
    image TEXT NOT NULL,
    memory_mb BIGINT NOT NULL,
    vcpus BIGINT NOT NULL,
    network_mode TEXT NOT NULL DEFAULT '',
    size_bytes BIGINT NOT NULL DEFAULT 0,
    owner_id TEXT NOT NULL DEFAULT '',
    tenant_id TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_snapshots_tenant ON snapshots(tenant_id, created_at);
