//! Request and response bodies.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::GoDuration;

/// Error body of every JSON error: exactly `code` and `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// Lifecycle state of a sandbox as reported on the wire.
pub mod state {
    pub const CREATING: &str = "creating";
    pub const RUNNING: &str = "running";
    pub const IDLE: &str = "idle";
    pub const UNHEALTHY: &str = "unhealthy";
    pub const EXPIRED: &str = "expired";
    pub const DESTROYED: &str = "destroyed";
    pub const ERROR: &str = "error";
    pub const STOPPED: &str = "stopped";
    /// Frozen by `POST /sandboxes/{id}/pause`: no CPU, memory kept, the
    /// time to live stopped; the next exec, file operation or preview
    /// request resumes it.
    pub const PAUSED: &str = "paused";
}

fn is_empty_map(m: &Option<BTreeMap<String, String>>) -> bool {
    m.as_ref().is_none_or(BTreeMap::is_empty)
}

/// The sandbox object (`GET /sandboxes/{id}` and friends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Sandbox {
    pub id: String,
    pub state: String,
    pub provider: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker_id: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "is_empty_map")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub preview_domain: String,
    /// Time without activity (exec, file operations, preview traffic, open
    /// streams) after which `on_timeout` applies; absent: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub idle_timeout: String,
    /// What the time to live or the idle timeout does when it runs out:
    /// `kill` (absent) or `pause`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub on_timeout: String,
    /// The sandbox's egress policy, when it has one (see [`NetworkPolicy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// `false` when a paused sandbox waits for an explicit resume (absent:
    /// the next call resumes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<bool>,
}

/// `POST /sandboxes` and `POST /sandboxes/admission` body. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct SpawnRequest {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub provider: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub memory_mb: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub vcpus: i64,
    /// Go duration string; parsed by the server so that a bad value is a 400.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ttl: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub template: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub network_mode: String,
    /// Start from this snapshot (`snap-…`) of a sandbox: its files, memory
    /// and processes. Provider, image, size and network are the
    /// snapshot's; naming others is a 400.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub snapshot: String,
    /// Go duration (`"10m"`): time without activity (exec, file
    /// operations, preview traffic, open streams) after which `on_timeout`
    /// applies. At least 1s, at most the time to live. Empty: none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub idle_timeout: String,
    /// What a timeout (time to live or idle) does: `kill` (the default)
    /// destroys the sandbox, `pause` pauses it (kept up to
    /// `defaults.max_paused`; the next call or preview request resumes it
    /// with a fresh time to live).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub on_timeout: String,
    /// Where the sandbox may connect (`bridge` network mode): see
    /// [`NetworkPolicy`]. Absent: the server's default (the public
    /// internet, never private, link-local or metadata addresses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// `false`: a paused sandbox stays paused until `POST …/resume` (an
    /// exec, file operation or preview request is then a 409 instead of
    /// resuming it). Default `true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<bool>,
    /// Named volumes (`POST /volumes`) to mount (at most 8). A volume is
    /// mounted read-write by one running sandbox at a time, read-only by
    /// any number.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
}

/// A volume in a spawn request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeMount {
    /// The volume's name (or its `vol-…` id).
    pub volume: String,
    /// Where it appears in the sandbox: an absolute path, not `/`, not
    /// under `/proc`, `/sys` or `/dev`.
    pub path: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// `POST /environments/specs` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CreateEnvironmentSpec {
    /// The spec's owner (default: the caller).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
    /// Unique per owner.
    pub name: String,
    pub base_image: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub python_packages: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub apt_packages: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub python_version: String,
    /// A Dockerfile run after the packages: FROM (the base image; then
    /// `base_image` may be left out), RUN, ENV, WORKDIR, COPY (from the
    /// context uploaded with `PUT /environments/specs/{id}/context`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dockerfile: String,
}

