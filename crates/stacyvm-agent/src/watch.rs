//! Directory watches over inotify (the `watch` protocol feature): one
//! thread per watch, polling its inotify descriptor so a host's cancel
//! (or the end of its connection) stops it within a quarter second.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use stacyvm_agent_proto::{AgentError, ErrorKind, Kind, WatchEvent, WatchOp};

use crate::server::Conn;

/// Most directories one recursive watch follows.
const MAX_DIRS: usize = 4096;
/// Deepest subdirectory a recursive watch follows.
const MAX_DEPTH: usize = 64;
/// In the names of the agent's temporary upload files (see `files`).
pub const UPLOAD_MARK: &str = ".stacyvm-upload-";
/// Most events in one `Data` frame (names are at most 4 KiB each).
const BATCH: usize = 64;

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

struct Watch {
    ino: Inotify,
    /// Each watched directory's path relative to the root ("" for it).
    dirs: HashMap<WatchDescriptor, String>,
    root: Option<WatchDescriptor>,
    base: String,
    recursive: bool,
    /// Rename cookies of the agent's own upload files moving into place.
    uploads: Vec<u32>,
}

impl Watch {
    fn start(path: &str, recursive: bool) -> Result<Watch, AgentError> {
        let meta = std::fs::metadata(path).map_err(|e| crate::files::err(path, &e))?;
        if !meta.is_dir() {
            return Err(AgentError::new(
                ErrorKind::InvalidInput,
                format!("{path:?} is not a directory"),
            ));
        }
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| AgentError::new(ErrorKind::ResourceExhausted, format!("inotify: {e}")))?;
        let mut w = Watch {
            ino,
            dirs: HashMap::new(),
            root: None,
            base: path.trim_end_matches('/').to_string(),
            recursive,
            uploads: Vec::new(),
        };
        let root = w.add("").map_err(|e| {
            AgentError::new(
                ErrorKind::ResourceExhausted,
                format!("watching {path:?}: {e}"),
            )
        })?;
        w.root = Some(root);
        if recursive {
            w.walk("", 0);
        }
        Ok(w)
    }

    fn full(&self, rel: &str) -> String {
        if rel.is_empty() {
            if self.base.is_empty() {
                "/".into()
            } else {
                self.base.clone()
            }
        } else {
            format!("{}/{rel}", self.base)
        }
    }

    fn add(&mut self, rel: &str) -> nix::Result<WatchDescriptor> {
        if self.dirs.len() >= MAX_DIRS {
            return Err(Errno::ENOSPC);
        }
        let wd = self.ino.add_watch(Path::new(&self.full(rel)), mask())?;
        self.dirs.insert(wd, rel.to_string());
        Ok(wd)
    }

    /// Watches the subdirectories under `rel` (never through symlinks).
    fn walk(&mut self, rel: &str, depth: usize) {
        if depth >= MAX_DEPTH {
            return;
        }
        let Ok(rd) = std::fs::read_dir(self.full(rel)) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if self.add(&child).is_err() {
                return;
            }
            self.walk(&child, depth + 1);
        }
    }

    /// The events of one inotify record; `None` when the root is gone.
    fn translate(&mut self, ev: &InotifyEvent, out: &mut Vec<WatchEvent>) -> Option<()> {
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            self.dirs.remove(&ev.wd);
            return (Some(ev.wd) != self.root).then_some(());
        }
        let prefix = self.dirs.get(&ev.wd)?.clone();
        let Some(name) = &ev.name else {
            // The directory itself: its parent reports it, except for the
            // root, whose removal or move ends the watch.
            let gone = AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
            return (!(Some(ev.wd) == self.root && ev.mask.intersects(gone))).then_some(());
        };
        let name = name.to_string_lossy();
        let m = ev.mask;
        // An upload is written to a hidden temporary file and renamed over
        // its target: watchers see the target created and written, as if
        // it had been written in place, and never the temporary file.
        if name.starts_with('.') && name.contains(UPLOAD_MARK) {
            if m.contains(AddWatchFlags::IN_MOVED_FROM) {
                if self.uploads.len() >= 64 {
                    self.uploads.remove(0);
                }
                self.uploads.push(ev.cookie);
            }
            return Some(());
        }
        let upload = m.contains(AddWatchFlags::IN_MOVED_TO)
            && self
                .uploads
                .iter()
                .position(|c| *c == ev.cookie)
                .map(|i| self.uploads.remove(i))
                .is_some();
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        if upload {
            out.push(WatchEvent {
                name: rel.clone(),
                op: WatchOp::Create,
            });
            out.push(WatchEvent {
                name: rel,
                op: WatchOp::Write,
            });
            return Some(());
        }
        let op = if m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            if self.recursive && m.contains(AddWatchFlags::IN_ISDIR) && self.add(&rel).is_ok() {
                let depth = rel.matches('/').count() + 1;
                self.walk(&rel, depth);
            }
            WatchOp::Create
        } else if m.contains(AddWatchFlags::IN_MODIFY) {
            WatchOp::Write
        } else if m.contains(AddWatchFlags::IN_DELETE) {
            WatchOp::Remove
        } else if m.contains(AddWatchFlags::IN_MOVED_FROM) {
            WatchOp::Rename
        } else if m.contains(AddWatchFlags::IN_ATTRIB) {
            WatchOp::Chmod
        } else {
            return Some(());
        };
        out.push(WatchEvent { name: rel, op });
        Some(())
    }
}

/// Serves one `Watch` request until `stop` is set, the host goes away or
/// the watched directory does.
pub fn run(id: u32, path: &str, recursive: bool, conn: &Arc<Conn>, stop: &AtomicBool) {
    let mut w = match Watch::start(path, recursive) {
        Ok(w) => w,
        Err(e) => return conn.respond_err(id, e),
    };
    conn.respond(id, Ok(serde_json::json!({})));
    let send = |events: &[WatchEvent]| -> bool {
        events.chunks(BATCH).all(|c| {
            let body = serde_json::to_vec(c).unwrap_or_default();
            conn.send_body(Kind::Data, id, &body).is_ok()
        })
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            let _ = conn.send_body(Kind::Data, id, &[]);
            return;
        }
        let ready = {
            let mut fds = [PollFd::new(w.ino.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(250u16))
        };
        match ready {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                return conn.respond_err(id, AgentError::new(ErrorKind::Internal, e.to_string()))
            }
        }
        let events = match w.ino.read_events() {
            Ok(ev) => ev,
            Err(Errno::EAGAIN) => continue,
            Err(e) => {
                return conn.respond_err(id, AgentError::new(ErrorKind::Internal, e.to_string()))
            }
        };
        let mut out = Vec::new();
        let mut ended = false;
        for ev in &events {
            if w.translate(ev, &mut out).is_none() && Some(ev.wd) == w.root {
                ended = true;
            }
        }
        if !out.is_empty() && !send(&out) {
            return;
        }
        if ended {
            let _ = conn.send_body(Kind::Data, id, &[]);
            return;
        }
    }
}
