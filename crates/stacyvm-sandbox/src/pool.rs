//! Slots of a pool host: logical sandboxes sharing one runtime.
//!
//! A pool host's agent cannot make namespaces once it is locked down (no
//! CAP_SYS_ADMIN, a seccomp filter that refuses `unshare`, `setns` and
//! `mount`). So, while it still can, it forks the **slot factory**: a
//! small process that runs no user code, keeps the privileges and answers
//! the agent's requests on a socket pair:
//!
//! - `open ID UID GID`: makes `/workspace/ID` (0700, the slot's), clones
//!   the slot's init into new pid and mount namespaces (and a network
//!   namespace with only loopback, when asked) and answers with
//!   one end of a socket pair to it (SCM_RIGHTS). The init, in its mount
//!   namespace, puts a fresh `/tmp`, `/var/tmp` and `/dev/shm` in place,
//!   binds its own workspace over `/workspace` (the host's, with every
//!   other slot's directory in it, is out of view), mounts a `/proc` of its pid namespace (masked like the sandbox's),
//!   drops every capability, becomes UID:GID, sets no_new_privs and the
//!   sandbox's seccomp filter, and then runs the caller's slot main: the
//!   agent serving connections handed to it on that socket.
//! - `close ID`: kills the slot's init — the kernel then kills every
//!   process of its pid namespace — waits for it and removes the
//!   workspace.
//!
//! Slot users have distinct uids in distinct pid namespaces: they cannot
//! see, signal or trace each other's processes, nor read each other's
//! files; the slot's init is pid 1 of its namespace, which its own
//! processes cannot kill.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use crate::{io, sys, SetupError};

const NONE: Option<&str> = None;

/// What a slot's init runs once confined: serves the agent protocol on
/// connections passed over `control`, with `home` (the slot's workspace)
/// as default directory; never returns.
pub type SlotMain = fn(control: UnixStream, home: String) -> !;

static SLOT_MAIN: OnceLock<SlotMain> = OnceLock::new();
static FACTORY: OnceLock<SlotFactory> = OnceLock::new();

/// Sets what slots run. Call before [`crate::boot`] or [`start_factory`].
pub fn set_slot_main(f: SlotMain) {
    let _ = SLOT_MAIN.set(f);
}

/// The factory of this pool host, once started.
pub fn factory() -> Option<&'static SlotFactory> {
    FACTORY.get()
}

