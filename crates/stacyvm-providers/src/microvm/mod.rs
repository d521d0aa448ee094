//! MicroVM sandboxes: each sandbox gets its own guest kernel.
//!
//! - [`kernel`]: the guest kernel (Debian's cloud kernel, downloaded with
//!   apt, never installed into the host's /boot) and the initramfs whose
//!   `/init` is the static agent in guest mode (`stacyvm-agent guest`);
//! - [`rootfs`]: image-store roots as shared read-only ext4 disks;
//! - [`qcow2`]: each VM's writable layer over its image's disk;
//! - [`qmp`]: QEMU's control protocol;
//! - [`qemu`]: the `qemu` provider (QEMU `-M microvm`);
//! - [`firecracker`]: Firecracker's API and hybrid vsock (the provider
//!   on top of it is next).
//!
//! The agent serves on the virtio-serial port [`AGENT_PORT`], which QEMU
//! backs with a unix socket on the host; the handshake token travels on
//! the kernel command line (`stacyvm.token=<hex>`), the hostname likewise
//! (`stacyvm.hostname=`), the root disk as `stacyvm.root=vda`.

pub mod build;
pub mod fcvm;
pub mod firecracker;
pub mod kernel;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod rootfs;
pub mod setup;
pub mod snapshot;
pub mod usersnap;

#[cfg(test)]
pub(crate) mod tests;

/// The name of the agent's virtio-serial port.
pub const AGENT_PORT: &str = "org.stacyvm.agent";

/// The guest vsock port the agent listens on under Firecracker
/// (`stacyvm.transport=vsock`; the agent's `guest::VSOCK_PORT`).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Kernel command line of every guest (before the `stacyvm.*` values).
/// `panic=-1` with QEMU's `-no-reboot` turns a guest panic into a QEMU exit.
pub const KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1";

/// Added under TCG: on a loaded host the kernel hangs calibrating its TSC
/// and delay loop (no PIT, HPET or PM timer reference on `microvm`);
/// giving it the TSC frequency and loops-per-jiffy skips both.
pub const TCG_ARGS: &str = "tsc_early_khz=2000000 lpj=4000000";

/// The accelerator (`providers.qemu.accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM when a guest boots with it, TCG otherwise.
    Auto,
    Kvm,
    /// QEMU's binary translator: slower, needs no virtualisation support.
    Tcg,
}

impl Accel {
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "" | "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether `/dev/kvm` can be opened read-write; `Err` says why not.
pub fn kvm_usable() -> std::result::Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("/dev/kvm does not exist (no hardware virtualisation here)".into())
        }
        Err(e) => Err(format!("/dev/kvm cannot be opened: {e}")),
    }
}

/// Whether KVM boots guests on this host: `/dev/kvm` opens and the qemu
/// provider's probe (a guest booted with KVM, its verdict kept per host
/// boot in `CACHE/accel.json`) said yes. A paravirtualised `/dev/kvm` (as
/// on this project's CI hosts) opens but boots no stock kernel.
pub fn kvm_boots_guests(cache: &std::path::Path) -> std::result::Result<(), String> {
    kvm_usable()?;
    let verdict: Option<serde_json::Value> = std::fs::read(cache.join("accel.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match verdict {
        Some(v) if v["boot_id"] == stacyvm_sandbox::procs::boot_id().as_str() => {
            if v["kvm"] == true {
                Ok(())
            } else {
                Err(v["why"].as_str().unwrap_or("the KVM probe failed").to_string())
            }
        }
        _ => Err("/dev/kvm opens but no guest has been booted with it since this host started (the qemu provider's first spawn with accel auto probes it)".into()),
    }
}

/// The serial number of a sandbox's `i`th volume disk; the guest finds
/// the disk by it (`/sys/block/vd*/serial`), whatever order devices probe
/// in.
pub(crate) fn volume_serial(i: usize) -> String {
    format!("stacyvm_vol{i}")
}

/// The guest's `stacyvm.volumes=` argument: per disk its index, `rw` or
/// `ro`, and the mount path in hex (paths may hold any byte but `/0`).
/// The kernel command line is short (2 KiB on x86): refused when it
/// would not fit.
pub(crate) fn volumes_arg(
    volumes: &[stacyvm_core::volumes::VolumeBind],
) -> stacyvm_core::Result<String> {
    let list: Vec<String> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{i}:{}:{}",
                if v.read_only { "ro" } else { "rw" },
                hex::encode(v.target.as_bytes())
            )
        })
        .collect();
    let arg = format!("stacyvm.volumes={}", list.join(","));
    if arg.len() > 1024 {
        return Err(stacyvm_core::Error::invalid(
            "the volume paths are too long for a microVM's kernel command line (at most about 500 bytes together)",
        ));
    }
    Ok(arg)
}
