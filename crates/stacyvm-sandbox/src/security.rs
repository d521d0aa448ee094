//! Capabilities, no_new_privs, dumpability and the seccomp filter.

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::BpfProgram;

use crate::{BootSpec, SetupError};

/// Capabilities kept inside a sandbox: Docker's default set without
/// NET_RAW and MKNOD.
pub const KEPT_CAPS: [Capability; 11] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_SETFCAP,
];

fn caps_err(step: &str, e: caps::errors::CapsError) -> SetupError {
    SetupError::Other(format!("{step}: {e}"))
}

/// RLIMIT_NOFILE of every sandbox process, soft and hard, instead of the
/// server's (often 1M under systemd; a lower server limit is kept). The sandbox cannot raise it: that
/// takes CAP_SYS_RESOURCE in the host's user namespace.
pub const NOFILE_LIMIT: u64 = 65_536;

/// No core files (RLIMIT_CORE 0, hard limit included) and a bounded
/// descriptor table.
///
/// A core_pattern that writes a file honours the limit. A pipe
/// core_pattern (`|/usr/lib/systemd/systemd-coredump …`) is started by
/// the kernel whatever the limit; the helpers read it (`%c`) and store
/// nothing at 0.
fn set_resource_limits() -> Result<(), SetupError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    crate::sys("RLIMIT_CORE", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    // Never above what the server has (raising a hard limit needs the
    // host's CAP_SYS_RESOURCE, which a user-namespaced sandbox lacks).
    let (_, hard) = crate::sys("RLIMIT_NOFILE", getrlimit(Resource::RLIMIT_NOFILE))?;
    let n = hard.min(NOFILE_LIMIT);
    crate::sys("RLIMIT_NOFILE", setrlimit(Resource::RLIMIT_NOFILE, n, n))?;
    Ok(())
}

/// Drops capabilities, sets no_new_privs, makes the process undumpable
/// (no ptrace from inside) and installs the seccomp filter. Inherited by
/// every process the agent starts.
pub fn lock_down(spec: &BootSpec) -> Result<(), SetupError> {
    let keep: CapsHashSet = KEPT_CAPS.iter().copied().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| caps_err("dropping bounding capability", e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_err("clearing ambient capabilities", e))?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .map_err(|e| caps_err("clearing inheritable capabilities", e))?;
    caps::set(None, CapSet::Effective, &keep)
        .map_err(|e| caps_err("setting effective capabilities", e))?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(|e| caps_err("setting permitted capabilities", e))?;
    if spec.nproc_limit > 0 {
        crate::sys(
            "RLIMIT_NPROC",
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NPROC,
                spec.nproc_limit,
                spec.nproc_limit,
            ),
        )?;
    }
    set_resource_limits()?;
    crate::sys("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    if !spec.landlock_write.is_empty() {
        landlock_writes_beneath(&spec.landlock_write)?;
    }
    crate::sys("dumpable", nix::sys::prctl::set_dumpable(false))?;
    if spec.seccomp {
        install_seccomp()?;
    }
    Ok(())
}

/// Gives up every capability, the bounding set included: a docker pool
/// host's agent once its slot factory is forked (the container got what
/// the factory needs; the agent keeps none of it).
pub fn drop_all_caps() -> Result<(), SetupError> {
    for cap in caps::all() {
        if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| caps_err("dropping bounding capability", e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_err("clearing ambient capabilities", e))?;
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| caps_err("clearing capabilities", e))?;
    }
    crate::sys("no_new_privs", nix::sys::prctl::set_no_new_privs())
}

