//! Pure helpers of the Docker provider: container labels, image references,
//! memory sizes, user names. No engine calls here, so everything is unit
//! tested.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use stacyvm_core::provider::{RuntimeInfo, SpawnSpec};
use stacyvm_core::{Error, Result};

/// Label keys of the public contract (spec/runtime.md §3.1) plus ownership.
pub const LABEL_MANAGED: &str = "stacyvm";
pub const LABEL_SANDBOX: &str = "stacyvm.sandbox";
pub const LABEL_PROVIDER: &str = "stacyvm.provider";
pub const LABEL_IMAGE: &str = "stacyvm.image";
pub const LABEL_METADATA: &str = "stacyvm.metadata";
pub const LABEL_OWNER: &str = "stacyvm.owner";
pub const LABEL_TENANT: &str = "stacyvm.tenant";
pub const LABEL_EXPIRES: &str = "stacyvm.expires_at";
/// The sandbox's host dir (where the host keeps its agent token).
pub const LABEL_HOST_DIR: &str = "stacyvm.host_dir";

/// The labels of a new sandbox container.
pub fn labels(spec: &SpawnSpec, image: &str) -> HashMap<String, String> {
    let mut l = HashMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_SANDBOX.to_string(), spec.id.clone()),
        (LABEL_PROVIDER.to_string(), "docker".to_string()),
        (LABEL_IMAGE.to_string(), image.to_string()),
        (LABEL_EXPIRES.to_string(), spec.expires_at.to_rfc3339()),
    ]);
    if !spec.metadata.is_empty() {
        l.insert(
            LABEL_METADATA.to_string(),
            serde_json::to_string(&spec.metadata).unwrap_or_default(),
        );
    }
    if !spec.owner_id.is_empty() {
        l.insert(LABEL_OWNER.to_string(), spec.owner_id.clone());
    }
    if !spec.tenant_id.is_empty() {
        l.insert(LABEL_TENANT.to_string(), spec.tenant_id.clone());
    }
    l
}

/// Whether a container's labels mark it as a StacyVM docker sandbox.
pub fn is_ours(labels: Option<&HashMap<String, String>>) -> bool {
    labels.is_some_and(|l| {
        l.get(LABEL_MANAGED).map(String::as_str) == Some("true")
            && l.get(LABEL_PROVIDER).is_none_or(|p| p == "docker")
    })
}

/// Maps a Docker container state to the contract's states.
pub fn map_state(docker_state: &str) -> &'static str {
    match docker_state {
        "running" => "running",
        "paused" => "paused",
        "restarting" => "restarting",
        "created" => "creating",
        "exited" | "dead" | "removing" | "stopping" => "stopped",
        _ => "unknown",
    }
}

/// Builds the inventory record of a labelled container. `name` is the
/// container name without the leading `/`, `id` the engine's id.
pub fn runtime_info(
    labels: &HashMap<String, String>,
    name: &str,
    id: &str,
    container_image: &str,
    docker_state: &str,
    created_unix: Option<i64>,
) -> RuntimeInfo {
    let sandbox_id = [
        labels.get(LABEL_SANDBOX).map(String::as_str),
        Some(name),
        Some(id),
    ]
    .into_iter()
    .flatten()
    .find(|s| !s.is_empty())
    .unwrap_or_default()
    .to_string();
    let metadata: BTreeMap<String, String> = labels
        .get(LABEL_METADATA)
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or_default();
    let expires_at = labels
        .get(LABEL_EXPIRES)
        .and_then(|e| DateTime::parse_from_rfc3339(e).ok())
        .map(|t| t.with_timezone(&Utc));
    RuntimeInfo {
        sandbox_id,
        state: map_state(docker_state).to_string(),
        image: labels
            .get(LABEL_IMAGE)
            .cloned()
            .unwrap_or_else(|| container_image.to_string()),
        created_at: created_unix.and_then(|s| DateTime::<Utc>::from_timestamp(s, 0)),
        metadata,
        owner_id: labels.get(LABEL_OWNER).cloned().unwrap_or_default(),
        tenant_id: labels.get(LABEL_TENANT).cloned().unwrap_or_default(),
        expires_at,
    }
}

