//! `stacyvm doctor [--production]`: checks that this host can run the
//! configured providers (spec/config-and-cli.md §6).
//!
//! Unlike `config lint`, doctor looks at the machine: files, devices,
//! kernel features, the Docker engine. Each provider has its own function
//! below; a provider that is neither enabled nor the default gets one WARN
//! line and no further checks. With `--production` the spec's softer
//! findings (weak keys, missing database directory, the mock provider)
//! become failures. Any FAIL makes the command exit with status 1.

use std::fs;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use stacyvm_core::config::{self, Config};

use crate::checks::{self, Report};

/// Arguments of `stacyvm doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Treat production concerns (weak keys, mock provider, missing
    /// database directory) as failures.
    #[arg(long)]
    pub production: bool,
    /// Config file (default: ./stacyvm.yaml, then ~/.stacyvm/config.yaml).
    #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &DoctorArgs) -> Result<()> {
    let report = diagnose(args.config.as_deref(), args.production).await;
    checks::finish(&report, args.json, "doctor")
}

/// Loads the config and runs every check; a config that does not load is
/// the only check reported.
pub async fn diagnose(config_path: Option<&Path>, production: bool) -> Report {
    let mut r = Report::default();
    let cfg = match config::load(config_path, std::env::vars()) {
        Ok(l) => {
            let src = l
                .source
                .as_ref()
                .map_or_else(|| "built-in defaults".into(), |p| p.display().to_string());
            r.pass("config", format!("loaded ({src})"));
            l.config
        }
        Err(e) => {
            r.fail(
                "config",
                e.to_string(),
                "fix the config file; `stacyvm config lint` shows the details",
            );
            return r;
        }
    };
    check_config(&mut r, &cfg, production);
    check_database(&mut r, &cfg, production).await;
    check_data_dir(&mut r, &cfg);
    stacyvm_providers::registry::doctor(&cfg, production, &mut r).await;
    check_firecracker(&mut r, &cfg);
    r
}

fn used(cfg: &Config, name: &str) -> bool {
    cfg.providers.firecracker.enabled || cfg.providers.default == name
}

fn check_config(r: &mut Report, cfg: &Config, p: bool) {
    crate::lint::listen_rule(r, cfg, p);
    stacyvm_providers::registry::lint_default(cfg, r);
    let a = &cfg.auth;
    let key_fix = "set it to a random value of at least 32 characters, e.g. `openssl rand -hex 32`";
    match a.api_key.expose().chars().count() {
        0 => r.prod(p, "auth.api_key", "not set: the API is open", key_fix),
        n if n < 32 => r.prod(p, "auth.api_key", format!("only {n} characters"), key_fix),
        _ => r.pass("auth.api_key", "set"),
    }
    if a.admin_api_key.is_empty() {
        r.prod(
            p,
            "auth.admin_api_key",
            "not set",
            "set auth.admin_api_key to its own random value",
        );
    } else if a.admin_api_key == a.api_key {
        r.prod(
            p,
            "auth.admin_api_key",
            "equal to auth.api_key",
            "give the admin key its own random value",
        );
    } else {
        r.pass("auth.admin_api_key", "set");
    }
    if a.admin_fallback_enabled {
        r.prod(
            p,
            "auth.admin_fallback_enabled",
            "the API key is accepted on admin routes when no admin key is set",
            "set auth.admin_fallback_enabled: false",
        );
    } else {
        r.pass("auth.admin_fallback_enabled", "false");
    }
}

