//! `stacyvm config lint`: static checks of a configuration, no host access.
//!
//! The rules follow spec/config-and-cli.md §7. A rule marked "(P)" there is
//! a WARN normally and a FAIL with `--production` ([`Report::prod`]).
//! Messages never contain secret values, only facts about them (missing,
//! placeholder, length).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use stacyvm_core::config::{self, is_loopback_host, Config, ListenChoice, Secret};

use crate::checks::{self, Report};

/// Arguments of `stacyvm config lint`.
#[derive(Debug, Args)]
pub struct LintArgs {
    /// Config file to lint (must exist; default: ./stacyvm.yaml, then
    /// ~/.stacyvm/config.yaml, else the built-in defaults).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Apply production rules: weak settings become failures.
    #[arg(long)]
    pub production: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command: loads the config (load errors abort), lints, prints.
pub fn run(args: &LintArgs) -> Result<()> {
    let loaded = config::load(args.file.as_deref(), std::env::vars())?;
    let mut report = Report::default();
    let source = loaded.source.as_ref().map_or_else(
        || "built-in defaults".to_string(),
        |p| p.display().to_string(),
    );
    report.pass("config", format!("loaded and validated ({source})"));
    if !loaded.unknown_keys.is_empty() {
        report.warn(
            "config.unknown_keys",
            format!(
                "keys this build does not know are ignored: {}",
                loaded.unknown_keys.join(", ")
            ),
            "remove them or fix their spelling (see docs/configuration.md)",
        );
    }
    report.extend(lint(&loaded.config, args.production));
    checks::finish(&report, args.json, "config lint")
}

/// Placeholder fragments that mark a secret as never having been set.
const PLACEHOLDERS: &[&str] = &["change-me", "changeme", "replace-me"];

/// Minimum length of API keys and signing keys.
const MIN_SECRET_LEN: usize = 32;

/// The spec's secret rule: missing, placeholder or short is (P).
fn secret_rule(r: &mut Report, production: bool, key: &str, value: &Secret) {
    let v = value.expose();
    let lower = v.to_ascii_lowercase();
    let fix = format!("set {key} to a random value of at least {MIN_SECRET_LEN} characters, e.g. `openssl rand -hex 32`");
    if v.trim().is_empty() {
        r.prod(production, key, "missing secret", fix);
    } else if PLACEHOLDERS.iter().any(|p| lower.contains(p)) {
        r.prod(production, key, "still a placeholder value", fix);
    } else if v.chars().count() < MIN_SECRET_LEN {
        r.prod(
            production,
            key,
            format!(
                "shorter than {MIN_SECRET_LEN} characters ({} chars)",
                v.chars().count()
            ),
            fix,
        );
    } else {
        r.pass(key, format!("set ({} chars)", v.chars().count()));
    }
}

/// All lint rules over an already validated config.
pub fn lint(cfg: &Config, production: bool) -> Report {
    let mut r = Report::default();
    let p = production;
    lint_auth(&mut r, cfg, p);
    lint_server(&mut r, cfg, p);
    lint_limits(&mut r, cfg, p);
    lint_rpc_tls(&mut r, cfg, p);
    lint_providers(&mut r, cfg, p);
    r
}

fn lint_auth(r: &mut Report, cfg: &Config, p: bool) {
    let a = &cfg.auth;
    if a.enabled {
        r.pass("auth.enabled", "true");
    } else {
        r.prod(
            p,
            "auth.enabled",
            "authentication is not declared enabled",
            "set auth.enabled: true together with auth.api_key and auth.admin_api_key",
        );
    }
    secret_rule(r, p, "auth.api_key", &a.api_key);
    secret_rule(r, p, "auth.admin_api_key", &a.admin_api_key);
    lint_worker_credentials(r, cfg, p);
    if !a.api_key.is_empty() && a.api_key == a.admin_api_key {
        r.prod(
            p,
            "auth.key_separation",
            "auth.api_key and auth.admin_api_key are the same key",
            "give the admin key its own random value",
        );
    } else {
        r.pass("auth.key_separation", "API and admin keys differ");
    }
    if a.admin_fallback_enabled {
        r.prod(
            p,
            "auth.admin_fallback_enabled",
            "the regular API key is accepted on admin routes when no admin key is set",
            "set auth.admin_fallback_enabled: false",
        );
    } else {
        r.pass("auth.admin_fallback_enabled", "false");
    }
    if a.admin_audit_retention.is_zero() {
        r.prod(
            p,
            "auth.admin_audit_retention",
            "admin audit rows are kept forever (retention 0)",
            "set auth.admin_audit_retention, e.g. 2160h (90 days)",
        );
    } else {
        r.pass(
            "auth.admin_audit_retention",
            a.admin_audit_retention.0.to_string(),
        );
    }
    if a.oidc_enabled {
        if a.oidc_issuer.trim().is_empty() {
            r.prod(
                p,
                "auth.oidc_issuer",
                "OIDC is enabled without an issuer",
                "set auth.oidc_issuer to your identity provider's issuer URL",
            );
        } else {
            r.pass("auth.oidc_issuer", a.oidc_issuer.clone());
        }
        if a.oidc_jwks_url.trim().is_empty() && a.oidc_public_key.trim().is_empty() {
            r.prod(
                p,
                "auth.oidc_jwks_url",
                "OIDC is enabled without a JWKS URL or public key",
                "set auth.oidc_jwks_url or auth.oidc_public_key_file",
            );
        } else {
            r.pass("auth.oidc_jwks_url", "a verification key source is set");
        }
        if !a.oidc_public_key.trim().is_empty() && a.oidc_public_key_file.is_empty() {
            r.warn(
                "auth.oidc_public_key_file",
                "the OIDC public key is inline in the config",
                "store the PEM in a file and set auth.oidc_public_key_file",
            );
        }
        if a.oidc_audience.trim().is_empty() {
            r.warn(
                "auth.oidc_audience",
                "tokens for any audience of the issuer are accepted",
                "set auth.oidc_audience to this server's client id",
            );
        } else {
            r.pass("auth.oidc_audience", a.oidc_audience.clone());
        }
        if a.oidc_admin_groups.is_empty()
            && a.oidc_operator_groups.is_empty()
            && a.oidc_viewer_groups.is_empty()
        {
            r.warn(
                "auth.oidc_groups",
                "no group is mapped to a role; every OIDC user gets the api role",
                "set auth.oidc_admin_groups, auth.oidc_operator_groups or auth.oidc_viewer_groups",
            );
        } else {
            r.pass("auth.oidc_groups", "group mappings set");
        }
    }
}

/// Worker credential rules (the spec's four cases).
fn lint_worker_credentials(r: &mut Report, cfg: &Config, p: bool) {
    let a = &cfg.auth;
    let inline_token = |r: &mut Report| {
        if a.worker_token_file.is_empty() {
            r.warn(
                "auth.worker_token_file",
                "the shared worker token is inline in the config",
                "store it in a file readable only by stacyvm and set auth.worker_token_file",
            );
        } else {
            r.pass("auth.worker_token_file", a.worker_token_file.clone());
        }
    };
    if !a.worker_signing_key.is_empty() {
        secret_rule(r, p, "auth.worker_signing_key", &a.worker_signing_key);
        if a.worker_signing_key_file.is_empty() {
            r.warn(
                "auth.worker_signing_key_file",
                "the worker signing key is inline in the config",
                "store it in a file readable only by stacyvm and set auth.worker_signing_key_file",
            );
        } else {
            r.pass(
                "auth.worker_signing_key_file",
                a.worker_signing_key_file.clone(),
            );
        }
        let mut seen = BTreeSet::new();
        let dup = a
            .worker_signing_keys
            .iter()
            .any(|k| !seen.insert(k.expose()));
        if a.worker_signing_keys.contains(&a.worker_signing_key) || dup {
            r.warn(
                "auth.worker_signing_keys",
                "rotation keys repeat the active key or each other",
                "list only previous keys in auth.worker_signing_keys, each once",
            );
        } else {
            r.pass(
                "auth.worker_signing_keys",
                format!("{} rotation key(s)", a.worker_signing_keys.len()),
            );
        }
        r.pass(
            "auth.worker_revoked_token_ids",
            format!("{} revoked token id(s)", a.worker_revoked_token_ids.len()),
        );
        if !a.worker_token.is_empty() {
            r.warn(
                "auth.worker_token",
                "a shared static worker token is still accepted next to signed tokens",
                "remove auth.worker_token once every worker uses signed tokens",
            );
            inline_token(r);
        }
        if !a.worker_tokens.is_empty() {
            r.warn(
                "auth.worker_tokens",
                "static per-worker tokens are still accepted next to signed tokens",
                "remove auth.worker_tokens once every worker uses signed tokens",
            );
        }
    } else if !a.worker_signing_keys.is_empty() {
        r.prod(
            p,
            "auth.worker_signing_key",
            "rotation keys are set but no active signing key",
            "set auth.worker_signing_key_file to the current key",
        );
        if !a.worker_revoked_token_ids.is_empty() {
            r.warn(
                "auth.worker_revoked_token_ids",
                "revoked token ids are set but no signing key issues tokens",
                "set an active signing key or remove the list",
            );
        }
    } else if !a.worker_tokens.is_empty() {
        r.pass(
            "auth.worker_tokens",
            format!("{} per-worker token(s)", a.worker_tokens.len()),
        );
        if !a.worker_revoked_token_ids.is_empty() {
            r.warn(
                "auth.worker_revoked_token_ids",
                "revoked token ids only apply to signed tokens",
                "remove the list or switch workers to signed tokens",
            );
        }
    } else if !a.worker_token.is_empty() {
        r.warn(
            "auth.worker_tokens",
            "using a shared worker token for every worker",
            "prefer signed worker tokens (auth.worker_signing_key_file)",
        );
        inline_token(r);
    } else {
        r.warn(
            "auth.worker_tokens",
            "no worker credentials configured; remote workers cannot join",
            "ignore on a single node; for workers set auth.worker_signing_key_file",
        );
    }
}

/// `server.host`: where the server listens and why (shared with doctor).
pub fn listen_rule(r: &mut Report, cfg: &Config, p: bool) {
    let port = cfg.server.port;
    match cfg.listen_host() {
        (h, ListenChoice::LoopbackNoAuth) => r.pass(
            "server.host",
            format!("{h}:{port}: no credential is configured, so the open API listens on loopback only (requests must name localhost, 127.0.0.1 or [::1]); configuring auth.api_key makes it listen on all interfaces"),
        ),
        (h, ListenChoice::AuthConfigured) => r.pass(
            "server.host",
            format!("{h}:{port}: all interfaces, because a credential is configured"),
        ),
        (h, ListenChoice::Explicit) if !cfg.auth_configured() && !is_loopback_host(h) => r.prod(
            p,
            "server.host",
            format!("{h}:{port} is set explicitly and no credential is configured: anyone who can reach it can run code on this host"),
            "set auth.api_key and auth.admin_api_key, or remove server.host to listen on 127.0.0.1 only",
        ),
        (h, ListenChoice::Explicit) => r.pass(
            "server.host",
            format!("{h}:{port} (set explicitly)"),
        ),
    }
}

fn lint_server(r: &mut Report, cfg: &Config, p: bool) {
    listen_rule(r, cfg, p);
    let origins = &cfg.server.cors_allowed_origins;
    if origins.iter().any(|o| o.trim() == "*") {
        r.prod(
            p,
            "server.cors_allowed_origins",
            "web pages from any origin may call the API with the user's browser",
            "list the exact origins of your web apps, e.g. [\"https://app.example.com\"], or leave it empty",
        );
    } else if origins.is_empty() {
        r.pass(
            "server.cors_allowed_origins",
            "no web page may call the API from a browser (empty list)",
        );
    } else {
        r.pass(
            "server.cors_allowed_origins",
            format!("{} origin(s)", origins.len()),
        );
    }
    let rl = &cfg.rate_limit;
    if rl.enabled {
        r.pass("rate_limit.enabled", "true");
    } else {
        r.prod(
            p,
            "rate_limit.enabled",
            "requests are not rate limited",
            "set rate_limit.enabled: true",
        );
    }
    if rl.requests_per_minute <= 0 || rl.burst <= 0 {
        r.prod(
            p,
            "rate_limit.capacity",
            format!(
                "requests_per_minute {} and burst {} must both be positive",
                rl.requests_per_minute, rl.burst
            ),
            "set rate_limit.requests_per_minute and rate_limit.burst above 0",
        );
    } else {
        r.pass(
            "rate_limit.capacity",
            format!("{}/min, burst {}", rl.requests_per_minute, rl.burst),
        );
    }
    if rl.key_by == "ip" {
        r.warn(
            "rate_limit.key_by",
            "clients behind one proxy or NAT share a bucket",
            "use owner or api_key unless clients are anonymous",
        );
    } else {
        r.pass("rate_limit.key_by", rl.key_by.clone());
    }
    if cfg.is_postgres() {
        // Validation already refused an empty DSN. Its text is never shown.
        match stacyvm_store::parse_dsn(cfg.database.dsn.expose()) {
            Err(e) => r.fail(
                "database.dsn",
                e.detail().to_string(),
                "use postgres://user:password@host:5432/database",
            ),
            Ok(o) => {
                let host = o.get_host().to_string();
                let local = host == "localhost"
                    || host.starts_with('/')
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                let tls = matches!(
                    o.get_ssl_mode(),
                    sqlx::postgres::PgSslMode::Require
                        | sqlx::postgres::PgSslMode::VerifyCa
                        | sqlx::postgres::PgSslMode::VerifyFull
                );
                if !local && !tls {
                    r.prod(
                        p,
                        "database.dsn",
                        format!("the database at {host} is reached without requiring TLS"),
                        "add ?sslmode=verify-full (or require) to the DSN",
                    );
                } else {
                    r.pass(
                        "database.dsn",
                        format!(
                            "postgres at {host}, database {}",
                            o.get_database().unwrap_or("(default)")
                        ),
                    );
                }
            }
        }
    } else {
        let path = cfg.sqlite_path();
        if path.is_relative() {
            r.prod(
                p,
                "database.path",
                format!("{} is relative to the working directory", path.display()),
                "use an absolute path, e.g. /var/lib/stacyvm/stacyvm.db",
            );
        } else {
            r.pass("database.path", path.display().to_string());
        }
    }
    if cfg.logging.format == "json" {
        r.pass("logging.format", "json");
    } else {
        r.prod(
            p,
            "logging.format",
            format!(
                "{:?} logs are for humans, not collectors",
                cfg.logging.format
            ),
            "set logging.format: json",
        );
    }
}

fn lint_limits(r: &mut Report, cfg: &Config, p: bool) {
    let d = &cfg.defaults;
    if d.max_sandboxes <= 0 || d.max_sandboxes_per_owner <= 0 {
        r.prod(
            p,
            "defaults.sandbox_caps",
            format!(
                "max_sandboxes {} / max_sandboxes_per_owner {}: 0 means unlimited",
                d.max_sandboxes, d.max_sandboxes_per_owner
            ),
            "set defaults.max_sandboxes and defaults.max_sandboxes_per_owner to what the host can carry",
        );
    } else {
        r.pass(
            "defaults.sandbox_caps",
            format!(
                "{} total, {} per owner",
                d.max_sandboxes, d.max_sandboxes_per_owner
            ),
        );
    }
    if d.max_spawn_queue <= 0 {
        r.prod(
            p,
            "defaults.max_spawn_queue",
            "the spawn queue is unbounded",
            "set defaults.max_spawn_queue, e.g. 100",
        );
    } else {
        r.pass("defaults.max_spawn_queue", d.max_spawn_queue.to_string());
    }
    if d.default_exec_timeout.is_zero() || d.max_exec_timeout.is_zero() {
        r.prod(
            p,
            "defaults.exec_timeouts",
            format!(
                "default_exec_timeout {} / max_exec_timeout {}: 0 means commands may run forever",
                d.default_exec_timeout.0, d.max_exec_timeout.0
            ),
            "set defaults.default_exec_timeout (e.g. 60s) and defaults.max_exec_timeout (e.g. 10m)",
        );
    } else {
        r.pass(
            "defaults.exec_timeouts",
            format!(
                "default {}, max {}",
                d.default_exec_timeout.0, d.max_exec_timeout.0
            ),
        );
    }
    if d.max_ttl.is_zero() {
        r.prod(
            p,
            "defaults.max_ttl",
            "sandboxes may live forever (max_ttl 0)",
            "set defaults.max_ttl, e.g. 24h",
        );
    } else {
        r.pass("defaults.max_ttl", d.max_ttl.0.to_string());
    }
    let l = &cfg.limits;
    let caps = [
        ("max_active_per_sandbox", l.max_active_per_sandbox),
        ("max_active_per_credential", l.max_active_per_credential),
        ("max_active_per_tenant", l.max_active_per_tenant),
    ];
    let open: Vec<&str> = caps
        .iter()
        .filter(|(_, v)| *v <= 0)
        .map(|(k, _)| *k)
        .collect();
    if open.is_empty() {
        r.pass(
            "limits.active_caps",
            format!(
                "{} per sandbox, {} per credential, {} per tenant",
                l.max_active_per_sandbox, l.max_active_per_credential, l.max_active_per_tenant
            ),
        );
    } else {
        r.prod(
            p,
            "limits.active_caps",
            format!("limits.{} unlimited: one caller can hold every exec slot", open.join(", limits.")),
            "set limits.max_active_per_sandbox, _per_credential and _per_tenant above 0 (defaults 16, 32, 128)",
        );
    }
    let db = &cfg.database;
    if db.exec_log_retention.is_zero() || db.sandbox_retention.is_zero() {
        r.prod(
            p,
            "database.retention",
            format!(
                "exec_log_retention {} / sandbox_retention {}: 0 keeps exec output and destroyed sandboxes forever",
                db.exec_log_retention.0, db.sandbox_retention.0
            ),
            "set database.exec_log_retention (e.g. 168h) and database.sandbox_retention (e.g. 720h)",
        );
    } else {
        r.pass(
            "database.retention",
            format!(
                "exec logs {}, destroyed sandboxes {}",
                db.exec_log_retention.0, db.sandbox_retention.0
            ),
        );
    }
    if cfg.auth.owner_scoping {
        r.pass(
            "auth.owner_scoping",
            "viewers and api callers reach only what they own",
        );
    } else {
        r.prod(
            p,
            "auth.owner_scoping",
            "every member of a tenant reaches every sandbox in it",
            "set auth.owner_scoping: true unless all members of a tenant trust each other",
        );
    }
}

fn lint_rpc_tls(r: &mut Report, cfg: &Config, p: bool) {
    let t = &cfg.worker.rpc_tls;
    if !t.enabled {
        r.warn(
            "worker.rpc_tls.enabled",
            "worker RPC is plain HTTP",
            "ignore on a single node; with remote workers enable worker.rpc_tls",
        );
        return;
    }
    let files = [
        ("worker.rpc_tls.server_cert_file", &t.server_cert_file),
        ("worker.rpc_tls.server_key_file", &t.server_key_file),
        ("worker.rpc_tls.client_ca_file", &t.client_ca_file),
        ("worker.rpc_tls.ca_file", &t.ca_file),
        ("worker.rpc_tls.client_cert_file", &t.client_cert_file),
        ("worker.rpc_tls.client_key_file", &t.client_key_file),
    ];
    for (key, v) in files {
        if v.trim().is_empty() {
            r.prod(
                p,
                key,
                "not set while worker.rpc_tls is enabled",
                format!("set {key} (mutual TLS needs all six files)"),
            );
        } else {
            r.pass(key, v.clone());
        }
    }
    if t.insecure_skip_verify {
        r.prod(
            p,
            "worker.rpc_tls.insecure_skip_verify",
            "worker certificates are not verified",
            "set worker.rpc_tls.insecure_skip_verify: false and worker.rpc_tls.ca_file",
        );
    } else {
        r.pass("worker.rpc_tls.insecure_skip_verify", "false");
    }
}

/// Every provider's own checks (from its module), then the microVM keys,
/// whose provider does not exist yet.
fn lint_providers(r: &mut Report, cfg: &Config, p: bool) {
    stacyvm_providers::registry::lint(cfg, p, r);
    let pr = &cfg.providers;
    if pr.firecracker.enabled {
        let f = &pr.firecracker;
        for (key, v) in [
            ("providers.firecracker.kernel_path", &f.kernel_path),
            ("providers.firecracker.agent_path", &f.agent_path),
        ] {
            if v.trim().is_empty() {
                r.fail(
                    key,
                    "empty while firecracker is enabled",
                    format!("set {key}"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use stacyvm_core::checks::Status;

    fn cfg(yaml: &str) -> Config {
        config::from_yaml_str(yaml, &BTreeMap::new())
            .expect("config")
            .config
    }

    fn status(r: &Report, name: &str) -> Option<Status> {
        r.checks.iter().find(|c| c.name == name).map(|c| c.status)
    }

    const GOOD: &str = "
auth:
  enabled: true
  api_key: 0123456789abcdef0123456789abcdef-api
  admin_api_key: 0123456789abcdef0123456789abcdef-admin
  admin_fallback_enabled: false
  admin_audit_retention: 720h
server:
  cors_allowed_origins: [\"https://app.example.com\"]
rate_limit:
  enabled: true
database:
  path: /var/lib/stacyvm/stacyvm.db
defaults:
  max_sandboxes: 50
  max_sandboxes_per_owner: 5
  default_exec_timeout: 60s
logging:
  format: json
";

    #[test]
    fn defaults_fail_production_for_every_reason() {
        let r = lint(&cfg(""), true);
        for name in [
            "auth.enabled",
            "auth.api_key",
            "auth.admin_api_key",
            "auth.admin_fallback_enabled",
            "rate_limit.enabled",
            "defaults.sandbox_caps",
            "defaults.exec_timeouts",
            "logging.format",
        ] {
            assert_eq!(status(&r, name), Some(Status::Fail), "{name}");
        }
        // Without --production the same rules only warn.
        let r = lint(&cfg(""), false);
        assert_eq!(r.failures(), 0, "{:?}", r.checks);
        assert_eq!(status(&r, "auth.api_key"), Some(Status::Warn));
    }

    #[test]
    fn caps_retention_and_owner_scoping_are_on_by_default() {
        let r = lint(&cfg(""), true);
        for name in [
            "limits.active_caps",
            "database.retention",
            "auth.owner_scoping",
        ] {
            assert_eq!(status(&r, name), Some(Status::Pass), "{name}");
        }
        let off = "limits:\n  max_active_per_tenant: 0\ndatabase:\n  exec_log_retention: 0s\nauth:\n  owner_scoping: false\n";
        let r = lint(&cfg(off), true);
        for name in [
            "limits.active_caps",
            "database.retention",
            "auth.owner_scoping",
        ] {
            assert_eq!(status(&r, name), Some(Status::Fail), "{name}");
        }
    }

    #[test]
    fn listen_host_and_cors_rules() {
        // Defaults: loopback because nothing is configured, no CORS.
        let r = lint(&cfg(""), true);
        assert_eq!(status(&r, "server.host"), Some(Status::Pass));
        assert_eq!(
            status(&r, "server.cors_allowed_origins"),
            Some(Status::Pass)
        );
        let msg = |r: &Report| {
            r.checks
                .iter()
                .find(|c| c.name == "server.host")
                .map(|c| c.message.clone())
                .unwrap_or_default()
        };
        assert!(
            msg(&r).contains("127.0.0.1") && msg(&r).contains("loopback"),
            "{}",
            msg(&r)
        );
        // An explicit public host without a credential fails production.
        let open = "server:\n  host: 0.0.0.0\n  cors_allowed_origins: [\"*\"]\n";
        let r = lint(&cfg(open), true);
        assert_eq!(status(&r, "server.host"), Some(Status::Fail));
        assert_eq!(
            status(&r, "server.cors_allowed_origins"),
            Some(Status::Fail)
        );
        let r = lint(&cfg(open), false);
        assert_eq!(status(&r, "server.host"), Some(Status::Warn));
        // A key makes the default listen everywhere, which is fine.
        let r = lint(&cfg(GOOD), true);
        assert!(msg(&r).contains("0.0.0.0"), "{}", msg(&r));
    }

    #[test]
    fn a_hardened_config_passes_production() {
        let r = lint(&cfg(GOOD), true);
        assert_eq!(r.failures(), 0, "{:#?}", r.checks);
        for c in &r.checks {
            assert!(c.status == Status::Pass || c.fix.is_some(), "{c:?}");
        }
    }

    #[test]
    fn secret_rule_catches_placeholders_short_keys_and_equal_keys() {
        let y = GOOD.replace(
            "0123456789abcdef0123456789abcdef-api",
            "please-change-me-0123456789abcdef0123",
        );
        assert_eq!(
            status(&lint(&cfg(&y), true), "auth.api_key"),
            Some(Status::Fail)
        );
        let y = GOOD.replace("0123456789abcdef0123456789abcdef-api", "tiny-xyzzy");
        let r = lint(&cfg(&y), true);
        assert_eq!(status(&r, "auth.api_key"), Some(Status::Fail));
        // The value itself is never printed.
        assert!(!r.checks.iter().any(|c| c.message.contains("xyzzy")));
        let y = GOOD.replace("-admin", "-api");
        assert_eq!(
            status(&lint(&cfg(&y), true), "auth.key_separation"),
            Some(Status::Fail)
        );
    }

    #[test]
    fn docker_rules_apply_when_docker_is_used() {
        let y = format!(
            "{GOOD}providers:\n  docker:\n    enabled: true\n    seccomp_profile: unconfined\n    added_caps: [NET_ADMIN]\n    dropped_caps: [MKNOD]\n"
        );
        let r = lint(&cfg(&y), true);
        for name in [
            "providers.docker.seccomp_profile",
            "providers.docker.added_caps",
            "providers.docker.dropped_caps",
            "providers.docker.user",
        ] {
            assert_eq!(status(&r, name), Some(Status::Fail), "{name}");
        }
        assert_eq!(status(&r, "providers.docker.runtime"), Some(Status::Pass));
        let r = lint(&cfg(GOOD), true);
        assert_eq!(status(&r, "providers.docker"), Some(Status::Warn));
        assert_eq!(status(&r, "providers.docker.user"), None);
    }

    #[test]
    fn worker_credential_cases() {
        let y = GOOD.replace(
            "auth:\n",
            "auth:\n  worker_signing_keys: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]\n",
        );
        let r = lint(&cfg(&y), true);
        assert_eq!(
            status(&r, "auth.worker_signing_key"),
            Some(Status::Fail),
            "rotation keys without an active key"
        );
        let y = GOOD.replace(
            "auth:\n",
            "auth:\n  worker_signing_key: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n  worker_signing_keys: [bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb]\n  worker_token: shared-token\n",
        );
        let r = lint(&cfg(&y), true);
        assert_eq!(status(&r, "auth.worker_signing_key"), Some(Status::Pass));
        assert_eq!(
            status(&r, "auth.worker_signing_key_file"),
            Some(Status::Warn)
        );
        assert_eq!(status(&r, "auth.worker_signing_keys"), Some(Status::Warn));
        assert_eq!(status(&r, "auth.worker_token"), Some(Status::Warn));
        let r = lint(&cfg(GOOD), true);
        assert_eq!(status(&r, "auth.worker_tokens"), Some(Status::Warn));
    }

    #[test]
    fn mock_and_default_provider_rules() {
        let y = format!("{GOOD}providers:\n  default: docker\n  mock:\n    enabled: true\n");
        let r = lint(&cfg(&y), true);
        assert_eq!(status(&r, "providers.default"), Some(Status::Fail));
        assert_eq!(status(&r, "providers.mock.enabled"), Some(Status::Fail));
    }
}
