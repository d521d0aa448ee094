//! File operations on a host directory that acts as a sandbox root.
//!
//! Paths are sandbox paths (absolute, already normalised). Resolution walks
//! component by component and resolves symlinks *inside* the root, exactly
//! as a chroot would: an absolute link target restarts at the root and `..`
//! never climbs above it. Resolution and use are separate steps, though:
//! a process that can change the tree *between* them (the mock provider's
//! commands run on the host) can race a link in. Final opens use
//! `O_NOFOLLOW` and temp files are created exclusively under random names,
//! which closes the simple races; this module is a boundary only for the
//! mock test double, never for a real sandbox.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use stacyvm_api::FileInfo;
use stacyvm_core::provider::{format_mod_time, format_mode};
use stacyvm_core::{Error, Result};

const MAX_LINKS: usize = 40;

/// A sandbox root on the host.
#[derive(Debug, Clone)]
pub struct HostRoot {
    root: PathBuf,
}

fn io_err(path: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::not_found(format!("path {path:?}")),
        io::ErrorKind::AlreadyExists => Error::conflict(format!("path {path:?} already exists")),
        io::ErrorKind::PermissionDenied => Error::forbidden(format!("permission denied: {path:?}")),
        io::ErrorKind::DirectoryNotEmpty => {
            Error::invalid(format!("directory {path:?} is not empty (use recursive)"))
        }
        io::ErrorKind::NotADirectory => {
            Error::invalid(format!("a component of {path:?} is not a directory"))
        }
        io::ErrorKind::IsADirectory => Error::invalid(format!("{path:?} is a directory")),
        _ => Error::internal(format!("file operation on {path:?} failed")).with_source(e),
    }
}

