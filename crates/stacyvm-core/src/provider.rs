//! The provider trait: one backend that runs sandboxes.
//!
//! Contract highlights (checked by the conformance suite in
//! `stacyvm-providers::conformance`):
//! - `spawn` returns only once the sandbox can run commands.
//! - `exec` streams output chunks in order to the sink and returns the exit
//!   status; a non-zero exit is `Ok`. When `spec.timeout` elapses the whole
//!   process tree is killed and the result is `ErrorKind::ExecTimeout`.
//!   Dropping the future kills the process too.
//! - File paths given to providers are already normalised by the
//!   orchestrator: absolute, lexically clean, no NUL. Providers must still
//!   resolve them *inside* the sandbox: symlinks can never reach host files.
//! - A missing file is `ErrorKind::NotFound`; a missing sandbox is
//!   `ErrorKind::SandboxNotFound`.
//! - `destroy` of an unknown sandbox returns `Ok` (idempotent).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stacyvm_api::FileInfo;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// What a provider needs to create a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SpawnSpec {
    /// The StacyVM sandbox id (`sb-xxxxxxxx`); providers should use it as
    /// their runtime name so inventory and adoption can match it.
    pub id: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub metadata: BTreeMap<String, String>,
    pub owner_id: String,
    pub tenant_id: String,
    pub expires_at: DateTime<Utc>,
    /// `none` or `bridge`; empty = provider default.
    pub network_mode: String,
    /// Start from this snapshot of a sandbox ([`Provider::snapshot_sandbox`])
    /// instead of booting the image: its files, processes and memory as
    /// they were. The orchestrator sets image, size and network to the
    /// snapshot's.
    pub snapshot: Option<String>,
    /// Egress rules in force from the sandbox's first packet (providers
    /// with [`capability::EGRESS`]; `bridge` mode).
    pub egress: Option<crate::egress::EgressRules>,
    /// Volumes to mount (providers with [`capability::VOLUMES`]).
    pub volumes: Vec<crate::volumes::VolumeBind>,
}

/// One step of an image build (the Dockerfile subset builds run).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStep {
    /// `RUN`: `/bin/sh -c` as the image's root, in the current working
    /// directory, with the environment so far.
    Run(String),
    /// `ENV key=value`.
    Env(String, String),
    /// `WORKDIR`: an absolute path, created when missing.
    Workdir(String),
    /// `COPY`: paths of the spec's build context (`""` is all of it) to an
    /// absolute destination (a directory when it ends in `/`, or when
    /// there are several sources or a directory source).
    Copy { sources: Vec<String>, dest: String },
}

/// An image to build from a base and steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuild {
    pub build_id: String,
    pub base_image: String,
    pub steps: Vec<BuildStep>,
    /// The built image's name in the provider's store (`repo:tag`).
    pub name: String,
    /// Names base and steps: an image built before with this key on the
    /// same base image is the same image.
    pub cache_key: String,
}

/// An image a build made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// What spawns name to run it.
    pub image_ref: String,
    /// The image's id (`sha256:…`).
    pub digest: String,
    pub size_bytes: u64,
    /// Made by an earlier build with the same cache key.
    pub reused: bool,
}

/// Credentials for a registry push (resolved from a server secret at use).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// `host[:port]`.
    pub host: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Metadata key of a build's sandbox (reserved: callers cannot set it);
/// its value is the build's id. Providers may grant such a sandbox what
/// package installs need.
pub const IMAGE_BUILD_METADATA: &str = "stacyvm.sys.build";

/// Where a build's output lines go.
pub type BuildLog = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// What [`Provider::snapshot_sandbox`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSnapshot {
    /// Disk space the snapshot takes.
    pub size_bytes: u64,
    /// The source's network mode, which its children get.
    pub network_mode: String,
}

/// A spawned runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    /// Provider runtime id (usually equal to the sandbox id).
    pub runtime_id: String,
}

/// A fully resolved command to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecSpec {
    /// `argv[0]` is the program; never empty.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; empty = provider default (`/workspace`).
    pub workdir: String,
    pub timeout: Option<Duration>,
    pub stdin: Option<Vec<u8>>,
    /// Run on a pseudo-terminal of (rows, cols); stdout carries everything.
    pub pty: Option<(u16, u16)>,
    /// Run as this uid and gid of the sandbox (supplementary groups
    /// dropped); `None` = the sandbox's root.
    pub user: Option<ExecUser>,
}

