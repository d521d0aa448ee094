//! Starting a PRoot sandbox: what `stacyvm-agent proot --spec FILE` does
//! before it becomes `proot`.
//!
//! proot translates paths by tracing system calls; it isolates nothing by
//! itself: its binds are real host paths, `-0` is a fake root, and any
//! path-taking syscall it does not know (openat2, statx, faccessat2,
//! fchmodat2, the mount API, io_uring…) reaches the host unchanged. So the
//! process is confined by the kernel before proot starts, and everything
//! it traces inherits that:
//! - its own session, and its cgroups when the server made some;
//! - on a root server: a private mount namespace whose stage (a tmpfs)
//!   holds binds of what the sandbox needs from the 0700 data dir, a
//!   private network namespace (loopback only), and an unprivileged
//!   uid/gid of its own (never host root);
//! - rlimits (no core files, bounded descriptors, optionally processes and
//!   address space), no_new_privs;
//! - landlock: read/execute only beneath the image and the host dirs it
//!   shows, every access only beneath the sandbox's writable dirs, signals
//!   and abstract unix sockets scoped to the sandbox;
//! - seccomp ([`filters`]): ENOSYS for the syscalls proot would pass
//!   through untranslated, EPERM for signalling or tracing proot itself
//!   and for namespace, mount, module, bpf and keyring calls.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
pub use stacyvm_agent_proto::boot::ProotSpec;

use crate::{cgroup, io, sys, SetupError};

/// The fd number of the agent's listening socket in proot and the agent.
pub const LISTEN_FD: i32 = 3;

/// Syscalls numbered from 424 on (newer than proot 5.1) that take no path
/// and may pass; every other number from 424 to 511 gets ENOSYS.
const NEW_ALLOWED: [i64; 17] = [
    424, // pidfd_send_signal
    434, // pidfd_open (EPERM for proot's pid by the deny filter)
    436, // close_range
    440, // process_madvise
    441, // epoll_pwait2
    444, // landlock_create_ruleset
    445, // landlock_add_rule
    446, // landlock_restrict_self
    447, // memfd_secret
    448, // process_mrelease
    449, // futex_waitv
    450, // set_mempolicy_home_node
    451, // cachestat
    453, // map_shadow_stack
    454, // futex_wake
    455, // futex_wait
    456, // futex_requeue
];

/// Below 424: path-taking syscalls proot does not translate.
const OLD_UNTRANSLATED: [i64; 1] = [libc::SYS_statx];

/// Refused with EPERM whatever the arguments.
const DENIED: [i64; 22] = [
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_iopl,
    libc::SYS_ioperm,
];

fn seccomp_err(e: impl std::fmt::Display) -> SetupError {
    SetupError::Other(format!("seccomp: {e}"))
}

fn arg_eq(arg: u8, value: u64) -> Result<SeccompCondition, SetupError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(seccomp_err)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SetupError> {
    SeccompRule::new(conds).map_err(seccomp_err)
}

/// A pid as the low 32 bits of a syscall argument.
fn pid_arg(pid: i32) -> u64 {
    u64::from(pid as u32)
}

/// The programs of a proot sandbox whose proot will have pid `proot`, in
/// the order they are installed (the kernel keeps the most severe result).
pub fn filters(proot: i32) -> Result<[BpfProgram; 3], SetupError> {
    let mut untranslated: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        OLD_UNTRANSLATED.iter().map(|n| (*n, Vec::new())).collect();
    for nr in 424..512 {
        if !NEW_ALLOWED.contains(&nr) {
            untranslated.insert(nr, Vec::new());
        }
    }
    let enosys = SeccompFilter::new(
        untranslated,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(seccomp_err)?;

    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|n| (*n, Vec::new())).collect();
    // Signals to proot, its process group, every process (-1) or the
    // caller's group when that is proot's (0).
    let me = pid_arg(proot);
    let group = pid_arg(-proot);
    let mut kill_rules = Vec::new();
    for target in [me, group, pid_arg(-1), 0] {
        kill_rules.push(rule(vec![arg_eq(0, target)?])?);
    }
    rules.insert(libc::SYS_kill, kill_rules);
    for nr in [
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_prlimit64,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kcmp,
        434, // pidfd_open
    ] {
        rules.insert(nr, vec![rule(vec![arg_eq(0, me)?])?]);
    }
    rules.insert(libc::SYS_ptrace, vec![rule(vec![arg_eq(1, me)?])?]);
    rules.insert(libc::SYS_setpgid, vec![rule(vec![arg_eq(1, me)?])?]);
    // Unix datagram and seqpacket sockets: proot does not translate the
    // address of sendto/sendmsg, so they could reach any host socket.
    let mut socket_rules = Vec::new();
    for ty in [libc::SOCK_DGRAM, libc::SOCK_RAW, libc::SOCK_SEQPACKET] {
        socket_rules.push(rule(vec![
            arg_eq(0, libc::AF_UNIX as u64)?,
            SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xf),
                ty as u64,
            )
            .map_err(seccomp_err)?,
        ])?);
    }
    rules.insert(libc::SYS_socket, socket_rules);
    // clone with a namespace flag.
    let mut clone_rules = Vec::new();
    for f in [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWCGROUP,
    ] {
        let f = f as u64;
        clone_rules.push(rule(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(f),
            f,
        )
        .map_err(seccomp_err)?])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(seccomp_err)?;
    Ok([
        enosys.try_into().map_err(seccomp_err)?,
        deny.try_into().map_err(seccomp_err)?,
        crate::security::abi_guard(),
    ])
}

