//! MicroVM sandboxes (issue 11), groundwork: the guest kernel and
//! initramfs ([`kernel`]), one QEMU VM's lifecycle ([`qemu::QemuVm`]: boot
//! to agent handshake, status, destroy) and a boot test that runs a
//! command through the agent over virtio-serial. No `Provider` yet.
//!
//! The guest: QEMU `-M microvm -accel tcg -cpu max` (stock guests hang
//! under KVM on the hosts measured so far), Debian's cloud kernel, and an
//! initramfs whose `/init` is the static agent in guest mode
//! (`stacyvm-agent guest`). The agent serves on the virtio-serial port
//! [`AGENT_PORT`], which QEMU backs with a unix socket chardev on the host;
//! the handshake token travels on the kernel command line
//! (`stacyvm.token=<hex>`), the hostname likewise (`stacyvm.hostname=`).

pub mod kernel;
pub mod qemu;

#[cfg(test)]
mod tests;

/// The name of the agent's virtio-serial port.
pub const AGENT_PORT: &str = "org.stacyvm.agent";

/// Kernel command line of every guest (before the `stacyvm.*` values).
/// Under TCG on a loaded host the kernel hangs calibrating its TSC and
/// delay loop (no PIT, HPET or PM timer reference on `microvm`): giving it
/// the TSC frequency and loops-per-jiffy skips both. `panic=-1` with QEMU's
/// `-no-reboot` turns a guest panic into a QEMU exit.
pub const KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1 tsc_early_khz=2000000 lpj=4000000";
