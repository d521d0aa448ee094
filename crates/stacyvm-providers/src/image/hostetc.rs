//! The `/etc` of the `host` image: synthesized from an allowlist, never the
//! host's own.
//!
//! A real host keeps credentials all over `/etc` (`/etc/default/*`, systemd
//! units with `Environment=`, `/etc/letsencrypt`, `/etc/kubernetes`,
//! NetworkManager connections …); no denylist can name them all. So the
//! sandbox gets only what programs need to run: the loader cache and
//! config, certificates, system accounts (`passwd`/`group` filtered to ids
//! below 1000 and `nobody`), name service and resolver config, time zone,
//! language runtimes' config dirs, `alternatives`, `mime.types` and a few
//! more. Files that are not world-readable are never copied, nor is any
//! directory named `private`.
//!
//! The layer is built at provider start into `<images>/host-etc/<hash>/etc`
//! (content-addressed, so a sandbox booted earlier keeps its layer while a
//! changed host gets a new one) and used as the top lower layer of `host`
//! sandboxes: `/etc` is writable inside through the overlay.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stacyvm_core::{Error, Result};

/// Entries of the host's `/etc` a sandbox sees (glob `*` at the end allowed).
pub const ALLOWED: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "bindresvport.blacklist",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "ethertypes",
    "fonts",
    "gai.conf",
    "host.conf",
    "inputrc",
    "issue",
    "java-*",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.conf",
    "locale.gen",
    "localtime",
    "login.defs",
    "lsb-release",
    "magic",
    "magic.mime",
    "mailcap",
    "mime.types",
    "networks",
    "nsswitch.conf",
    "os-release",
    "perl",
    "pki",
    "profile",
    "profile.d",
    "protocols",
    "python3",
    "python3.*",
    "resolv.conf",
    "rpc",
    "ruby*",
    "services",
    "shells",
    "skel",
    "ssl",
    "system-release",
    "terminfo",
    "timezone",
    "xattr.conf",
];

/// Most bytes the layer copies (a host with gigabytes under an allowed
/// dir must not stall every start).
const MAX_BYTES: u64 = 64 * 1024 * 1024;

fn allowed(name: &str) -> bool {
    ALLOWED.iter().any(|a| match a.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *a,
    })
}

/// What the layer holds: relative path → entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>, u32),
    Link(PathBuf),
}

/// Builds (or reuses) the layer from `host_etc` under `store`; returns the
/// layer dir (which holds `etc/`).
pub fn ensure_layer(host_etc: &Path, store: &Path) -> Result<PathBuf> {
    let err = |e: std::io::Error| Error::internal("building the host image's /etc").with_source(e);
    let entries = collect(host_etc).map_err(err)?;
    let mut h = Sha256::new();
    for (rel, e) in &entries {
        h.update(rel.as_bytes());
        match e {
            Entry::Dir => h.update(b"\0d"),
            Entry::File(data, mode) => {
                h.update(b"\0f");
                h.update(mode.to_be_bytes());
                h.update((data.len() as u64).to_be_bytes());
                h.update(data);
            }
            Entry::Link(t) => {
                h.update(b"\0l");
                h.update(t.as_os_str().as_encoded_bytes());
            }
        }
    }
    let hash = hex::encode(&h.finalize()[..12]);
    let layer = store.join(&hash);
    if std::fs::symlink_metadata(layer.join("etc")).is_ok() {
        return Ok(layer);
    }
    std::fs::create_dir_all(store).map_err(err)?;
    let tmp = store.join(format!(".{hash}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let etc = tmp.join("etc");
    std::fs::create_dir_all(&etc).map_err(err)?;
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    for (rel, e) in &entries {
        let dst = etc.join(rel);
        match e {
            Entry::Dir => {
                std::fs::create_dir_all(&dst).map_err(err)?;
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
                    .map_err(err)?;
            }
            Entry::File(data, mode) => {
                std::fs::write(&dst, data).map_err(err)?;
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(*mode))
                    .map_err(err)?;
            }
            Entry::Link(t) => symlink(t, &dst).map_err(err)?,
        }
    }
    match std::fs::rename(&tmp, &layer) {
        Ok(()) => Ok(layer),
        // Another server built the same layer meanwhile.
        Err(_) if std::fs::symlink_metadata(layer.join("etc")).is_ok() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(layer)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(err(e))
        }
    }
}

/// The unprivileged account of the `host` image (home `/home/user`).
pub const DEFAULT_USER: &str = "user";
pub const DEFAULT_UID: u32 = 1000;

/// Reads the allowed part of `host_etc`, plus the synthesized files.
fn collect(host_etc: &Path) -> std::io::Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    let mut budget = MAX_BYTES;
    let mut names: Vec<String> = std::fs::read_dir(host_etc)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| allowed(n))
        .collect();
    names.sort();
    for name in names {
        walk(&host_etc.join(&name), &name, &mut out, &mut budget, 0);
    }
    let passwd = std::fs::read_to_string(host_etc.join("passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(host_etc.join("group")).unwrap_or_default();
    let (mut passwd, users) = system_accounts(&passwd);
    let mut group = system_groups(&group, &users);
    // The unprivileged account E2B code (and most images) assume.
    if !users.iter().any(|u| u == DEFAULT_USER) {
        let shell = if Path::new("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        passwd.push_str(&format!(
            "{DEFAULT_USER}:x:{DEFAULT_UID}:{DEFAULT_UID}:{DEFAULT_USER}:/home/{DEFAULT_USER}:{shell}\n"
        ));
        if !group
            .lines()
            .any(|l| l.split(':').next() == Some(DEFAULT_USER))
        {
            group.push_str(&format!("{DEFAULT_USER}:x:{DEFAULT_UID}:\n"));
        }
    }
    out.insert("passwd".into(), Entry::File(passwd.into_bytes(), 0o644));
    out.insert("group".into(), Entry::File(group.into_bytes(), 0o644));
    out.insert(
        "hosts".into(),
        Entry::File(
            b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_vec(),
            0o644,
        ),
    );
    out.insert("hostname".into(), Entry::File(b"sandbox\n".to_vec(), 0o644));
    Ok(out)
}

