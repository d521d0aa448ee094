//! One QEMU microVM and its agent: the lifecycle core a `Provider` will
//! wrap (not a `Provider` yet: no state dir, recovery, inventory or limits).
//!
//! [`QemuVm::boot`] starts `qemu-system-x86_64 -M microvm` under TCG with
//! the agent's virtio-serial port on a unix socket in `dir`, and returns
//! once the agent has answered the handshake. Dropping the [`QemuVm`] kills
//! QEMU; [`QemuVm::destroy`] kills and reaps it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stacyvm_core::{Error, Result};

use super::kernel::Kernel;
use crate::agent::AgentClient;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The guest's hostname (`stacyvm.hostname=`).
    pub hostname: String,
    pub memory_mb: u32,
    /// The handshake token (`stacyvm.token=`).
    pub token: Vec<u8>,
    /// How long the boot may take, QEMU start to handshake.
    pub boot_timeout: Duration,
}

/// A running microVM.
#[derive(Debug)]
pub struct QemuVm {
    child: tokio::process::Child,
    client: Arc<AgentClient>,
    console: PathBuf,
    /// QEMU start to agent handshake.
    pub boot_time: Duration,
}

impl QemuVm {
    /// Boots `kernel` with `initrd`; `dir` (which must exist) receives the
    /// agent socket and the serial console log (`console.log`).
    pub async fn boot(kernel: &Kernel, initrd: &Path, dir: &Path, spec: &VmSpec) -> Result<Self> {
        let sock = dir.join("agent.sock");
        let console = dir.join("console.log");
        let append = format!(
            "{} stacyvm.hostname={} stacyvm.token={}",
            super::KERNEL_ARGS,
            spec.hostname,
            hex::encode(&spec.token)
        );
        let started = Instant::now();
        let mut child = tokio::process::Command::new("qemu-system-x86_64")
            .args(["-M", "microvm", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", &spec.memory_mb.to_string()])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=agent",
                sock.display()
            ))
            .args([
                "-device",
                &format!("virtserialport,chardev=agent,name={}", super::AGENT_PORT),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::internal(format!("starting qemu-system-x86_64: {e}")))?;
        let deadline = started + spec.boot_timeout;
        // QEMU holds the host's bytes until the guest opens the port, so a
        // handshake waits for the boot; each attempt times out after 5 s.
        let client = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::internal(format!(
                    "qemu exited during boot ({status}); console: {}",
                    console.display()
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                return Err(Error::internal(format!(
                    "no agent handshake within {:?}; console: {}",
                    spec.boot_timeout,
                    console.display()
                )));
            }
            let Ok(stream) = tokio::net::UnixStream::connect(&sock).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            if let Ok(c) = AgentClient::handshake(stream, Some(&spec.token)).await {
                break c;
            }
        };
        Ok(Self {
            child,
            client,
            console,
            boot_time: started.elapsed(),
        })
    }

    /// The agent connection.
    pub fn client(&self) -> &Arc<AgentClient> {
        &self.client
    }

    /// The serial console log.
    pub fn console(&self) -> &Path {
        &self.console
    }

    /// Whether QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills QEMU and reaps it. Destroying a stopped VM is Ok.
    pub async fn destroy(mut self) -> Result<()> {
        let _ = self.child.start_kill();
        self.child
            .wait()
            .await
            .map(|_| ())
            .map_err(|e| Error::internal(format!("reaping qemu: {e}")))
    }
}