/// Whether `id` is a slot id this host accepts (`sb-` and 8 lowercase hex
/// digits: it becomes a directory name).
pub fn valid_slot_id(id: &str) -> bool {
    id.len() == 11
        && id.starts_with("sb-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowest uid and gid a slot may run as: the ids of an image's own
/// accounts (root, daemons, a first user at 1000) are never a slot's.
pub const MIN_SLOT_ID: u32 = 10_000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Ask {
    Open {
        id: String,
        uid: u32,
        gid: u32,
        #[serde(default)]
        private_network: bool,
    },
    Close {
        id: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    #[serde(default)]
    error: String,
}

/// The agent's end of the factory's socket.
pub struct SlotFactory {
    sock: Mutex<UnixStream>,
}

impl SlotFactory {
    fn ask(&self, a: &Ask) -> Result<Option<OwnedFd>, String> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let body = serde_json::to_vec(a).map_err(|e| e.to_string())?;
        send_with_fd(&sock, &body, None).map_err(|e| format!("asking the slot factory: {e}"))?;
        let (msg, fd) =
            recv_with_fd(&sock).map_err(|e| format!("hearing from the slot factory: {e}"))?;
        let Some(msg) = msg else {
            return Err("the slot factory is gone".into());
        };
        let ans: Answer = serde_json::from_slice(&msg).map_err(|e| e.to_string())?;
        if ans.error.is_empty() {
            Ok(fd)
        } else {
            Err(ans.error)
        }
    }

    /// Starts slot `id` as `uid`:`gid` (in a network namespace of its own
    /// with `private_network`); answers its control socket.
    pub fn open(
        &self,
        id: &str,
        uid: u32,
        gid: u32,
        private_network: bool,
    ) -> Result<UnixStream, String> {
        match self.ask(&Ask::Open {
            id: id.to_string(),
            uid,
            gid,
            private_network,
        })? {
            Some(fd) => Ok(UnixStream::from(fd)),
            None => Err("the slot factory sent no socket".into()),
        }
    }

    /// Ends slot `id` and removes its workspace.
    pub fn close(&self, id: &str) -> Result<(), String> {
        self.ask(&Ask::Close { id: id.to_string() }).map(|_| ())
    }
}

/// Sends `body` and, when given, one descriptor over a unix socket.
pub fn send_with_fd(sock: &UnixStream, body: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    let iov = [IoSlice::new(body)];
    let fds;
    let cmsgs: Vec<ControlMessage<'_>> = match fd {
        Some(f) => {
            fds = [f];
            vec![ControlMessage::ScmRights(&fds)]
        }
        None => Vec::new(),
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// Receives one message (at most 64 KiB) and the descriptor it carries;
/// `None` at end of stream.
pub fn recv_with_fd(sock: &UnixStream) -> std::io::Result<(Option<Vec<u8>>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => {
                let mut fds = Vec::new();
                for c in m.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        fds.extend(list);
                    }
                }
                break (m.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // SAFETY: SCM_RIGHTS gave us these descriptors; nothing else owns them.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
        .collect();
    let fd = if owned.is_empty() {
        None
    } else {
        Some(owned.swap_remove(0))
    };
    if n == 0 && fd.is_none() {
        return Ok((None, None));
    }
    buf.truncate(n);
    Ok((Some(buf), fd))
}

/// How slots are confined beyond namespaces and ids (the host's settings).
#[derive(Debug, Clone, Default)]
pub struct SlotPolicy {
    pub seccomp: bool,
    pub landlock_write: Vec<String>,
}

/// Forks the slot factory and keeps its socket for [`factory`]. Call while
/// single-threaded and still privileged (before the agent's lock-down),
/// after [`set_slot_main`].
pub fn start_factory(policy: SlotPolicy, close_in_child: &[RawFd]) -> Result<(), SetupError> {
    let Some(main) = SLOT_MAIN.get().copied() else {
        return Err(SetupError::Other("no slot main set".into()));
    };
    let (ours, theirs) = sys(
        "factory socket pair",
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ),
    )?;
    // SAFETY: the caller is single-threaded (documented), so the child is
    // a full copy of the process and may allocate.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(SetupError::Sys {
            step: "fork slot factory".into(),
            source: e,
        }),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ours);
            for fd in close_in_child {
                let _ = nix::unistd::close(*fd);
            }
            // Nothing of the agent's (the boot pipes, the listener, any
            // connection) stays open here, nor in the slots it clones.
            crate::close_other_fds(&[&theirs]);
            let _ = nix::sys::prctl::set_dumpable(false);
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            factory_loop(UnixStream::from(theirs), &policy, main);
            std::process::exit(0);
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(theirs);
            let _ = FACTORY.set(SlotFactory {
                sock: Mutex::new(UnixStream::from(ours)),
            });
            Ok(())
        }
    }
}

fn factory_loop(sock: UnixStream, policy: &SlotPolicy, main: SlotMain) {
    let factory_fd = sock.as_raw_fd();
    let mut slots: HashMap<String, Pid> = HashMap::new();
    loop {
        // Slots whose init ended on its own (an OOM kill): reaped here.
        while let Ok(ws) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            match ws.pid() {
                Some(pid) => slots.retain(|_, p| *p != pid),
                None => break,
            }
        }
        let msg = match recv_with_fd(&sock) {
            Ok((Some(m), _)) => m,
            Ok((None, _)) | Err(_) => return,
        };
        let (answer, fd) = match serde_json::from_slice::<Ask>(&msg) {
            Ok(Ask::Open {
                id,
                uid,
                gid,
                private_network,
            }) => match open_slot(
                &id,
                (uid, gid),
                private_network,
                (policy, main, factory_fd),
                &slots,
            ) {
                Ok(Some((pid, control))) => {
                    slots.insert(id, pid);
                    (Answer::default(), Some(control))
                }
                Ok(None) => (
                    Answer {
                        error: format!("slot {id} is already open"),
                    },
                    None,
                ),
                Err(e) => (
                    Answer {
                        error: e.to_string(),
                    },
                    None,
                ),
            },
            Ok(Ask::Close { id }) => {
                let r = close_slot(&id, slots.remove(&id));
                (
                    Answer {
                        error: r.err().map(|e| e.to_string()).unwrap_or_default(),
                    },
                    None,
                )
            }
            Err(e) => (
                Answer {
                    error: format!("bad request: {e}"),
                },
                None,
            ),
        };
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        let sent = send_with_fd(&sock, &body, fd.as_ref().map(|f| f.as_raw_fd()));
        drop(fd);
        if sent.is_err() {
            return;
        }
    }
}

