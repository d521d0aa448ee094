-- Registry connections belong to a tenant like everything else, and name
-- the registry host for the `registry` provider (any OCI registry).
ALTER TABLE registry_connections ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
ALTER TABLE registry_connections ADD COLUMN host TEXT NOT NULL DEFAULT '';
