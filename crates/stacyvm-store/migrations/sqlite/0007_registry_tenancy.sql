-- Registry connections and environment specs belong to a tenant like
-- everything else; a registry connection names
-- the registry host for the `registry` provider (any OCI registry).
ALTER TABLE registry_connections ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
ALTER TABLE registry_connections ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE environment_specs ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