/// One change under a watched directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEvent {
    /// Path relative to the watched directory.
    pub name: String,
    pub op: FsOp,
}

/// What happened to an [`FsEvent`]'s path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsOp {
    /// Created, or moved in.
    Create,
    Write,
    Remove,
    /// Moved away.
    Rename,
    /// Mode, owner or times changed.
    Chmod,
}

impl FsOp {
    /// The wire name (`create`, `write`, `remove`, `rename`, `chmod`).
    pub fn as_str(self) -> &'static str {
        match self {
            FsOp::Create => "create",
            FsOp::Write => "write",
            FsOp::Remove => "remove",
            FsOp::Rename => "rename",
            FsOp::Chmod => "chmod",
        }
    }

    /// The op a wire name names; `None` for any other word.
    pub fn parse(s: &str) -> Option<FsOp> {
        Some(match s {
            "create" => FsOp::Create,
            "write" => FsOp::Write,
            "remove" => FsOp::Remove,
            "rename" => FsOp::Rename,
            "chmod" => FsOp::Chmod,
            _ => return None,
        })
    }
}

/// A running directory watch: batches of events; `None` once the watch
/// ends (the directory went away), an `Err` when it fails.
pub type FsEvents = mpsc::Receiver<Result<Vec<FsEvent>>>;

/// A numeric identity inside a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
}

/// One account of a sandbox's `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// The account named `name` in a `passwd` file's text.
pub fn find_account(passwd: &str, name: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(Account {
            name: f[0].to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: if f[5].starts_with('/') {
                f[5].to_string()
            } else {
                "/".to_string()
            },
        })
    })
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// One chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: StreamKind,
    pub data: Vec<u8>,
}

/// Where a provider sends output. A closed receiver must not fail the exec.
pub type OutputSink = mpsc::Sender<OutputChunk>;

/// A regular file being read: its size when the read started, then its
/// content in order. The channel is bounded: a slow reader slows the
/// sandbox side, never grows the server's memory. Dropping the receiver
/// cancels the read.
#[derive(Debug)]
pub struct FileStream {
    pub size: u64,
    pub chunks: mpsc::Receiver<Result<Vec<u8>>>,
}

impl FileStream {
    /// A stream of one buffered chunk (providers without streaming).
    pub fn buffered(data: Vec<u8>) -> FileStream {
        let (tx, rx) = mpsc::channel(1);
        let size = data.len() as u64;
        let _ = tx.try_send(Ok(data));
        FileStream { size, chunks: rx }
    }

    /// Reads the whole stream (tests and small internal reads).
    pub async fn collect(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(self.size).unwrap_or(0).min(1 << 20));
        while let Some(chunk) = self.chunks.recv().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }
}

/// Input to an interactive exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    CloseStdin,
    /// Signal number sent to the command's process group.
    Signal(i32),
    /// New terminal size (rows, cols) of a pty exec.
    Resize(u16, u16),
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code; `128 + signal` when killed by a signal (as a shell reports).
    pub code: i32,
    pub signal: Option<i32>,
}

/// Runtime state reported by a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeStatus {
    pub state: String,
}

/// A runtime found by inventory (for adoption after restart).
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeInfo {
    pub sandbox_id: String,
    pub state: String,
    pub image: String,
    pub created_at: Option<DateTime<Utc>>,
    pub metadata: BTreeMap<String, String>,
    pub owner_id: String,
    pub tenant_id: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Resource usage of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub cpu_pct: f64,
    pub mem_bytes: u64,
    pub mem_limit_bytes: u64,
}