/// An environment spec: what a build makes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EnvironmentSpec {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub base_image: String,
    pub python_packages: Vec<String>,
    pub apt_packages: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub python_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dockerfile: String,
    /// SHA-256 of the uploaded build context (none uploaded: absent).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub context_sha256: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `GET /environments/specs/{id}/suggestions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SpecSuggestions {
    pub spec_id: String,
    pub suggestions: Vec<String>,
}

/// `POST /environments/builds` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CreateBuild {
    pub spec_id: String,
    /// Where the image goes: `local` (the provider's own store, always
    /// made), `ghcr`, `dockerhub`, `registry` (your default connection of
    /// that kind) or a registry connection's id. Default `["local"]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// The provider the image is for (default: the server's default).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// Accepted for compatibility; images are private to their tenant.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub visibility: String,
}

/// Where one build's image went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BuildArtifact {
    /// `local`, `ghcr`, `dockerhub` or `registry`.
    pub target: String,
    /// The registry connection pushed with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub connection_id: String,
    pub image_ref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// `pending`, `ready` or `failed`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An environment build.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Build {
    pub id: String,
    pub spec_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// `queued`, `building`, `ready`, `failed` or `canceled`.
    pub status: String,
    pub current_step: String,
    /// The build's output so far (`GET …/logs?follow=1` streams it).
    pub log: String,
    pub image_size_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest_local: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub artifacts: Vec<BuildArtifact>,
}

/// One entry of `GET /environments/builds`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildEntry {
    pub build: Build,
    pub spec: EnvironmentSpec,
}

/// `GET /environments/builds/{id}/spawn-config`: how to spawn the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BuildSpawnConfig {
    pub build_id: String,
    pub build_status: String,
    pub digest: String,
    pub image: String,
    pub note: String,
    pub provider: String,
    pub ready: bool,
    pub target: String,
}

/// `POST /environments/registry-connections` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CreateRegistryConnection {
    /// Replace this connection (one of yours); absent: a new one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The connection's owner (default: the caller; naming another needs
    /// a credential that may act for others).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
    /// `ghcr`, `dockerhub`, or `registry` (any OCI registry at `host`).
    pub provider: String,
    /// `registry` only: `host[:port]`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host: String,
    pub username: String,
    /// The NAME of a server secret holding the password or token
    /// (`<data_dir>/secrets/NAME` or the server's `STACYVM_SECRET_NAME`).
    /// Never the secret itself: it must be set on the server when the
    /// connection is made, and it is never returned.
    pub secret_ref: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_default: bool,
}

