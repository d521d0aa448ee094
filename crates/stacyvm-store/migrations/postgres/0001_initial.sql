-- StacyVM schema v1 (Postgres): the logical schema of the SQLite engine,
-- with TIMESTAMPTZ timestamps, BIGINT integers and BOOLEAN flags. JSON
-- values are kept as text, as on SQLite.
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'creating',
    provider TEXT NOT NULL,
    image TEXT NOT NULL DEFAULT '',
    memory_mb BIGINT NOT NULL DEFAULT 512,
    vcpus BIGINT NOT NULL DEFAULT 1,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    template TEXT NOT NULL DEFAULT '',
    owner_id TEXT NOT NULL DEFAULT '',
    vm_id TEXT NOT NULL DEFAULT '',
    worker_id TEXT NOT NULL DEFAULT 'local',
    tenant_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX idx_sandboxes_state ON sandboxes(state);
CREATE INDEX idx_sandboxes_owner ON sandboxes(owner_id);
CREATE INDEX idx_sandboxes_vm ON sandboxes(vm_id);
CREATE INDEX idx_sandboxes_worker ON sandboxes(worker_id);
CREATE INDEX idx_sandboxes_tenant ON sandboxes(tenant_id);

CREATE TABLE exec_logs (
    id BIGSERIAL PRIMARY KEY,
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    command TEXT NOT NULL,
    exit_code BIGINT NOT NULL,
    stdout TEXT NOT NULL DEFAULT '',
    stderr TEXT NOT NULL DEFAULT '',
    duration TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_exec_logs_sandbox ON exec_logs(sandbox_id);

CREATE TABLE provider_configs (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL DEFAULT '{}',
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE templates (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL DEFAULT 1,
    image TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    setup TEXT NOT NULL DEFAULT '[]',
    allowed_hosts TEXT NOT NULL DEFAULT '[]',
    memory_mb BIGINT NOT NULL DEFAULT 512,
    cpu_cores BIGINT NOT NULL DEFAULT 1,
    ttl_seconds BIGINT NOT NULL DEFAULT 300,
    env TEXT NOT NULL DEFAULT '{}',
    secrets TEXT NOT NULL DEFAULT '[]',
    pool_size BIGINT NOT NULL DEFAULT 0,
    provider TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE environment_specs (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    name TEXT NOT NULL,
    base_image TEXT NOT NULL,
    python_packages TEXT NOT NULL DEFAULT '[]',
    apt_packages TEXT NOT NULL DEFAULT '[]',
    python_version TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    UNIQUE(owner_id, name)
);

CREATE TABLE environment_builds (
    id TEXT PRIMARY KEY,
    spec_id TEXT NOT NULL REFERENCES environment_specs(id),
    status TEXT NOT NULL DEFAULT 'queued',
    current_step TEXT NOT NULL DEFAULT '',
    log_blob TEXT NOT NULL DEFAULT '',
    image_size_bytes BIGINT NOT NULL DEFAULT 0,
    digest_local TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE environment_artifacts (
    id BIGSERIAL PRIMARY KEY,
    build_id TEXT NOT NULL REFERENCES environment_builds(id),
    target TEXT NOT NULL,
    image_ref TEXT NOT NULL DEFAULT '',
    digest TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    UNIQUE(build_id, target)
);

CREATE TABLE registry_connections (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    username TEXT NOT NULL,
    secret_ref TEXT NOT NULL,
    is_default BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    UNIQUE(owner_id, provider, username)
);

CREATE TABLE owner_quotas (
    owner_id TEXT PRIMARY KEY,
    max_sandboxes BIGINT NOT NULL DEFAULT 0,
    max_ttl_seconds BIGINT NOT NULL DEFAULT 0,
    max_exec_timeout_seconds BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE admin_audit_logs (
    id BIGSERIAL PRIMARY KEY,
    actor TEXT NOT NULL DEFAULT '',
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL DEFAULT 0,
    request_id TEXT NOT NULL DEFAULT '',
    remote_addr TEXT NOT NULL DEFAULT '',
    user_agent TEXT NOT NULL DEFAULT '',
    tenant_id TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_admin_audit_created ON admin_audit_logs(created_at DESC);
CREATE INDEX idx_admin_audit_actor ON admin_audit_logs(actor);

CREATE TABLE operation_audit_logs (
    id BIGSERIAL PRIMARY KEY,
    actor TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    sandbox_id TEXT NOT NULL DEFAULT '',
    resource TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    tenant_id TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_op_audit_created ON operation_audit_logs(created_at DESC);
CREATE INDEX idx_op_audit_actor ON operation_audit_logs(actor);
CREATE INDEX idx_op_audit_sandbox ON operation_audit_logs(sandbox_id);
CREATE INDEX idx_op_audit_action ON operation_audit_logs(action);

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'online',
    providers TEXT NOT NULL DEFAULT '[]',
    capabilities TEXT NOT NULL DEFAULT '[]',
    capacity TEXT NOT NULL DEFAULT '{}',
    last_heartbeat TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_workers_status ON workers(status);
CREATE INDEX idx_workers_heartbeat ON workers(last_heartbeat DESC);

CREATE TABLE leases (
    resource_id TEXT PRIMARY KEY,
    resource_type TEXT NOT NULL DEFAULT '',
    holder_id TEXT NOT NULL,
    generation BIGINT NOT NULL DEFAULT 1,
    expires_at TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_leases_holder ON leases(holder_id);
CREATE INDEX idx_leases_expires ON leases(expires_at);

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner_id TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_tenants_owner ON tenants(owner_id);

CREATE TABLE tenant_members (
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'viewer',
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX idx_tenant_members_user ON tenant_members(user_id);

CREATE TABLE policies (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL DEFAULT '',
    resource_type TEXT NOT NULL,
    effect TEXT NOT NULL DEFAULT 'allow',
    pattern TEXT NOT NULL,
    priority BIGINT NOT NULL DEFAULT 10,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_policies_tenant ON policies(tenant_id);
CREATE INDEX idx_policies_resource ON policies(resource_type);