/// Capability names reported on `GET /providers`.
pub mod capability {
    pub const SPAWN: &str = "spawn";
    pub const EXEC: &str = "exec";
    pub const EXEC_STREAM: &str = "exec_stream";
    pub const FILES: &str = "files";
    pub const CONSOLE: &str = "console";
    pub const HEALTH: &str = "health";
    pub const RUNTIME_INVENTORY: &str = "runtime_inventory";
    pub const STATS: &str = "stats";
    pub const BASE: [&str; 6] = [SPAWN, EXEC, EXEC_STREAM, FILES, CONSOLE, HEALTH];
    /// Interactive exec: stdin and signals while the command runs.
    pub const EXEC_INTERACTIVE: &str = "exec_interactive";
    /// Pseudo-terminal execs (with resize).
    pub const PTY: &str = "pty";
    /// Commands run as another uid/gid of the sandbox ([`super::ExecSpec::user`]).
    pub const EXEC_USER: &str = "exec_user";
    pub const SNAPSHOTS: &str = "snapshots";
    /// `POST /sandboxes/{id}/snapshot`, `/fork` and spawns from a snapshot.
    pub const SANDBOX_SNAPSHOTS: &str = "sandbox_snapshots";
    /// Named volumes mounted at spawn (`SpawnSpec::volumes`).
    pub const VOLUMES: &str = "volumes";
    /// Named volumes attached at spawn as block devices whose file system
    /// the guest mounts (`VolumeBind::device`; microVMs). Such a sandbox
    /// holds its volumes alone.
    pub const BLOCK_VOLUMES: &str = "block_volumes";
    /// Directory watches ([`super::SandboxIo::watch_dir`]).
    pub const WATCH: &str = "watch";
    /// `pause`/`resume` freeze and thaw a sandbox (and `on_timeout: pause`).
    pub const PAUSE: &str = "pause";
    /// Per-sandbox egress rules ([`super::Provider::set_egress`]).
    pub const EGRESS: &str = "egress";
    /// Environment builds: [`super::Provider::build_image`], or the
    /// steps run in a sandbox and [`super::Provider::commit_image`].
    pub const IMAGE_BUILD: &str = "image_build";
    /// Built images pushed to a registry ([`super::Provider::push_image`]).
    pub const IMAGE_PUSH: &str = "image_push";
    /// Pool mode: sandboxes spawned with [`super::POOL_HOST_METADATA`]
    /// host slots ([`super::Provider::slot_open`]).
    pub const POOL_HOST: &str = "pool_host";
}

/// Metadata key of a pool host (reserved): the provider spawns it able to
/// start slots, each a logical sandbox confined to its own uid, pid and
/// mount namespaces and workspace inside the shared runtime.
pub const POOL_HOST_METADATA: &str = "stacyvm.sys.pool_host";

/// How a pool slot runs ([`Provider::slot_open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSpec {
    /// Its uid and gid (10000 or more: never one of the image's accounts).
    pub uid: u32,
    /// A network namespace of its own with only loopback (a host with
    /// network `none`); else it shares the host's network.
    pub private_network: bool,
}

/// The runtime id of slot `slot` of pool host `host` (what
/// [`Provider::io`] and the file and exec calls take).
pub fn slot_runtime_id(host: &str, slot: &str) -> String {
    format!("{host}/{slot}")
}

/// The pool host and slot of a slot's runtime id.
pub fn split_slot_runtime_id(id: &str) -> Option<(&str, &str)> {
    id.split_once('/')
}

/// How a provider separates a sandbox from the host, weakest first: the
/// order `providers.default: auto` ranks healthy providers by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isolation {
    /// Commands run as host processes (the mock test double).
    None,
    /// Another service runs the sandbox; its isolation is that service's.
    Remote,
    /// Host processes confined in user space (PRoot: ptrace path
    /// translation, no kernel boundary of its own).
    Process,
    /// Kernel namespaces, cgroups and seccomp on the host kernel (native,
    /// Docker with runc).
    Container,
    /// A user-space kernel between the sandbox and the host (gVisor).
    UserSpaceKernel,
    /// A guest kernel in a virtual machine (QEMU, Firecracker, Kata).
    MicroVm,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::None => "none",
            Isolation::Remote => "remote",
            Isolation::Process => "process",
            Isolation::Container => "container",
            Isolation::UserSpaceKernel => "user-space kernel",
            Isolation::MicroVm => "microvm",
        }
    }
}

/// What a provider is and offers, for the manager (network defaults and
/// validation), `providers.default: auto` and the capability report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub isolation: Isolation,
    /// Network modes a spawn may ask for.
    pub network_modes: Vec<String>,
    /// The mode of a spawn that names none.
    pub default_network: String,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            isolation: Isolation::Process,
            network_modes: vec!["none".into()],
            default_network: "none".into(),
        }
    }
}