/// A registry connection (its secret is never part of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RegistryConnection {
    pub id: String,
    pub owner_id: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    pub username: String,
    pub is_default: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /volumes` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// 1–63 characters: lowercase letters, digits, `-`, `_`, `.`; starts
    /// with a letter or digit. Unique within the tenant.
    pub name: String,
    /// Capacity in MiB (default 1024, at most `defaults.max_volume_mb`).
    #[serde(skip_serializing_if = "is_zero")]
    pub size_mb: i64,
    /// Owner (admins and tenant admins; default: the caller).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
}

/// A named persistent volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size_mb: i64,
    /// Bytes its file system holds now.
    pub used_bytes: u64,
    pub owner_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    pub created_at: DateTime<Utc>,
    /// Running sandboxes that mount it.
    #[serde(default)]
    pub mounts: Vec<VolumeUse>,
}

/// A sandbox's mount of a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeUse {
    pub sandbox_id: String,
    pub path: String,
    pub read_only: bool,
}

/// A sandbox's egress policy. Every list entry is an IPv4 address, a CIDR
/// block (`10.1.0.0/16`) or, in `allow_out` only, a domain
/// (`api.example.com`, `*.example.com`: subdomains at any depth, not the
/// apex). An allowed entry beats a denied one; what neither names is
/// allowed. The operator's own limits (the built-in private and metadata
/// ranges, `egress_deny`, tenant `egress` policies) always apply on top: a
/// policy can only narrow them.
///
/// A domain means the domain: connections to denied addresses on TCP are
/// handed to the server's egress proxy, which reads the HTTP `Host` or TLS
/// SNI name, checks it against the allowed domains, resolves it itself and
/// connects only to the addresses it resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct NetworkPolicy {
    /// Input only: `true` is `deny_out: ["0.0.0.0/0"]`.
    #[serde(skip_serializing_if = "is_false")]
    pub deny_all: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// IPv4 resolvers the sandbox may query on port 53 (and the egress
    /// proxy uses for allowed domains). Absent: the host's resolvers.
    /// `[]`: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
}

/// `PATCH /sandboxes/{id}/network`: the fields present replace the
/// policy's (`{"allow_out": []}` clears the allow list); `{}` keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct NetworkPatch {
    pub deny_all: Option<bool>,
    pub allow_out: Option<Vec<String>>,
    pub deny_out: Option<Vec<String>>,
    /// `null` resets to the host's resolvers.
    #[serde(deserialize_with = "double_option")]
    pub dns_servers: Option<Option<Vec<String>>>,
}

fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `GET /sandboxes/{id}/network`: the policy in force and what it denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkStatus {
    pub sandbox_id: String,
    pub network_mode: String,
    /// The sandbox's own policy (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<NetworkPolicy>,
    /// What is enforced: the policy under the tenant's and template's
    /// allowlists (absent: the server's defaults only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<NetworkPolicy>,
    /// CIDRs denied by the tenant's `egress` policies, whatever the
    /// sandbox's policy allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enforced_deny: Vec<String>,
    /// Recent denied connections, newest first (at most 256).
    pub denied: Vec<EgressDenial>,
}

/// A destination the sandbox was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EgressDenial {
    /// The address it tried (empty when a name was refused before any
    /// address was chosen).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// The HTTP Host or TLS SNI name, for connections the egress proxy
    /// judged.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `cidr` (a deny rule), `domain` (a name no rule allows), `no_name`
    /// (neither HTTP nor TLS with SNI), `resolved_blocked` (the name
    /// resolved only to addresses the operator blocks), `resolve_failed`,
    /// `too_many_connections` (more than 256 open through the proxy).
    pub reason: String,
    /// Packets (`cidr`) or connections (proxy reasons) refused.
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<DateTime<Utc>>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// `POST /sandboxes/admission` response. The three worker keys of the original
/// are deliberately absent: the published Python SDK rejects unknown keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AdmissionDecision {
    pub allowed: bool,
    pub queueable: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub active_sandboxes: i64,
    pub max_sandboxes: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub active_owner_sandboxes: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_owner_sandboxes: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub max_ttl: String,
}

/// `POST /sandboxes/{id}/exec` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ExecRequest {
    pub command: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mode: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub workdir: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub timeout: String,
    #[serde(skip_serializing_if = "is_false")]
    pub stream: bool,
    /// Extension: when true, a streamed exec ends with one
    /// `{"type":"exit","exit_code":N,"duration":"…"}` record.
    #[serde(skip_serializing_if = "is_false")]
    pub report_exit: bool,
    /// Extension: standard input given to the command, as UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Extension (WebSocket only): keep stdin open and accept
    /// `{"type":"stdin","data":…}`, `{"type":"stdin_close"}` and
    /// `{"type":"signal","signal":N}` messages while the command runs.
    #[serde(skip_serializing_if = "is_false")]
    pub interactive: bool,
    /// Extension (WebSocket only): run on a pseudo-terminal of this size;
    /// `{"type":"resize","rows":R,"cols":C}` messages resize it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Extension (WebSocket only): output arrives as binary messages whose
    /// first byte names the stream (1 stdout, 2 stderr) followed by the raw
    /// bytes, so binary output passes unchanged. The end is still the text
    /// `{"type":"done",…}` message.
    #[serde(skip_serializing_if = "is_false")]
    pub binary: bool,
    /// Extension: run as this account of the sandbox, a name from its
    /// `/etc/passwd` (its home becomes `HOME` and the default working
    /// directory) or a numeric `uid[:gid]`. Absent = root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Terminal size of a pty exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Synchronous exec result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration: GoDuration,
}

/// One NDJSON line of a streamed exec (or one WebSocket text message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamChunk {
    pub stream: String,
    pub data: String,
    /// NDJSON streams: the output offset after this line's bytes; a client
    /// whose connection drops resumes from the last one it got
    /// (`GET /sandboxes/{id}/execs/{exec_id}/stream?offset=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// A streamed exec, running or recently ended