/// Prepares the process as `spec` says and executes proot. Returns only
/// on failure. Must be called while the process is single-threaded.
pub fn launch(spec: &ProotSpec) -> Result<Infallible, SetupError> {
    for dir in &spec.cgroups {
        cgroup::join(Path::new(dir))?;
    }
    // Its own session and process group: the server's signals and
    // terminal never reach it, and it outlives a server restart.
    sys("setsid", nix::unistd::setsid())?;
    // Bound first: the stage may cover the host dir it lives in.
    let listener = bind_socket(&spec.socket)?;
    if let Some(stage) = &spec.stage {
        build_stage(stage)?;
    }
    limits(spec)?;
    if let Some((uid, gid)) = spec.ids {
        drop_ids(uid, gid)?;
    }
    sys("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    landlock(spec)?;
    let programs = filters(std::process::id() as i32)?;
    // The listener becomes fd 3, inheritable (dup2 leaves the copy so;
    // when it already is fd 3 only the flag changes).
    if listener.as_raw_fd() == LISTEN_FD {
        sys(
            "placing the agent socket",
            nix::fcntl::fcntl(
                LISTEN_FD,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            ),
        )?;
        let _ = listener.into_raw_fd();
    } else {
        sys(
            "placing the agent socket",
            nix::unistd::dup2(listener.as_raw_fd(), LISTEN_FD),
        )?;
        drop(listener);
    }
    let path = cstring(&spec.proot)?;
    let mut argv = vec![path.clone()];
    for a in &spec.args {
        argv.push(cstring(a)?);
    }
    let mut env = Vec::new();
    for (k, v) in &spec.env {
        env.push(cstring(&format!("{k}={v}"))?);
    }
    for prog in &programs {
        seccompiler::apply_filter(prog).map_err(seccomp_err)?;
    }
    let e = nix::unistd::execve(&path, &argv, &env);
    Err(SetupError::Sys {
        step: format!("executing {}", spec.proot),
        source: e.err().unwrap_or(nix::Error::UnknownErrno),
    })
}

fn cstring(s: &str) -> Result<CString, SetupError> {
    CString::new(s).map_err(|_| SetupError::Other(format!("{s:?} contains a NUL byte")))
}

/// A private mount namespace (propagation off, so nothing reaches the
/// host) and network namespace (loopback only); a tmpfs at the stage dir
/// holding the binds, made read-only once populated.
fn build_stage(stage: &stacyvm_agent_proto::boot::Stage) -> Result<(), SetupError> {
    const NONE: Option<&str> = None;
    sys(
        "unsharing mount and network namespaces",
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET),
    )?;
    sys(
        "making mounts private",
        mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE),
    )?;
    crate::security::loopback_up()?;
    let dir = Path::new(&stage.dir);
    sys(
        "mounting the stage",
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=1m"),
        ),
    )?;
    for b in &stage.binds {
        let target = dir.join(b.target.trim_start_matches('/'));
        let is_dir = io(
            format!("inspecting {}", b.source),
            std::fs::metadata(&b.source),
        )?
        .is_dir();
        if let Some(parent) = target.parent() {
            io("creating stage dirs", std::fs::create_dir_all(parent))?;
        }
        if is_dir {
            io(
                "creating a stage mount point",
                std::fs::create_dir_all(&target),
            )?;
        } else {
            io("creating a stage mount point", std::fs::write(&target, b""))?;
        }
        sys(
            format!("binding {}", b.source),
            mount(
                Some(b.source.as_str()),
                &target,
                NONE,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                NONE,
            ),
        )?;
        if b.readonly {
            sys(
                format!("making {} read-only", b.source),
                mount(
                    NONE,
                    &target,
                    NONE,
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV,
                    NONE,
                ),
            )?;
        }
    }
    if !stage.tmp.is_empty() {
        sys(
            "binding proot's /tmp",
            mount(
                Some(stage.tmp.as_str()),
                "/tmp",
                NONE,
                MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                NONE,
            ),
        )?;
    }
    sys(
        "making the stage read-only",
        mount(
            NONE,
            dir,
            NONE,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=1m"),
        ),
    )?;
    Ok(())
}

