//! `stacyvm worker`: run sandboxes for a control plane.
//!
//! A worker builds every provider its config enables (any of them: native,
//! docker, qemu, …), heartbeats to the control plane with what it offers,
//! and serves worker RPC (mutual TLS) on `worker.listen_addr`. On SIGTERM
//! it drains: it takes no new sandbox, tells the control plane, keeps
//! serving the ones it has for `worker.shutdown_timeout`, then says it is
//! offline and stops. `stacyvm worker token` makes and reads worker tokens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use stacyvm_cluster::rpc::{RpcAuth, WorkerRpc};
use stacyvm_cluster::token::{self, Audience, Issue};
use stacyvm_core::config;
use stacyvm_core::registry::Registry;
use tracing::{info, warn};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkerArgs {
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Make, read, verify signed worker tokens, and plan a key rotation.
    /// `stacyvm worker token <worker-id>` signs (the same as `sign`).
    Token(TokenArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: Option<TokenCommand>,
    #[command(flatten)]
    pub sign: SignArgs,
}

/// The signing key, inline or from a file.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The signing key (or --signing-key-file).
    #[arg(long, env = "STACYVM_AUTH_WORKER_SIGNING_KEY", hide_env_values = true)]
    signing_key: Option<String>,
    #[arg(long)]
    signing_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The worker the token is for.
    worker_id: Option<String>,
    #[command(flatten)]
    key: KeyArgs,
    /// Lifetime, more than 0 and at most 15m.
    #[arg(long, default_value = "5m")]
    ttl: String,
    /// `worker:control-plane` (a worker calling the control plane) or
    /// `worker:rpc` (a control plane calling a worker).
    #[arg(long, default_value = "worker:control-plane")]
    audience: String,
    /// The token id (default: random); revoke it with
    /// auth.worker_revoked_token_ids.
    #[arg(long)]
    token_id: Option<String>,
    /// How long from now before the token is valid (default 0s).
    #[arg(long, default_value = "0s")]
    not_before: String,
    /// `token` (the token alone) or `json` (the token and its claims).
    #[arg(long, default_value = "token", value_parser = ["token", "json"])]
    format: String,
    /// A scope to grant (repeatable; default every worker scope).
    #[arg(long = "scope")]
    scopes: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Sign a token for a worker (needs the signing key; a control plane
    /// issues them centrally at POST /api/v1/admin/worker-tokens).
    Sign(SignArgs),
    /// Print a token's claims without checking its signature.
    Inspect { token: String },
    /// Check a token's signature, lifetime, audience, worker and
    /// revocation, as a control plane or worker would; exit 1 if it fails.
    Verify(VerifyArgs),
    /// Print the steps of a signing-key rotation (no secret is read or
    /// printed).
    RotationPlan(RotationArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    token: String,
    /// Config whose auth.worker_signing_key(s) and
    /// auth.worker_revoked_token_ids are used too (default: ./stacyvm.yaml,
    /// then ~/.stacyvm/config.yaml, when present).
    #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    key: KeyArgs,
    /// Another key that may have signed it (repeatable; rotation).
    #[arg(long = "verification-key", hide_env_values = true)]
    verification_keys: Vec<String>,
    #[arg(long = "verification-key-file")]
    verification_key_files: Vec<PathBuf>,
    /// The audience it must carry.
    #[arg(long, default_value = "worker:control-plane")]
    audience: String,
    /// The worker it must be for.
    #[arg(long)]
    worker_id: Option<String>,
    /// A token id to treat as revoked (repeatable).
    #[arg(long = "revoked-token-id")]
    revoked_token_ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RotationArgs {
    /// Where the new key goes (a config key or a file path).
    #[arg(long, default_value = "auth.worker_signing_key")]
    new_key_ref: String,
    /// Where the previous key stays for verification meanwhile.
    #[arg(long, default_value = "auth.worker_signing_keys[0]")]
    previous_key_ref: String,
    /// The longest lifetime of a token signed with the previous key (how
    /// long to keep it), at most 15m.
    #[arg(long, default_value = "5m")]
    ttl: String,
    /// `text` or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (default: ./stacyvm.yaml, then ~/.stacyvm/config.yaml).
    #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
    config: Option<PathBuf>,
    /// This worker's id (default: worker.id, else the host name).
    #[arg(long)]
    id: Option<String>,
    /// The control plane's URL (default: worker.control_plane_url).
    #[arg(long)]
    control_plane: Option<String>,
    /// A static worker token (auth.worker_token or auth.worker_tokens[id]
    /// on the control plane).
    #[arg(long, env = "STACYVM_AUTH_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// A file holding the worker token, read before every heartbeat (for
    /// tokens rotated by something else).
    #[arg(long, conflicts_with = "worker_token")]
    worker_token_file: Option<PathBuf>,
    /// An admin key to fetch short-lived signed tokens from the control
    /// plane (POST /api/v1/admin/worker-tokens): the worker never holds the
    /// signing key.
    #[arg(
        long,
        env = "STACYVM_WORKER_BOOTSTRAP_ADMIN_KEY",
        hide_env_values = true
    )]
    bootstrap_admin_key: Option<String>,
    /// Where worker RPC listens (default: worker.listen_addr; empty = no
    /// RPC, and the worker receives no sandbox).
    #[arg(long)]
    listen: Option<String>,
    /// The RPC URL to advertise (default: from the listen address).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Seconds between heartbeats (default: worker.heartbeat_interval).
    #[arg(long)]
    heartbeat_interval: Option<u64>,
    /// Send one heartbeat and exit.
    #[arg(long)]
    once: bool,
}

pub async fn run(args: WorkerArgs) -> Result<()> {
    match args.command {
        Some(WorkerCommand::Token(t)) => match t.command {
            Some(c) => token_cmd(c),
            None => sign_cmd(t.sign),
        },
        None => run_worker(args.run).await,
    }
}

fn read_key(k: KeyArgs) -> Result<String> {
    read_optional_key(k)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no signing key: pass --signing-key-file (or set STACYVM_AUTH_WORKER_SIGNING_KEY)"
        )
    })
}