/// Parses a Docker memory size (`512m`, `1g`, `1048576`, `64k`) into bytes.
pub fn parse_memory(s: &str) -> Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1024),
        Some('m') => (&t[..t.len() - 1], 1024 * 1024),
        Some('g') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("invalid memory size {s:?} (use e.g. 512m or 1g)")))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(Error::invalid(format!("invalid memory size {s:?}")));
    }
    Ok((n * f64::from(mult)) as i64)
}

/// A parsed image reference: what the engine's pull API wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host and repository path (`localhost:5000/a/b`).
    pub repo: String,
    /// Tag, or `sha256:…` for a digest reference.
    pub tag: String,
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ separated by '.', '_', '__' or runs of '-'.
    if c.is_empty() || c.len() > 255 {
        return false;
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|x| x.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|x| x.is_ascii_alphanumeric() || x == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// Parses and validates an image reference with Docker's grammar;
/// a missing tag means `latest`.
pub fn parse_image(image: &str) -> Result<ImageRef> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "invalid image reference {image:?}: {why} (expected [registry/]name[:tag][@digest])"
        ))
    };
    if image.is_empty() || image.len() > 4096 || image.trim() != image {
        return Err(bad("empty or surrounded by spaces"));
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => {
            let hex = d.strip_prefix("sha256:").ok_or_else(|| bad("bad digest"))?;
            if hex.len() != 64 || !hex.bytes().all(|x| x.is_ascii_hexdigit()) {
                return Err(bad("bad digest"));
            }
            (r, Some(d))
        }
        None => (image, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let tb = t.as_bytes();
        let ok = !t.is_empty()
            && t.len() <= 128
            && (tb[0].is_ascii_alphanumeric() || tb[0] == b'_')
            && tb
                .iter()
                .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if !ok {
            return Err(bad("bad tag"));
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        let is_host = first.contains('.') || first.contains(':') || first == "localhost";
        if is_host {
            if !valid_host(first) {
                return Err(bad("bad registry host"));
            }
            parts.remove(0);
        }
    }
    if parts.is_empty() || !parts.iter().all(|c| valid_component(c)) {
        return Err(bad(
            "bad repository name (lowercase letters, digits and separators)",
        ));
    }
    Ok(ImageRef {
        repo: name.to_string(),
        tag: digest
            .map(str::to_string)
            .or_else(|| tag.map(str::to_string))
            .unwrap_or_else(|| "latest".to_string()),
    })
}

impl ImageRef {
    /// The full reference (`repo:tag` or `repo@sha256:…`).
    pub fn full(&self) -> String {
        if self.tag.starts_with("sha256:") {
            format!("{}@{}", self.repo, self.tag)
        } else {
            format!("{}:{}", self.repo, self.tag)
        }
    }
}

/// Resolves a container user (`name`, `uid`, `name:group`, `uid:gid`)
/// against the image's /etc/passwd and /etc/group text. Returns
/// `(uid, gid)`; unknown names are an error, unknown numeric ids are used
/// as given (gid 0 when neither the spec nor passwd names one, as Docker does).
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<(u32, u32)> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = |text: &str, key: &str, by_id: bool| -> Option<(u32, u32)> {
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let hit = if by_id { f[2] == key } else { f[0] == key };
            if !hit {
                return None;
            }
            let id = f[2].parse().ok()?;
            let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            Some((id, gid))
        })
    };
    let (uid, passwd_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, entry(passwd, u, true).map(|(_, g)| g)),
        Err(_) => {
            let (uid, gid) = entry(passwd, u, false).ok_or_else(|| {
                Error::invalid(format!(
                    "user {u:?} (providers.docker.user) does not exist in the image's /etc/passwd"
                ))
            })?;
            (uid, Some(gid))
        }
    };
    let gid = match g {
        None | Some("") => passwd_gid.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => entry(group, g, false).map(|(gid, _)| gid).ok_or_else(|| {
                Error::invalid(format!(
                    "group {g:?} does not exist in the image's /etc/group"
                ))
            })?,
        },
    };
    Ok((uid, gid))
}