/// A pool slot's init, last step before it serves: no capability left
/// (bounding set included, while CAP_SETPCAP still allows), `uid`/`gid`
/// with no supplementary groups, the sandbox's resource limits,
/// no_new_privs, undumpable, Landlock and seccomp as the host's.
pub fn lock_down_slot(
    uid: u32,
    gid: u32,
    policy: &crate::pool::SlotPolicy,
) -> Result<(), SetupError> {
    for cap in caps::all() {
        // Without CAP_SETPCAP this fails; no_new_privs and a non-root uid
        // keep the bounding set out of reach anyway.
        let _ = caps::drop(None, CapSet::Bounding, cap);
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_err("clearing ambient capabilities", e))?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .map_err(|e| caps_err("clearing inheritable capabilities", e))?;
    set_resource_limits()?;
    crate::sys("setgroups", nix::unistd::setgroups(&[]))?;
    let g = nix::unistd::Gid::from_raw(gid);
    crate::sys("setresgid", nix::unistd::setresgid(g, g, g))?;
    let u = nix::unistd::Uid::from_raw(uid);
    crate::sys("setresuid", nix::unistd::setresuid(u, u, u))?;
    // The credential change cleared the parent-death signal: the slot
    // must still end with its factory.
    crate::sys(
        "parent death signal",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    // Every uid is non-zero now: the kernel cleared the permitted and
    // effective sets. Make sure.
    caps::clear(None, CapSet::Effective)
        .map_err(|e| caps_err("clearing effective capabilities", e))?;
    caps::clear(None, CapSet::Permitted)
        .map_err(|e| caps_err("clearing permitted capabilities", e))?;
    crate::sys("no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    if !policy.landlock_write.is_empty() {
        landlock_writes_beneath(&policy.landlock_write)?;
    }
    crate::sys("dumpable", nix::sys::prctl::set_dumpable(false))?;
    if policy.seccomp {
        install_seccomp()?;
    }
    Ok(())
}

// ---- seccomp ---------------------------------------------------------------
//
// The profile is an allowlist in the spirit of Docker's default profile,
// assembled as one classic BPF program (see [`build_filters`]): allowed
// syscalls pass, denied ones and forbidden arguments get EPERM, anything
// else ENOSYS; other arches are killed and x32 numbers refused.

/// Every syscall a sandboxed process may make, unconditionally or with
/// the argument checks of the deny filter (`socket`, `clone`,
/// `personality`). Roughly Docker's default allowlist minus what the
/// sandbox's capability set makes useless, and minus [`DENIED_SYSCALLS`].
pub const ALLOWED_SYSCALLS: &[i64] = &[
    // files and directories
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_stat,
    libc::SYS_fstat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync,
    libc::SYS_syncfs,
    libc::SYS_sync_file_range,
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_readahead,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_umask,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_utimensat,
    libc::SYS_futimesat,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_tee,
    libc::SYS_vmsplice,
    libc::SYS_copy_file_range,
    libc::SYS_ioctl,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_memfd_create,
    SYS_CACHESTAT,
    // asynchronous i/o (the old AIO interface, not io_uring)
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_cancel,
    libc::SYS_io_getevents,
    SYS_IO_PGETEVENTS,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    // polling and event fds
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // memory
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_munlock,
    libc::SYS_mlockall,
    libc::SYS_munlockall,
    libc::SYS_remap_file_pages,
    libc::SYS_membarrier,
    libc::SYS_mseal,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_get_mempolicy,
    SYS_MAP_SHADOW_STACK,
    // processes and threads (clone: the deny filter refuses namespace flags)
    libc::SYS_clone,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_tgkill,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_process_mrelease,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_gettid,
    libc::SYS_getpgid,
    libc::SYS_setpgid,
    libc::SYS_getpgrp,
    libc::SYS_getsid,
    libc::SYS_setsid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_prctl,
    libc::SYS_arch_prctl,
    libc::SYS_personality,
    libc::SYS_seccomp,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    libc::SYS_set_tid_address,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    SYS_FUTEX_WAKE,
    SYS_FUTEX_WAIT,
    SYS_FUTEX_REQUEUE,
    libc::SYS_set_thread_area,
    libc::SYS_get_thread_area,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getattr,
    libc::SYS_sched_setattr,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_getcpu,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    // signals
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sigaltstack,
    libc::SYS_pause,
    // time
    libc::SYS_time,
    libc::SYS_gettimeofday,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_alarm,
    libc::SYS_getitimer,
    libc::SYS_setitimer,
    libc::SYS_times,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_gettime,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_delete,
    // sockets (socket: the deny filter checks the family)
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    // System V and POSIX IPC (private to the sandbox's IPC namespace)
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmdt,
    libc::SYS_shmctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_semctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgrcv,
    libc::SYS_msgctl,
    libc::SYS_mq_open,
    libc::SYS_mq_unlink,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_notify,
    libc::SYS_mq_getsetattr,
];

// x86_64 numbers the libc crate does not name yet.
const SYS_IO_PGETEVENTS: i64 = 333;
const SYS_CACHESTAT: i64 = 451;
const SYS_MAP_SHADOW_STACK: i64 = 453;
const SYS_FUTEX_WAKE: i64 = 454;
const SYS_FUTEX_WAIT: i64 = 455;
const SYS_FUTEX_REQUEUE: i64 = 456;

/// Syscalls refused with EPERM (everything else outside
/// [`ALLOWED_SYSCALLS`] gets ENOSYS). Listed so a caller learns it is not
/// permitted, and so the refusal stands even if one were ever added to
/// the allowlist by mistake.
pub const DENIED_SYSCALLS: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_lookup_dcookie,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_modify_ldt,
    libc::SYS_vhangup,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_pidfd_getfd,
    libc::SYS_uselib,
    libc::SYS_nfsservctl,
    libc::SYS_fanotify_init,
    libc::SYS_set_mempolicy,
    libc::SYS_set_mempolicy_home_node,
    libc::SYS_mbind,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
];

