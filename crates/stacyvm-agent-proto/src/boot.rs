//! The boot specification the native provider hands to `stacyvm-agent boot`.

use serde::{Deserialize, Serialize};

/// Overlay root: read-only image layers plus a per-sandbox upper dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpec {
    /// Lower layers, topmost first.
    pub lower: Vec<String>,
    pub upper: String,
    pub work: String,
    /// Mount point of the merged root (host path).
    pub merged: String,
}

/// A host path bound into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindSpec {
    pub source: String,
    /// Path inside the sandbox.
    pub target: String,
    pub readonly: bool,
    /// The target must be reached without a symlink (and is made as
    /// directories where missing): a volume the caller places, whose path
    /// must not be redirected by a link in the image or a snapshot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confined: bool,
}

/// Everything `stacyvm-agent boot` needs to build a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    pub id: String,
    pub hostname: String,
    pub root: RootSpec,
    #[serde(default)]
    pub binds: Vec<BindSpec>,
    /// Sandbox paths hidden from the sandbox (files become empty, dirs empty read-only).
    #[serde(default)]
    pub masks: Vec<String>,
    /// Host path of the agent's listening socket (never visible inside).
    pub socket: String,
    /// Host file that receives the sandbox init's stdout/stderr (console log).
    #[serde(default)]
    pub console_log: String,
    /// cgroup directories to join before unsharing.
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// `none` (loopback only) or `bridge` (eth0 added by the provider after boot).
    #[serde(default)]
    pub network: String,
    /// Size of /tmp in MiB (0 = half of memory).
    #[serde(default)]
    pub tmp_size_mb: u64,
    /// Install the seccomp filter (always on in production).
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// Rootless mode: a user namespace mapping these host ids to root
    /// inside (set when the server does not run as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userns: Option<IdMap>,
    /// RLIMIT_NPROC for the sandbox (0 = unset). Used in rootless mode
    /// without a delegated cgroup: since Linux 5.14 it counts processes per
    /// user namespace, so it bounds the sandbox alone.
    #[serde(default)]
    pub nproc_limit: u64,
    /// Landlock: when not empty, the sandbox (agent included) may write
    /// only beneath these paths; everything else is read/execute only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub landlock_write: Vec<String>,
    /// Hex per-sandbox secret the agent proves it holds at every handshake
    /// (see `Hello::nonce`). Empty: no proof (sandboxes of older servers).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// A pool host: the sandbox init keeps a helper outside the agent's
    /// lock-down that makes slots ([`crate::Request::SlotOpen`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pool_host: bool,
}

/// Host ids that become uid/gid 0 inside a user namespace: `count` ids
/// from `uid`/`gid` on. One id (rootless mode: the server's own) is mapped
/// by the sandbox itself; a range (a root server's subordinate ids) is
/// mapped by a privileged helper, and the image layers are then
/// idmapped so their root-owned files belong to the sandbox's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub uid: u32,
    pub gid: u32,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// What `stacyvm-agent proot --spec FILE` needs to start a PRoot sandbox:
/// it prepares the process (cgroups, session, namespaces on a root
/// server, limits, ids, landlock, seccomp), binds the agent's socket and
/// then becomes `proot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProotSpec {
    /// Sandbox id (for messages only).
    pub id: String,
    /// Absolute path of the `proot` binary.
    pub proot: String,
    /// Arguments after the binary; the agent's listening socket is fd 3.
    pub args: Vec<String>,
    /// proot's whole environment (passed on to the agent).
    pub env: Vec<(String, String)>,
    /// Host path where the agent's socket is bound (before any privilege
    /// is dropped; never visible inside).
    pub socket: String,
    /// cgroup directories to join first.
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// Root servers: a private mount and network namespace (loopback
    /// only) with these binds staged under a tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// Root servers: the unprivileged uid and gid the sandbox runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<(u32, u32)>,
    /// RLIMIT_NPROC (0 = unset).
    #[serde(default)]
    pub nproc_limit: u64,
    /// RLIMIT_AS in bytes (0 = unset).
    #[serde(default)]
    pub as_limit: u64,
    /// Landlock: paths that may be read and executed.
    #[serde(default)]
    pub read: Vec<String>,
    /// Landlock: paths with every access.
    #[serde(default)]
    pub write: Vec<String>,
    /// Landlock: device files that may be read, written and ioctl'd.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// A tmpfs mounted at `dir` in the sandbox's private mount namespace,
/// holding binds of host paths (`target` relative to `dir`) that the
/// sandbox's unprivileged ids could not reach where they are (a 0700 data
/// dir).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub dir: String,
    pub binds: Vec<BindSpec>,
    /// Host dir bound over `/tmp` in the private mount namespace: proot
    /// keeps its scratch files (glue dirs, loader) in `/tmp`, which must
    /// be the sandbox's own.
    #[serde(default)]
    pub tmp: String,
}