/// (`GET /sandboxes/{id}/execs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecInfo {
    pub id: String,
    pub sandbox_id: String,
    pub command: String,
    /// `running`, `exited`, `failed` or `killed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Bytes of output (stdout and stderr together) written so far.
    pub output_bytes: u64,
    /// The oldest offset still kept; reading from before it reports a gap.
    pub retained_from: u64,
    /// Readers attached now.
    pub attached: usize,
}

/// Final record of a streamed exec when `report_exit` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamExit {
    #[serde(rename = "type")]
    pub kind: String,
    pub exit_code: i32,
    pub duration: GoDuration,
}

/// File metadata, normalised across providers: absolute `path`, permission
/// bits in octal without type bits (`644`), RFC 3339 UTC `mod_time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileInfo {
    pub path: String,
    pub size: u64,
    pub mode: String,
    pub is_dir: bool,
    pub mod_time: String,
    /// Extension: the final path component.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// `POST /sandboxes/{id}/files` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct WriteFileRequest {
    pub path: String,
    pub content: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mode: String,
    /// Extension: `base64` means `content` is base64 of arbitrary bytes.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encoding: String,
}

/// `POST /sandboxes/{id}/files/move` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct MoveFileRequest {
    pub old_path: String,
    pub new_path: String,
}

/// `POST /sandboxes/{id}/files/chmod` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ChmodRequest {
    pub path: String,
    pub mode: String,
}

/// `POST /sandboxes/{id}/extend` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ExtendRequest {
    pub ttl: String,
}

/// `{"status":"…"}` responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StatusResponse {
    pub status: String,
}

impl StatusResponse {
    pub fn new(status: &str) -> Self {
        StatusResponse {
            status: status.to_string(),
        }
    }
}

/// `DELETE /sandboxes` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PruneResponse {
    pub pruned: u64,
}

/// `GET /health` and `GET /live`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HealthResponse {
    pub status: String,
    pub uptime: GoDuration,
    pub version: String,
}

/// Health of one provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderHealth {
    pub name: String,
    pub healthy: bool,
    pub default: bool,
    pub latency_ms: i64,
    pub last_checked: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_count: Option<i64>,
    /// Isolation class: `none`, `remote`, `process`, `container`,
    /// `user-space kernel` or `microvm`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub isolation: String,
    /// Network modes a spawn may ask for, and the one used when it names none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_modes: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub default_network_mode: String,
}

/// `GET /ready`; map-typed in the original, so keys are alphabetical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReadyResponse {
    pub providers: Vec<ProviderHealth>,
    pub ready_providers: i64,
    pub status: String,
    pub total_providers: i64,
    pub uptime: GoDuration,
    pub version: String,
}

/// `GET /providers/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderDetail {
    pub name: String,
    pub healthy: bool,
    pub default: bool,
    pub sandbox_count: i64,
    pub health: ProviderHealth,
    pub config: BTreeMap<String, String>,
}

/// A template secret reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TemplateSecret {
    pub name: String,
    #[serde(default)]
    pub inject_at: String,
}

/// A sandbox template. Input also accepts the SDK aliases `vcpus`
/// (→ `cpu_cores`), `ttl` (→ `ttl_seconds`), `provider` and `metadata`;
/// output carries both spellings so either SDK reads what it sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Template {
    pub name: String,
    pub version: i64,
    pub image: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    pub memory_mb: i64,
    pub cpu_cores: i64,
    pub ttl_seconds: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<TemplateSecret>,
    pub pool_size: i64,
    /// Files written into every sandbox spawned from the template:
    /// absolute path → text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// The warm pool's state, when `pool_size > 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<TemplatePool>,
    /// Alias of `cpu_cores` for the SDKs.
    pub vcpus: i64,
    /// Alias of `ttl_seconds` as a Go duration, for the SDKs.
    pub ttl: GoDuration,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A template's warm pool: sandboxes spawned and set up ahead of demand.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TemplatePool {
    /// `pool_size`.
    pub target: i64,
    /// Set up and waiting on this server.
    pub ready: i64,
    /// Spawns served from the pool since the server started.
    pub hits: u64,
    /// Spawns that found the pool empty (a fresh sandbox was set up).
    pub misses: u64,
    /// Pool sandboxes whose spawn or setup failed.
    pub failures: u64,
}

