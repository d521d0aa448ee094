//! Configuration: YAML file + `STACYVM_*` environment overrides.
//!
//! Lookup order (spec/config-and-cli.md §1): an explicit `--config PATH`,
//! else the first existing file of `./stacyvm.yaml` and
//! `~/.stacyvm/config.yaml`; a missing file means defaults only. Every key
//! that exists in the defaults or in the file can be overridden by an
//! environment variable named `STACYVM_` + the key path upper-cased with `.`
//! replaced by `_` (`server.port` → `STACYVM_SERVER_PORT`). Lists take
//! comma-separated values, booleans `true/false/1/0`.
//!
//! Loading parses into a value tree, applies env overrides, deserialises into
//! [`Config`], reads secret files and finally [`Config::validate`]s. Errors
//! name the key and say what is allowed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::Value;
use stacyvm_api::duration;

/// A configuration error; the message names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A string whose `Debug` and `Serialize` never reveal the value.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("[REDACTED]")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Secrets are serialised as-is only into the defaults tree (always
        // empty); anything rendered for humans goes through redaction.
        s.serialize_str(&self.0)
    }
}

/// A Go duration in config; accepts a string (`30m`) or the integer 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub stacyvm_api::GoDuration);

impl Dur {
    pub fn secs(s: i64) -> Self {
        Dur(stacyvm_api::GoDuration::from_secs(s))
    }
    pub fn std(self) -> std::time::Duration {
        self.0.to_std()
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match v {
            Value::String(s) if s.trim().is_empty() => Ok(Dur::default()),
            Value::String(s) => duration::parse(s.trim())
                .map(|n| Dur(stacyvm_api::GoDuration(n)))
                .map_err(|e| {
                    serde::de::Error::custom(format!("{e}; use a duration like 30s, 10m or 1h30m"))
                }),
            Value::Number(n) if n.as_i64() == Some(0) => Ok(Dur::default()),
            Value::Null => Ok(Dur::default()),
            other => Err(serde::de::Error::custom(format!(
                "expected a duration string like 30s, 10m or 1h30m, got {}",
                yaml_brief(&other)
            ))),
        }
    }
}

fn yaml_brief(v: &Value) -> String {
    serde_yaml::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "a value".into())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub server: ServerConfig,
    pub worker: WorkerConfig,
    pub providers: ProvidersConfig,
    pub defaults: DefaultsConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub database: DatabaseConfig,
    pub logging: LoggingConfig,
    pub pool: PoolConfig,
    pub limits: LimitsConfig,
    pub preview: PreviewConfig,
    pub exec: ExecConfig,
}

/// Streamed execs: ids, the output journal and reattaching
/// (docs/api.md, "Resumable exec streams").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecConfig {
    /// How long a streamed exec keeps running with no client attached
    /// (a dropped connection); 0 = killed when its client goes.
    pub resume_window: Dur,
    /// Unread output one streamed exec may hold, in bytes; a command that
    /// writes faster waits (unread output is never dropped).
    pub buffer_bytes: u64,
    /// Output already sent that one streamed exec keeps, in bytes: what a
    /// client whose connection dropped may not have received (socket
    /// buffers, proxies) is sent again from its offset.
    pub history_bytes: u64,
    /// How long a finished exec stays listed and readable.
    pub keep_finished: Dur,
    /// Finished execs kept per sandbox (the oldest are dropped first).
    pub keep_per_sandbox: u32,
    /// Streamed execs one sandbox may run at once, attached or not.
    pub max_running_per_sandbox: u32,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            resume_window: Dur::secs(60),
            buffer_bytes: 1024 * 1024,
            history_bytes: 4 * 1024 * 1024,
            keep_finished: Dur::secs(600),
            keep_per_sandbox: 8,
            max_running_per_sandbox: 16,
        }
    }
}

/// The built-in preview proxy (docs/preview.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreviewConfig {
    /// Serve `{port}-{id}.{server.preview_domain}` and `/preview/{id}/{port}/`.
    pub enabled: bool,
    /// Scheme of the URLs the API reports (`https` behind a TLS proxy).
    pub scheme: String,
    /// Port of the URLs the API reports; 0 = `server.port`.
    pub url_port: u16,
    /// More domains whose `{port}-{id}.` names the proxy answers.
    pub extra_domains: Vec<String>,
    /// Lifetime of a preview token when the request names none.
    pub default_token_ttl: String,
    /// Longest lifetime a preview token may have.
    pub max_token_ttl: String,
    /// Ports a sandbox may expose at once.
    pub max_ports_per_sandbox: u16,
    /// Carry connections to public ports (Host form, plain HTTP) as
    /// tunnels after their first request (bytes copied, not parsed),
    /// instead of proxying each request (docs/preview.md).
    pub tunnel: bool,
}

