//! Templates that act: a sandbox spawned from a template gets the
//! template's environment (every exec starts with it), its secrets (as
//! environment variables resolved at each exec, or files written at
//! spawn), its files, and then its `setup` commands, in order. A step that
//! fails or outlives `defaults.max_exec_timeout` ends the spawn with a
//! typed error (`SETUP_FAILED`, 422) carrying the command's exit code and
//! the tail of its output, and the sandbox is destroyed.
//!
//! What the sandbox record keeps: the template's environment and, for
//! secrets, only which variable takes which secret (hidden metadata keys
//! under the reserved `stacyvm.sys.` prefix, never shown). Secret values live
//! only in the server's secret store ([`crate::secrets`]) and in the
//! sandbox.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stacyvm_api::GoDuration;
use tokio::sync::mpsc;

use super::Manager;
use crate::error::{Error, ErrorKind, Result};
use crate::provider::{ExecSpec, OutputChunk};
use crate::secrets::{self, Inject};
use crate::store::{SandboxRecord, TemplateRecord};

/// Metadata keys users cannot set (`stacyvm.sys.…`).
pub const RESERVED_PREFIX: &str = "stacyvm.sys.";
/// The template's environment (JSON object).
pub(crate) const ENV_KEY: &str = "stacyvm.sys.env";
/// Environment variable → secret name (JSON object).
pub(crate) const SECRET_ENV_KEY: &str = "stacyvm.sys.secret_env";
/// File path → secret name (JSON object).
pub(crate) const SECRET_FILES_KEY: &str = "stacyvm.sys.secret_files";
/// Marks a warm-pool sandbox not yet claimed: `template@updated_at`.
pub(crate) const POOL_KEY: &str = "stacyvm.sys.pool";

/// Most bytes of files one template may write.
const MAX_FILES_BYTES: usize = 1024 * 1024;
/// Most setup commands.
const MAX_SETUP_STEPS: usize = 64;
/// Output kept of a failed step for its error (the tail).
const OUTPUT_TAIL: usize = 2048;

/// Whether spawning from `t` does anything beyond sizing (env, secrets,
/// files or setup).
pub(crate) fn acts(t: &TemplateRecord) -> bool {
    !t.env.is_empty() || !t.secrets.is_empty() || !t.files.is_empty() || !t.setup.is_empty()
}

/// Checks a template's acting parts when it is created or replaced.
pub fn check_template(t: &TemplateRecord) -> Result<()> {
    crate::egress::check_allowed_hosts(&t.allowed_hosts)?;
    if let Some(k) = t.metadata.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
        return Err(Error::invalid(format!(
            "template metadata key {k:?}: the prefix {RESERVED_PREFIX:?} is reserved"
        )));
    }
    for (k, v) in &t.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(Error::invalid(format!(
                "template env: invalid variable name {k:?}"
            )));
        }
    }
    let mut targets = std::collections::BTreeSet::new();
    for s in &t.secrets {
        secrets::check_name(&s.name)?;
        let target = secrets::inject_of(&s.name, &s.inject_at)?;
        if !targets.insert(target.clone()) {
            return Err(Error::invalid(format!(
                "template secrets: two secrets go to {target:?}"
            )));
        }
    }
    let mut bytes = 0;
    for (path, content) in &t.files {
        let p = crate::paths::normalize(path)?;
        if !path.starts_with('/') || p == "/" {
            return Err(Error::invalid(format!(
                "template files: {path:?} must be an absolute file path"
            )));
        }
        bytes += content.len();
    }
    if bytes > MAX_FILES_BYTES {
        return Err(Error::invalid(format!(
            "template files hold {bytes} bytes; the limit is {MAX_FILES_BYTES}"
        )));
    }
    if t.setup.len() > MAX_SETUP_STEPS {
        return Err(Error::invalid(format!(
            "template setup has {} commands; the limit is {MAX_SETUP_STEPS}",
            t.setup.len()
        )));
    }
    if t.setup
        .iter()
        .any(|c| c.trim().is_empty() || c.contains('\0'))
    {
        return Err(Error::invalid(
            "template setup commands must be non-empty and without NUL bytes",
        ));
    }
    Ok(())
}

/// The hidden metadata a sandbox of `t` carries (its environment and
/// which variable takes which secret).
pub(crate) fn env_metadata(t: &TemplateRecord) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if !t.env.is_empty() {
        out.push((ENV_KEY.to_string(), to_json(&t.env)));
    }
    let mut secret_env = BTreeMap::new();
    let mut secret_files = BTreeMap::new();
    for s in &t.secrets {
        match secrets::inject_of(&s.name, &s.inject_at)? {
            Inject::Env(var) => secret_env.insert(var, s.name.clone()),
            Inject::File(path) => secret_files.insert(path, s.name.clone()),
        };
    }
    if !secret_env.is_empty() {
        out.push((SECRET_ENV_KEY.to_string(), to_json(&secret_env)));
    }
    if !secret_files.is_empty() {
        out.push((SECRET_FILES_KEY.to_string(), to_json(&secret_files)));
    }
    Ok(out)
}

fn to_json(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_default()
}