/// Binds the agent's socket while still privileged (its dir is the
/// server's and private).
fn bind_socket(path: &str) -> Result<OwnedFd, SetupError> {
    let _ = std::fs::remove_file(path);
    let l = io(format!("binding {path}"), UnixListener::bind(path))?;
    Ok(OwnedFd::from(l))
}

fn limits(spec: &ProotSpec) -> Result<(), SetupError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    sys("RLIMIT_CORE", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    let (_, hard) = sys("RLIMIT_NOFILE", getrlimit(Resource::RLIMIT_NOFILE))?;
    let n = hard.min(crate::security::NOFILE_LIMIT);
    sys("RLIMIT_NOFILE", setrlimit(Resource::RLIMIT_NOFILE, n, n))?;
    if spec.nproc_limit > 0 {
        sys(
            "RLIMIT_NPROC",
            setrlimit(Resource::RLIMIT_NPROC, spec.nproc_limit, spec.nproc_limit),
        )?;
    }
    if spec.as_limit > 0 {
        sys(
            "RLIMIT_AS",
            setrlimit(Resource::RLIMIT_AS, spec.as_limit, spec.as_limit),
        )?;
    }
    Ok(())
}

/// Becomes `uid`/`gid` for good, with no supplementary groups.
fn drop_ids(uid: u32, gid: u32) -> Result<(), SetupError> {
    use nix::unistd::{Gid, Uid};
    sys("setgroups", nix::unistd::setgroups(&[]))?;
    let g = Gid::from_raw(gid);
    sys("setresgid", nix::unistd::setresgid(g, g, g))?;
    let u = Uid::from_raw(uid);
    sys("setresuid", nix::unistd::setresuid(u, u, u))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(SetupError::Other("dropping root did not stick".into()));
    }
    Ok(())
}

/// Whether this kernel enforces landlock (ABI 1 or later).
pub fn landlock_available() -> bool {
    use landlock::{Access, AccessFs, Ruleset, RulesetAttr, ABI};
    Ruleset::default()
        .handle_access(AccessFs::from_all(ABI::V1))
        .and_then(|r| r.create())
        .is_ok()
}

fn landlock(spec: &ProotSpec) -> Result<(), SetupError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V5;
    let fail = |e: landlock::RulesetError| SetupError::Other(format!("landlock: {e}"));
    let device = AccessFs::from_read(abi) | AccessFs::WriteFile | AccessFs::IoctlDev;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .set_compatibility(CompatLevel::BestEffort)
        .scope(Scope::from_all(ABI::V6))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(&spec.read, AccessFs::from_read(abi)))
        .map_err(fail)?
        .add_rules(path_beneath_rules(&spec.devices, device))
        .map_err(fail)?
        .add_rules(path_beneath_rules(&spec.write, AccessFs::from_all(abi)))
        .map_err(fail)?
        .restrict_self()
        .map_err(fail)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        eprintln!(
            "stacyvm-agent: warning: this kernel does not enforce landlock; sandbox {} is confined by proot, seccomp and its ids only",
            spec.id
        );
    }
    Ok(())
}

/// The listening socket a proot sandbox's agent inherits as [`LISTEN_FD`].
pub fn inherited_listener() -> Result<UnixListener, SetupError> {
    use nix::sys::socket::{getsockopt, sockopt};
    use std::os::fd::{BorrowedFd, FromRawFd};
    // SAFETY: the fd is only borrowed for the checks below, which fail
    // harmlessly if it is not open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(LISTEN_FD) };
    let listening = sys(
        format!("fd {LISTEN_FD} is not a socket"),
        getsockopt(&borrowed, sockopt::AcceptConn),
    )?;
    if !listening {
        return Err(SetupError::Other(format!(
            "fd {LISTEN_FD} is not a listening socket"
        )));
    }
    // SAFETY: fd 3 is an open listening socket (checked above) that
    // nothing else in this process owns: the launcher placed it there
    // for the agent alone.
    let owned = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    let _ = nix::fcntl::fcntl(
        owned.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Ok(UnixListener::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_and_stay_small() {
        for p in filters(4242).expect("filters") {
            assert!(!p.is_empty() && p.len() < 4096, "{}", p.len());
        }
        for nr in NEW_ALLOWED {
            assert!((424..512).contains(&nr));
        }
    }
}
