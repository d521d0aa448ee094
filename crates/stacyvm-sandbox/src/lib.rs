//! Sandbox setup: namespaces, the root filesystem, cgroups, capabilities,
//! no_new_privs and seccomp. Synchronous, and the only crate of StacyVM
//! with `unsafe` code (each block says why it is sound).
//!
//! [`boot`] is called by `stacyvm-agent boot` while it is still
//! single-threaded. It joins the sandbox cgroups, unshares every namespace,
//! forks the future PID 1, builds the root filesystem, binds the host-side
//! agent socket, pivots into the new root, locks itself down and hands the
//! listening socket to the caller, which then serves the agent protocol.

pub mod archive;
pub mod cgroup;
pub mod flatten;
pub mod ifconfig;
mod mounts;
pub mod pool;
pub mod procs;
pub mod proot;
pub mod pty;
pub mod security;
pub mod treecopy;
pub mod userns;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid};
pub use stacyvm_agent_proto::boot::BootSpec;

/// A setup failure, with the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("{step}: {source}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub(crate) fn sys<T>(step: impl Into<String>, r: nix::Result<T>) -> Result<T, SetupError> {
    r.map_err(|source| SetupError::Sys {
        step: step.into(),
        source,
    })
}

pub(crate) fn io<T>(step: impl Into<String>, r: std::io::Result<T>) -> Result<T, SetupError> {
    r.map_err(|source| SetupError::Io {
        step: step.into(),
        source,
    })
}

/// What the original process does after the fork.
pub enum Booted {
    /// The caller is the intermediate parent: the sandbox PID 1 is ready
    /// (its socket accepts connections) but dies with this process unless
    /// [`Pending::commit`] is called once its pid reached the server.
    Parent(Pending),
    /// The caller is the sandbox PID 1 inside the new root; serve on this socket.
    Init(UnixListener),
}

/// A booted sandbox init that is not yet anybody's: it carries a
/// parent-death signal, so if the server dies before it learns the pid
/// (or a boot is abandoned), the init dies with the intermediate process
/// instead of running unowned.
pub struct Pending {
    pub pid: Pid,
    commit: File,
    ack: File,
}

impl Pending {
    /// Tells the init it is owned (it drops its parent-death signal) and
    /// waits for it to confirm, so the caller may exit.
    pub fn commit(mut self) -> Result<Pid, SetupError> {
        io("committing the sandbox init", self.commit.write_all(b"C"))?;
        let mut a = [0u8; 1];
        match self.ack.read(&mut a) {
            Ok(1) if a[0] == b'A' => Ok(self.pid),
            _ => Err(SetupError::Other(
                "the sandbox init did not confirm its commit".into(),
            )),
        }
    }
}