impl HostRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HostRoot { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a sandbox path to a host path inside the root. With
    /// `follow_last` false the final component is not dereferenced (for
    /// delete, move, lstat). Missing components are allowed at the end.
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<PathBuf> {
        let mut parts: Vec<String> = Vec::new();
        let mut pending: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(str::to_string)
            .collect();
        let mut links = 0;
        while let Some(comp) = pending.pop() {
            match comp.as_str() {
                "." => continue,
                ".." => {
                    parts.pop();
                    continue;
                }
                _ => {}
            }
            let is_last = pending.is_empty();
            let mut candidate = self.root.clone();
            for p in &parts {
                candidate.push(p);
            }
            candidate.push(&comp);
            if is_last && !follow_last {
                parts.push(comp);
                break;
            }
            match fs::symlink_metadata(&candidate) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Error::invalid(format!(
                            "too many levels of symbolic links in {path:?}"
                        )));
                    }
                    let target = fs::read_link(&candidate).map_err(|e| io_err(path, e))?;
                    let t = target.to_string_lossy().to_string();
                    if t.starts_with('/') {
                        parts.clear();
                    }
                    for c in t.split('/').filter(|c| !c.is_empty()).rev() {
                        pending.push(c.to_string());
                    }
                }
                _ => parts.push(comp),
            }
        }
        let mut out = self.root.clone();
        for p in &parts {
            out.push(p);
        }
        Ok(out)
    }

    fn info(&self, sandbox_path: &str, host: &Path, lstat: bool) -> Result<FileInfo> {
        let m = if lstat {
            fs::symlink_metadata(host)
        } else {
            fs::metadata(host)
        }
        .map_err(|e| io_err(sandbox_path, e))?;
        Ok(file_info(sandbox_path, &m))
    }

    pub fn write(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let host = self.resolve(path, true)?;
        if let Some(parent) = host.parent() {
            fs::create_dir_all(parent).map_err(|e| io_err(path, e))?;
        }
        // Write to a temp file and rename: readers never see partial
        // content. The temp name is unpredictable and created exclusively
        // (O_EXCL never follows a planted symlink); the mode is set on the
        // open file, not by path.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = host.with_file_name(format!(
            ".{}.stacyvm-tmp-{:016x}",
            host.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            rand::random::<u64>()
        ));
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(data)?;
                f.set_permissions(fs::Permissions::from_mode(mode))
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(path, e));
        }
        fs::rename(&tmp, &host).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(path, e)
        })
    }

    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let host = self.resolve(path, true)?;
        // Opened without following a final symlink and without blocking
        // (a FIFO), then checked on the open file: what is read is what
        // was checked.
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
            .open(&host)
            .map_err(|e| io_err(path, e))?;
        let m = f.metadata().map_err(|e| io_err(path, e))?;
        if m.is_dir() {
            return Err(Error::invalid(format!("{path:?} is a directory")));
        }
        if !m.is_file() {
            return Err(Error::invalid(format!(
                "{path:?} is not a regular file (devices, FIFOs and sockets cannot be read)"
            )));
        }
        let cap = crate::agent::client::MAX_RESULT_BYTES as u64;
        if m.len() > cap {
            return Err(Error::too_large(format!(
                "{path:?} is larger than {cap} bytes"
            )));
        }
        let mut out = Vec::new();
        f.by_ref()
            .take(cap + 1)
            .read_to_end(&mut out)
            .map_err(|e| io_err(path, e))?;
        if out.len() as u64 > cap {
            return Err(Error::too_large(format!(
                "{path:?} grew beyond {cap} bytes"
            )));
        }
        Ok(out)
    }

    pub fn list(&self, path: &str) -> Result<Vec<FileInfo>> {
        let host = self.resolve(path, true)?;
        let m = fs::metadata(&host).map_err(|e| io_err(path, e))?;
        if !m.is_dir() {
            return Err(Error::invalid(format!("{path:?} is not a directory")));
        }
        let mut out = Vec::new();
        for entry in fs::read_dir(&host).map_err(|e| io_err(path, e))? {
            let entry = entry.map_err(|e| io_err(path, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let child = if path == "/" {
                format!("/{name}")
            } else {
                format!("{path}/{name}")
            };
            if let Ok(m) = entry.metadata() {
                out.push(file_info(&child, &m));
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    pub fn delete(&self, path: &str, recursive: bool) -> Result<()> {
        let host = self.resolve(path, false)?;
        let m = match fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(path, e)),
        };
        if m.is_dir() {
            if recursive {
                fs::remove_dir_all(&host).map_err(|e| io_err(path, e))
            } else {
                fs::remove_dir(&host).map_err(|e| io_err(path, e))
            }
        } else {
            fs::remove_file(&host).map_err(|e| io_err(path, e))
        }
    }

    pub fn rename(&self, old: &str, new: &str) -> Result<()> {
        let from = self.resolve(old, false)?;
        fs::symlink_metadata(&from).map_err(|e| io_err(old, e))?;
        let to = self.resolve(new, false)?;
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| io_err(new, e))?;
        }
        fs::rename(&from, &to).map_err(|e| io_err(new, e))
    }

    pub fn chmod(&self, path: &str, mode: u32) -> Result<()> {
        let host = self.resolve(path, true)?;
        fs::set_permissions(&host, fs::Permissions::from_mode(mode)).map_err(|e| io_err(path, e))
    }

    pub fn stat(&self, path: &str) -> Result<FileInfo> {
        let host = self.resolve(path, true)?;
        self.info(path, &host, false)
    }

    pub fn mkdir_all(&self, path: &str) -> Result<()> {
        let host = self.resolve(path, true)?;
        fs::create_dir_all(&host).map_err(|e| io_err(path, e))
    }

    pub fn is_dir(&self, path: &str) -> bool {
        self.resolve(path, true)
            .map(|p| p.is_dir())
            .unwrap_or(false)
    }

    /// Glob inside the root (`*`, `?`, `[..]`, and `**` for any depth);
    /// returns sandbox paths, sorted. Every directory is resolved in-root,
    /// so symlinked directories are followed the way the sandbox sees them.
    pub fn glob(&self, pattern: &str) -> Result<Vec<String>> {
        let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
        let mut compiled = Vec::with_capacity(comps.len());
        for c in &comps {
            if *c == "**" {
                compiled.push(None);
            } else {
                let pat = glob::Pattern::new(c).map_err(|e| {
                    Error::invalid(format!("invalid glob pattern {pattern:?}: {}", e.msg))
                })?;
                compiled.push(Some(pat));
            }
        }
        let mut out = std::collections::BTreeSet::new();
        self.glob_walk("/", &compiled, 0, &mut out);
        Ok(out.into_iter().collect())
    }

    fn glob_walk(
        &self,
        dir: &str,
        pats: &[Option<glob::Pattern>],
        depth: usize,
        out: &mut std::collections::BTreeSet<String>,
    ) {
        if out.len() >= 100_000 || depth > 64 {
            return;
        }
        let Some((first, rest)) = pats.split_first() else {
            out.insert(dir.to_string());
            return;
        };
        let join = |name: &str| {
            if dir == "/" {
                format!("/{name}")
            } else {
                format!("{dir}/{name}")
            }
        };
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        match first {
            None => {
                // `**`: zero directories here, or descend into each subdirectory.
                self.glob_walk(dir, rest, depth + 1, out);
                for entry in self.entries(dir) {
                    if !entry.starts_with('.') {
                        let child = join(&entry);
                        if self.is_dir(&child) {
                            self.glob_walk(&child, pats, depth + 1, out);
                        }
                    }
                }
            }
            Some(p) => {
                let literal = !p.as_str().contains(['*', '?', '[']);
                if literal {
                    let child = join(p.as_str());
                    let exists = self
                        .resolve(&child, false)
                        .map(|h| fs::symlink_metadata(h).is_ok())
                        .unwrap_or(false);
                    if exists && (rest.is_empty() || self.is_dir(&child)) {
                        self.glob_walk(&child, rest, depth + 1, out);
                    }
                    return;
                }
                for entry in self.entries(dir) {
                    if p.matches_with(&entry, opts) {
                        let child = join(&entry);
                        if rest.is_empty() || self.is_dir(&child) {
                            self.glob_walk(&child, rest, depth + 1, out);
                        }
                    }
                }
            }
        }
    }

    fn entries(&self, dir: &str) -> Vec<String> {
        let Ok(host) = self.resolve(dir, true) else {
            return Vec::new();
        };
        let Ok(rd) = fs::read_dir(host) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }
}