fn read_optional_key(k: KeyArgs) -> Result<Option<String>> {
    match (
        k.signing_key.filter(|s| !s.trim().is_empty()),
        k.signing_key_file,
    ) {
        (Some(_), Some(_)) => bail!("pass --signing-key or --signing-key-file, not both"),
        (Some(k), None) => Ok(Some(k.trim().to_string())),
        (None, Some(f)) => Ok(Some(read_key_file(&f)?)),
        (None, None) => Ok(None),
    }
}

fn read_key_file(f: &std::path::Path) -> Result<String> {
    Ok(std::fs::read_to_string(f)
        .with_context(|| format!("reading {}", f.display()))?
        .trim()
        .to_string())
}

/// Seconds of a duration flag within `0..=max`.
fn secs_flag(flag: &str, v: &str, min: i64, max: i64) -> Result<i64> {
    let n = stacyvm_api::duration::parse(v.trim())
        .map_err(|_| anyhow::anyhow!("invalid --{flag} {v:?}; use a duration like 5m"))?;
    let secs = n / 1_000_000_000;
    if n < 0 || secs < min || secs > max || (min > 0 && n == 0) {
        bail!("--{flag} must be between {}s and {}s, got {v:?}", min, max);
    }
    Ok(secs)
}

fn audience_flag(a: &str) -> Result<Audience> {
    Audience::parse(a)
        .ok_or_else(|| anyhow::anyhow!("--audience must be worker:control-plane or worker:rpc"))
}

/// A token's claims as `inspect` and `verify` print them.
fn claims_json(c: &token::Claims, verified: bool) -> serde_json::Value {
    let t = |s: i64| {
        (s > 0)
            .then(|| chrono::DateTime::from_timestamp(s, 0).map(|d| d.to_rfc3339()))
            .flatten()
    };
    json!({
        "signature_verified": verified,
        "worker_id": c.worker_id,
        "token_id": c.jti,
        "audience": c.aud,
        "scopes": c.scopes,
        "issued_at": t(c.iat),
        "not_before": t(c.nbf),
        "expires_at": t(c.exp),
    })
}