/// Reads one line (up to and including `\n`, or to EOF).
fn read_line(f: &mut File) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while let Ok(1) = f.read(&mut b) {
        out.push(b[0]);
        if b[0] == b'\n' || out.len() > 64 * 1024 {
            break;
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Sets up the sandbox described by `spec`.
///
/// Must be called while the process is single-threaded. Returns twice, as
/// fork does: in the parent once the child reported readiness (or the
/// child's error), and in the child as PID 1 of the sandbox.
pub fn boot(spec: &BootSpec) -> Result<Booted, SetupError> {
    let server = nix::unistd::getppid();
    sys("setsid", nix::unistd::setsid())?;
    for dir in &spec.cgroups {
        cgroup::join(Path::new(dir))?;
    }
    let staged;
    let spec = match spec.userns {
        Some(ids) if ids.count > 1 => {
            staged = userns::enter_mapped(spec, ids)?;
            &staged
        }
        Some(ids) => {
            enter_user_namespace(ids)?;
            spec
        }
        None => spec,
    };
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWCGROUP
        // Always private: `bridge` mode gets its eth0 from the host later.
        | CloneFlags::CLONE_NEWNET;
    sys("unshare namespaces", nix::sched::unshare(flags))?;
    // This process dies with the server that started it (set after every
    // credential change, which would clear it); if the server is already
    // gone, stop here.
    sys(
        "parent-death signal",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    if nix::unistd::getppid() != server {
        return Err(SetupError::Other(
            "the server exited during the boot".into(),
        ));
    }
    let (ready_r, ready_w) = sys("pipe", nix::unistd::pipe())?;
    let (commit_r, commit_w) = sys("pipe", nix::unistd::pipe())?;
    // SAFETY: the agent calls `boot` before it starts any thread, so the
    // child is a full copy of a single-threaded process and may allocate.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(SetupError::Sys {
            step: "fork".into(),
            source: e,
        }),
        Ok(ForkResult::Parent { child }) => {
            drop(ready_w);
            drop(commit_r);
            let mut r = File::from(ready_r);
            let msg = read_line(&mut r);
            if msg.starts_with("OK") {
                Ok(Booted::Parent(Pending {
                    pid: child,
                    commit: File::from(commit_w),
                    ack: r,
                }))
            } else {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                Err(SetupError::Other(if msg.is_empty() {
                    "sandbox init exited during setup".into()
                } else {
                    msg.trim().to_string()
                }))
            }
        }
        Ok(ForkResult::Child) => {
            drop(ready_r);
            drop(commit_w);
            // Not owned yet: die with the intermediate process. (Its pid
            // is outside the new pid namespace, so getppid() says 0 here;
            // if it died before this line, the commit read below sees EOF.)
            if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err() {
                std::process::exit(1);
            }
            let mut w = File::from(ready_w);
            match init(spec) {
                Ok(listener) => {
                    let _ = w.write_all(b"OK\n");
                    let mut c = [0u8; 1];
                    match File::from(commit_r).read(&mut c) {
                        Ok(1) if c[0] == b'C' => {}
                        // The intermediate died uncommitted (the server is
                        // gone or gave up on this boot).
                        _ => std::process::exit(1),
                    }
                    if nix::sys::prctl::set_pdeathsig(None).is_err() {
                        std::process::exit(1);
                    }
                    let _ = w.write_all(b"A");
                    drop(w);
                    Ok(Booted::Init(listener))
                }
                Err(e) => {
                    let _ = w.write_all(format!("ERR {e}\n").as_bytes());
                    std::process::exit(1);
                }
            }
        }
    }
}

/// Rootless mode: a new user namespace in which the server's uid and gid
/// are root. Every namespace unshared afterwards is owned by it, so the
/// sandbox's "root" has no privilege over anything of the host.
fn enter_user_namespace(ids: stacyvm_agent_proto::boot::IdMap) -> Result<(), SetupError> {
    sys(
        "unshare user namespace",
        nix::sched::unshare(CloneFlags::CLONE_NEWUSER),
    )?;
    io(
        "writing setgroups",
        std::fs::write("/proc/self/setgroups", "deny"),
    )?;
    io(
        "writing uid_map",
        std::fs::write("/proc/self/uid_map", format!("0 {} 1\n", ids.uid)),
    )?;
    io(
        "writing gid_map",
        std::fs::write("/proc/self/gid_map", format!("0 {} 1\n", ids.gid)),
    )?;
    Ok(())
}

/// Runs as PID 1 in the new namespaces.
fn init(spec: &BootSpec) -> Result<UnixListener, SetupError> {
    redirect_stdio(&spec.console_log)?;
    sys("sethostname", nix::unistd::sethostname(&spec.hostname))?;
    mounts::build_root(spec)?;
    // Bind the agent socket on the host path before the host disappears
    // from view: sandboxed processes can never reach (or replace) it.
    let sock = Path::new(&spec.socket);
    let _ = std::fs::remove_file(sock);
    let listener = io("bind agent socket", UnixListener::bind(sock))?;
    io(
        "chmod agent socket",
        std::fs::set_permissions(sock, std::os::unix::fs::PermissionsExt::from_mode(0o600)),
    )?;
    mounts::pivot(Path::new(&spec.root.merged))?;
    security::loopback_up()?;
    if spec.pool_host {
        // Before the lock-down: the factory keeps what making slots takes.
        use std::os::fd::AsRawFd;
        pool::start_factory(
            pool::SlotPolicy {
                seccomp: spec.seccomp,
                landlock_write: spec.landlock_write.clone(),
            },
            &[listener.as_raw_fd()],
        )?;
    }
    security::lock_down(spec)?;
    Ok(listener)
}

