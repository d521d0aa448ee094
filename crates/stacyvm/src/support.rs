//! `stacyvm support bundle <out>`: one redacted JSON file with what a
//! maintainer needs to help (spec/config-and-cli.md §5): version, platform,
//! the effective config, `config lint --production`, optionally `doctor`
//! and the server's `/api/v1/diagnostics`.
//!
//! Everything goes through [`Redactor`]: the redactor is seeded with every
//! secret of the loaded config, the secret environment variables and the
//! API key used to reach the server, the whole document is redacted, and
//! the rendered text is checked once more before it is written (0600).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use stacyvm_core::config;

use crate::redact::{self, Redactor};

/// Arguments of `stacyvm support bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The JSON file to write (mode 0600).
    pub output: PathBuf,
    /// Config file (must exist; default lookup otherwise).
    #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Include `stacyvm doctor` results.
    #[arg(long)]
    pub include_doctor: bool,
    /// Include GET /api/v1/diagnostics from --server.
    #[arg(long)]
    pub include_server: bool,
    /// Server URL for --include-server.
    #[arg(
        long,
        env = "STACYVM_URL",
        default_value = "http://localhost:7423",
        alias = "url"
    )]
    pub server: String,
    /// API key for --include-server (sent as X-API-Key).
    #[arg(long, env = "STACYVM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Environment variables worth showing (values redacted).
fn relevant_env(vars: &[(String, String)]) -> BTreeMap<String, String> {
    vars.iter()
        .filter(|(k, _)| k.starts_with("STACYVM_") || k == "DOCKER_HOST" || k == "RUST_LOG")
        .map(|(k, v)| {
            let shown = if redact::is_secret_key(k) {
                redact::REDACTED.to_string()
            } else {
                v.clone()
            };
            (k.clone(), shown)
        })
        .collect()
}

pub async fn run(args: &BundleArgs) -> Result<()> {
    match std::fs::symlink_metadata(&args.output) {
        Ok(m) if m.is_dir() => bail!(
            "{} is a directory; give the path of the bundle file to write",
            args.output.display()
        ),
        Ok(_) if !args.force => bail!(
            "{} already exists; pass --force to overwrite it",
            args.output.display()
        ),
        _ => {}
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut redactor = Redactor::new();
    redactor.add_env(env.clone());
    if let Some(k) = &args.api_key {
        redactor.add_secret(k);
    }
    let mut errors: Vec<String> = Vec::new();
    let mut bundle = json!({
        "generated_at": chrono::Utc::now().to_rfc3339(),
        "version": env!("CARGO_PKG_VERSION"),
        // goos/goarch as the original's bundles name them; os/arch for people.
        "runtime": {
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "goos": std::env::consts::OS,
            "goarch": if std::env::consts::ARCH == "x86_64" { "amd64" } else if std::env::consts::ARCH == "aarch64" { "arm64" } else { std::env::consts::ARCH },
        },
    });
    let loaded = config::load(args.config.as_deref(), env.clone());
    match &loaded {
        Ok(l) => {
            let cfg_value = serde_json::to_value(&l.config).context("serialising the config")?;
            redactor.add_secrets_from(&cfg_value);
            bundle["config_source"] = json!(l.source);
            bundle["config"] = cfg_value;
            bundle["unknown_config_keys"] = json!(l.unknown_keys);
            bundle["config_lint"] = crate::lint::lint(&l.config, true).to_json();
        }
        Err(e) => {
            if let Some(p) = &args.config {
                // An explicit file that cannot be read is the caller's error.
                if !p.is_file() {
                    bail!("config file {}: does not exist", p.display());
                }
            }
            errors.push(format!("config: {e}"));
        }
    }
    if args.include_doctor {
        let report = crate::doctor::diagnose(args.config.as_deref(), true).await;
        bundle["doctor"] = report.to_json();
    }
    if args.include_server {
        match server_diagnostics(&args.server, args.api_key.clone()).await {
            Ok(v) => bundle["server_diagnostics"] = v,
            Err(e) => errors.push(format!("server diagnostics from {}: {e:#}", args.server)),
        }
    }
    bundle["environment"] = json!(relevant_env(&env));
    if !errors.is_empty() {
        bundle["collection_errors"] = json!(errors);
    }
    bundle["redactions"] = json!(redact::RULES);
    redactor.value(&mut bundle);
    let mut text = serde_json::to_string_pretty(&bundle)?;
    text.push('\n');
    // Last line of defence: no known secret may be in the file.
    redactor
        .check(&text)
        .map_err(|e| anyhow::anyhow!("support bundle: {e}"))?;
    write_private(&args.output, text.as_bytes(), args.force)?;
    println!("support bundle written: {}", args.output.display());
    for e in bundle["collection_errors"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", e.as_str().unwrap_or_default());
    }
    Ok(())
}

async fn server_diagnostics(url: &str, api_key: Option<String>) -> Result<Value> {
    let client = stacyvm_client::Client::new(url, api_key)?;
    let v: Value = client.get_json("/diagnostics").await?;
    Ok(v)
}

/// Writes `data` to `path` with mode 0600 via a temporary sibling and a
/// rename, so a partial file never appears under the final name.
fn write_private(path: &std::path::Path, data: &[u8], force: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".stacyvm-bundle-{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    if !force && std::fs::symlink_metadata(path).is_ok() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