#[allow(clippy::print_stdout)]
fn sign_cmd(a: SignArgs) -> Result<()> {
    let Some(worker_id) = a.worker_id else {
        bail!("which worker? stacyvm worker token <worker-id> (see --help)");
    };
    let key = read_key(a.key)?;
    let ttl = secs_flag("ttl", &a.ttl, 1, token::MAX_TTL_SECS)?;
    let not_before = secs_flag("not-before", &a.not_before, 0, token::MAX_TTL_SECS)?;
    let audience = audience_flag(&a.audience)?;
    if let Some(id) = &a.token_id {
        stacyvm_core::services::check_id("--token-id", id)?;
    }
    let scopes = if a.scopes.is_empty() {
        None
    } else {
        Some(token::parse_scopes(&a.scopes).map_err(|e| anyhow::anyhow!("{e}"))?)
    };
    let issue = Issue {
        scopes,
        not_before_secs: not_before,
        token_id: a.token_id,
        ..Issue::new(&worker_id, audience, ttl)
    };
    let (t, _) = token::sign(key.as_bytes(), &issue, chrono::Utc::now().timestamp())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if a.format == "json" {
        let c = token::inspect(&t).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut v = claims_json(&c, true);
        if let Some(m) = v.as_object_mut() {
            m.remove("signature_verified");
            m.insert("token".into(), json!(t));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{t}");
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
fn token_cmd(c: TokenCommand) -> Result<()> {
    match c {
        TokenCommand::Sign(a) => sign_cmd(a)?,
        TokenCommand::Inspect { token } => {
            let c = token::inspect(&token).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", serde_json::to_string_pretty(&claims_json(&c, false))?);
        }
        TokenCommand::Verify(a) => verify_cmd(a)?,
        TokenCommand::RotationPlan(a) => rotation_plan(a)?,
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
fn verify_cmd(a: VerifyArgs) -> Result<()> {
    // The config's keys and revocations when there is a config.
    let explicit = a.config.is_some();
    let auth = match config::load(a.config.as_deref(), std::env::vars()) {
        Ok(l) => l.config.auth,
        Err(e) if explicit => return Err(e.into()),
        Err(_) => config::AuthConfig::default(),
    };
    let mut keys: Vec<String> = Vec::new();
    if let Some(k) = read_optional_key(a.key)? {
        keys.push(k);
    }
    keys.push(auth.worker_signing_key.expose().trim().to_string());
    keys.extend(
        auth.worker_signing_keys
            .iter()
            .map(|k| k.expose().trim().to_string()),
    );
    keys.extend(a.verification_keys.iter().map(|k| k.trim().to_string()));
    for f in &a.verification_key_files {
        keys.push(read_key_file(f)?);
    }
    keys.retain(|k| !k.is_empty());
    if keys.is_empty() {
        bail!("no key to verify with: pass --signing-key(-file) or --verification-key(-file), or a config with auth.worker_signing_key");
    }
    let mut revoked = auth.worker_revoked_token_ids.clone();
    revoked.extend(a.revoked_token_ids);
    let audience = audience_flag(&a.audience)?;
    let v = token::Verifier::new(&keys, &revoked)
        .verify(
            &a.token,
            audience,
            a.worker_id.as_deref(),
            chrono::Utc::now().timestamp(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&claims_json(&v.claims, true))?
    );
    Ok(())
}

#[allow(clippy::print_stdout)]
fn rotation_plan(a: RotationArgs) -> Result<()> {
    let ttl = secs_flag("ttl", &a.ttl, 1, token::MAX_TTL_SECS)?;
    let wait = ttl + token::SKEW_SECS;
    let (new, prev) = (a.new_key_ref, a.previous_key_ref);
    let steps = [
        format!("Generate a new key of at least {} random bytes into a file only the server reads (e.g. head -c 32 /dev/urandom | base64 > new.key); never paste it into a shell history or a ticket.", token::MIN_KEY_LEN),
        format!("On every control plane and worker, add the current key to {prev} (verification only) and restart or reload them: tokens signed with either key now verify."),
        format!("Put the new key in {new} on every control plane and restart them: new tokens are signed with it."),
        format!("Wait {wait}s (the longest token lifetime, {ttl}s, plus {}s clock skew): every token signed with the previous key has expired.", token::SKEW_SECS),
        format!("Remove the previous key from {prev} everywhere and restart; revoke any token id you distrust with auth.worker_revoked_token_ids."),
    ];
    let yaml = format!(
        "auth:\n  worker_signing_key_file: /etc/stacyvm/worker-signing.new.key   # {new}\n  worker_signing_keys:\n    - <the previous key, from where you keep secrets>   # {prev}, removed in step 5\n"
    );
    let checks = [
        "stacyvm config lint --production".to_string(),
        "stacyvm worker token <worker-id> --signing-key-file /etc/stacyvm/worker-signing.new.key --ttl 1m > t && stacyvm worker token verify \"$(cat t)\" -c /etc/stacyvm/config.yaml".to_string(),
        "stacyvm doctor".to_string(),
    ];
    if a.format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "new_key_ref": new,
                "previous_key_ref": prev,
                "token_ttl_seconds": ttl,
                "wait_seconds": wait,
                "steps": steps,
                "config_sketch": yaml,
                "validation_commands": checks,
            }))?
        );
        return Ok(());
    }
    println!("Worker signing-key rotation ({new}; previous key kept in {prev})\n");
    for (i, s) in steps.iter().enumerate() {
        println!("{}. {s}", i + 1);
    }
    println!("\nConfig during the rotation:\n\n{yaml}");
    println!("Validate:");
    for c in &checks {
        println!("  {c}");
    }
    Ok(())
}