/// Socket families a sandbox may open: unix, IPv4, IPv6 and netlink
/// (glibc's `getaddrinfo` asks netlink for the host's addresses, `ip`
/// reads routes through it). Not AF_VSOCK (on a VM host it reaches the
/// hypervisor), AF_PACKET, AF_KEY, bluetooth, …
pub const ALLOWED_SOCKET_FAMILIES: [u64; 4] = [
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_NETLINK as u64,
];

/// `personality` values that leave the process as it is (as in Docker's
/// profile): the query, PER_LINUX, PER_LINUX32 and their UNAME26 forms.
const ALLOWED_PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// `__X32_SYSCALL_BIT`.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const NS_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn seccomp_err(e: impl std::fmt::Display) -> SetupError {
    SetupError::Other(format!("seccomp: {e}"))
}

/// Classic BPF opcodes and return values the filter uses.
mod bpf {
    pub const LD_W_ABS: u16 = 0x20;
    pub const JMP_JEQ: u16 = 0x05 | 0x10;
    pub const JMP_JSET: u16 = 0x05 | 0x40;
    pub const JMP_JA: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    pub const KILL_PROCESS: u32 = 0x8000_0000;
    pub const ERRNO: u32 = 0x0005_0000;
    pub const ALLOW: u32 = 0x7fff_0000;
    /// Offsets in `struct seccomp_data`.
    pub const NR: u32 = 0;
    pub const ARCH: u32 = 4;
    /// Low 32 bits of `args[0]` (little-endian).
    pub const ARG0_LO: u32 = 16;
}

/// Emits `jeq` tests of the syscall number (in A) against `nrs`, each
/// match returning `action`; no match falls through. Chunks keep every
/// jump within the 255 instructions a conditional jump can skip.
fn match_any(prog: &mut BpfProgram, nrs: &[i64], action: u32) {
    use seccompiler::sock_filter;
    for chunk in nrs.chunks(200) {
        let n = chunk.len();
        for (i, nr) in chunk.iter().enumerate() {
            // A match jumps over the rest of the chunk and the `ja` to the `ret`.
            let to_ret = (n - 1 - i + 1) as u8;
            prog.push(sock_filter {
                code: bpf::JMP_JEQ,
                jt: to_ret,
                jf: 0,
                k: *nr as u32,
            });
        }
        prog.push(sock_filter {
            code: bpf::JMP_JA,
            jt: 0,
            jf: 0,
            k: 1,
        });
        prog.push(sock_filter {
            code: bpf::RET,
            jt: 0,
            jf: 0,
            k: action,
        });
    }
}

/// Emits: if the syscall number (in A) is `nr`, load `args[0]` (low 32
/// bits) and return what `check` emits for it; otherwise fall through.
/// `check` must end in a `ret` on every path and leave A untouched until
/// it loads.
fn arg_block(prog: &mut BpfProgram, nr: i64, check: impl FnOnce(&mut BpfProgram)) {
    use seccompiler::sock_filter;
    let mut block = vec![sock_filter {
        code: bpf::LD_W_ABS,
        jt: 0,
        jf: 0,
        k: bpf::ARG0_LO,
    }];
    check(&mut block);
    prog.push(sock_filter {
        code: bpf::JMP_JEQ,
        jt: 0,
        jf: u8::try_from(block.len()).expect("argument block under 256 instructions"),
        k: nr as u32,
    });
    prog.extend(block);
}

