//! Capabilities, no_new_privs, dumpability and the seccomp filter.

use std::collections::BTreeMap;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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

/// Syscalls no sandboxed process may make (EPERM). With the capability set
/// above this is at least as strict as Docker's default profile.
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
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_lookup_dcookie,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_vhangup,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_pidfd_getfd,
    libc::SYS_personality,
    libc::SYS_uselib,
    libc::SYS_nfsservctl,
    libc::SYS_fanotify_init,
    libc::SYS_set_mempolicy,
    libc::SYS_mbind,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
];

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

fn build_filters() -> Result<(BpfProgram, BpfProgram), SetupError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|s| (*s, Vec::new())).collect();
    // clone with any namespace flag creates namespaces: deny.
    let mut clone_rules = Vec::new();
    for f in NS_FLAGS {
        let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)
            .map_err(seccomp_err)?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(seccomp_err)?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // Personality changes other than the harmless query/linux default.
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(seccomp_err)?;
    // clone3 passes flags in memory the filter cannot inspect: make it
    // unavailable so libc falls back to clone (as Docker does).
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(seccomp_err)?;
    Ok((
        deny.try_into().map_err(seccomp_err)?,
        clone3.try_into().map_err(seccomp_err)?,
    ))
}

fn install_seccomp() -> Result<(), SetupError> {
    let (deny, clone3) = build_filters()?;
    seccompiler::apply_filter(&clone3).map_err(seccomp_err)?;
    seccompiler::apply_filter(&deny).map_err(seccomp_err)?;
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

    #[test]
    fn filters_compile() {
        let (a, b) = build_filters().expect("filters");
        assert!(!a.is_empty() && !b.is_empty());
    }
}