/// See [`Provider::default_resources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceDefaults {
    pub memory_mb: i64,
    /// Rounded up when the provider allows fractions.
    pub vcpus: i64,
}

/// Exec and file I/O inside one sandbox (see [`Provider::io`]). The
/// semantics are the provider contract's (module docs).
#[async_trait]
pub trait SandboxIo: Send + Sync {
    /// Runs a command, streaming output to `sink` in order.
    async fn exec(&self, spec: &ExecSpec, sink: OutputSink) -> Result<ExitStatus>;

    /// Like `exec`, but stdin stays open for `ExecInput::Stdin` chunks and
    /// signals can be delivered while the command runs. Dropping `input`
    /// closes stdin.
    async fn exec_interactive(
        &self,
        _spec: &ExecSpec,
        _sink: OutputSink,
        _input: mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus> {
        Err(Error::unsupported("interactive exec"))
    }

    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()>;
    async fn read_file(&self, path: &str) -> Result<Vec<u8>>;

    /// Watches the directory `path` (and, when `recursive`, the ones
    /// under it, also those made later): batches of changes as they
    /// happen. Not a directory → `InvalidInput`; missing → `NotFound`.
    /// Dropping the receiver ends the watch.
    async fn watch_dir(&self, _path: &str, _recursive: bool) -> Result<FsEvents> {
        Err(Error::unsupported("watching directories"))
    }

    /// Reads a regular file of at most `max_bytes` as a stream; anything
    /// else (device, FIFO, socket, directory) is `InvalidInput`, a larger
    /// file `PayloadTooLarge`. The default buffers `read_file` (for
    /// sessions whose reads are already bounded).
    async fn read_file_stream(&self, path: &str, max_bytes: u64) -> Result<FileStream> {
        buffered_read(self.read_file(path).await?, path, max_bytes)
    }

    /// Writes a file from `chunks` (ended by the channel closing); more
    /// than `max_bytes` is `PayloadTooLarge` and leaves the old file as it
    /// was. Returns the size written. The default collects, then calls
    /// `write_file`.
    async fn write_file_stream(
        &self,
        path: &str,
        mode: u32,
        chunks: mpsc::Receiver<Vec<u8>>,
        max_bytes: u64,
    ) -> Result<u64> {
        let data = collect_upload(chunks, max_bytes).await?;
        self.write_file(path, &data, mode).await?;
        Ok(data.len() as u64)
    }
    /// Lists one directory level, sorted by path.
    async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>>;
    /// Deleting a missing path is `Ok`; a non-empty directory needs `recursive`.
    async fn delete_file(&self, path: &str, recursive: bool) -> Result<()>;
    /// Creates the parent of `new` when missing.
    async fn move_file(&self, old: &str, new: &str) -> Result<()>;
    async fn chmod_file(&self, path: &str, mode: u32) -> Result<()>;
    async fn stat_file(&self, path: &str) -> Result<FileInfo>;
    /// Absolute matching paths, sorted; no match is an empty list.
    async fn glob_files(&self, pattern: &str) -> Result<Vec<String>>;

    /// Opens a TCP connection to `port` on the sandbox's loopback (the
    /// preview proxy). Nothing listening there is `NotFound`.
    async fn connect(&self, _port: u16) -> Result<PortStream> {
        Err(Error::unsupported("connecting to sandbox ports"))
    }

    /// Packs `path` (a directory's contents, or one file) as an
    /// uncompressed tar stream: symlinks stored as links, sockets, FIFOs
    /// and devices left out. Over `limits` is `PayloadTooLarge`.
    async fn archive_read(&self, _path: &str, _limits: ArchiveLimits) -> Result<FileStream> {
        Err(Error::unsupported("directory archives"))
    }

    /// Extracts the tar stream `chunks` into directory `path` (created if
    /// missing). Entries stay inside it: absolute names, `..`, device
    /// nodes, FIFOs and hard links out of the archive are `InvalidInput`,
    /// symlinks are never followed. A refused archive, or one whose
    /// channel closes before the end, leaves nothing it created.
    async fn archive_write(
        &self,
        _path: &str,
        _chunks: mpsc::Receiver<Vec<u8>>,
        _limits: ArchiveLimits,
    ) -> Result<ArchiveReport> {
        Err(Error::unsupported("directory archives"))
    }
}

/// Bounds of one archive transfer (`limits.max_archive_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Bytes of file content.
    pub max_bytes: u64,
    pub max_entries: u64,
}

