//! The `mock` provider: a TEST DOUBLE, not a sandbox.
//!
//! It runs commands directly on the host with the host's privileges, in a
//! per-sandbox directory that stands in for the root filesystem (sandbox path
//! `/workspace/a` is `<base>/<id>/workspace/a`). Use it for orchestrator and
//! API tests only; it is never a default and the server warns loudly when it
//! is enabled. State lives on disk under the base directory, so a new
//! instance re-discovers sandboxes (exercises adoption after restart).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use stacyvm_api::FileInfo;
use stacyvm_core::provider::{
    buffered_read, capability, collect_upload, ExecInput, ExecSpec, ExitStatus, FileStream,
    Isolation, OutputChunk, OutputSink, Profile, Provider, RuntimeInfo, RuntimeStatus,
    SandboxSnapshot, SpawnSpec, Spawned, StreamKind,
};
use stacyvm_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::hostfs::HostRoot;

const META: &str = ".stacyvm-mock.json";

/// `cp -a from to` (to must not exist).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| Error::internal("running cp").with_source(e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "copying {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[derive(Debug)]
pub struct MockProvider {
    base: PathBuf,
}

impl MockProvider {
    /// A mock provider keeping sandbox directories under `base`.
    pub fn new(base: impl Into<PathBuf>) -> Result<Self> {
        let base = base.into();
        std::fs::create_dir_all(&base)
            .map_err(|e| Error::internal(format!("creating {}", base.display())).with_source(e))?;
        Ok(MockProvider { base })
    }

    fn dir(&self, id: &str) -> Result<PathBuf> {
        if !stacyvm_core::paths::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        let d = self.base.join(id);
        if !d.join(META).is_file() {
            return Err(Error::sandbox_not_found(id));
        }
        Ok(d)
    }

    fn root(&self, id: &str) -> Result<HostRoot> {
        Ok(HostRoot::new(self.dir(id)?))
    }

    /// Where snapshot `id` lives (`<base>/.snapshots/<id>`).
    fn snapshot_dir(&self, id: &str) -> Result<PathBuf> {
        if !stacyvm_core::paths::is_snapshot_id(id) {
            return Err(Error::invalid(format!("bad snapshot id {id:?}")));
        }
        Ok(self.base.join(".snapshots").join(id))
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::internal("file worker failed").with_source(e))?
    }
}