/// Returns `pass` if A is one of `values`, else `fail`.
fn one_of(prog: &mut BpfProgram, values: &[u64], pass: u32, fail: u32) {
    use seccompiler::sock_filter;
    let n = values.len();
    for (i, v) in values.iter().enumerate() {
        prog.push(sock_filter {
            code: bpf::JMP_JEQ,
            jt: (n - i) as u8,
            jf: 0,
            k: *v as u32,
        });
    }
    prog.push(sock_filter {
        code: bpf::RET,
        jt: 0,
        jf: 0,
        k: fail,
    });
    prog.push(sock_filter {
        code: bpf::RET,
        jt: 0,
        jf: 0,
        k: pass,
    });
}

/// The whole profile as ONE program (one filter to compile and attach per
/// sandbox; the three stacked filters it replaced cost a fifth of a
/// sandbox boot). In order:
///
/// 1. any arch but x86_64 (the i386 `int 0x80` entry) kills the process;
///    a number with `__X32_SYSCALL_BIT` gets EPERM;
/// 2. the argument checks: `clone` with a namespace flag, `socket`
///    outside [`ALLOWED_SOCKET_FAMILIES`] and `personality` other than the
///    default get EPERM, else they pass;
/// 3. [`DENIED_SYSCALLS`] get EPERM: a program asking for something it may
///    not have learns that it is not permitted;
/// 4. [`ALLOWED_SYSCALLS`] pass;
/// 5. everything else gets ENOSYS, as runc answers syscalls its profile
///    does not know: libc then falls back to an older call (clone3 →
///    clone, fchmodat2 → fchmodat), as on an older kernel.
///
/// Returned as a one-element array for callers that install a list.
pub(crate) fn build_filters() -> Result<[BpfProgram; 1], SetupError> {
    use seccompiler::sock_filter;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let eperm = bpf::ERRNO | libc::EPERM as u32;
    let mut prog: BpfProgram = vec![
        op(bpf::LD_W_ABS, 0, 0, bpf::ARCH),
        op(bpf::JMP_JEQ, 1, 0, bpf::AUDIT_ARCH_X86_64),
        op(bpf::RET, 0, 0, bpf::KILL_PROCESS),
        op(bpf::LD_W_ABS, 0, 0, bpf::NR),
        op(bpf::JMP_JSET, 0, 1, X32_SYSCALL_BIT),
        op(bpf::RET, 0, 0, eperm),
    ];
    for nr in [libc::SYS_clone, libc::SYS_socket, libc::SYS_personality] {
        if !ALLOWED_SYSCALLS.contains(&nr) {
            return Err(seccomp_err(format!(
                "syscall {nr} has argument checks but is not allowed"
            )));
        }
    }
    let ns_mask = NS_FLAGS.iter().fold(0u64, |m, f| m | f);
    let ns_mask = u32::try_from(ns_mask).map_err(seccomp_err)?;
    arg_block(&mut prog, libc::SYS_clone, |b| {
        b.push(op(bpf::JMP_JSET, 0, 1, ns_mask));
        b.push(op(bpf::RET, 0, 0, eperm));
        b.push(op(bpf::RET, 0, 0, bpf::ALLOW));
    });
    arg_block(&mut prog, libc::SYS_socket, |b| {
        one_of(b, &ALLOWED_SOCKET_FAMILIES, bpf::ALLOW, eperm);
    });
    arg_block(&mut prog, libc::SYS_personality, |b| {
        one_of(b, &ALLOWED_PERSONALITIES, bpf::ALLOW, eperm);
    });
    match_any(&mut prog, DENIED_SYSCALLS, eperm);
    match_any(&mut prog, ALLOWED_SYSCALLS, bpf::ALLOW);
    prog.push(op(bpf::RET, 0, 0, bpf::ERRNO | libc::ENOSYS as u32));
    if prog.len() >= 4096 {
        return Err(seccomp_err(format!(
            "filter of {} instructions",
            prog.len()
        )));
    }
    Ok([prog])
}

