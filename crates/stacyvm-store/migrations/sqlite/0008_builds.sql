-- Specs may carry a Dockerfile and an uploaded build context.
ALTER TABLE environment_specs ADD COLUMN dockerfile TEXT NOT NULL DEFAULT '';
ALTER TABLE environment_specs ADD COLUMN context_sha256 TEXT NOT NULL DEFAULT '';
-- Environment builds belong to their spec's owner and tenant, name the
-- provider that gets the image, and keep their artifacts (local image and
-- registry pushes) beside them.
ALTER TABLE environment_builds ADD COLUMN owner_id TEXT NOT NULL DEFAULT '';
ALTER TABLE environment_builds ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
ALTER TABLE environment_builds ADD COLUMN provider TEXT NOT NULL DEFAULT '';
ALTER TABLE environment_builds ADD COLUMN builder TEXT NOT NULL DEFAULT '';
ALTER TABLE environment_builds ADD COLUMN artifacts TEXT NOT NULL DEFAULT '[]';
CREATE INDEX environment_builds_tenant ON environment_builds(tenant_id, created_at);
CREATE INDEX environment_builds_status ON environment_builds(status);