fn from_json(rec: &SandboxRecord, key: &str) -> BTreeMap<String, String> {
    rec.metadata
        .get(key)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

/// The last `max` bytes of `b`, as text.
fn tail(b: &[u8], max: usize) -> String {
    let start = b.len().saturating_sub(max);
    String::from_utf8_lossy(&b[start..]).into_owned()
}

impl Manager {
    /// The server's secret store.
    pub fn secrets(&self) -> crate::secrets::Secrets {
        crate::secrets::Secrets::new(std::path::Path::new(&self.cfg.server.data_dir))
    }

    /// Every secret `t` names resolves on this server (checked before a
    /// spawn, so a missing one is a 400 and no sandbox is made).
    pub(crate) fn check_secrets(&self, t: &TemplateRecord) -> Result<()> {
        let store = self.secrets();
        for s in &t.secrets {
            store
                .resolve(&s.name)
                .map_err(|e| Error::invalid(format!("template {:?}: {}", t.name, e.detail())))?;
        }
        Ok(())
    }

    /// The environment every exec of `rec` starts with: its template's,
    /// then the secrets it takes, read now.
    pub(crate) fn base_env(&self, rec: &SandboxRecord) -> Result<BTreeMap<String, String>> {
        let mut env = from_json(rec, ENV_KEY);
        let secret_env = from_json(rec, SECRET_ENV_KEY);
        if !secret_env.is_empty() {
            let store = self.secrets();
            for (var, name) in secret_env {
                let v = store.resolve(&name).map_err(|_| {
                    Error::invalid(format!(
                        "secret {name} (this sandbox's {var}) is no longer set on this server"
                    ))
                })?;
                env.insert(var, v);
            }
        }
        Ok(env)
    }

    /// `text` with the values of the secrets `rec` takes replaced by
    /// `[REDACTED]` (stored exec output: the database keeps no secret,
    /// whatever a command prints).
    pub(crate) fn redact_secrets(&self, rec: &SandboxRecord, text: String) -> String {
        let mut names: Vec<String> = from_json(rec, SECRET_ENV_KEY).into_values().collect();
        names.extend(from_json(rec, SECRET_FILES_KEY).into_values());
        if names.is_empty() {
            return text;
        }
        let store = self.secrets();
        let mut out = text;
        for name in &names {
            if let Ok(v) = store.resolve(name) {
                // Short values would redact ordinary words.
                if v.len() >= 4 && out.contains(&v) {
                    out = out.replace(&v, "[REDACTED]");
                }
            }
        }
        out
    }

    /// Writes `t`'s files and secret files into the new sandbox `rec`,
    /// then runs its setup commands in order.
    pub(crate) async fn run_template(&self, rec: &SandboxRecord, t: &TemplateRecord) -> Result<()> {
        let started = Instant::now();
        let provider = self.provider_of(rec).await?;
        let target = rec.runtime_id().to_string();
        let res = async {
            for (path, content) in &t.files {
                provider
                    .write_file(&target, path, content.as_bytes(), 0o644)
                    .await
                    .map_err(|e| {
                        Error::setup_failed(format!(
                            "template {:?}: writing {path}: {}",
                            t.name,
                            e.detail()
                        ))
                    })?;
            }
            let store = self.secrets();
            for s in &t.secrets {
                if let Inject::File(path) = secrets::inject_of(&s.name, &s.inject_at)? {
                    let v = store.resolve(&s.name)?;
                    provider
                        .write_file(&target, &path, v.as_bytes(), 0o400)
                        .await
                        .map_err(|e| {
                            Error::setup_failed(format!(
                                "template {:?}: writing secret {} to {path}: {}",
                                t.name,
                                s.name,
                                e.detail()
                            ))
                        })?;
                }
            }
            let env = self.base_env(rec)?;
            let limit = self.cfg.defaults.max_exec_timeout.std();
            let timeout = (!limit.is_zero()).then_some(limit);
            for (i, cmd) in t.setup.iter().enumerate() {
                let spec = ExecSpec {
                    argv: crate::paths::build_argv("shell", cmd, &[])?,
                    env: env.clone(),
                    timeout,
                    ..ExecSpec::default()
                };
                let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
                let collect = async move {
                    let mut out = Vec::new();
                    while let Some(c) = rx.recv().await {
                        out.extend_from_slice(&c.data);
                        if out.len() > 4 * OUTPUT_TAIL {
                            out.drain(..out.len() - OUTPUT_TAIL);
                        }
                    }
                    out
                };
                let (ran, out) = tokio::join!(provider.exec(&target, &spec, tx), collect);
                let step = format!("template {:?} setup step {} ({cmd:?})", t.name, i + 1);
                match ran {
                    Ok(st) if st.code == 0 => {}
                    Ok(st) => {
                        return Err(Error::setup_failed(format!(
                            "{step} exited with code {}; output: {}",
                            st.code,
                            tail(&out, OUTPUT_TAIL)
                        )))
                    }
                    Err(e) if e.kind() == ErrorKind::ExecTimeout => {
                        return Err(Error::setup_failed(format!(
                            "{step} did not finish within {}; output: {}",
                            GoDuration::from_std(limit.max(Duration::ZERO)),
                            tail(&out, OUTPUT_TAIL)
                        )))
                    }
                    Err(e) => {
                        return Err(Error::setup_failed(format!(
                            "{step} failed: {}",
                            e.detail()
                        )))
                    }
                }
            }
            Ok(())
        }
        .await;
        self.metrics.observe(
            "template_setup",
            &rec.provider,
            started.elapsed(),
            res.as_ref().err().map(ToString::to_string).as_deref(),
        );
        res
    }
}