/// Hand-assembled classic BPF (seccompiler cannot test a bit of the
/// syscall number): kill any arch but x86_64, refuse x32 numbers.
///
/// ```text
/// 0: ld  [4]                  ; seccomp_data.arch
/// 1: jeq #AUDIT_ARCH_X86_64, 3, 2
/// 2: ret #KILL_PROCESS        ; i386 (int 0x80) or anything else
/// 3: ld  [0]                  ; seccomp_data.nr
/// 4: jset #0x40000000, 5, 6
/// 5: ret #ERRNO(EPERM)        ; x32 ABI
/// 6: ret #ALLOW
/// ```
pub(crate) fn abi_guard() -> BpfProgram {
    use seccompiler::sock_filter;
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP: u16 = 0x05;
    const BPF_JEQ: u16 = 0x10;
    const BPF_JSET: u16 = 0x40;
    const BPF_RET: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        op(BPF_LD_W_ABS, 0, 0, 4),
        op(BPF_JMP | BPF_JEQ, 1, 0, AUDIT_ARCH_X86_64),
        op(BPF_RET, 0, 0, RET_KILL_PROCESS),
        op(BPF_LD_W_ABS, 0, 0, 0),
        op(BPF_JMP | BPF_JSET, 0, 1, X32_SYSCALL_BIT),
        op(BPF_RET, 0, 0, RET_ERRNO | libc::EPERM as u32),
        op(BPF_RET, 0, 0, RET_ALLOW),
    ]
}

