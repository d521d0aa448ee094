//! File operations, executed inside the sandbox root.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use stacyvm_agent_proto::{AgentError, ErrorKind, FileStat};

pub fn err(path: &str, e: &io::Error) -> AgentError {
    stacyvm_sandbox::archive::io_error(path, e)
}

/// The error for a file over the caller's limit.
pub fn too_large(path: &str, max: u64) -> AgentError {
    AgentError::new(
        ErrorKind::TooLarge,
        format!("{path:?} is larger than the limit of {max} bytes"),
    )
}

/// Opens `path` for reading if it is a regular file of at most `max`
/// bytes; returns it with its size. Devices, FIFOs and sockets are
/// refused without blocking (a FIFO is opened non-blocking and refused).
pub fn open_regular(path: &str, max: u64) -> Result<(fs::File, u64), AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| err(path, &e))?;
    let m = f.metadata().map_err(|e| err(path, &e))?;
    if m.is_dir() {
        return Err(AgentError::new(
            ErrorKind::InvalidInput,
            format!("{path:?} is a directory"),
        ));
    }
    if !m.is_file() {
        return Err(AgentError::new(
            ErrorKind::InvalidInput,
            format!("{path:?} is not a regular file (devices, FIFOs and sockets cannot be read)"),
        ));
    }
    if m.len() > max {
        return Err(too_large(path, max));
    }
    Ok((f, m.len()))
}

/// Most entries one listing returns.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Most matches, and longest time, of one glob.
pub const MAX_GLOB_MATCHES: usize = 100_000;
pub const GLOB_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn stat_of(path: &str, follow: bool) -> Result<FileStat, AgentError> {
    let lm = fs::symlink_metadata(path).map_err(|e| err(path, &e))?;
    let m = if follow && lm.file_type().is_symlink() {
        fs::metadata(path).map_err(|e| err(path, &e))?
    } else {
        lm.clone()
    };
    Ok(FileStat {
        path: path.to_string(),
        size: if m.is_dir() { 0 } else { m.len() },
        mode: m.mode() & 0o7777,
        is_dir: m.is_dir(),
        is_symlink: lm.file_type().is_symlink(),
        mtime: m.mtime(),
    })
}

/// Streams the upload into a temp file next to `path`, then renames it.
pub struct Upload {
    path: String,
    tmp: String,
    file: fs::File,
    mode: u32,
}

impl Upload {
    pub fn start(path: &str, mode: u32) -> Result<Upload, AgentError> {
        let p = Path::new(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| err(path, &e))?;
        }
        if fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false) {
            return Err(AgentError::new(
                ErrorKind::InvalidInput,
                format!("{path:?} is a directory"),
            ));
        }
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = p
            .with_file_name(format!(
                ".{name}{}{}",
                crate::watch::UPLOAD_MARK,
                std::process::id()
            ))
            .to_string_lossy()
            .to_string();
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode_compat(0o600)
            .open(&tmp)
            .map_err(|e| err(path, &e))?;
        Ok(Upload {
            path: path.to_string(),
            tmp,
            file,
            mode,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), AgentError> {
        self.file.write_all(data).map_err(|e| err(&self.path, &e))
    }

    pub fn finish(self) -> Result<u64, AgentError> {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        drop(self.file);
        let res = fs::set_permissions(&self.tmp, fs::Permissions::from_mode(self.mode))
            .and_then(|()| fs::rename(&self.tmp, &self.path));
        if let Err(e) = res {
            let _ = fs::remove_file(&self.tmp);
            return Err(err(&self.path, &e));
        }
        Ok(size)
    }

    pub fn abort(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

trait ModeCompat {
    fn mode_compat(&mut self, mode: u32) -> &mut Self;
}

impl ModeCompat for fs::OpenOptions {
    fn mode_compat(&mut self, mode: u32) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, mode)
    }
}

pub fn list(path: &str) -> Result<Vec<FileStat>, AgentError> {
    let m = fs::metadata(path).map_err(|e| err(path, &e))?;
    if !m.is_dir() {
        return Err(AgentError::new(
            ErrorKind::InvalidInput,
            format!("{path:?} is not a directory"),
        ));
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| err(path, &e))?.flatten() {
        if out.len() >= MAX_LIST_ENTRIES {
            return Err(AgentError::new(
                ErrorKind::TooLarge,
                format!(
                    "{path:?} has more than {MAX_LIST_ENTRIES} entries; list it with a command"
                ),
            ));
        }
        let name = entry.file_name().to_string_lossy().to_string();
        let child = if path == "/" {
            format!("/{name}")
        } else {
            format!("{}/{name}", path.trim_end_matches('/'))
        };
        if let Ok(s) = stat_of(&child, true).or_else(|_| stat_of(&child, false)) {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

pub fn remove(path: &str, recursive: bool) -> Result<(), AgentError> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(path, &e)),
    };
    let r = if m.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    r.map_err(|e| err(path, &e))
}

pub fn rename(from: &str, to: &str) -> Result<(), AgentError> {
    fs::symlink_metadata(from).map_err(|e| err(from, &e))?;
    if let Some(parent) = Path::new(to).parent() {
        fs::create_dir_all(parent).map_err(|e| err(to, &e))?;
    }
    fs::rename(from, to).map_err(|e| err(to, &e))
}

pub fn chmod(path: &str, mode: u32) -> Result<(), AgentError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| err(path, &e))
}

pub fn mkdir(path: &str) -> Result<(), AgentError> {
    fs::create_dir_all(path).map_err(|e| err(path, &e))
}

pub fn glob(pattern: &str) -> Result<Vec<String>, AgentError> {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let paths = glob::glob_with(pattern, opts).map_err(|e| {
        AgentError::new(
            ErrorKind::InvalidInput,
            format!("invalid glob pattern {pattern:?}: {}", e.msg),
        )
    })?;
    let deadline = std::time::Instant::now() + GLOB_TIME_LIMIT;
    let mut out: Vec<String> = Vec::new();
    for p in paths.flatten() {
        if out.len() >= MAX_GLOB_MATCHES || std::time::Instant::now() > deadline {
            return Err(AgentError::new(
                ErrorKind::TooLarge,
                format!(
                    "glob {pattern:?} matches more than {MAX_GLOB_MATCHES} paths or takes longer than {}s; narrow the pattern",
                    GLOB_TIME_LIMIT.as_secs()
                ),
            ));
        }
        out.push(p.to_string_lossy().to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}
