-- Named persistent volumes (/volumes): the host holds the data (a
-- size-capped file system per volume), this row holds who owns it and its
-- size. A name is unique within its tenant.
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    size_mb INTEGER NOT NULL,
    owner_id TEXT NOT NULL DEFAULT '',
    tenant_id TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_volumes_tenant_name ON volumes(tenant_id, name);