/// What an extraction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// A byte stream to a port inside a sandbox (see [`Provider::connect`]).
pub trait PortIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> PortIo for T {}
/// A boxed [`PortIo`].
pub type PortStream = Box<dyn PortIo>;

/// A whole file already read, as a stream bounded by `max_bytes`.
pub fn buffered_read(data: Vec<u8>, path: &str, max_bytes: u64) -> Result<FileStream> {
    if data.len() as u64 > max_bytes {
        return Err(Error::too_large(format!(
            "{path:?} is larger than the limit of {max_bytes} bytes"
        )));
    }
    Ok(FileStream::buffered(data))
}

/// Why a fed upload failed.
#[derive(Debug)]
pub enum Feed {
    /// The request body broke off (a client error or hang-up).
    Body(String),
    /// The body went past the limit.
    TooLarge(String),
    /// The sandbox refused the write.
    Write(Error),
}

/// Runs `write` (which reads what `tx` sends) fed from `body`, at most
/// `max` bytes. A body that breaks off or grows past the limit abandons
/// the write before its end (its future is dropped, which cancels the
/// upload in the sandbox): the old file stays as it was, never a
/// truncated new one. Every front door that streams an upload into a
/// sandbox (the REST API, envd, worker RPC) goes through this.
pub async fn feed<S, B, E, W, T>(
    body: S,
    tx: mpsc::Sender<Vec<u8>>,
    max: u64,
    write: W,
) -> std::result::Result<T, Feed>
where
    S: futures::Stream<Item = std::result::Result<B, E>> + Send,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
    W: std::future::Future<Output = Result<T>>,
{
    use futures::StreamExt;
    let pump = async move {
        let mut body = std::pin::pin!(body);
        let mut total = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| Feed::Body(format!("the request body ended early: {e}")))?;
            let chunk = chunk.as_ref();
            total += chunk.len() as u64;
            if total > max {
                return Err(Feed::TooLarge(format!(
                    "the file exceeds the limit of {max} bytes"
                )));
            }
            if tx.send(chunk.to_vec()).await.is_err() {
                break;
            }
        }
        // Only now may the write see the end of its input.
        drop(tx);
        Ok(())
    };
    let mut pump = std::pin::pin!(pump);
    let mut write = std::pin::pin!(write);
    tokio::select! {
        fed = &mut pump => match fed {
            Ok(()) => write.await.map_err(Feed::Write),
            // Returning drops the unfinished write.
            Err(e) => Err(e),
        },
        // The write ended first: the sandbox refused it.
        written = &mut write => written.map_err(Feed::Write),
    }
}

/// Collects an upload of at most `max_bytes`.
pub async fn collect_upload(
    mut chunks: mpsc::Receiver<Vec<u8>>,
    max_bytes: u64,
) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    while let Some(c) = chunks.recv().await {
        if (data.len() + c.len()) as u64 > max_bytes {
            return Err(Error::too_large(format!(
                "the upload is larger than the limit of {max_bytes} bytes"
            )));
        }
        data.extend_from_slice(&c);
    }
    Ok(data)
}