fn workspace_of(id: &str) -> String {
    format!("/workspace/{id}")
}

type Opened = Option<(Pid, OwnedFd)>;

fn open_slot(
    id: &str,
    (uid, gid): (u32, u32),
    private_network: bool,
    (policy, main, factory_fd): (&SlotPolicy, SlotMain, RawFd),
    slots: &HashMap<String, Pid>,
) -> Result<Opened, SetupError> {
    if !valid_slot_id(id) {
        return Err(SetupError::Other(format!("{id:?} is not a slot id")));
    }
    if uid < MIN_SLOT_ID || gid < MIN_SLOT_ID {
        return Err(SetupError::Other(format!(
            "slot ids start at {MIN_SLOT_ID}: uid {uid} gid {gid} could be the image's own"
        )));
    }
    if slots.contains_key(id) {
        return Ok(None);
    }
    let ws = workspace_of(id);
    match std::fs::symlink_metadata(&ws) {
        // A leftover of a slot whose close did not finish.
        Ok(_) => remove_tree(Path::new(&ws))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return io(format!("inspect {ws}"), Err(e)),
    }
    io("mkdir /workspace", std::fs::create_dir_all("/workspace"))?;
    io(format!("mkdir {ws}"), std::fs::create_dir(&ws))?;
    sys(
        format!("chown {ws}"),
        nix::unistd::chown(
            Path::new(&ws),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        ),
    )?;
    io(
        format!("chmod {ws}"),
        std::fs::set_permissions(&ws, std::os::unix::fs::PermissionsExt::from_mode(0o700)),
    )?;
    let (agent_end, slot_end) = sys(
        "slot socket pair",
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ),
    )?;
    let (ready_r, ready_w) = sys("pipe", nix::unistd::pipe())?;
    let mut stack = vec![0u8; 1024 * 1024];
    let slot_fd = slot_end.as_raw_fd();
    let ready_fd = ready_w.as_raw_fd();
    let agent_fd = agent_end.as_raw_fd();
    let ready_rfd = ready_r.as_raw_fd();
    let child_ws = ws.clone();
    let child_policy = policy.clone();
    let cb = Box::new(move || -> isize {
        // The slot keeps nothing of the factory: not its socket to the
        // agent, not the agent's end of this slot's socket.
        let _ = nix::unistd::close(factory_fd);
        let _ = nix::unistd::close(agent_fd);
        let _ = nix::unistd::close(ready_rfd);
        // SAFETY: the clone's own copy of the parent's pipe end, owned by
        // nothing else in this process.
        let ready = unsafe { std::fs::File::from_raw_fd(ready_fd) };
        // SAFETY: likewise, the clone's copy of the slot's socket end.
        let control = unsafe { UnixStream::from_raw_fd(slot_fd) };
        match confine(&child_ws, uid, gid, private_network, &child_policy) {
            Ok(()) => {
                // The descriptor must not leak into what the slot runs.
                let _ = nix::fcntl::fcntl(
                    control.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                drop(ready);
                main(control, "/workspace".into())
            }
            Err(e) => {
                use std::io::Write;
                let mut ready = ready;
                let _ = ready.write_all(e.to_string().as_bytes());
                1
            }
        }
    });
    // Its own System V IPC and POSIX message queues too: shared memory
    // and queues outlive their creator and would pass to the next
    // sandbox in the slot (same uid).
    let mut flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC;
    if private_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    // SAFETY: the factory is single-threaded; the child gets its own copy
    // of the address space (no CLONE_VM) and runs `cb` on `stack`.
    let pid = sys("clone slot init", unsafe {
        nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD))
    })?;
    drop(ready_w);
    drop(slot_end);
    // The init closes its end of the pipe once confined (or writes why
    // it could not be).
    let mut why = String::new();
    {
        use std::io::Read;
        let _ = std::fs::File::from(ready_r).read_to_string(&mut why);
    }
    if !why.is_empty() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(pid, None);
        let _ = remove_tree(Path::new(&ws));
        return Err(SetupError::Other(format!("starting slot {id}: {why}")));
    }
    Ok(Some((pid, agent_end)))
}