impl Default for PreviewConfig {
    fn default() -> Self {
        PreviewConfig {
            enabled: true,
            scheme: "http".into(),
            url_port: 0,
            extra_domains: Vec::new(),
            default_token_ttl: "24h".into(),
            max_token_ttl: "720h".into(),
            max_ports_per_sandbox: 16,
            tunnel: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Listen address; "" = automatic: `127.0.0.1` while no credential is
    /// configured, `0.0.0.0` once one is (see [`Config::listen_host`]).
    pub host: String,
    pub port: u16,
    pub preview_domain: String,
    pub cors_allowed_origins: Vec<String>,
    /// Directory for the database, images and sandbox state.
    pub data_dir: String,
    /// Largest accepted request body in bytes (413 above).
    pub max_body_bytes: u64,
    /// Proxies (addresses or CIDRs) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// E2B's host-based routing: requests for `<port>-<sandbox id>.<domain>`
    /// go to that sandbox (port 49983: its envd), and E2B create/connect
    /// answers name this domain. Empty = header routing only
    /// (`E2B_SANDBOX_URL`).
    pub e2b_domain: String,
    /// How long a client may take to send a request's headers; a
    /// connection that is slower (slowloris) is closed. 0 = no limit.
    pub header_read_timeout: Dur,
    /// Open client connections; more are closed as they arrive. 0 = no
    /// limit.
    pub max_connections: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerConfig {
    pub id: String,
    pub control_plane_url: String,
    pub listen_addr: String,
    pub preview_domain: String,
    pub heartbeat_interval: Dur,
    pub shutdown_timeout: Dur,
    pub rpc_tls: RpcTlsConfig,
    /// The RPC address other machines use to reach this worker (when
    /// `listen_addr` is a wildcard or behind NAT); "" = from `listen_addr`.
    pub advertise_url: String,
    /// A worker silent this long is stale: no new sandboxes go to it, and
    /// its sandboxes are shown `unhealthy` until it heartbeats again.
    pub stale_after: Dur,
    /// On a control plane of a cluster: run sandboxes here too. `false`
    /// makes an API-only control plane that places every sandbox on a
    /// worker.
    pub local_sandboxes: bool,
    /// What a draining worker does with its sandboxes: `finish` (keep
    /// serving them until they end or `shutdown_timeout` passes) or
    /// `migrate` (a control plane moves them to other workers, with their
    /// `/workspace` files; processes restart).
    pub drain_policy: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcTlsConfig {
    pub enabled: bool,
    pub server_cert_file: String,
    pub server_key_file: String,
    pub client_ca_file: String,
    pub ca_file: String,
    pub client_cert_file: String,
    pub client_key_file: String,
    pub server_name: String,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProvidersConfig {
    pub default: String,
    pub mock: MockConfig,
    pub native: NativeConfig,
    pub firecracker: FirecrackerConfig,
    pub qemu: QemuConfig,
    pub docker: DockerConfig,
    pub e2b: E2bConfig,
    pub custom: CustomConfig,
    pub proot: ProotConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MockConfig {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NativeConfig {
    pub enabled: bool,
    /// Network mode when the spawn does not ask: `none` or `bridge`.
    pub network_mode: String,
    /// Path of the static `stacyvm-agent` binary ("" = next to the server binary).
    pub agent_path: String,
    /// Maximum processes per sandbox.
    pub pids_limit: i64,
    /// Host bridge of `bridge` mode (at most 15 bytes).
    pub bridge_name: String,
    /// IPv4 subnet of the bridge; its first address is the gateway.
    pub bridge_subnet: String,
    /// IPv4 CIDRs `bridge` sandboxes may reach despite the built-in deny
    /// list (private, link-local, metadata, ...), e.g. an internal proxy.
    pub egress_allow: Vec<String>,
    /// Extra IPv4 CIDRs `bridge` sandboxes may not reach; beats `egress_allow`.
    pub egress_deny: Vec<String>,
    /// Sandboxes pre-booted for fast spawns (image `host`, network
    /// `none`; root servers only). 0 disables the pool.
    pub warm_pool: i64,
    /// Landlock: sandboxes may write only beneath their workspace, /tmp,
    /// /var/tmp, /run, /dev, /proc, /home and /root.
    pub landlock: bool,
    /// A root server runs each sandbox in its own user namespace: sandbox
    /// root is an unprivileged block of `subordinate_ids`, never host root.
    pub user_namespace: bool,
    /// `START:COUNT` host ids handed out in blocks of 65536 per sandbox.
    pub subordinate_ids: String,
    /// MiB a sandbox may write into its root (overlay upper dir); a
    /// sandbox over it is ended. 0 = no cap.
    pub disk_mb: i64,
    /// MiB the data filesystem keeps free: below it the largest sandbox is
    /// ended. 0 = no floor.
    pub disk_min_free_mb: i64,
}

/// The `qemu` provider: QEMU `microvm` machines with their own guest kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QemuConfig {
    pub enabled: bool,
    /// `qemu-system-x86_64` (a name looked up in PATH, or a path).
    pub qemu_binary: String,
    /// `auto` (KVM when a guest boots with it, else TCG), `kvm` or `tcg`.
    pub accel: String,
    /// Debian package of the guest kernel (downloaded with apt once).
    pub kernel_package: String,
    /// Kernels, initramfs and root disks (empty = `<data_dir>/microvm`).
    pub cache_dir: String,
    /// Image used when a spawn names none or `host` (which a microVM
    /// cannot show); empty = such spawns are refused.
    pub default_image: String,
    pub max_sandboxes: i64,
    /// Largest `memory_mb` a spawn may ask for (0 = no cap).
    pub max_memory_mb: i64,
    pub max_vcpus: i64,
    /// MiB free in each sandbox's root disk.
    pub disk_mb: i64,
    /// QEMU start to the guest agent's answer.
    pub boot_timeout: Dur,
    /// Hard cap of every exec.
    pub default_timeout: Dur,
    /// Spawn by restoring a snapshot of a booted guest of the same image,
    /// memory and vCPUs (made in the background after the first boot).
    pub snapshots: bool,
    /// Network of spawns that do not ask: `none` (no NIC at all) or
    /// `bridge` (a tap on the native bridge, with its egress rules:
    /// `providers.native.bridge_*`, `egress_allow`, `egress_deny`).
    pub network_mode: String,
}

impl QemuConfig {
    /// `cache_dir`, or its default under `data_dir`.
    pub fn cache_in(&self, data_dir: &str) -> std::path::PathBuf {
        if self.cache_dir.is_empty() {
            std::path::Path::new(data_dir).join("microvm")
        } else {
            self.cache_dir.clone().into()
        }
    }
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            enabled: false,
            qemu_binary: "qemu-system-x86_64".into(),
            accel: "auto".into(),
            kernel_package: "linux-image-cloud-amd64".into(),
            cache_dir: String::new(),
            default_image: String::new(),
            max_sandboxes: 20,
            max_memory_mb: 4096,
            max_vcpus: 4,
            disk_mb: 2048,
            boot_timeout: Dur::secs(60),
            default_timeout: Dur::secs(300),
            snapshots: true,
            network_mode: "none".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FirecrackerConfig {
    pub enabled: bool,
    pub firecracker_path: String,
    /// Firecracker's `jailer` (empty = none): every VMM then starts in a
    /// chroot of its VM directory with device nodes of its own.
    pub jailer_path: String,
    /// Uncompressed `vmlinux` guest kernel.
    pub kernel_path: String,
    /// Image used when a spawn names none or `host`.
    pub default_rootfs: String,
    pub agent_path: String,
    /// Where sandbox state lives (`<data_dir>/firecracker/sandboxes`);
    /// empty = `server.data_dir`.
    pub data_dir: String,
    pub max_sandboxes: i64,
    /// Largest `memory_mb` a spawn may ask for (0 = no cap).
    pub max_memory_mb: i64,
    pub max_vcpus: i64,
    /// MiB free in each sandbox's root disk.
    pub disk_mb: i64,
    /// Firecracker start to the guest agent's answer.
    pub boot_timeout: Dur,
    /// Hard cap of every exec.
    pub default_timeout: Dur,
    /// Spawn by loading a restore point of a booted guest of the same
    /// image, memory and vCPUs (built after the first boot of a shape).
    pub snapshots: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DockerConfig {
    pub enabled: bool,
    pub socket: String,
    pub runtime: String,
    pub default_image: String,
    pub network_mode: String,
    pub seccomp_profile: String,
    pub read_only_rootfs: bool,
    pub memory: String,
    pub cpus: f64,
    pub pids_limit: i64,
    pub user: String,
    pub dropped_caps: Vec<String>,
    pub added_caps: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tmpfs: BTreeMap<String, String>,
    /// Size cap of a container's writable layer (`storage_opt size`) where
    /// the engine's storage driver supports one; empty = none.
    pub disk: String,
    /// The Docker network `network_mode: bridge` means (created on demand,
    /// no inter-container traffic, public internet only).
    pub bridge_network: String,
    /// IPv4 CIDRs the network's sandboxes may reach despite the built-in
    /// deny list (an internal package mirror or proxy).
    pub egress_allow: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct E2bConfig {
    pub enabled: bool,
    pub api_key: Secret,
    pub base_url: String,
    /// Where envd answers for every sandbox, routed by the
    /// `E2b-Sandbox-Id` header (a StacyVM, or a proxy); empty = E2B's
    /// host routing, `https://49983-<id>.<domain>`.
    pub sandbox_url: String,
    /// The template a spawn without an image starts from.
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CustomConfig {
    pub enabled: bool,
    pub name: String,
    pub base_url: String,
    pub api_key: Secret,
    pub timeout: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProotConfig {
    pub enabled: bool,
    /// A plain root directory offered as image `rootfs` (optional; empty
    /// = `<data_dir>/proot/rootfs`).
    pub rootfs_path: String,
    pub proot_binary: String,
    /// Per-sandbox state (empty = `<data_dir>/proot/sandboxes`).
    pub workspace_base: String,
    /// Hard cap of every exec.
    pub default_timeout: Dur,
    pub max_sandboxes: i64,
    /// Largest `memory_mb` a spawn may ask for (0 = no cap).
    pub max_memory_mb: i64,
    /// Bytes a sandbox may hold in its writable dirs, in MiB (0 = no cap).
    pub max_disk_mb: i64,
    /// Processes per sandbox (cgroup, else RLIMIT_NPROC on root servers).
    pub pids_limit: i64,
}

impl ProotConfig {
    /// `workspace_base`, or its default under `data_dir`.
    pub fn workspace_base_in(&self, data_dir: &str) -> std::path::PathBuf {
        if self.workspace_base.is_empty() {
            std::path::Path::new(data_dir).join("proot/sandboxes")
        } else {
            self.workspace_base.clone().into()
        }
    }

    /// `rootfs_path`, or its default under `data_dir`.
    pub fn rootfs_in(&self, data_dir: &str) -> std::path::PathBuf {
        if self.rootfs_path.is_empty() {
            std::path::Path::new(data_dir).join("proot/rootfs")
        } else {
            self.rootfs_path.clone().into()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DefaultsConfig {
    pub ttl: Dur,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub max_ttl: Dur,
    pub default_exec_timeout: Dur,
    pub max_exec_timeout: Dur,
    pub max_sandboxes: i64,
    pub max_sandboxes_per_owner: i64,
    /// Snapshots of sandboxes one owner may keep (0 = no limit).
    pub max_snapshots_per_owner: i64,
    /// Volumes one owner may keep (0 = no limit).
    pub max_volumes_per_owner: i64,
    /// Largest volume, MiB.
    pub max_volume_mb: i64,
    pub spawn_overflow: String,
    pub spawn_queue_timeout: Dur,
    pub max_spawn_queue: i64,
    /// How long a sandbox may stay paused before the reaper destroys it
    /// (its time to live is stopped while paused). 0 = no limit.
    pub max_paused: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    pub enabled: bool,
    pub api_key: Secret,
    pub admin_api_key: Secret,
    pub admin_fallback_enabled: bool,
    /// Whether the shared API key may name the end user in `X-User-ID`
    /// (a backend acting for its users, as the SDKs do). The admin key
    /// always may; an OIDC caller never can.
    pub api_key_acts_for_users: bool,
    /// Age after which admin and operation audit rows are deleted (0 =
    /// keep forever).
    pub admin_audit_retention: Dur,
    /// Callers with the viewer or api role only see sandboxes they own
    /// (inside their tenant); operators and admins see the whole tenant.
    pub owner_scoping: bool,
    pub worker_token: Secret,
    pub worker_token_file: String,
    pub worker_tokens: BTreeMap<String, Secret>,
    pub worker_signing_key: Secret,
    pub worker_signing_key_file: String,
    pub worker_signing_keys: Vec<Secret>,
    pub worker_revoked_token_ids: Vec<String>,
    pub oidc_enabled: bool,
    pub oidc_issuer: String,
    pub oidc_audience: String,
    pub oidc_jwks_url: String,
    pub oidc_public_key: String,
    pub oidc_public_key_file: String,
    pub oidc_groups_claim: String,
    pub oidc_tenant_claim: String,
    pub oidc_admin_groups: Vec<String>,
    pub oidc_operator_groups: Vec<String>,
    pub oidc_viewer_groups: Vec<String>,
    /// The dashboard's OIDC sign-in (authorization code + PKCE): this
    /// server's client id at the issuer; empty = no OIDC sign-in.
    pub oidc_client_id: String,
    /// The client's secret, for issuers that require one (confidential
    /// clients); empty = a public client (PKCE alone).
    pub oidc_client_secret: Secret,
    pub oidc_client_secret_file: String,
    /// Where the issuer sends the browser back: this server's
    /// `/ui/oidc/callback` as the browser reaches it (empty = derived from
    /// the request's host and `preview.scheme`).
    pub oidc_redirect_url: String,
    /// Scopes asked for at sign-in.
    pub oidc_scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub requests_per_minute: i64,
    pub burst: i64,
    pub key_by: String,
    pub bucket_ttl: Dur,
    pub cleanup_interval: Dur,
    /// Most buckets kept in memory; beyond it the least recently used
    /// generation is dropped.
    pub max_buckets: i64,
    /// Failed authentication attempts allowed per client address and
    /// minute, whether or not `enabled` (0 = unlimited).
    pub failed_auth_per_minute: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    pub driver: String,
    /// SQLite file; "" = `<server.data_dir>/stacyvm.db`.
    pub path: String,
    pub dsn: Secret,
    /// Age after which stored exec logs (command, captured output) are
    /// deleted (0 = keep forever).
    pub exec_log_retention: Dur,
    /// Age after which rows of destroyed sandboxes are deleted (0 = keep
    /// forever).
    pub sandbox_retention: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoggingConfig {
    pub level: String,
    pub format: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolConfig {
    /// Pool mode: sandboxes share pool hosts, each confined to a slot
    /// (its own uid, pid and mount namespaces, and workspace); see
    /// docs/pool-mode.md.
    pub enabled: bool,
    /// Pool hosts this server runs at most.
    pub max_vms: i64,
    /// Sandboxes one pool host holds at most.
    pub max_users_per_vm: i64,
    /// Image of pooled sandboxes whose spawn names none; empty =
    /// `defaults.image`.
    pub image: String,
    /// Memory of a pool host (shared by its sandboxes).
    pub memory_mb: i64,
    /// vCPUs of a pool host (shared by its sandboxes).
    pub vcpus: i64,
    /// With every host full and `max_vms` reached: `reject` (429) or
    /// `queue` (wait for a slot up to `defaults.spawn_queue_timeout`).
    pub overflow: String,
}

/// Per-caller resource caps of the API server (0 = unlimited).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Concurrent execs (sync, NDJSON, WebSocket) and file transfers on
    /// one sandbox.
    pub max_active_per_sandbox: i64,
    /// Concurrent execs, file transfers and event streams of one
    /// credential (an API key, an API key acting for one user, an OIDC
    /// subject, or a client address when authentication is off).
    pub max_active_per_credential: i64,
    /// Concurrent execs, file transfers and event streams of one tenant
    /// (callers without a tenant share one budget).
    pub max_active_per_tenant: i64,
    /// Bytes of stdout and of stderr a synchronous exec returns; the
    /// rest is dropped (`stream: true` has no such cap).
    pub exec_output_bytes: i64,
    /// Largest WebSocket message or frame accepted from a client.
    pub ws_max_message_bytes: i64,
    /// Largest file the file API reads or writes (413 above). Transfers
    /// stream, so the server's memory does not depend on it.
    pub max_file_bytes: u64,
    /// Bytes of file content one archive transfer (`/archive`) may move.
    pub max_archive_bytes: u64,
    /// Entries one archive transfer may hold.
    pub max_archive_entries: u64,
}

/// Default data directory: `/var/lib/stacyvm` for root, else
/// `$XDG_DATA_HOME/stacyvm` or `~/.local/share/stacyvm`.
pub fn default_data_dir() -> String {
    // SAFETY-free check: geteuid via /proc is not needed; HOME and USER suffice.
    let is_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::env::var("HOME").map(|h| h == "/root").unwrap_or(false);
    if is_root {
        return "/var/lib/stacyvm".into();
    }
    if let Ok(x) = std::env::var("XDG_DATA_HOME") {
        if !x.is_empty() {
            return format!("{x}/stacyvm");
        }
    }
    match std::env::var("HOME") {
        Ok(h) if !h.is_empty() => format!("{h}/.local/share/stacyvm"),
        _ => "/tmp/stacyvm".into(),
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: String::new(),
            port: stacyvm_api::DEFAULT_PORT,
            preview_domain: "localhost".into(),
            cors_allowed_origins: Vec::new(),
            data_dir: default_data_dir(),
            max_body_bytes: 64 * 1024 * 1024,
            trusted_proxies: Vec::new(),
            e2b_domain: String::new(),
            header_read_timeout: Dur::secs(30),
            max_connections: 8192,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: String::new(),
            control_plane_url: "http://localhost:7423".into(),
            listen_addr: String::new(),
            preview_domain: String::new(),
            heartbeat_interval: Dur::secs(30),
            shutdown_timeout: Dur::secs(10),
            rpc_tls: RpcTlsConfig::default(),
            advertise_url: String::new(),
            stale_after: Dur::secs(120),
            local_sandboxes: true,
            drain_policy: "finish".into(),
        }
    }
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        ProvidersConfig {
            default: "native".into(),
            mock: MockConfig::default(),
            native: NativeConfig::default(),
            firecracker: FirecrackerConfig::default(),
            qemu: QemuConfig::default(),
            docker: DockerConfig::default(),
            e2b: E2bConfig::default(),
            custom: CustomConfig::default(),
            proot: ProotConfig::default(),
        }
    }
}

impl Default for NativeConfig {
    fn default() -> Self {
        NativeConfig {
            enabled: true,
            network_mode: "none".into(),
            agent_path: String::new(),
            pids_limit: 512,
            bridge_name: "stacyvm0".into(),
            bridge_subnet: "10.88.0.0/16".into(),
            egress_allow: Vec::new(),
            egress_deny: Vec::new(),
            warm_pool: 2,
            user_namespace: true,
            subordinate_ids: "100000000:1000000000".into(),
            disk_mb: 10240,
            disk_min_free_mb: 1024,
            landlock: false,
        }
    }
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            enabled: false,
            firecracker_path: "/usr/local/bin/firecracker".into(),
            jailer_path: String::new(),
            kernel_path: "/var/lib/stacyvm/vmlinux.bin".into(),
            default_rootfs: String::new(),
            agent_path: "./bin/stacyvm-agent".into(),
            data_dir: String::new(),
            max_sandboxes: 20,
            max_memory_mb: 4096,
            max_vcpus: 4,
            disk_mb: 2048,
            boot_timeout: Dur::secs(30),
            default_timeout: Dur::secs(300),
            snapshots: true,
        }
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: false,
            socket: String::new(),
            runtime: "runc".into(),
            default_image: "alpine:latest".into(),
            network_mode: "none".into(),
            seccomp_profile: "default".into(),
            read_only_rootfs: false,
            memory: "512m".into(),
            cpus: 1.0,
            pids_limit: 256,
            user: String::new(),
            dropped_caps: vec!["ALL".into()],
            added_caps: Vec::new(),
            tmpfs: BTreeMap::new(),
            disk: "10g".into(),
            bridge_network: "stacyvm-bridge".into(),
            egress_allow: Vec::new(),
        }
    }
}

impl Default for E2bConfig {
    fn default() -> Self {
        E2bConfig {
            enabled: false,
            api_key: Secret::default(),
            base_url: "https://api.e2b.dev".into(),
            sandbox_url: String::new(),
            template: "base".into(),
        }
    }
}

impl Default for CustomConfig {
    fn default() -> Self {
        CustomConfig {
            enabled: false,
            name: "custom".into(),
            base_url: String::new(),
            api_key: Secret::default(),
            timeout: Dur::secs(60),
        }
    }
}

impl Default for ProotConfig {
    fn default() -> Self {
        ProotConfig {
            enabled: false,
            rootfs_path: String::new(),
            proot_binary: "proot".into(),
            workspace_base: String::new(),
            default_timeout: Dur::secs(60),
            max_sandboxes: 10,
            max_memory_mb: 2048,
            max_disk_mb: 1024,
            pids_limit: 512,
        }
    }
}

impl Default for DefaultsConfig {
    fn default() -> Self {
        DefaultsConfig {
            ttl: Dur::secs(30 * 60),
            image: "host".into(),
            memory_mb: 1024,
            vcpus: 1,
            max_ttl: Dur::secs(24 * 3600),
            max_paused: Dur::secs(24 * 3600),
            default_exec_timeout: Dur::default(),
            max_exec_timeout: Dur::secs(10 * 60),
            max_sandboxes: 0,
            max_sandboxes_per_owner: 0,
            max_snapshots_per_owner: 20,
            max_volumes_per_owner: 20,
            max_volume_mb: 10240,
            spawn_overflow: "reject".into(),
            spawn_queue_timeout: Dur::secs(30),
            max_spawn_queue: 100,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            api_key: Secret::default(),
            admin_api_key: Secret::default(),
            admin_fallback_enabled: true,
            api_key_acts_for_users: true,
            admin_audit_retention: Dur::secs(30 * 24 * 3600),
            owner_scoping: true,
            worker_token: Secret::default(),
            worker_token_file: String::new(),
            worker_tokens: BTreeMap::new(),
            worker_signing_key: Secret::default(),
            worker_signing_key_file: String::new(),
            worker_signing_keys: Vec::new(),
            worker_revoked_token_ids: Vec::new(),
            oidc_enabled: false,
            oidc_issuer: String::new(),
            oidc_audience: String::new(),
            oidc_jwks_url: String::new(),
            oidc_public_key: String::new(),
            oidc_public_key_file: String::new(),
            oidc_groups_claim: "groups".into(),
            oidc_tenant_claim: "tenant_id".into(),
            oidc_admin_groups: Vec::new(),
            oidc_operator_groups: Vec::new(),
            oidc_viewer_groups: Vec::new(),
            oidc_client_id: String::new(),
            oidc_client_secret: Secret::default(),
            oidc_client_secret_file: String::new(),
            oidc_redirect_url: String::new(),
            oidc_scopes: vec!["openid".into(), "email".into(), "profile".into()],
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: false,
            requests_per_minute: 120,
            burst: 60,
            key_by: "owner".into(),
            bucket_ttl: Dur::secs(15 * 60),
            cleanup_interval: Dur::secs(60),
            max_buckets: 100_000,
            failed_auth_per_minute: 30,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            driver: "sqlite".into(),
            path: String::new(),
            dsn: Secret::default(),
            exec_log_retention: Dur::secs(7 * 24 * 3600),
            sandbox_retention: Dur::secs(30 * 24 * 3600),
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: "pretty".into(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_active_per_sandbox: 16,
            max_active_per_credential: 32,
            max_active_per_tenant: 128,
            exec_output_bytes: 1024 * 1024,
            ws_max_message_bytes: 1024 * 1024,
            max_file_bytes: 4 * 1024 * 1024 * 1024,
            max_archive_bytes: 16 * 1024 * 1024 * 1024,
            max_archive_entries: 200_000,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: false,
            max_vms: 10,
            max_users_per_vm: 5,
            image: String::new(),
            memory_mb: 2048,
            vcpus: 2,
            overflow: "reject".into(),
        }
    }
}

/// A loaded configuration plus where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file that was read, if any.
    pub source: Option<PathBuf>,
    /// Keys in the file that this build does not know (dotted paths).
    pub unknown_keys: Vec<String>,
}

/// Candidate files in lookup order.
pub fn default_paths() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("stacyvm.yaml")];
    if let Ok(home) = std::env::var("HOME") {
        v.push(Path::new(&home).join(".stacyvm").join("config.yaml"));
    }
    v
}

/// Loads configuration from `explicit` (must exist) or the default lookup,
/// applying overrides from `env` (pass `std::env::vars()`).
pub fn load(
    explicit: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let source = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => default_paths().into_iter().find(|p| p.is_file()),
    };
    let file_value = match &source {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                path: p.clone(),
                source: e,
            })?;
            if text.trim().is_empty() {
                None
            } else {
                let v: Value = serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
                match v {
                    Value::Mapping(_) => Some(v),
                    Value::Null => None,
                    _ => {
                        return Err(ConfigError::Parse {
                            path: p.clone(),
                            message: "top level must be a mapping of sections".into(),
                        })
                    }
                }
            }
        }
        None => None,
    };
    let env: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("STACYVM_"))
        .collect();
    let (config, unknown_keys) = from_value_tree(file_value, &env, source.as_deref())?;
    Ok(Loaded {
        config,
        source,
        unknown_keys,
    })
}

/// Parses YAML text (for tests and `config lint`) with the given env.
pub fn from_yaml_str(text: &str, env: &BTreeMap<String, String>) -> Result<Loaded, ConfigError> {
    let path = PathBuf::from("<inline>");
    let v: Value = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let v = if v.is_null() { None } else { Some(v) };
    let (config, unknown_keys) = from_value_tree(v, env, None)?;
    Ok(Loaded {
        config,
        source: None,
        unknown_keys,
    })
}

fn from_value_tree(
    file: Option<Value>,
    env: &BTreeMap<String, String>,
    source: Option<&Path>,
) -> Result<(Config, Vec<String>), ConfigError> {
    let mut tree = serde_yaml::to_value(Config::default()).map_err(|e| ConfigError::Parse {
        path: PathBuf::from("<defaults>"),
        message: e.to_string(),
    })?;
    let mut unknown = Vec::new();
    if let Some(file) = file {
        merge(&mut tree, file, "", &mut unknown);
    }
    apply_env(&mut tree, "", env)?;
    let mut config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().to_string();
        match source {
            Some(p) => ConfigError::Parse {
                path: p.to_path_buf(),
                message: format!("{key}: {message}"),
            },
            None => ConfigError::Invalid { key, message },
        }
    })?;
    config.resolve_secret_files()?;
    config.validate()?;
    Ok((config, unknown))
}

/// Deep-merges `src` into `dst`; records keys of `src` absent from `dst`
/// (except under free-form maps, which accept any key).
fn merge(dst: &mut Value, src: Value, path: &str, unknown: &mut Vec<String>) {
    const FREE_FORM: &[&str] = &["auth.worker_tokens", "providers.docker.tmpfs"];
    match (dst, src) {
        (Value::Mapping(d), Value::Mapping(s)) => {
            let free = FREE_FORM.contains(&path);
            for (k, v) in s {
                let key = match &k {
                    Value::String(s) => s.clone(),
                    other => yaml_brief(other),
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match d.get_mut(&k) {
                    Some(existing) => merge(existing, v, &child, unknown),
                    None => {
                        if !free && !FREE_FORM.contains(&child.as_str()) {
                            unknown.push(child);
                        }
                        d.insert(k, v);
                    }
                }
            }
        }
        (d, s) => *d = s,
    }
}

/// Environment variable name of a dotted key.
pub fn env_name(key: &str) -> String {
    format!("STACYVM_{}", key.to_uppercase().replace(['.', '-'], "_"))
}

fn apply_env(
    node: &mut Value,
    path: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    if let Value::Mapping(m) = node {
        // Maps of secrets keyed by id cannot be set from env (spec §1).
        if path == "auth.worker_tokens" || path == "providers.docker.tmpfs" {
            return Ok(());
        }
        for (k, v) in m.iter_mut() {
            let Value::String(key) = k else { continue };
            let child = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            apply_env(v, &child, env)?;
        }
        return Ok(());
    }
    let var = env_name(path);
    let Some(raw) = env.get(&var) else {
        return Ok(());
    };
    let parsed = match node {
        Value::Bool(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Bool(true),
            "false" | "0" | "no" | "off" | "" => Value::Bool(false),
            _ => {
                return Err(ConfigError::Env {
                    var,
                    message: format!("{raw:?} is not a boolean (use true/false/1/0)"),
                })
            }
        },
        Value::Number(n) => {
            let t = raw.trim();
            if n.is_f64() {
                Value::Number(
                    t.parse::<f64>()
                        .map_err(|_| ConfigError::Env {
                            var: var.clone(),
                            message: format!("{raw:?} is not a number"),
                        })?
                        .into(),
                )
            } else {
                Value::Number(
                    t.parse::<i64>()
                        .map_err(|_| ConfigError::Env {
                            var: var.clone(),
                            message: format!("{raw:?} is not an integer"),
                        })?
                        .into(),
                )
            }
        }
        Value::Sequence(_) => Value::Sequence(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => Value::String(raw.clone()),
    };
    *node = parsed;
    Ok(())
}

fn read_secret_file(file_key: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(file_key, format!("reading {path}: {e}")))?;
    let t = text.trim().to_string();
    if t.is_empty() {
        return Err(invalid(file_key, format!("{file_key} is empty")));
    }
    Ok(t)
}

/// A trusted proxy: an IP address or a CIDR (`10.0.0.0/8`, `fd00::/8`).
fn validate_proxy(p: &str) -> Result<(), String> {
    let (addr, bits) = match p.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (p, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| "must be an IP address or CIDR like 10.0.0.0/8".to_string())?;
    if let Some(b) = bits {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match b.parse::<u32>() {
            Ok(n) if n <= max => {}
            _ => return Err(format!("prefix length must be 0..={max}")),
        }
    }
    Ok(())
}

impl Config {
    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        let a = &mut self.auth;
        if !a.worker_token_file.is_empty() {
            if !a.worker_token.is_empty() {
                return Err(invalid(
                    "auth.worker_token",
                    "auth.worker_token and auth.worker_token_file cannot both be set",
                ));
            }
            a.worker_token = Secret(read_secret_file(
                "auth.worker_token_file",
                &a.worker_token_file,
            )?);
        }
        if !a.worker_signing_key_file.is_empty() {
            if !a.worker_signing_key.is_empty() {
                return Err(invalid(
                    "auth.worker_signing_key",
                    "auth.worker_signing_key and auth.worker_signing_key_file cannot both be set",
                ));
            }
            a.worker_signing_key = Secret(read_secret_file(
                "auth.worker_signing_key_file",
                &a.worker_signing_key_file,
            )?);
        }
        if !a.oidc_client_secret_file.is_empty() {
            if !a.oidc_client_secret.is_empty() {
                return Err(invalid(
                    "auth.oidc_client_secret",
                    "auth.oidc_client_secret and auth.oidc_client_secret_file cannot both be set",
                ));
            }
            a.oidc_client_secret = Secret(read_secret_file(
                "auth.oidc_client_secret_file",
                &a.oidc_client_secret_file,
            )?);
        }
        if !a.oidc_public_key_file.is_empty() {
            if !a.oidc_public_key.is_empty() {
                return Err(invalid(
                    "auth.oidc_public_key",
                    "auth.oidc_public_key and auth.oidc_public_key_file cannot both be set",
                ));
            }
            a.oidc_public_key =
                read_secret_file("auth.oidc_public_key_file", &a.oidc_public_key_file)?;
        }
        Ok(())
    }

    /// Checks every constraint of spec/config-and-cli.md §3.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let db = &self.database;
        match db.driver.to_ascii_lowercase().as_str() {
            "sqlite" | "sqlite3" => {}
            "postgres" | "postgresql" => {
                if db.dsn.expose().trim().is_empty() {
                    return Err(invalid(
                        "database.dsn",
                        "required when database.driver is postgres",
                    ));
                }
            }
            other => {
                return Err(invalid(
                    "database.driver",
                    format!("unsupported database.driver {other:?} (allowed: sqlite, postgres)"),
                ))
            }
        }
        if !self.worker.id.is_empty() && !crate::paths::is_worker_id(&self.worker.id) {
            return Err(invalid(
                "worker.id",
                format!(
                    "{:?} is not a valid worker id (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)",
                    self.worker.id
                ),
            ));
        }
        let durations = [
            ("defaults.ttl", self.defaults.ttl),
            ("defaults.max_ttl", self.defaults.max_ttl),
            (
                "defaults.default_exec_timeout",
                self.defaults.default_exec_timeout,
            ),
            ("defaults.max_exec_timeout", self.defaults.max_exec_timeout),
            (
                "defaults.spawn_queue_timeout",
                self.defaults.spawn_queue_timeout,
            ),
            ("rate_limit.bucket_ttl", self.rate_limit.bucket_ttl),
            (
                "rate_limit.cleanup_interval",
                self.rate_limit.cleanup_interval,
            ),
            (
                "auth.admin_audit_retention",
                self.auth.admin_audit_retention,
            ),
            (
                "database.exec_log_retention",
                self.database.exec_log_retention,
            ),
            (
                "database.sandbox_retention",
                self.database.sandbox_retention,
            ),
            ("worker.heartbeat_interval", self.worker.heartbeat_interval),
            ("worker.shutdown_timeout", self.worker.shutdown_timeout),
            ("worker.stale_after", self.worker.stale_after),
            ("providers.custom.timeout", self.providers.custom.timeout),
            (
                "providers.proot.default_timeout",
                self.providers.proot.default_timeout,
            ),
            ("exec.resume_window", self.exec.resume_window),
            ("defaults.max_paused", self.defaults.max_paused),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("exec.keep_finished", self.exec.keep_finished),
        ];
        if self.exec.buffer_bytes < 4096 {
            return Err(invalid(
                "exec.buffer_bytes",
                format!("must be at least 4096, got {}", self.exec.buffer_bytes),
            ));
        }
        for (key, d) in durations {
            if d.0.is_negative() {
                return Err(invalid(key, format!("must not be negative, got {}", d.0)));
            }
        }
        let non_negative = [
            ("defaults.max_sandboxes", self.defaults.max_sandboxes),
            (
                "defaults.max_sandboxes_per_owner",
                self.defaults.max_sandboxes_per_owner,
            ),
            ("defaults.max_spawn_queue", self.defaults.max_spawn_queue),
            (
                "defaults.max_volumes_per_owner",
                self.defaults.max_volumes_per_owner,
            ),
            ("defaults.max_volume_mb", self.defaults.max_volume_mb),
            ("defaults.memory_mb", self.defaults.memory_mb),
            ("defaults.vcpus", self.defaults.vcpus),
            (
                "rate_limit.requests_per_minute",
                self.rate_limit.requests_per_minute,
            ),
            ("rate_limit.burst", self.rate_limit.burst),
            ("rate_limit.max_buckets", self.rate_limit.max_buckets),
            (
                "rate_limit.failed_auth_per_minute",
                self.rate_limit.failed_auth_per_minute,
            ),
            (
                "limits.max_active_per_sandbox",
                self.limits.max_active_per_sandbox,
            ),
            (
                "limits.max_active_per_credential",
                self.limits.max_active_per_credential,
            ),
            (
                "limits.max_active_per_tenant",
                self.limits.max_active_per_tenant,
            ),
            ("limits.exec_output_bytes", self.limits.exec_output_bytes),
            (
                "limits.ws_max_message_bytes",
                self.limits.ws_max_message_bytes,
            ),
        ];
        for (key, v) in non_negative {
            if v < 0 {
                return Err(invalid(key, format!("must not be negative, got {v}")));
            }
        }
        if self.pool.enabled {
            // Slot uids are 10000 + slot: a sandbox's user namespace maps
            // 65536 ids.
            for (key, v, max) in [
                ("pool.max_vms", self.pool.max_vms, 10_000),
                ("pool.max_users_per_vm", self.pool.max_users_per_vm, 50_000),
            ] {
                if !(1..=max).contains(&v) {
                    return Err(invalid(key, format!("must be 1..={max}, got {v}")));
                }
            }
            if !(self.database.driver.is_empty() || self.database.driver == "sqlite") {
                return Err(invalid(
                    "pool.enabled",
                    "pool mode keeps its hosts on one control plane: it needs database.driver sqlite",
                ));
            }
        }
        let enums: [(&str, &str, &[&str]); 7] = [
            (
                "worker.drain_policy",
                &self.worker.drain_policy,
                &["", "finish", "migrate"],
            ),
            (
                "defaults.spawn_overflow",
                &self.defaults.spawn_overflow,
                &["", "reject", "queue"],
            ),
            (
                "rate_limit.key_by",
                &self.rate_limit.key_by,
                &["", "owner", "api_key", "ip"],
            ),
            (
                "pool.overflow",
                &self.pool.overflow,
                &["", "reject", "queue"],
            ),
            (
                "logging.format",
                &self.logging.format,
                &["json", "pretty", "text"],
            ),
            (
                "providers.native.network_mode",
                &self.providers.native.network_mode,
                &["none", "bridge"],
            ),
            (
                "providers.qemu.network_mode",
                &self.providers.qemu.network_mode,
                &["none", "bridge"],
            ),
        ];
        for (key, v, allowed) in enums {
            if !allowed.contains(&v) {
                let list: Vec<&str> = allowed.iter().copied().filter(|s| !s.is_empty()).collect();
                return Err(invalid(
                    key,
                    format!("{v:?} is not allowed (allowed: {})", list.join(", ")),
                ));
            }
        }
        match self.logging.level.to_ascii_lowercase().as_str() {
            "trace" | "debug" | "info" | "warn" | "warning" | "error" => {}
            other => {
                return Err(invalid(
                    "logging.level",
                    format!("{other:?} is not allowed (allowed: trace, debug, info, warn, error)"),
                ))
            }
        }
        for origin in &self.server.cors_allowed_origins {
            let o = origin.trim();
            if o.is_empty() || o == "*" {
                continue;
            }
            validate_origin(o)
                .map_err(|m| invalid("server.cors_allowed_origins", format!("{o:?}: {m}")))?;
        }
        for p in &self.server.trusted_proxies {
            validate_proxy(p.trim())
                .map_err(|m| invalid("server.trusted_proxies", format!("{p:?}: {m}")))?;
        }
        if self.server.data_dir.trim().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty"));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        for (key, v) in [
            ("providers.native.disk_mb", self.providers.native.disk_mb),
            (
                "providers.native.disk_min_free_mb",
                self.providers.native.disk_min_free_mb,
            ),
        ] {
            if v < 0 {
                return Err(invalid(key, "must be 0 (off) or a positive number of MiB"));
            }
        }
        if !(0..=1000).contains(&self.providers.native.warm_pool) {
            return Err(invalid(
                "providers.native.warm_pool",
                "must be between 0 and 1000",
            ));
        }
        let bridge = &self.providers.native.bridge_name;
        if bridge.is_empty()
            || bridge.len() > 15
            || !bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "providers.native.bridge_name",
                format!("{bridge:?} must be 1-15 characters of [A-Za-z0-9_-]"),
            ));
        }
        for (key, list) in [
            (
                "providers.native.egress_allow",
                &self.providers.native.egress_allow,
            ),
            (
                "providers.native.egress_deny",
                &self.providers.native.egress_deny,
            ),
            (
                "providers.docker.egress_allow",
                &self.providers.docker.egress_allow,
            ),
        ] {
            for entry in list {
                let cidr: crate::cidr::Cidr =
                    entry.parse().map_err(|e| invalid(key, format!("{e}")))?;
                if !cidr.is_ipv4() {
                    return Err(invalid(
                        key,
                        format!("{entry}: bridge sandboxes have no IPv6, list IPv4 CIDRs only"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether any API credential is configured: a key or an OIDC key
    /// source. Without one the API is open to whoever reaches it.
    pub fn auth_configured(&self) -> bool {
        let a = &self.auth;
        !a.api_key.expose().trim().is_empty()
            || !a.admin_api_key.expose().trim().is_empty()
            || !a.oidc_issuer.trim().is_empty()
            || !a.oidc_jwks_url.trim().is_empty()
            || !a.oidc_public_key.trim().is_empty()
    }

    /// The host to listen on and why: `server.host` when the operator set
    /// it (file or `STACYVM_SERVER_HOST`), else `0.0.0.0` when a
    /// credential is configured and `127.0.0.1` when the API is open.
    pub fn listen_host(&self) -> (&str, ListenChoice) {
        let h = self.server.host.trim();
        if !h.is_empty() {
            (h, ListenChoice::Explicit)
        } else if self.auth_configured() {
            ("0.0.0.0", ListenChoice::AuthConfigured)
        } else {
            ("127.0.0.1", ListenChoice::LoopbackNoAuth)
        }
    }

    /// The SQLite file path (explicit, or under the data dir).
    pub fn sqlite_path(&self) -> PathBuf {
        if self.database.path.trim().is_empty() {
            Path::new(&self.server.data_dir).join("stacyvm.db")
        } else {
            PathBuf::from(&self.database.path)
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(
            self.database.driver.to_ascii_lowercase().as_str(),
            "postgres" | "postgresql"
        )
    }
}

/// Why [`Config::listen_host`] picked its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenChoice {
    /// `server.host` is set.
    Explicit,
    /// No host set and a credential is configured: all interfaces.
    AuthConfigured,
    /// No host set and no credential: loopback only.
    LoopbackNoAuth,
}

/// Whether a listen host only accepts local connections.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn validate_origin(o: &str) -> Result<(), &'static str> {
    let (scheme, rest) = o
        .split_once("://")
        .ok_or("must be a URL like https://app.example.com")?;
    if scheme != "http" && scheme != "https" {
        return Err("scheme must be http or https");
    }
    if rest.is_empty() {
        return Err("host is missing");
    }
    if rest.contains(['/', '?', '#']) {
        return Err("must not have a path, query or fragment");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let l = from_yaml_str("", &env(&[])).expect("defaults");
        assert_eq!(l.config.server.port, 7423);
        assert_eq!(l.config.providers.default, "native");
        assert_eq!(l.config.defaults.ttl.0.to_string(), "30m0s");
    }

    #[test]
    fn listen_host_is_loopback_until_a_credential_is_configured() {
        let l = from_yaml_str("", &env(&[])).expect("defaults");
        assert_eq!(
            l.config.listen_host(),
            ("127.0.0.1", ListenChoice::LoopbackNoAuth)
        );
        let l = from_yaml_str("auth:\n  api_key: k\n", &env(&[])).expect("key");
        assert_eq!(
            l.config.listen_host(),
            ("0.0.0.0", ListenChoice::AuthConfigured)
        );
        let l = from_yaml_str(
            "",
            &env(&[("STACYVM_AUTH_OIDC_JWKS_URL", "https://idp/jwks")]),
        )
        .expect("oidc");
        assert_eq!(l.config.listen_host().1, ListenChoice::AuthConfigured);
        // The operator's explicit choice wins, from the file or the env.
        let l = from_yaml_str("server:\n  host: 0.0.0.0\n", &env(&[])).expect("file");
        assert_eq!(l.config.listen_host(), ("0.0.0.0", ListenChoice::Explicit));
        let l = from_yaml_str("", &env(&[("STACYVM_SERVER_HOST", "::")])).expect("env");
        assert_eq!(l.config.listen_host(), ("::", ListenChoice::Explicit));
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("[::1]"));
        assert!(is_loopback_host("localhost"));
        assert!(!is_loopback_host("0.0.0.0"));
        assert!(!is_loopback_host("10.0.0.1"));
        // No browser origin may call the API unless listed.
        assert!(l.config.server.cors_allowed_origins.is_empty());
    }

    #[test]
    fn file_values_and_env_overrides() {
        let yaml = "server:\n  port: 9000\ndefaults:\n  ttl: 1h\nproviders:\n  docker:\n    tmpfs:\n      /tmp: size=64m\n";
        let l = from_yaml_str(
            yaml,
            &env(&[
                ("STACYVM_SERVER_PORT", "9100"),
                (
                    "STACYVM_SERVER_CORS_ALLOWED_ORIGINS",
                    "https://a.example, https://b.example",
                ),
                ("STACYVM_RATE_LIMIT_ENABLED", "1"),
                ("STACYVM_DEFAULTS_MAX_TTL", "2h"),
            ]),
        )
        .expect("load");
        assert_eq!(l.config.server.port, 9100);
        assert_eq!(l.config.defaults.ttl.0.to_string(), "1h0m0s");
        assert_eq!(l.config.defaults.max_ttl.0.to_string(), "2h0m0s");
        assert!(l.config.rate_limit.enabled);
        assert_eq!(
            l.config.server.cors_allowed_origins,
            vec![
                "https://a.example".to_string(),
                "https://b.example".to_string()
            ]
        );
        assert_eq!(
            l.config
                .providers
                .docker
                .tmpfs
                .get("/tmp")
                .map(String::as_str),
            Some("size=64m")
        );
        assert!(l.unknown_keys.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let e = from_yaml_str("defaults:\n  ttl: forever\n", &env(&[])).expect_err("bad ttl");
        assert!(e.to_string().contains("defaults.ttl"), "{e}");
        let e = from_yaml_str("defaults:\n  spawn_overflow: maybe\n", &env(&[])).expect_err("enum");
        assert!(
            e.to_string().contains("defaults.spawn_overflow")
                && e.to_string().contains("reject, queue"),
            "{e}"
        );
        let e = from_yaml_str("", &env(&[("STACYVM_SERVER_PORT", "http")])).expect_err("env");
        assert!(e.to_string().contains("STACYVM_SERVER_PORT"), "{e}");
        let e = from_yaml_str(
            "server:\n  cors_allowed_origins: [\"https://x.example/path\"]\n",
            &env(&[]),
        )
        .expect_err("cors");
        assert!(e.to_string().contains("server.cors_allowed_origins"), "{e}");
        let e = from_yaml_str("server:\n  trusted_proxies: [\"10.0.0.0/33\"]\n", &env(&[]))
            .expect_err("bad proxy");
        assert!(e.to_string().contains("server.trusted_proxies"), "{e}");
        let e = from_yaml_str("server:\n  trusted_proxies: [\"proxy.local\"]\n", &env(&[]))
            .expect_err("bad proxy");
        assert!(e.to_string().contains("IP address or CIDR"), "{e}");
        let ok = from_yaml_str(
            "server:\n  trusted_proxies: [\"10.0.0.0/8\", \"::1\", \"fd00::/8\"]\n",
            &env(&[]),
        )
        .expect("good proxies");
        assert_eq!(ok.config.server.trusted_proxies.len(), 3);
        let e = from_yaml_str("database:\n  driver: mysql\n", &env(&[])).expect_err("driver");
        assert!(e.to_string().contains("unsupported database.driver"), "{e}");
        let e = from_yaml_str("defaults:\n  max_ttl: -1h\n", &env(&[])).expect_err("negative");
        assert!(e.to_string().contains("defaults.max_ttl"), "{e}");
    }

    #[test]
    fn native_egress_lists_are_validated() {
        let l = from_yaml_str(
            "providers:\n  native:\n    egress_allow: [\"10.1.2.0/24\", \"192.168.7.9\"]\n    egress_deny: [\"198.51.100.0/24\"]\n",
            &env(&[]),
        )
        .expect("good lists");
        assert_eq!(l.config.providers.native.egress_allow.len(), 2);
        assert_eq!(l.config.providers.native.egress_deny, ["198.51.100.0/24"]);
        for (yaml, key, why) in [
            (
                "egress_allow: [\"10.1.2.3/24\"]",
                "egress_allow",
                "host bits",
            ),
            (
                "egress_allow: [\"proxy.local\"]",
                "egress_allow",
                "not an IP",
            ),
            (
                "egress_deny: [\"10.0.0.0/40\"]",
                "egress_deny",
                "prefix length",
            ),
            ("egress_deny: [\"fd00::/8\"]", "egress_deny", "no IPv6"),
        ] {
            let e = from_yaml_str(&format!("providers:\n  native:\n    {yaml}\n"), &env(&[]))
                .expect_err(yaml);
            assert!(
                matches!(&e, ConfigError::Invalid { key: k, .. } if *k == format!("providers.native.{key}")),
                "{e}"
            );
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_reported() {
        let l = from_yaml_str("server:\n  prot: 1\nbogus: true\n", &env(&[])).expect("load");
        assert_eq!(
            l.unknown_keys,
            vec!["server.prot".to_string(), "bogus".to_string()]
        );
    }

    #[test]
    fn secret_files_are_read_and_conflicts_rejected() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("tok");
        std::fs::write(&f, "  s3cret\n").expect("write");
        let yaml = format!("auth:\n  worker_token_file: {}\n", f.display());
        let l = from_yaml_str(&yaml, &env(&[])).expect("load");
        assert_eq!(l.config.auth.worker_token.expose(), "s3cret");
        assert_eq!(format!("{:?}", l.config.auth.worker_token), "[REDACTED]");
        let yaml = format!(
            "auth:\n  worker_token: x\n  worker_token_file: {}\n",
            f.display()
        );
        assert!(from_yaml_str(&yaml, &env(&[])).is_err());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let yaml = format!("auth:\n  worker_signing_key_file: {}\n", empty.display());
        let e = from_yaml_str(&yaml, &env(&[])).expect_err("empty");
        assert!(e.to_string().contains("is empty"), "{e}");
    }

    #[test]
    fn env_name_rule() {
        assert_eq!(
            env_name("providers.docker.pool_security.hidepid"),
            "STACYVM_PROVIDERS_DOCKER_POOL_SECURITY_HIDEPID"
        );
    }
}