impl MockProvider {
    async fn run(
        &self,
        id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
        input: Option<tokio::sync::mpsc::Receiver<ExecInput>>,
    ) -> Result<ExitStatus> {
        let dir = self.dir(id)?;
        if spec.pty.is_some() {
            return Err(Error::unsupported("mock: pty exec"));
        }
        if spec.user.is_some_and(|u| u.uid != 0) {
            return Err(Error::unsupported("mock: exec as a user other than root"));
        }
        let root = HostRoot::new(&dir);
        let workdir = if spec.workdir.is_empty() {
            "/workspace".to_string()
        } else {
            spec.workdir.clone()
        };
        let cwd = root.resolve(&workdir, true)?;
        if !cwd.is_dir() {
            return Err(Error::invalid(format!(
                "workdir {workdir:?} does not exist"
            )));
        }
        let Some((prog, args)) = spec.argv.split_first() else {
            return Err(Error::invalid("empty command"));
        };
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .current_dir(&cwd)
            .env("HOME", &dir)
            .env("WORKSPACE", dir.join("workspace"))
            .env("SANDBOX_ROOT", &dir)
            .envs(&spec.env)
            .stdin(if spec.stdin.is_some() || input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let msg = format!("stacyvm: {prog}: command not found\n");
                let _ = sink
                    .send(OutputChunk {
                        stream: StreamKind::Stderr,
                        data: msg.into_bytes(),
                    })
                    .await;
                return Ok(ExitStatus {
                    code: 127,
                    signal: None,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                let msg = format!("stacyvm: {prog}: permission denied\n");
                let _ = sink
                    .send(OutputChunk {
                        stream: StreamKind::Stderr,
                        data: msg.into_bytes(),
                    })
                    .await;
                return Ok(ExitStatus {
                    code: 126,
                    signal: None,
                });
            }
            Err(e) => return Err(Error::internal("starting command").with_source(e)),
        };
        let mut guard = GroupKill(child.id().and_then(|p| i32::try_from(p).ok()));
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        match (child.stdin.take(), spec.stdin.clone(), input) {
            (Some(stdin), _, Some(mut input)) => {
                tokio::spawn(async move {
                    let mut stdin = Some(stdin);
                    while let Some(msg) = input.recv().await {
                        match msg {
                            ExecInput::Stdin(d) => {
                                if let Some(w) = stdin.as_mut() {
                                    let _ = w.write_all(&d).await;
                                }
                            }
                            ExecInput::CloseStdin => stdin = None,
                            ExecInput::Resize(..) => {}
                            ExecInput::Signal(sig) => {
                                if let (Some(pg), Ok(sig)) = (pgid, Signal::try_from(sig)) {
                                    let _ = killpg(Pid::from_raw(pg), sig);
                                }
                            }
                        }
                    }
                });
            }
            (Some(mut stdin), Some(data), None) => {
                tokio::spawn(async move {
                    let _ = stdin.write_all(&data).await;
                });
            }
            _ => {}
        }
        let out = child
            .stdout
            .take()
            .map(|o| tokio::spawn(pump(o, StreamKind::Stdout, sink.clone())));
        let err = child
            .stderr
            .take()
            .map(|e| tokio::spawn(pump(e, StreamKind::Stderr, sink.clone())));
        let wait = async {
            let status = child.wait().await;
            // Output pipes close when every process holding them exits.
            if let Some(h) = out {
                let _ = h.await;
            }
            if let Some(h) = err {
                let _ = h.await;
            }
            status
        };
        let status = match spec.timeout {
            Some(t) => match tokio::time::timeout(t, wait).await {
                Ok(s) => s,
                Err(_) => {
                    drop(guard); // kill the group now
                    return Err(Error::exec_timeout(id));
                }
            },
            None => wait.await,
        }
        .map_err(|e| Error::internal("waiting for command").with_source(e))?;
        // Leftover background processes die with the group.
        drop(std::mem::replace(&mut guard, GroupKill(None)));
        let _ = guard;
        use std::os::unix::process::ExitStatusExt;
        Ok(match (status.code(), status.signal()) {
            (Some(c), _) => ExitStatus {
                code: c,
                signal: None,
            },
            (None, Some(s)) => ExitStatus {
                code: 128 + s,
                signal: Some(s),
            },
            _ => ExitStatus {
                code: -1,
                signal: None,
            },
        })
    }
}

/// Kills the whole process group when dropped (timeout, cancellation).
struct GroupKill(Option<i32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

async fn pump(mut r: impl tokio::io::AsyncRead + Unpin, stream: StreamKind, sink: OutputSink) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // A closed receiver must not stop the command: keep draining.
                let _ = sink
                    .send(OutputChunk {
                        stream,
                        data: buf[..n].to_vec(),
                    })
                    .await;
            }
        }
    }
}

#[async_trait]
impl Provider for MockProvider {
    fn name(&self) -> &str {
        "mock"
    }

    fn capabilities(&self) -> Vec<String> {
        let mut c: Vec<String> = capability::BASE.iter().map(|s| s.to_string()).collect();
        c.push(capability::RUNTIME_INVENTORY.into());
        c.push("test_provider".into());
        c.push(capability::EXEC_INTERACTIVE.into());
        c.push(capability::SANDBOX_SNAPSHOTS.into());
        c
    }