/// Sandboxes this worker's providers still run (providers that cannot
/// list theirs count none).
async fn running_sandboxes(registry: &Registry) -> usize {
    let mut n = 0;
    for p in registry.all() {
        if let Ok(list) = p.list_runtimes().await {
            n += list
                .iter()
                .filter(|r| r.state != stacyvm_api::state::DESTROYED)
                .count();
        }
    }
    n
}

fn hostname_id() -> String {
    let h = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let id: String = h
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() {
        "worker".into()
    } else {
        id
    }
}

/// Where the worker's credential towards the control plane comes from.
enum Credential {
    Static(String),
    File(PathBuf),
    /// A signed token fetched with an admin key, with its expiry.
    Bootstrap {
        admin_key: String,
        cached: Option<(String, chrono::DateTime<chrono::Utc>)>,
    },
}

struct ControlPlane {
    http: reqwest::Client,
    base: String,
    worker_id: String,
    cred: Credential,
}

impl ControlPlane {
    async fn token(&mut self) -> Result<String> {
        match &mut self.cred {
            Credential::Static(t) => Ok(t.clone()),
            Credential::File(p) => Ok(std::fs::read_to_string(&*p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string()),
            Credential::Bootstrap { admin_key, cached } => {
                let now = chrono::Utc::now();
                if let Some((t, exp)) = cached {
                    if *exp - now > chrono::Duration::seconds(60) {
                        return Ok(t.clone());
                    }
                }
                let r = self
                    .http
                    .post(format!("{}/api/v1/admin/worker-tokens", self.base))
                    .header("X-Admin-API-Key", admin_key.as_str())
                    .json(&json!({"worker_id": self.worker_id, "ttl": "5m", "scopes": ["worker:heartbeat", "worker:lease"]}))
                    .send()
                    .await
                    .context("asking the control plane for a worker token")?;
                let status = r.status();
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                if !status.is_success() {
                    bail!(
                        "the control plane refused a worker token ({status}): {}",
                        v["message"]
                    );
                }
                let t = v["token"].as_str().unwrap_or_default().to_string();
                let exp = v["expires_at"]
                    .as_str()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .map_or(now, |d| d.with_timezone(&chrono::Utc));
                *cached = Some((t.clone(), exp));
                Ok(t)
            }
        }
    }

    async fn heartbeat(&mut self, body: &serde_json::Value) -> Result<()> {
        let t = self.token().await?;
        let r = self
            .http
            .post(format!(
                "{}/api/v1/worker/{}/heartbeat",
                self.base, self.worker_id
            ))
            .header("X-Worker-ID", &self.worker_id)
            .header("X-Worker-Token", t)
            .json(body)
            .send()
            .await
            .with_context(|| format!("reaching the control plane at {}", self.base))?;
        let status = r.status();
        if !status.is_success() {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            bail!(
                "the control plane refused the heartbeat ({status}): {}",
                v["message"]
            );
        }
        Ok(())
    }
}

async fn run_worker(a: RunArgs) -> Result<()> {
    let loaded = config::load(a.config.as_deref(), std::env::vars())?;
    let mut cfg = loaded.config;
    crate::serve::init_logging(&cfg);
    let id =
        a.id.clone()
            .filter(|s| !s.is_empty())
            .or_else(|| Some(cfg.worker.id.clone()).filter(|s| !s.is_empty()))
            .unwrap_or_else(hostname_id);
    if !stacyvm_core::paths::is_worker_id(&id) {
        bail!("{id:?} is not a valid worker id (1-64 of A-Z a-z 0-9 . _ -)");
    }
    cfg.worker.id = id.clone();
    let base = a
        .control_plane
        .clone()
        .unwrap_or_else(|| cfg.worker.control_plane_url.clone())
        .trim_end_matches('/')
        .to_string();
    let listen = a
        .listen
        .clone()
        .unwrap_or_else(|| cfg.worker.listen_addr.clone());
    let tls = cfg.worker.rpc_tls.enabled;
    if let Some(u) = a.advertise_url.clone().filter(|u| !u.is_empty()) {
        cfg.worker.advertise_url = u;
    }
    let url = stacyvm_cluster::rpc::advertised_url(&cfg, &listen);
    std::fs::create_dir_all(&cfg.server.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.server.data_dir))?;