/// Splits `K=V` environment entries (image and container env).
pub fn parse_env(env: &[String]) -> BTreeMap<String, String> {
    env.iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The remapped root of a `userns-remap` dockerd from its root dir, whose
/// last component is `<uid>.<gid>` (`/var/lib/docker/100000.100000`).
pub fn remap_from_root_dir(root: &str) -> Option<(u32, u32)> {
    let last = root.trim_end_matches('/').rsplit('/').next()?;
    let (u, g) = last.split_once('.')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// Whether a storage driver (with its backing filesystem) honours a
/// container's `storage_opt size`.
pub fn driver_caps_layers(driver: &str, backing_fs: &str) -> bool {
    match driver {
        "btrfs" | "zfs" | "devicemapper" | "windowsfilter" => true,
        // Project quotas: xfs mounted with pquota (an unquota'd xfs makes
        // container creation fail; the operator then clears `disk`).
        "overlay2" | "overlay" => backing_fs.eq_ignore_ascii_case("xfs"),
        _ => false,
    }
}

/// Tmpfs mount options with a size cap, `nosuid` and `nodev` unless given.
pub fn capped_tmpfs(options: &str, default_size: &str) -> String {
    let mut parts: Vec<String> = options
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let has = |parts: &[String], key: &str| {
        parts
            .iter()
            .any(|p| p == key || p.starts_with(&format!("{key}=")))
    };
    if !has(&parts, "size") {
        parts.push(format!("size={default_size}"));
    }
    for flag in ["nosuid", "nodev"] {
        if !has(&parts, flag) && !has(&parts, &flag.replacen("no", "", 1)) {
            parts.push(flag.to_string());
        }
    }
    parts.join(",")
}

/// Computes the CPU percentage from two cumulative samples, as `docker
/// stats` does: Δcontainer / Δsystem × online CPUs × 100.
pub fn cpu_percent(cpu: u64, pre_cpu: u64, system: u64, pre_system: u64, cpus: u32) -> f64 {
    let dc = cpu.saturating_sub(pre_cpu) as f64;
    let ds = system.saturating_sub(pre_system) as f64;
    if ds <= 0.0 || dc <= 0.0 {
        return 0.0;
    }
    dc / ds * f64::from(cpus.max(1)) * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userns_remap_root_dirs() {
        assert_eq!(
            remap_from_root_dir("/var/lib/docker/100000.100000"),
            Some((100_000, 100_000))
        );
        assert_eq!(
            remap_from_root_dir("/data/docker/231072.231072/"),
            Some((231_072, 231_072))
        );
        assert_eq!(remap_from_root_dir("/var/lib/docker"), None);
        assert_eq!(remap_from_root_dir(""), None);
    }

    #[test]
    fn layer_caps_by_driver() {
        assert!(!driver_caps_layers("overlay2", "extfs"));
        assert!(driver_caps_layers("overlay2", "xfs"));
        assert!(driver_caps_layers("btrfs", "btrfs"));
        assert!(!driver_caps_layers("vfs", "extfs"));
    }

    #[test]
    fn tmpfs_mounts_get_a_size_cap() {
        assert_eq!(capped_tmpfs("", "64m"), "size=64m,nosuid,nodev");
        assert_eq!(
            capped_tmpfs("size=16m,exec", "64m"),
            "size=16m,exec,nosuid,nodev"
        );
        assert_eq!(
            capped_tmpfs("mode=1777,suid", "8m"),
            "mode=1777,suid,size=8m,nodev"
        );
    }

    fn spec() -> SpawnSpec {
        SpawnSpec {
            id: "sb-0123abcd".into(),
            image: "busybox".into(),
            memory_mb: 64,
            vcpus: 1,
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
            owner_id: "alice".into(),
            tenant_id: "acme".into(),
            expires_at: DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z")
                .expect("time")
                .with_timezone(&Utc),
            network_mode: String::new(),
            snapshot: None,
            egress: None,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn labels_round_trip_through_inventory() {
        let l = labels(&spec(), "busybox:latest");
        assert_eq!(l[LABEL_MANAGED], "true");
        assert_eq!(l[LABEL_PROVIDER], "docker");
        assert!(is_ours(Some(&l)));
        let rt = runtime_info(
            &l,
            "other-name",
            "abc",
            "sha256:x",
            "exited",
            Some(1_700_000_000),
        );
        assert_eq!(rt.sandbox_id, "sb-0123abcd", "label wins over the name");
        assert_eq!(rt.state, "stopped");
        assert_eq!(rt.image, "busybox:latest");
        assert_eq!(rt.metadata["k"], "v");
        assert_eq!(rt.owner_id, "alice");
        assert_eq!(rt.tenant_id, "acme");
        assert_eq!(rt.expires_at, Some(spec().expires_at));
        assert_eq!(rt.created_at.map(|t| t.timestamp()), Some(1_700_000_000));
        // Without labels the name, then the id, identify the sandbox.
        let bare = HashMap::from([(LABEL_MANAGED.to_string(), "true".to_string())]);
        assert_eq!(
            runtime_info(&bare, "sb-1", "id", "img", "running", None).sandbox_id,
            "sb-1"
        );
        assert_eq!(
            runtime_info(&bare, "", "id", "img", "created", None).state,
            "creating"
        );
        assert!(!is_ours(None));
        let foreign = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_PROVIDER.to_string(), "firecracker".to_string()),
        ]);
        assert!(!is_ours(Some(&foreign)));
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m").expect("m"), 512 * 1024 * 1024);
        assert_eq!(parse_memory("1G").expect("g"), 1024 * 1024 * 1024);
        assert_eq!(parse_memory("64kb").expect("k"), 64 * 1024);
        assert_eq!(parse_memory("1000").expect("b"), 1000);
        assert_eq!(parse_memory("1.5g").expect("f"), 1536 * 1024 * 1024);
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("-1m").is_err());
    }

    #[test]
    fn image_references() {
        let r = parse_image("busybox").expect("plain");
        assert_eq!((r.repo.as_str(), r.tag.as_str()), ("busybox", "latest"));
        let r = parse_image("localhost:5000/stacyvm/test:v1.2").expect("registry");
        assert_eq!(r.repo, "localhost:5000/stacyvm/test");
        assert_eq!(r.tag, "v1.2");
        assert_eq!(r.full(), "localhost:5000/stacyvm/test:v1.2");
        let d = format!("alpine@sha256:{}", "a".repeat(64));
        let r = parse_image(&d).expect("digest");
        assert_eq!(r.full(), d);
        assert_eq!(parse_image("a.b-c/x__y/z-1").expect("seps").tag, "latest");
        for bad in [
            "",
            "UPPER/case",
            "bad//name",
            "name:",
            "name:bad tag",
            "-lead",
            "trail-",
            "a/b:c:d",
            "alpine@sha256:short",
            " alpine",
            "host:port:5000/x",
            "a..b",
        ] {
            let e = parse_image(bad).expect_err(bad);
            assert_eq!(e.kind(), stacyvm_core::ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[test]
    fn users_resolve_against_the_image() {
        let passwd = "root:x:0:0::/root:/bin/sh\nsandbox:x:1000:1001::/home/s:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(
            resolve_user("sandbox", passwd, group).expect("name"),
            (1000, 1001)
        );
        assert_eq!(
            resolve_user("1000", passwd, group).expect("uid"),
            (1000, 1001)
        );
        assert_eq!(
            resolve_user("4242", passwd, group).expect("unknown uid"),
            (4242, 0)
        );
        assert_eq!(
            resolve_user("4242:7", passwd, group).expect("uid:gid"),
            (4242, 7)
        );
        assert_eq!(
            resolve_user("sandbox:staff", passwd, group).expect("group"),
            (1000, 50)
        );
        assert!(resolve_user("nobody-here", passwd, group).is_err());
        assert!(resolve_user("sandbox:nogroup", passwd, group).is_err());
    }

    #[test]
    fn cpu_percentages() {
        assert_eq!(cpu_percent(200, 100, 2000, 1000, 2), 20.0);
        assert_eq!(cpu_percent(100, 100, 2000, 1000, 2), 0.0);
        assert_eq!(cpu_percent(200, 100, 1000, 1000, 2), 0.0, "no system delta");
    }

    #[test]
    fn env_entries() {
        let e = parse_env(&["A=1".into(), "B=x=y".into(), "junk".into()]);
        assert_eq!(e["A"], "1");
        assert_eq!(e["B"], "x=y");
        assert_eq!(e.len(), 2);
    }
}
