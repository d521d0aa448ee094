-- Registry connections belong to a tenant like everything else, and name
-- the registry host for the `registry` provider (any OCI registry).
ALTER TABLE registry_connections ADD COLUMN IF NOT EXISTS tenant_id TEXT NOT NULL DEFAULT '';
ALTER TABLE registry_connections ADD COLUMN IF NOT EXISTS host TEXT NOT NULL DEFAULT '';