    // Every provider the config enables (gaps C-11: not only docker).
    let providers = stacyvm_providers::registry::build(&cfg)?;
    let registry = Arc::new(
        Registry::with_default(providers, &cfg.providers.default)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    recover(&registry).await;

    let cred = if let Some(f) = a.worker_token_file.clone() {
        Credential::File(f)
    } else if let Some(k) = a.bootstrap_admin_key.clone().filter(|s| !s.is_empty()) {
        Credential::Bootstrap {
            admin_key: k,
            cached: None,
        }
    } else if let Some(t) = a
        .worker_token
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| Some(cfg.auth.worker_token.expose().to_string()).filter(|s| !s.is_empty()))
    {
        Credential::Static(t)
    } else {
        bail!("no credential for the control plane: pass --worker-token, --worker-token-file or --bootstrap-admin-key");
    };
    let mut http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10));
    if base.starts_with("https://") && !cfg.worker.rpc_tls.ca_file.is_empty() {
        http =
            http.use_preconfigured_tls(stacyvm_cluster::tls::client_config(&cfg.worker.rpc_tls)?);
    }
    let mut cp = ControlPlane {
        http: http.build().context("building the HTTP client")?,
        base,
        worker_id: id.clone(),
        cred,
    };

    let rpc = WorkerRpc::new(registry.clone(), RpcAuth::from_config(&cfg, &id));
    rpc.persist_fences(std::path::Path::new(&cfg.server.data_dir).join("worker-fences.json"))
        .map_err(anyhow::Error::msg)?;
    let capabilities: Vec<String> = {
        let mut c: Vec<String> = vec!["remote_worker".into(), "heartbeat".into()];
        for p in registry.all() {
            for cap in p.capabilities() {
                if !c.contains(&cap) {
                    c.push(cap);
                }
            }
        }
        c
    };
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let beat = |state: &str, images: Vec<String>| {
        json!({
            "hostname": hostname,
            "status": state,
            "providers": registry.names(),
            "capabilities": capabilities,
            "capacity": {
                "max_sandboxes": cfg.defaults.max_sandboxes,
                "max_sandboxes_per_owner": cfg.defaults.max_sandboxes_per_owner,
                "preview_domain": if cfg.worker.preview_domain.is_empty() { cfg.server.preview_domain.clone() } else { cfg.worker.preview_domain.clone() },
                "rpc_url": url,
                "images": images,
                "drain_policy": if cfg.worker.drain_policy.is_empty() { "finish" } else { cfg.worker.drain_policy.as_str() },
            },
        })
    };
    // The first heartbeat must land: a worker the control plane does not
    // accept should fail loudly, not sit idle.
    cp.heartbeat(&beat("online", registry.local_images().await))
        .await
        .context("first heartbeat")?;
    info!(worker_id = %id, control_plane = %cp.base, rpc_url = %url, providers = ?registry.names(), "worker registered");
    if a.once {
        return Ok(());
    }
    if url.is_empty() {
        warn!("no worker.listen_addr: this worker serves no RPC and receives no sandboxes");
    }

    let stop = tokio_util::sync::CancellationToken::new();
    let server = if listen.is_empty() {
        None
    } else {
        let tls_cfg = if tls {
            Some(stacyvm_cluster::tls::server_config(&cfg.worker.rpc_tls)?)
        } else {
            warn!("worker.rpc_tls is off: worker RPC is plain HTTP (use it only on a trusted network)");
            None
        };
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        info!(addr = %listener.local_addr()?, tls, "worker RPC listening");
        let router = rpc.router();
        let s = stop.clone();
        Some(tokio::spawn(async move {
            stacyvm_cluster::tls::serve(
                listener,
                router,
                tls_cfg,
                async move { s.cancelled().await },
            )
            .await
        }))
    };

    let every = Duration::from_secs(
        a.heartbeat_interval
            .unwrap_or_else(|| cfg.worker.heartbeat_interval.std().as_secs())
            .max(1),
    );
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let shutdown = crate::serve::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let state = if rpc.is_draining() { "draining" } else { "online" };
                if let Err(e) = cp.heartbeat(&beat(state, registry.local_images().await)).await {
                    warn!(error = %format!("{e:#}"), "heartbeat failed");
                }
            }
            _ = &mut shutdown => break,
        }
    }
    // Drain: no new sandboxes; the ones here keep being served a while.
    rpc.drain();
    if let Err(e) = cp
        .heartbeat(&beat("draining", registry.local_images().await))
        .await
    {
        warn!(error = %format!("{e:#}"), "draining heartbeat failed");
    }
    // Its sandboxes finish: it keeps serving (and heartbeating, so they
    // are not marked unhealthy) until none is left, `shutdown_timeout`
    // passes, or a second signal says stop now.
    let grace = cfg.worker.shutdown_timeout.std();
    let started = std::time::Instant::now();
    let again = crate::serve::shutdown_signal();
    tokio::pin!(again);
    loop {
        let left = running_sandboxes(&registry).await;
        if left == 0 {
            info!("drained: no sandbox left");
            break;
        }
        let Some(remaining) = grace.checked_sub(started.elapsed()) else {
            warn!(
                sandboxes = left,
                "shutdown_timeout passed with sandboxes still here; going offline"
            );
            break;
        };
        info!(
            sandboxes = left,
            remaining_s = remaining.as_secs(),
            "draining: waiting for sandboxes to finish"
        );
        tokio::select! {
            _ = tokio::time::sleep(every.min(remaining).min(Duration::from_secs(5))) => {}
            _ = &mut again => {
                warn!(sandboxes = left, "second signal: going offline now");
                break;
            }
        }
        if let Err(e) = cp
            .heartbeat(&beat("draining", registry.local_images().await))
            .await
        {
            warn!(error = %format!("{e:#}"), "draining heartbeat failed");
        }
    }
    if let Err(e) = cp.heartbeat(&beat("offline", Vec::new())).await {
        warn!(error = %format!("{e:#}"), "offline heartbeat failed");
    }
    stop.cancel();
    if let Some(s) = server {
        let _ = s.await;
    }
    for p in registry.all() {
        p.shutdown().await;
    }
    info!("worker stopped");
    Ok(())
}

/// Picks up the sandboxes a previous run of this worker left (their
/// control plane still has them).
async fn recover(registry: &Registry) {
    for p in registry.all() {
        let Ok(runtimes) = p.list_runtimes().await else {
            continue;
        };
        for rt in runtimes {
            match p.recover(&rt.sandbox_id).await {
                Ok(()) => {
                    info!(sandbox_id = %rt.sandbox_id, provider = p.name(), "recovered a sandbox")
                }
                Err(e) => {
                    warn!(sandbox_id = %rt.sandbox_id, provider = p.name(), error = %e, "could not recover a sandbox")
                }
            }
        }
    }
}