/// Template create/replace body (all fields optional on the wire).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct TemplateInput {
    pub name: String,
    pub version: i64,
    pub image: String,
    pub description: String,
    pub setup: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub memory_mb: i64,
    pub cpu_cores: i64,
    pub ttl_seconds: i64,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<TemplateSecret>,
    pub pool_size: i64,
    /// Absolute path → text, written before `setup` runs.
    pub files: BTreeMap<String, String>,
    pub vcpus: i64,
    /// Go duration string or integer seconds.
    pub ttl: Option<serde_json::Value>,
    pub provider: String,
    pub metadata: BTreeMap<String, String>,
}

/// `POST /templates/{name}/spawn` optional body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct TemplateSpawnRequest {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub provider: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ttl: String,
}

/// Per-owner quota override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OwnerQuota {
    pub owner_id: String,
    pub max_sandboxes: i64,
    pub max_ttl: GoDuration,
    pub max_exec_timeout: GoDuration,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `PUT /quotas/{owner}` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct QuotaInput {
    pub max_sandboxes: i64,
    pub max_ttl: String,
    pub max_exec_timeout: String,
}

/// `GET /quotas/summary`: exactly four keys (the Python SDK unpacks them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaSummary {
    pub total: i64,
    pub with_max_sandboxes: i64,
    pub with_max_ttl: i64,
    pub with_max_exec_timeout: i64,
}

/// `GET /quotas/{owner}/usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaUsage {
    pub owner_id: String,
    pub active_sandboxes: i64,
    pub max_sandboxes: i64,
    pub max_ttl: GoDuration,
    pub max_exec_timeout: GoDuration,
    pub quota_configured: bool,
}

/// `GET /snapshots` item (the spec's three fields, then StacyVM's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotSummary {
    pub image: String,
    pub provider: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_mb: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vcpus: i64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub size_bytes: u64,
    /// Snapshots of sandboxes only: the sandbox it was taken of (restore
    /// points a provider keeps for its spawns have none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_sandbox_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network_mode: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner_id: String,
}

/// `POST /sandboxes/{id}/fork` body. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ForkRequest {
    /// Children to start (1–16, default 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub count: i64,
    /// Time to live of each child (Go duration; default as for spawns).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ttl: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Keep the snapshot the children start from (listed, spawnable,
    /// counted against the owner's snapshots) instead of deleting it once
    /// they run.
    #[serde(skip_serializing_if = "is_false")]
    pub keep_snapshot: bool,
}

/// `POST /sandboxes/{id}/fork` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForkResponse {
    pub sandboxes: Vec<Sandbox>,
    /// The snapshot, when `keep_snapshot` asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSummary>,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// An event on `GET /events` (SSE) and the internal bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox_id: String,
    pub timestamp: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<BTreeMap<String, serde_json::Value>>,
}