    fn profile(&self) -> Profile {
        Profile {
            isolation: Isolation::None,
            network_modes: vec!["none".into(), "bridge".into()],
            default_network: "none".into(),
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("type".to_string(), "mock".to_string()),
            ("base_dir".to_string(), self.base.display().to_string()),
            (
                "isolation".to_string(),
                "none: runs commands on the host (test double)".to_string(),
            ),
        ])
    }

    async fn health(&self) -> Result<()> {
        if self.base.is_dir() {
            Ok(())
        } else {
            Err(Error::unavailable(format!(
                "mock base dir {} is missing",
                self.base.display()
            )))
        }
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        if spec.image.contains(char::is_whitespace) {
            return Err(Error::invalid(format!(
                "invalid image name {:?}",
                spec.image
            )));
        }
        let dir = self.base.join(&spec.id);
        let meta = serde_json::json!({
            "image": spec.image,
            "created_at": Utc::now(),
            "expires_at": spec.expires_at,
            "owner_id": spec.owner_id,
            "tenant_id": spec.tenant_id,
            "metadata": spec.metadata,
        });
        let id = spec.id.clone();
        let from = match &spec.snapshot {
            Some(s) => {
                let d = self.snapshot_dir(s)?;
                if !d.is_dir() {
                    return Err(Error::not_found(format!("snapshot {s:?}")));
                }
                Some(d)
            }
            None => None,
        };
        Self::blocking(move || {
            std::fs::create_dir_all(dir.join("tmp"))?;
            match from {
                // A child starts with the snapshot's files.
                Some(src) => copy_tree(&src.join("workspace"), &dir.join("workspace"))?,
                None => std::fs::create_dir_all(dir.join("workspace"))?,
            }
            std::fs::write(dir.join(META), meta.to_string())?;
            Ok(())
        })
        .await
        .map_err(|e| e.context("mock spawn"))?;
        Ok(Spawned { runtime_id: id })
    }

    /// A copy of the sandbox's `/workspace` (a test double's snapshot: no
    /// memory, no processes).
    async fn snapshot_sandbox(&self, id: &str, snapshot_id: &str) -> Result<SandboxSnapshot> {
        let dir = self.base.join(id);
        if !stacyvm_core::paths::is_sandbox_id(id) || !dir.join(META).is_file() {
            return Err(Error::sandbox_not_found(id));
        }
        let target = self.snapshot_dir(snapshot_id)?;
        if target.exists() {
            return Err(Error::conflict(format!("snapshot {snapshot_id} exists")));
        }
        let size_bytes = Self::blocking(move || {
            std::fs::create_dir_all(&target)?;
            copy_tree(&dir.join("workspace"), &target.join("workspace"))?;
            Ok(crate::native::disk::usage(&target, u64::MAX).0)
        })
        .await
        .map_err(|e| e.context("mock snapshot"))?;
        Ok(SandboxSnapshot {
            size_bytes,
            network_mode: "none".into(),
        })
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        let dir = self.snapshot_dir(snapshot_id)?;
        Self::blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        })
        .await
    }

    async fn exec(&self, id: &str, spec: &ExecSpec, sink: OutputSink) -> Result<ExitStatus> {
        self.run(id, spec, sink, None).await
    }

    async fn exec_interactive(
        &self,
        id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
        input: tokio::sync::mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus> {
        self.run(id, spec, sink, Some(input)).await
    }

    async fn write_file(&self, id: &str, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let root = self.root(id)?;
        let (path, data) = (path.to_string(), data.to_vec());
        Self::blocking(move || root.write(&path, &data, mode)).await
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>> {
        let root = self.root(id)?;
        let path = path.to_string();
        Self::blocking(move || root.read(&path)).await
    }

    async fn read_file_stream(&self, id: &str, path: &str, max_bytes: u64) -> Result<FileStream> {
        buffered_read(self.read_file(id, path).await?, path, max_bytes)
    }

    async fn write_file_stream(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        max_bytes: u64,
    ) -> Result<u64> {
        let data = collect_upload(chunks, max_bytes).await?;
        self.write_file(id, path, &data, mode).await?;
        Ok(data.len() as u64)
    }

    async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileInfo>> {
        let root = self.root(id)?;
        let path = path.to_string();
        Self::blocking(move || {
            let mut v = root.list(&path)?;
            v.retain(|f| f.name != META);
            Ok(v)
        })
        .await
    }

    async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let root = self.root(id)?;
        let path = path.to_string();
        Self::blocking(move || root.delete(&path, recursive)).await
    }

    async fn move_file(&self, id: &str, old: &str, new: &str) -> Result<()> {
        let root = self.root(id)?;
        let (old, new) = (old.to_string(), new.to_string());
        Self::blocking(move || root.rename(&old, &new)).await
    }

    async fn chmod_file(&self, id: &str, path: &str, mode: u32) -> Result<()> {
        let root = self.root(id)?;
        let path = path.to_string();
        Self::blocking(move || root.chmod(&path, mode)).await
    }

    async fn stat_file(&self, id: &str, path: &str) -> Result<FileInfo> {
        let root = self.root(id)?;
        let path = path.to_string();
        Self::blocking(move || root.stat(&path)).await
    }

    async fn glob_files(&self, id: &str, pattern: &str) -> Result<Vec<String>> {
        let root = self.root(id)?;
        let pattern = pattern.to_string();
        Self::blocking(move || {
            let mut v = root.glob(&pattern)?;
            v.retain(|p| !p.ends_with(META));
            Ok(v)
        })
        .await
    }

    async fn status(&self, id: &str) -> Result<RuntimeStatus> {
        self.dir(id)?;
        Ok(RuntimeStatus {
            state: "running".into(),
        })
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        let dir = match self.dir(id) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::SandboxNotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        Self::blocking(move || {
            // Remove the marker first so a crash mid-way leaves no "live" sandbox.
            let _ = std::fs::remove_file(dir.join(META));
            std::fs::remove_dir_all(&dir).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        self.dir(id)?;
        let all = vec![
            format!("[mock] sandbox {id} started"),
            "[mock] test double: commands run on the host without isolation".to_string(),
        ];
        let skip = all.len().saturating_sub(lines);
        Ok(all.into_iter().skip(skip).collect())
    }

    async fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>> {
        let base = self.base.clone();
        Self::blocking(move || {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(&base)? {
                let entry = entry?;
                let id = entry.file_name().to_string_lossy().to_string();
                if !stacyvm_core::paths::is_sandbox_id(&id) {
                    continue;
                }
                let Ok(text) = std::fs::read_to_string(entry.path().join(META)) else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let s = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                let t = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_str())
                        .and_then(|x| DateTime::parse_from_rfc3339(x).ok())
                        .map(|x| x.with_timezone(&Utc))
                };
                out.push(RuntimeInfo {
                    sandbox_id: id,
                    state: "running".into(),
                    image: s("image"),
                    created_at: t("created_at"),
                    metadata: v
                        .get("metadata")
                        .and_then(|m| serde_json::from_value(m.clone()).ok())
                        .unwrap_or_default(),
                    owner_id: s("owner_id"),
                    tenant_id: s("tenant_id"),
                    expires_at: t("expires_at"),
                });
            }
            Ok(out)
        })
        .await
    }
}

