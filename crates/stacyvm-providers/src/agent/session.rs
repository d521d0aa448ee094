//! Exec and every file operation over the agent protocol, written once for
//! every agent-backed provider (native, docker, PRoot, microVM).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_api::FileInfo;
use stacyvm_core::provider::{
    ExecInput, ExecSpec, ExitStatus, FileStream, FsEvents, OutputSink, SandboxIo,
};
use stacyvm_core::Result;
use tokio::sync::mpsc;

use super::client::{self, exec_request, to_info, AgentClient, MAX_RESULT_BYTES};

/// One sandbox's agent connection plus the base environment of its execs.
#[derive(Debug, Clone)]
pub struct AgentSession {
    /// The runtime id, for errors (`exec timeout: <id>`).
    id: Arc<str>,
    client: Arc<AgentClient>,
    /// Environment every exec starts from (e.g. a container image's `ENV`);
    /// the request's env overrides it.
    env: Arc<BTreeMap<String, String>>,
}

impl AgentSession {
    pub fn new(id: &str, client: Arc<AgentClient>) -> Self {
        AgentSession {
            id: id.into(),
            client,
            env: Arc::default(),
        }
    }

    /// The same session with a base environment for execs.
    #[must_use]
    pub fn with_env(mut self, env: BTreeMap<String, String>) -> Self {
        self.env = Arc::new(env);
        self
    }

    pub fn client(&self) -> &Arc<AgentClient> {
        &self.client
    }

    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// Whether the connection is gone (the provider reconnects).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn request(&self, spec: &ExecSpec, stdin: bool) -> stacyvm_agent_proto::Request {
        if self.env.is_empty() {
            return exec_request(spec, stdin);
        }
        let mut s = spec.clone();
        let mut env = (*self.env).clone();
        env.extend(spec.env.clone());
        s.env = env;
        exec_request(&s, stdin)
    }
}

#[async_trait]
impl SandboxIo for AgentSession {
    async fn exec(&self, spec: &ExecSpec, sink: OutputSink) -> Result<ExitStatus> {
        let req = self.request(spec, spec.stdin.is_some());
        let exit = self.client.exec(req, spec.stdin.clone(), sink).await?;
        client::to_status(&self.id, exit)
    }

    async fn exec_interactive(
        &self,
        spec: &ExecSpec,
        sink: OutputSink,
        input: mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus> {
        let req = self.request(spec, true);
        let exit = self.client.exec_interactive(req, input, sink).await?;
        client::to_status(&self.id, exit)
    }

    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.client.write_file(path, data, mode).await
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.client.read_all(path, MAX_RESULT_BYTES as u64).await
    }

    async fn read_file_stream(&self, path: &str, max_bytes: u64) -> Result<FileStream> {
        self.client.read_stream(path, max_bytes).await
    }

    async fn write_file_stream(
        &self,
        path: &str,
        mode: u32,
        chunks: mpsc::Receiver<Vec<u8>>,
        max_bytes: u64,
    ) -> Result<u64> {
        self.client
            .write_stream(path, mode, chunks, max_bytes)
            .await
    }

    async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>> {
        let stats = self.client.list(path).await?;
        Ok(stats.into_iter().map(to_info).collect())
    }

    async fn delete_file(&self, path: &str, recursive: bool) -> Result<()> {
        self.client.remove(path, recursive).await
    }

    async fn move_file(&self, old: &str, new: &str) -> Result<()> {
        self.client.rename(old, new).await
    }

    async fn chmod_file(&self, path: &str, mode: u32) -> Result<()> {
        self.client.chmod(path, mode).await
    }

    async fn stat_file(&self, path: &str) -> Result<FileInfo> {
        Ok(to_info(self.client.stat(path).await?))
    }

    async fn watch_dir(&self, path: &str, recursive: bool) -> Result<FsEvents> {
        self.client.watch(path, recursive).await
    }

    async fn glob_files(&self, pattern: &str) -> Result<Vec<String>> {
        // An empty match is `[]`, never null (gaps C-3).
        self.client.glob(pattern).await
    }

    async fn archive_read(
        &self,
        path: &str,
        limits: stacyvm_core::provider::ArchiveLimits,
    ) -> Result<FileStream> {
        self.client
            .archive_read(path, limits.max_bytes, limits.max_entries)
            .await
    }

    async fn archive_write(
        &self,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
        limits: stacyvm_core::provider::ArchiveLimits,
    ) -> Result<stacyvm_core::provider::ArchiveReport> {
        let (entries, bytes) = self
            .client
            .archive_write(path, chunks, limits.max_bytes, limits.max_entries)
            .await?;
        Ok(stacyvm_core::provider::ArchiveReport { entries, bytes })
    }

    async fn connect(&self, port: u16) -> Result<stacyvm_core::provider::PortStream> {
        self.client.connect_port(port).await
    }
}

/// The exec as it runs: a provider's hard timeout `max` (zero = none)
/// caps the request's own.
pub fn capped(spec: &ExecSpec, max: std::time::Duration) -> ExecSpec {
    let mut s = spec.clone();
    if !max.is_zero() {
        s.timeout = Some(s.timeout.map_or(max, |t| t.min(max)));
    }
    s
}
