//! MicroVM sandboxes (issue 11), groundwork: the guest kernel and
//! initramfs ([`kernel`]) and a boot test that reaches the agent over
//! virtio-serial. No `Provider` yet.
//!
//! The guest: QEMU `-M microvm -accel tcg -cpu max` (stock guests hang
//! under KVM on the hosts measured so far), Debian's cloud kernel, and an
//! initramfs whose `/init` is the static agent in guest mode
//! (`stacyvm-agent guest`). The agent serves on the virtio-serial port
//! [`AGENT_PORT`], which QEMU backs with a unix socket chardev on the host;
//! the handshake token travels on the kernel command line
//! (`stacyvm.token=<hex>`), the hostname likewise (`stacyvm.hostname=`).

pub mod kernel;

#[cfg(test)]
mod tests;

/// The name of the agent's virtio-serial port.
pub const AGENT_PORT: &str = "org.stacyvm.agent";