/// The base directory a mock provider would use under a data dir.
pub fn default_base(data_dir: &Path) -> PathBuf {
    data_dir.join("mock")
}

/// The mock test double's module (`providers.mock.*`).
pub struct MockModule;

#[async_trait]
impl crate::registry::ProviderModule for MockModule {
    fn kind(&self) -> &'static str {
        "mock"
    }

    fn enabled(&self, cfg: &stacyvm_core::config::Config) -> bool {
        cfg.providers.mock.enabled
    }

    fn build(&self, cfg: &stacyvm_core::config::Config) -> Result<std::sync::Arc<dyn Provider>> {
        tracing::warn!("the mock provider is enabled: it runs sandbox commands ON THE HOST without isolation; use it for tests only");
        Ok(std::sync::Arc::new(MockProvider::new(default_base(
            Path::new(&cfg.server.data_dir),
        ))?))
    }

    fn lint(
        &self,
        _cfg: &stacyvm_core::config::Config,
        p: bool,
        r: &mut stacyvm_core::checks::Report,
    ) {
        r.prod(
            p,
            "providers.mock.enabled",
            "the mock provider runs sandbox commands on the host without isolation",
            "set providers.mock.enabled: false (it is for tests only)",
        );
    }

    async fn doctor(
        &self,
        _cfg: &stacyvm_core::config::Config,
        production: bool,
        r: &mut stacyvm_core::checks::Report,
    ) {
        r.prod(
            production,
            "providers.mock",
            "enabled: it runs sandbox commands on the host without isolation",
            "set providers.mock.enabled: false outside tests",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        base: PathBuf,
    }

    impl crate::conformance::Fixture for Fixture {
        fn provider(&self) -> std::sync::Arc<dyn Provider> {
            std::sync::Arc::new(MockProvider::new(&self.base).expect("mock"))
        }
        fn image(&self) -> String {
            "host".into()
        }
        fn survives_restart(&self) -> bool {
            true
        }
        fn supports_pty(&self) -> bool {
            false
        }
        fn has_devices(&self) -> bool {
            false
        }
        fn supports_users(&self) -> bool {
            false
        }
        fn supports_archives(&self) -> bool {
            false
        }
        fn supports_connect(&self) -> bool {
            false
        }
        fn supports_watch(&self) -> bool {
            false
        }
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tmp");
        let base = dir.path().join("mock");
        Fixture { _dir: dir, base }
    }

    crate::conformance_tests!(mock_conformance, fixture());
}