async fn check_database(r: &mut Report, cfg: &Config, p: bool) {
    if cfg.is_postgres() {
        let probe = async {
            let opts = stacyvm_store::parse_dsn(cfg.database.dsn.expose())?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect_with(opts)
                .await
                .map_err(|_| stacyvm_core::Error::unavailable("cannot connect"))?;
            let version: String = sqlx::query_scalar("SHOW server_version")
                .fetch_one(&pool)
                .await
                .map_err(|_| stacyvm_core::Error::unavailable("cannot query"))?;
            let schema: Option<i64> = sqlx::query_scalar(
                "SELECT max(version) FROM schema_migrations WHERE to_regclass('schema_migrations') IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(None);
            pool.close().await;
            Ok::<_, stacyvm_core::Error>((version, schema))
        };
        match probe.await {
            Ok((version, schema)) => r.pass(
                "database.driver",
                format!(
                    "postgres {version}, schema version {} (this build: {})",
                    schema.map_or("none yet".to_string(), |v| v.to_string()),
                    stacyvm_store::pg::latest_version()
                ),
            ),
            Err(e) => r.fail(
                "database.driver",
                format!("postgres: {}", e.detail()),
                "check database.dsn, the server and the network (stacyvm db pg-rehearse tells more)",
            ),
        }
        return;
    }
    r.pass("database.driver", "sqlite");
    let path = cfg.sqlite_path();
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_relative() {
        r.warn(
            "database.path",
            format!("{} is relative to the working directory", path.display()),
            "use an absolute path, e.g. /var/lib/stacyvm/stacyvm.db",
        );
    }
    match fs::metadata(&parent) {
        // The default location is inside server.data_dir, which serve
        // creates (checked below).
        Err(_) if cfg.database.path.trim().is_empty() => {
            r.pass(
                "database.path",
                format!("{} (created with server.data_dir)", path.display()),
            );
            return;
        }
        Err(_) => {
            r.prod(
                p,
                "database.path",
                format!("directory {} does not exist", parent.display()),
                format!("create it: install -d -m 0750 {}", parent.display()),
            );
            return;
        }
        Ok(m) if !m.is_dir() => {
            r.fail(
                "database.path",
                format!("{} is not a directory", parent.display()),
                "point database.path into a directory",
            );
            return;
        }
        Ok(_) => {
            if let Err(e) = probe_writable(&parent) {
                r.fail(
                    "database.path",
                    format!("cannot write in {}: {e}", parent.display()),
                    "run stacyvm as the directory's owner or fix its permissions",
                );
                return;
            }
        }
    }
    if !path.is_relative() {
        r.pass("database.path", path.display().to_string());
    }
    if !path.is_file() {
        r.pass(
            "database.integrity",
            "no database yet; created on first start",
        );
        return;
    }
    match stacyvm_store::backup::verify(&path).await {
        Ok(info) => r.pass(
            "database.integrity",
            format!("ok (schema version {})", info.schema_version),
        ),
        Err(e) => r.fail(
            "database.integrity",
            e.to_string(),
            "restore the latest backup: stacyvm db restore BACKUP --yes",
        ),
    }
}

/// Creates and removes a file in `dir`.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".stacyvm-doctor-{}", std::process::id()));
    fs::write(&probe, b"")?;
    fs::remove_file(&probe)
}

fn check_data_dir(r: &mut Report, cfg: &Config) {
    let dir = Path::new(&cfg.server.data_dir);
    // The directory itself, or the closest ancestor that exists (the
    // server creates the rest).
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p.to_path_buf(),
            _ => {
                existing = PathBuf::from(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        r.fail(
            "server.data_dir",
            format!("{} is not a directory", existing.display()),
            "point server.data_dir at a directory",
        );
        return;
    }
    if let Err(e) = probe_writable(&existing) {
        r.fail(
            "server.data_dir",
            format!("cannot write in {}: {e}", existing.display()),
            "run stacyvm as the directory's owner or fix its permissions",
        );
        return;
    }
    let what = if existing == dir {
        "writable".to_string()
    } else {
        format!("will be created under {}", existing.display())
    };
    match nix::sys::statvfs::statvfs(&existing) {
        Ok(s) => {
            let free = s.blocks_available() * s.fragment_size();
            let gib = free as f64 / (1u64 << 30) as f64;
            if free < 1 << 30 {
                r.warn(
                    "server.data_dir",
                    format!("{} ({what}): only {gib:.2} GiB free", dir.display()),
                    "free space or move server.data_dir; images and sandboxes need room",
                );
            } else {
                r.pass(
                    "server.data_dir",
                    format!("{} ({what}, {gib:.1} GiB free)", dir.display()),
                );
            }
        }
        Err(_) => r.pass("server.data_dir", format!("{} ({what})", dir.display())),
    }
}

/// The firecracker provider checks its host itself (its module's
/// `doctor`); here only the line saying it is not in use.
fn check_firecracker(r: &mut Report, cfg: &Config) {
    if !used(cfg, "firecracker") {
        r.warn(
            "firecracker",
            "not enabled; microVM checks skipped",
            "ignore unless you use microVMs (providers.firecracker.enabled)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_core::checks::which;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn which_needs_the_executable_bit() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("tool");
        fs::write(&f, "#!/bin/sh\n").expect("write");
        assert_eq!(which(f.to_str().expect("utf8")), None);
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(which(f.to_str().expect("utf8")), Some(f));
        assert!(which("sh").is_some());
    }
}