/// Pool status when the pool is disabled: `{"enabled":false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PoolStatus {
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_users: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_users_per_vm: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_omits_empty_fields_in_contract_order() {
        let t = DateTime::parse_from_rfc3339("2026-05-04T10:30:00.5Z")
            .expect("time")
            .with_timezone(&Utc);
        let sb = Sandbox {
            id: "sb-1a2b3c4d".into(),
            state: "running".into(),
            provider: "native".into(),
            image: "host".into(),
            memory_mb: 1024,
            vcpus: 1,
            owner_id: String::new(),
            tenant_id: String::new(),
            vm_id: String::new(),
            worker_id: "local".into(),
            created_at: t,
            expires_at: t,
            metadata: Some(BTreeMap::new()),
            preview_domain: "localhost".into(),
            idle_timeout: String::new(),
            on_timeout: String::new(),
            network: None,
            auto_resume: None,
        };
        let json = serde_json::to_string(&sb).expect("json");
        assert_eq!(
            json,
            r#"{"id":"sb-1a2b3c4d","state":"running","provider":"native","image":"host","memory_mb":1024,"vcpus":1,"worker_id":"local","created_at":"2026-05-04T10:30:00.500Z","expires_at":"2026-05-04T10:30:00.500Z","preview_domain":"localhost"}"#
        );
    }

    #[test]
    fn spawn_request_ignores_unknown_fields_and_defaults_missing() {
        let req: SpawnRequest = serde_json::from_str(r#"{"image":"x","bogus":1}"#).expect("decode");
        assert_eq!(req.image, "x");
        assert_eq!(req.memory_mb, 0);
        assert!(serde_json::from_str::<SpawnRequest>(r#"{"memory_mb":"lots"}"#).is_err());
    }
}

/// A worker (a control plane or a `stacyvm worker`), as `/workers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Worker {
    pub id: String,
    pub hostname: String,
    /// `online`, `draining` or `offline`.
    pub status: String,
    pub providers: Vec<String>,
    pub capabilities: Vec<String>,
    /// `max_sandboxes`, `rpc_url`, `preview_domain`, running counts …
    pub capacity: serde_json::Value,
    pub last_heartbeat: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// No heartbeat for more than 2 minutes.
    pub stale: bool,
}

/// What a worker says about itself every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct WorkerHeartbeat {
    pub hostname: String,
    /// `online` (the default) or `draining`.
    pub status: String,
    pub providers: Vec<String>,
    pub capabilities: Vec<String>,
    pub capacity: serde_json::Value,
}

/// `POST …/leases/{resource}/renew`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LeaseRenewRequest {
    /// A positive duration (`30s`, `5m`).
    pub ttl: String,
}

/// A lease as workers see it: the generation is the fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeaseToken {
    pub resource_id: String,
    pub holder_id: String,
    pub generation: i64,
    pub expires_at: DateTime<Utc>,
}

/// `{"lease": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeaseResponse {
    pub lease: LeaseToken,
}

/// `POST /admin/worker-tokens`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct WorkerTokenRequest {
    pub worker_id: String,
    /// Lifetime (default `5m`, at most `15m`).
    pub ttl: String,
    /// `worker:*` scopes; omitted = every scope.
    pub scopes: Option<Vec<String>>,
    /// `worker:control-plane` (default) or `worker:rpc`.
    pub audience: String,
}

/// A signed worker token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerTokenResponse {
    pub token: String,
    pub token_id: String,
    pub worker_id: String,
    pub audience: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    pub expires_at: DateTime<Utc>,
}

/// `POST /sandboxes/{id}/ports/{port}`: how the preview proxy serves a
/// port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExposePortRequest {
    /// `token` (the default: a preview token is needed, in the
    /// `X-StacyVM-Preview-Token` header, the `stacyvm_token` query
    /// parameter or the cookie it sets) or `public` (anyone with the URL).
    #[serde(default)]
    pub mode: String,
}

/// An exposed port of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PortExposure {
    pub sandbox_id: String,
    pub port: u16,
    /// `public` or `token`.
    pub mode: String,
    /// `http://{port}-{id}.{preview_domain}[:port]/`.
    pub url: String,
    /// The path form on the API's own address: `/preview/{id}/{port}/`.
    pub path: String,
    pub created_at: DateTime<Utc>,
}

/// `POST /sandboxes/{id}/ports/{port}/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PreviewTokenRequest {
    /// How long the token works (Go duration, e.g. `30m`, `24h`);
    /// default `preview.default_token_ttl`, at most
    /// `preview.max_token_ttl`.
    #[serde(default)]
    pub ttl: String,
}

/// A preview token. `token` (the secret) appears only in the answer
/// that creates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PreviewToken {
    pub id: String,
    pub sandbox_id: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// The preview URL with the token as a query parameter (creation only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
}