/// A sandbox backend: the lifecycle (spawn, status, destroy, recover,
/// inventory, stats, logs, health) plus the sandbox's I/O, which defaults
/// to the session [`Provider::io`] returns.
#[async_trait]
pub trait Provider: Debug + Send + Sync + 'static {
    /// Stable registry name (`native`, `docker`, `mock`, …).
    fn name(&self) -> &str;

    /// Capability strings, e.g. `capability::BASE` plus extras.
    fn capabilities(&self) -> Vec<String>;

    /// Brings a stopped runtime (e.g. a container stopped by a host or
    /// engine restart) back to running, its state kept. Called by startup
    /// reconciliation (gaps C-25); the default is unsupported.
    async fn recover(&self, runtime_id: &str) -> Result<()> {
        Err(Error::unsupported(format!(
            "{}: recovering {runtime_id}",
            self.name()
        )))
    }

    /// The provider's own resource defaults for spawns that name none
    /// (e.g. `providers.docker.memory`/`cpus`). `None`: the server's
    /// `defaults.memory_mb`/`vcpus` apply. When `Some`, the manager records
    /// these values and passes 0 in [`SpawnSpec`] so the provider applies
    /// its exact setting (gaps C-26).
    fn default_resources(&self) -> Option<ResourceDefaults> {
        None
    }

    /// Isolation class and network modes (see [`Profile`]).
    fn profile(&self) -> Profile {
        Profile::default()
    }

    /// Non-secret configuration shown on `GET /providers/{name}`.
    fn describe(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("type".to_string(), "other".to_string())])
    }

    /// Fast, side-effect-free health probe; `Err` says why it is unhealthy.
    async fn health(&self) -> Result<()>;

    /// Creates and starts a sandbox; returns once it can run commands.
    /// On error nothing of the sandbox may remain.
    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned>;

    /// Runs a command, streaming output to `sink` in order.
    async fn exec(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
    ) -> Result<ExitStatus> {
        self.io(runtime_id).await?.exec(spec, sink).await
    }

    /// Like `exec`, but stdin stays open for `ExecInput::Stdin` chunks and
    /// signals can be delivered while the command runs. Dropping `input`
    /// closes stdin.
    async fn exec_interactive(
        &self,
        runtime_id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
        input: mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus> {
        self.io(runtime_id)
            .await?
            .exec_interactive(spec, sink, input)
            .await
    }

    /// Whether startup reconciliation adopts runtimes the store does not
    /// know (true, the spec's rule for engines shared with other tools) or
    /// destroys them (false: every sandbox of this provider was recorded
    /// before its spawn was acknowledged, so an unknown one was never
    /// handed to anyone).
    fn adopts_unknown_runtimes(&self) -> bool {
        true
    }

    /// Snapshots the provider holds (`GET /snapshots`); none by default.
    async fn snapshots(&self) -> Result<Vec<stacyvm_api::SnapshotSummary>> {
        Ok(Vec::new())
    }

    /// Freezes the running sandbox `id` into the snapshot `snapshot_id`
    /// (a name the orchestrator chose, `snap-…`): what spawns with
    /// [`SpawnSpec::snapshot`] start from. The sandbox keeps running.
    /// Providers with [`capability::SANDBOX_SNAPSHOTS`] implement it.
    async fn snapshot_sandbox(&self, id: &str, snapshot_id: &str) -> Result<SandboxSnapshot> {
        let _ = (id, snapshot_id);
        Err(Error::unsupported(format!(
            "provider {} cannot snapshot sandboxes",
            self.name()
        )))
    }

    /// Removes a snapshot made by [`Provider::snapshot_sandbox`]. A
    /// snapshot that sandboxes still run from is a `Conflict`; an unknown
    /// one is `Ok` (idempotent).
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        let _ = snapshot_id;
        Ok(())
    }

    /// Builds `plan` with the provider's own builder (docker: the Engine
    /// build API), its output to `log`, stopping when `cancel` fires.
    /// `Ok(None)`: the provider has no builder of its own; the orchestrator
    /// runs the steps in a sandbox and calls [`Provider::commit_image`].
    async fn build_image(
        &self,
        plan: &ImageBuild,
        log: BuildLog,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Option<BuiltImage>> {
        let _ = (plan, log, cancel);
        Ok(None)
    }

    /// An image an earlier build made from `plan.cache_key` on the base
    /// image as it is now, given the name `plan.name`; `None` when there
    /// is none.
    async fn cached_image(&self, plan: &ImageBuild) -> Result<Option<BuiltImage>> {
        let _ = plan;
        Ok(None)
    }

    /// Saves what the steps changed in sandbox `runtime_id` (spawned from
    /// `plan.base_image`) as the image `plan.name`, on top of the base.
    async fn commit_image(&self, runtime_id: &str, plan: &ImageBuild) -> Result<BuiltImage> {
        let _ = plan;
        Err(Error::unsupported(format!(
            "provider {} cannot save sandbox {runtime_id} as an image",
            self.name()
        )))
    }

    /// Pushes the built image `image_ref` to `target` (`host/repo:tag`)
    /// with `auth`; returns the pushed manifest's digest.
    async fn push_image(
        &self,
        image_ref: &str,
        target: &str,
        auth: &RegistryAuth,
        log: BuildLog,
    ) -> Result<String> {
        let _ = (image_ref, auth, log);
        Err(Error::unsupported(format!(
            "provider {} cannot push images (to {target})",
            self.name()
        )))
    }

    /// Replaces the egress rules of a running sandbox (`None`: the
    /// operator's defaults only), effective for new connections at once.
    /// Also called after a restart for every adopted sandbox with rules.
    /// Providers with [`capability::EGRESS`] implement it.
    async fn set_egress(
        &self,
        runtime_id: &str,
        rules: Option<&crate::egress::EgressRules>,
    ) -> Result<()> {
        let _ = rules;
        Err(Error::unsupported(format!(
            "provider {} cannot apply egress rules (to {runtime_id})",
            self.name()
        )))
    }

    /// Recent connections the sandbox's egress rules refused.
    async fn egress_denials(&self, runtime_id: &str) -> Result<Vec<stacyvm_api::EgressDenial>> {
        let _ = runtime_id;
        Ok(Vec::new())
    }

    /// Pool mode ([`capability::POOL_HOST`]): starts slot `slot` — a
    /// logical sandbox with its own uid and gid, pid and mount namespaces
    /// and workspace — in the pool host `host` (a sandbox spawned with
    /// [`POOL_HOST_METADATA`]). Its I/O is then [`Provider::io`] of
    /// [`slot_runtime_id`]`(host, slot)`. Idempotent.
    async fn slot_open(&self, host: &str, slot: &str, spec: &SlotSpec) -> Result<()> {
        let _ = (slot, spec);
        Err(Error::unsupported(format!(
            "provider {} cannot host pooled sandboxes (in {host})",
            self.name()
        )))
    }

    /// Ends a slot: every process in it, and its workspace. Closing an
    /// unknown slot succeeds.
    async fn slot_close(&self, host: &str, slot: &str) -> Result<()> {
        let _ = slot;
        Err(Error::unsupported(format!(
            "provider {} cannot host pooled sandboxes (in {host})",
            self.name()
        )))
    }

    /// The slots alive in a pool host.
    async fn slots(&self, host: &str) -> Result<Vec<String>> {
        Err(Error::unsupported(format!(
            "provider {} cannot host pooled sandboxes (in {host})",
            self.name()
        )))
    }

    /// Stops what the provider runs for itself (warm pools, helpers)
    /// before the server exits; user sandboxes keep running.
    async fn shutdown(&self) {}

    /// The sandbox's I/O session: exec and every file operation. Agent-backed
    /// providers return their agent session and implement nothing else of
    /// the I/O below, whose defaults forward to it.
    async fn io(&self, runtime_id: &str) -> Result<std::sync::Arc<dyn SandboxIo>> {
        Err(Error::unsupported(format!(
            "{}: sandbox I/O for {runtime_id}",
            self.name()
        )))
    }

    async fn write_file(&self, runtime_id: &str, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.io(runtime_id)
            .await?
            .write_file(path, data, mode)
            .await
    }
    async fn read_file(&self, runtime_id: &str, path: &str) -> Result<Vec<u8>> {
        self.io(runtime_id).await?.read_file(path).await
    }
    /// See [`SandboxIo::read_file_stream`].
    async fn read_file_stream(
        &self,
        runtime_id: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<FileStream> {
        self.io(runtime_id)
            .await?
            .read_file_stream(path, max_bytes)
            .await
    }
    /// See [`SandboxIo::write_file_stream`].
    async fn write_file_stream(
        &self,
        runtime_id: &str,
        path: &str,
        mode: u32,
        chunks: mpsc::Receiver<Vec<u8>>,
        max_bytes: u64,
    ) -> Result<u64> {
        self.io(runtime_id)
            .await?
            .write_file_stream(path, mode, chunks, max_bytes)
            .await
    }
    /// Lists one directory level, sorted by path.
    async fn list_files(&self, runtime_id: &str, path: &str) -> Result<Vec<FileInfo>> {
        self.io(runtime_id).await?.list_files(path).await
    }
    /// Deleting a missing path is `Ok`; a non-empty directory needs `recursive`.
    async fn delete_file(&self, runtime_id: &str, path: &str, recursive: bool) -> Result<()> {
        self.io(runtime_id)
            .await?
            .delete_file(path, recursive)
            .await
    }
    /// Creates the parent of `new` when missing.
    async fn move_file(&self, runtime_id: &str, old: &str, new: &str) -> Result<()> {
        self.io(runtime_id).await?.move_file(old, new).await
    }
    async fn chmod_file(&self, runtime_id: &str, path: &str, mode: u32) -> Result<()> {
        self.io(runtime_id).await?.chmod_file(path, mode).await
    }
    async fn stat_file(&self, runtime_id: &str, path: &str) -> Result<FileInfo> {
        self.io(runtime_id).await?.stat_file(path).await
    }
    /// Absolute matching paths, sorted; no match is an empty list.
    async fn glob_files(&self, runtime_id: &str, pattern: &str) -> Result<Vec<String>> {
        self.io(runtime_id).await?.glob_files(pattern).await
    }
    /// Watches a directory (see [`SandboxIo::watch_dir`]).
    async fn watch_dir(&self, runtime_id: &str, path: &str, recursive: bool) -> Result<FsEvents> {
        self.io(runtime_id).await?.watch_dir(path, recursive).await
    }
    /// A TCP connection to `port` on the sandbox's loopback (see
    /// [`SandboxIo::connect`]). Providers that can enter the sandbox's
    /// network namespace directly override it.
    async fn connect(&self, runtime_id: &str, port: u16) -> Result<PortStream> {
        self.io(runtime_id).await?.connect(port).await
    }
    /// See [`SandboxIo::archive_read`].
    async fn archive_read(
        &self,
        runtime_id: &str,
        path: &str,
        limits: ArchiveLimits,
    ) -> Result<FileStream> {
        self.io(runtime_id).await?.archive_read(path, limits).await
    }
    /// See [`SandboxIo::archive_write`].
    async fn archive_write(
        &self,
        runtime_id: &str,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
        limits: ArchiveLimits,
    ) -> Result<ArchiveReport> {
        self.io(runtime_id)
            .await?
            .archive_write(path, chunks, limits)
            .await
    }

    /// Freezes every process of the sandbox where they stand (memory kept,
    /// no CPU); `status` then reports `paused`. Pausing a paused sandbox
    /// is `Ok`. `Unsupported` where the runtime cannot.
    async fn pause(&self, _runtime_id: &str) -> Result<()> {
        Err(Error::unsupported(format!(
            "pausing sandboxes on {}",
            self.name()
        )))
    }

    /// Thaws a paused sandbox; resuming a running one is `Ok`.
    async fn resume(&self, _runtime_id: &str) -> Result<()> {
        Err(Error::unsupported(format!(
            "resuming sandboxes on {}",
            self.name()
        )))
    }

    /// Current state; unknown sandbox → `ErrorKind::SandboxNotFound`.
    async fn status(&self, runtime_id: &str) -> Result<RuntimeStatus>;

    /// Tears the sandbox down completely. Unknown sandbox → `Ok`.
    async fn destroy(&self, runtime_id: &str) -> Result<()>;

    /// Last `lines` lines of the sandbox console/log.
    async fn logs(&self, runtime_id: &str, lines: usize) -> Result<Vec<String>>;

    /// Runtimes owned by this provider, for adoption after a restart.
    async fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>> {
        Err(Error::unsupported(format!(
            "{}: runtime inventory",
            self.name()
        )))
    }

    /// Images this provider spawns without fetching anything, as workers
    /// report them for placement locality; empty when it cannot tell.
    async fn local_images(&self) -> Vec<String> {
        Vec::new()
    }

    /// Resource usage.
    async fn stats(&self, _runtime_id: &str) -> Result<Stats> {
        Err(Error::unsupported(format!("{}: stats", self.name())))
    }
}

/// Formats a unix mode's permission bits like the contract (`644`, `755`, `1777`).
pub fn format_mode(mode: u32) -> String {
    format!("{:o}", mode & 0o7777)
}

/// Formats a modification time as RFC 3339 UTC with seconds precision.
pub fn format_mod_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}
