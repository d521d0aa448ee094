-- Live preview (docs/preview.md): which ports of a sandbox the proxy
-- serves, and how (public, or with a token).
CREATE TABLE IF NOT EXISTS sandbox_ports (
    sandbox_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    mode TEXT NOT NULL,
    created_by TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, port)
);
-- Access tokens of token-mode ports: only a SHA-256 of the secret is kept.
CREATE TABLE IF NOT EXISTS preview_tokens (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_by TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_preview_tokens_port ON preview_tokens(sandbox_id, port);