/// Installs the profile on the calling thread (inherited by every process
/// it starts). Needs no_new_privs or CAP_SYS_ADMIN.
pub fn install_seccomp() -> Result<(), SetupError> {
    for prog in build_filters()? {
        seccompiler::apply_filter(&prog).map_err(seccomp_err)?;
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> Result<(), SetupError> {
    use std::os::fd::AsRawFd;
    let sock = crate::sys(
        "socket for loopback",
        nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        ),
    )?;
    // SAFETY: `ifreq` is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own; the fd is valid.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(SetupError::Io {
            step: "SIOCGIFFLAGS lo".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the flags member is the active union field after SIOCGIFFLAGS.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own; the fd is valid.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(SetupError::Io {
            step: "SIOCSIFFLAGS lo".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Landlock: reads and executes anywhere, writes only beneath `writable`.
/// Applies to the calling thread and everything it starts afterwards (the
/// agent's threads and every command). Best effort across kernel ABIs; a
/// kernel without landlock is an error (the operator asked for it).
fn landlock_writes_beneath(writable: &[String]) -> Result<(), SetupError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let fail = |e: landlock::RulesetError| SetupError::Other(format!("landlock: {e}"));
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(fail)?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))
        .map_err(fail)?
        .restrict_self()
        .map_err(fail)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(SetupError::Other(
            "landlock is enabled in the config but this kernel does not enforce it".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno of a raw syscall, or 0 when it succeeded (its result is
    /// then closed if it is an fd).
    fn errno_of(nr: i64, args: [u64; 3], returns_fd: bool) -> i32 {
        // SAFETY: the calls below pass integers, null pointers or pointers
        // to locals that outlive the call.
        let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2]) };
        if rc < 0 {
            return std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
        }
        if returns_fd {
            // SAFETY: `rc` is a descriptor this thread just received.
            unsafe { libc::close(rc as i32) };
        }
        0
    }

    #[test]
    fn allowlist_is_consistent() {
        let programs = build_filters().expect("filters");
        for p in &programs {
            assert!(!p.is_empty() && p.len() < 4096, "{}", p.len());
        }
        for nr in DENIED_SYSCALLS {
            assert!(
                !ALLOWED_SYSCALLS.contains(nr),
                "{nr} is both allowed and denied"
            );
        }
        let mut sorted = ALLOWED_SYSCALLS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ALLOWED_SYSCALLS.len(), "duplicates");
    }

    /// F-9: the profile, installed on one thread of the test process
    /// (seccomp filters are per thread), refuses what it must on the
    /// x86_64 and x32 paths and keeps ordinary calls working.
    #[test]
    fn profile_refuses_escapes_and_keeps_ordinary_calls() {
        let programs = build_filters().expect("filters");
        let got = std::thread::spawn(move || {
            nix::sys::prctl::set_no_new_privs().expect("no_new_privs");
            for p in &programs {
                seccompiler::apply_filter(p).expect("install");
            }
            let x32 = u64::from(X32_SYSCALL_BIT);
            let mut params = [0u8; 120];
            let p = params.as_mut_ptr() as u64;
            let clone3_args = [0u64; 11];
            let c3 = clone3_args.as_ptr() as u64;
            vec![
                (
                    "io_uring_setup",
                    errno_of(libc::SYS_io_uring_setup, [8, p, 0], true),
                ),
                (
                    "io_uring_enter",
                    errno_of(libc::SYS_io_uring_enter, [0, 0, 0], false),
                ),
                (
                    "x32 unshare(CLONE_NEWUSER)",
                    errno_of(
                        (x32 | libc::SYS_unshare as u64) as i64,
                        [libc::CLONE_NEWUSER as u64, 0, 0],
                        false,
                    ),
                ),
                (
                    "x32 getpid",
                    errno_of((x32 | libc::SYS_getpid as u64) as i64, [0, 0, 0], false),
                ),
                (
                    "unshare(CLONE_NEWUSER)",
                    errno_of(libc::SYS_unshare, [libc::CLONE_NEWUSER as u64, 0, 0], false),
                ),
                (
                    "socket(AF_VSOCK)",
                    errno_of(
                        libc::SYS_socket,
                        [libc::AF_VSOCK as u64, libc::SOCK_STREAM as u64, 0],
                        true,
                    ),
                ),
                (
                    "socket(AF_PACKET)",
                    errno_of(
                        libc::SYS_socket,
                        [libc::AF_PACKET as u64, libc::SOCK_DGRAM as u64, 0],
                        true,
                    ),
                ),
                (
                    "modify_ldt",
                    errno_of(libc::SYS_modify_ldt, [0, 0, 0], false),
                ),
                ("keyctl", errno_of(libc::SYS_keyctl, [0, 0, 0], false)),
                ("bpf", errno_of(libc::SYS_bpf, [0, 0, 0], false)),
                (
                    "userfaultfd",
                    errno_of(libc::SYS_userfaultfd, [0, 0, 0], true),
                ),
                (
                    "perf_event_open",
                    errno_of(libc::SYS_perf_event_open, [0, 0, 0], true),
                ),
                (
                    "personality(ADDR_NO_RANDOMIZE)",
                    errno_of(libc::SYS_personality, [0x0004_0000, 0, 0], false),
                ),
                ("clone3", errno_of(libc::SYS_clone3, [c3, 88, 0], false)),
                (
                    "sysfs (not listed)",
                    errno_of(libc::SYS_sysfs, [3, 0, 0], false),
                ),
                ("getpid", errno_of(libc::SYS_getpid, [0, 0, 0], false)),
                (
                    "socket(AF_INET)",
                    errno_of(
                        libc::SYS_socket,
                        [libc::AF_INET as u64, libc::SOCK_DGRAM as u64, 0],
                        true,
                    ),
                ),
                (
                    "socket(AF_NETLINK)",
                    errno_of(
                        libc::SYS_socket,
                        [libc::AF_NETLINK as u64, libc::SOCK_RAW as u64, 0],
                        true,
                    ),
                ),
                (
                    "personality(query)",
                    errno_of(libc::SYS_personality, [0xffff_ffff, 0, 0], false),
                ),
            ]
        })
        .join()
        .expect("probe thread");
        let want = |name: &str| -> i32 {
            match name {
                "clone3" | "sysfs (not listed)" => libc::ENOSYS,
                "getpid" | "socket(AF_INET)" | "socket(AF_NETLINK)" | "personality(query)" => 0,
                _ => libc::EPERM,
            }
        };
        for (name, errno) in &got {
            assert_eq!(*errno, want(name), "{name}: {got:?}");
        }
    }

    /// The i386 entry (`int 0x80`, audit arch I386) from a 64-bit process
    /// kills it: checked in a child copy of this test binary, since the
    /// whole process dies.
    #[test]
    fn i386_entry_kills_the_process() {
        if std::env::var_os("STACYVM_SECCOMP_I386_CHILD").is_some() {
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", "security::tests::i386_child", "--nocapture"])
            .env("STACYVM_SECCOMP_I386_CHILD", "1")
            .output()
            .expect("child");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn i386_child() {
        if std::env::var_os("STACYVM_SECCOMP_I386_CHILD").is_none() {
            return;
        }
        nix::sys::prctl::set_no_new_privs().expect("no_new_privs");
        for p in build_filters().expect("filters") {
            seccompiler::apply_filter(&p).expect("install");
        }
        let mut eax: u32 = 20; // getpid on i386
                               // SAFETY: `int 0x80` with eax = getpid takes no pointers and
                               // clobbers only eax; the filter kills the process before it runs.
        unsafe {
            std::arch::asm!("int 0x80", inout("eax") eax, options(nostack));
        }
        println!("int 0x80 returned {eax}");
    }
}