fn walk(path: &Path, rel: &str, out: &mut BTreeMap<String, Entry>, budget: &mut u64, depth: usize) {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return;
    };
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if depth > 16 || name == "private" {
        return;
    }
    let ft = m.file_type();
    if ft.is_symlink() {
        if let Ok(t) = std::fs::read_link(path) {
            out.insert(rel.to_string(), Entry::Link(t));
        }
    } else if ft.is_dir() {
        // Only directories anyone may list and enter.
        if m.mode() & 0o005 != 0o005 {
            return;
        }
        out.insert(rel.to_string(), Entry::Dir);
        let Ok(rd) = std::fs::read_dir(path) else {
            return;
        };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        for n in names {
            walk(
                &path.join(&n),
                &format!("{rel}/{n}"),
                out,
                budget,
                depth + 1,
            );
        }
    } else if ft.is_file() {
        // Only files anyone may read; never setuid/setgid bits.
        if m.mode() & 0o004 == 0 || m.len() > *budget {
            return;
        }
        if let Ok(data) = std::fs::read(path) {
            *budget -= data.len() as u64;
            out.insert(rel.to_string(), Entry::File(data, m.mode() & 0o1777));
        }
    }
}

/// `passwd` lines of system accounts (uid below 1000, and nobody); returns
/// them and their names.
fn system_accounts(passwd: &str) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut names = Vec::new();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let Some(uid) = f.get(2).and_then(|u| u.parse::<u32>().ok()) else {
            continue;
        };
        if f.len() == 7 && (uid < 1000 || uid == 65534) {
            // No host password hashes, ever.
            text.push_str(&format!("{}:x:{}\n", f[0], f[2..].join(":")));
            names.push(f[0].to_string());
        }
    }
    (text, names)
}

/// `group` lines of system groups, their members limited to `users`.
fn system_groups(group: &str, users: &[String]) -> String {
    let mut text = String::new();
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let Some(gid) = f.get(2).and_then(|g| g.parse::<u32>().ok()) else {
            continue;
        };
        if f.len() == 4 && (gid < 1000 || gid == 65534) {
            let members: Vec<&str> = f[3]
                .split(',')
                .filter(|m| users.iter().any(|u| u == m))
                .collect();
            text.push_str(&format!("{}:x:{}:{}\n", f[0], f[2], members.join(",")));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_readable_entries_and_system_accounts() {
        let host = tempfile::tempdir().expect("tmp");
        let e = host.path();
        std::fs::write(
            e.join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\nbroken\n",
        )
        .expect("passwd");
        std::fs::write(
            e.join("group"),
            "root:x:0:\nsudo:x:27:alice,root\nalice:x:1000:\n",
        )
        .expect("group");
        std::fs::write(e.join("environment"), "SECRET=1\n").expect("env");
        std::fs::create_dir_all(e.join("default")).expect("default");
        std::fs::write(e.join("default/stacyvm"), "KEY=1\n").expect("default");
        std::fs::create_dir_all(e.join("ssl/private")).expect("ssl");
        std::fs::create_dir_all(e.join("ssl/certs")).expect("ssl");
        std::fs::write(e.join("ssl/private/k.pem"), "KEY").expect("key");
        std::fs::write(e.join("ssl/certs/ca.pem"), "CERT").expect("cert");
        std::fs::write(e.join("ssl/openssl.cnf"), "cnf").expect("cnf");
        std::fs::set_permissions(
            e.join("ssl/openssl.cnf"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        symlink("/usr/share/zoneinfo/UTC", e.join("localtime")).expect("link");
        std::fs::create_dir_all(e.join("python3.11")).expect("py");
        std::fs::write(e.join("python3.11/sitecustomize.py"), "").expect("py");
        let store = tempfile::tempdir().expect("store");
        let layer = ensure_layer(e, store.path()).expect("layer");
        let etc = layer.join("etc");
        let passwd = std::fs::read_to_string(etc.join("passwd")).expect("passwd");
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\nuser:x:1000:1000:user:/home/user:/bin/bash\n"
        );
        assert_eq!(
            std::fs::read_to_string(etc.join("group")).expect("group"),
            "root:x:0:\nsudo:x:27:root\nuser:x:1000:\n"
        );
        for hidden in ["environment", "default", "ssl/private", "ssl/openssl.cnf"] {
            assert!(
                std::fs::symlink_metadata(etc.join(hidden)).is_err(),
                "{hidden} must not be copied"
            );
        }
        assert_eq!(
            std::fs::read_to_string(etc.join("ssl/certs/ca.pem")).expect("ca"),
            "CERT"
        );
        assert_eq!(
            std::fs::read_link(etc.join("localtime")).expect("link"),
            PathBuf::from("/usr/share/zoneinfo/UTC")
        );
        assert!(etc.join("python3.11/sitecustomize.py").is_file());
        // Same content → same layer; a change → a new one.
        assert_eq!(ensure_layer(e, store.path()).expect("again"), layer);
        std::fs::write(e.join("ssl/certs/ca2.pem"), "CERT2").expect("cert");
        assert_ne!(ensure_layer(e, store.path()).expect("changed"), layer);
    }
}