/// Builds the normalised FileInfo for a sandbox path.
pub fn file_info(sandbox_path: &str, m: &fs::Metadata) -> FileInfo {
    let mtime = DateTime::<Utc>::from_timestamp(m.mtime(), 0).unwrap_or_default();
    let name = sandbox_path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    FileInfo {
        path: sandbox_path.to_string(),
        size: if m.is_dir() { 0 } else { m.len() },
        mode: format_mode(m.mode()),
        is_dir: m.is_dir(),
        mod_time: format_mod_time(mtime),
        name: if sandbox_path == "/" {
            "/".into()
        } else {
            name
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_resolve_inside_root() {
        let dir = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("outside");
        fs::write(outside.path().join("secret"), "host secret").expect("secret");
        let root = HostRoot::new(dir.path());
        root.mkdir_all("/workspace").expect("ws");
        symlink(
            outside.path().join("secret"),
            dir.path().join("workspace/abs"),
        )
        .expect("abs link");
        symlink(
            "../../../../../../../../../../..".to_string()
                + &outside.path().join("secret").to_string_lossy(),
            dir.path().join("workspace/rel"),
        )
        .expect("rel link");
        for p in ["/workspace/abs", "/workspace/rel"] {
            let r = root.read(p);
            assert!(
                r.is_err() || r.as_ref().map(|d| d != b"host secret").unwrap_or(true),
                "{p} escaped: {r:?}"
            );
        }
        let resolved = root.resolve("/workspace/abs", true).expect("resolve");
        assert!(resolved.starts_with(dir.path()));
    }
}