/// Points stdin at /dev/null and stdout/stderr at the console log, so the
/// sandbox never holds the pipes of whoever started it.
fn redirect_stdio(console_log: &str) -> Result<(), SetupError> {
    use std::os::fd::AsRawFd;
    let null = io(
        "open /dev/null",
        std::fs::OpenOptions::new().read(true).open("/dev/null"),
    )?;
    sys("dup2 stdin", nix::unistd::dup2(null.as_raw_fd(), 0))?;
    let out = if console_log.is_empty() {
        io(
            "open /dev/null",
            std::fs::OpenOptions::new().write(true).open("/dev/null"),
        )?
    } else {
        io(
            "open console log",
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(console_log),
        )?
    };
    sys("dup2 stdout", nix::unistd::dup2(out.as_raw_fd(), 1))?;
    sys("dup2 stderr", nix::unistd::dup2(out.as_raw_fd(), 2))?;
    Ok(())
}

/// Keeps allocations below `mmap_threshold` in glibc's heap and returns
/// freed heap memory to the system only above `trim_threshold`. Without it
/// every 1 MiB buffer is a fresh mmap: each file transfer pays for page
/// faults, zeroing and munmap, which profiling showed as most of the CPU on
/// that path. (Lives here because this crate is the workspace's only home
/// of `unsafe`.)
pub fn tune_allocator(mmap_threshold: i32, trim_threshold: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
    }
}

/// Closes every fd above stderr except `keep` (after boot, before serving).
pub fn close_other_fds(keep: &[&OwnedFd]) {
    use std::os::fd::AsRawFd;
    let keep: Vec<i32> = keep.iter().map(|f| f.as_raw_fd()).collect();
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Mixes `seed` into the kernel's entropy pool, credited (root only), and
/// makes the CRNG reseed from it at once: a microVM restored from a
/// snapshot must not hand out the random numbers its siblings will.
pub fn reseed_random(seed: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    let len = seed.len().min(512);
    let mut info = Vec::with_capacity(8 + len);
    info.extend_from_slice(&i32::try_from(len * 8).unwrap_or(0).to_ne_bytes());
    info.extend_from_slice(&i32::try_from(len).unwrap_or(0).to_ne_bytes());
    info.extend_from_slice(&seed[..len]);
    // Keep the buffer 4-byte aligned for the kernel's __u32 view.
    let words: Vec<u32> = info
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_ne_bytes(w)
        })
        .collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: the ioctl reads `8 + buf_size` bytes from a buffer we own of
    // at least that size; RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: no argument, no memory.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A listening AF_VSOCK stream socket (a microVM guest's agent under a
/// VMM without virtio-serial, e.g. Firecracker).
pub struct VsockListener(std::os::fd::OwnedFd);

impl VsockListener {
    /// Listens on `port` for any CID.
    pub fn bind(port: u32) -> std::io::Result<VsockListener> {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
        };
        use std::os::fd::AsRawFd;
        let sock = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // VMADDR_CID_ANY: whatever CID the VMM gave this guest.
        bind(sock.as_raw_fd(), &VsockAddr::new(u32::MAX, port))?;
        listen(&sock, Backlog::new(4).unwrap_or(Backlog::MAXCONN))?;
        Ok(VsockListener(sock))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> std::io::Result<std::fs::File> {
        use std::os::fd::{AsRawFd, FromRawFd};
        loop {
            match nix::sys::socket::accept4(
                self.0.as_raw_fd(),
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            ) {
                // SAFETY: accept4 just created this fd; nothing else owns it.
                Ok(fd) => return Ok(unsafe { std::fs::File::from_raw_fd(fd) }),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