/// In the slot's new namespaces, as its pid 1: its view of the files,
/// then its identity and lock-down.
fn confine(
    ws: &str,
    uid: u32,
    gid: u32,
    private_network: bool,
    policy: &SlotPolicy,
) -> Result<(), SetupError> {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if private_network {
        crate::security::loopback_up()?;
    }
    sys(
        "make mounts private",
        mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE),
    )?;
    // The slot's own workspace, held open while /workspace is covered.
    let own = io(
        format!("open {ws}"),
        std::fs::File::open(ws).and_then(|f| {
            if f.metadata()?.is_dir() {
                Ok(f)
            } else {
                Err(std::io::Error::other("not a directory"))
            }
        }),
    )?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // Its workspace *is* /workspace here: the host's, with every other
    // slot's directory in it, is out of view.
    let from = format!("/proc/self/fd/{}", own.as_raw_fd());
    sys(
        "bind the workspace",
        mount(
            Some(from.as_str()),
            "/workspace",
            NONE,
            MsFlags::MS_BIND,
            NONE,
        ),
    )?;
    drop(own);
    for (dir, opts) in [
        ("/tmp", "size=256m,mode=1777"),
        ("/var/tmp", "size=256m,mode=1777"),
        ("/dev/shm", "size=64m,mode=1777"),
    ] {
        if Path::new(dir).is_dir() {
            sys(
                format!("mount tmpfs {dir}"),
                mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some(opts)),
            )?;
        }
    }
    sys(
        "mount /proc",
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            flags | MsFlags::MS_NOEXEC,
            NONE,
        ),
    )?;
    crate::mounts::mask_proc(Path::new("/"))?;
    if Path::new("/dev/mqueue").is_dir() {
        sys(
            "mount /dev/mqueue",
            mount(
                Some("mqueue"),
                "/dev/mqueue",
                Some("mqueue"),
                flags | MsFlags::MS_NOEXEC,
                NONE,
            ),
        )?;
    }
    // The image is read-only to a slot (its own mounts above stay
    // writable): nothing it writes outside them outlives it or reaches
    // another slot, even where an image gives files to ids of its range.
    read_only_root()?;
    io(
        "chdir to the workspace",
        std::env::set_current_dir("/workspace"),
    )?;
    crate::security::lock_down_slot(uid, gid, policy)
}

/// Remounts `/` read-only in this mount namespace, keeping its other
/// flags (a remount that dropped `nosuid` or `nodev` would be refused in a
/// user namespace).
fn read_only_root() -> Result<(), SetupError> {
    use nix::sys::statvfs::FsFlags;
    let st = sys("statvfs /", nix::sys::statvfs::statvfs("/"))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    for (f, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.flags().contains(f) {
            flags |= m;
        }
    }
    sys("remount / read-only", mount(NONE, "/", NONE, flags, NONE))
}

fn close_slot(id: &str, pid: Option<Pid>) -> Result<(), SetupError> {
    if !valid_slot_id(id) {
        return Err(SetupError::Other(format!("{id:?} is not a slot id")));
    }
    if let Some(pid) = pid {
        // Pid 1 of the slot's namespace: when it dies, the kernel kills
        // the rest and waits for them before the wait below returns.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
    let ws = workspace_of(id);
    match std::fs::symlink_metadata(&ws) {
        Ok(_) => remove_tree(Path::new(&ws)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => io(format!("inspect {ws}"), Err(e)),
    }
}

/// Removes a slot's tree whatever modes its owner left on it (the factory
/// has CAP_DAC_OVERRIDE and CAP_FOWNER; nothing is ever chmod-ed or
/// followed, and the slot's processes are gone by now).
fn remove_tree(p: &Path) -> Result<(), SetupError> {
    io(
        format!("remove {}", p.display()),
        std::fs::remove_dir_all(p),
    )
}
