//! Boots a real microVM (QEMU TCG) and talks to its agent.
//!
//! Needs `qemu-system-x86_64`, `apt-get` (the kernel .deb is downloaded
//! once into the cache), `/bin/busybox` (static) and a static agent built
//! from this tree: `STACYVM_AGENT_PATH`, else
//! `/var/cache/stacyvm/agent/stacyvm-agent` (`scripts/build-agent DIR`).
//! Cache: `STACYVM_MICROVM_CACHE`, else `/var/cache/stacyvm/microvm`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use stacyvm_core::provider::{ExecSpec, OutputChunk, SandboxIo, StreamKind};
use tokio::sync::mpsc;

use super::kernel;
use crate::agent::{AgentClient, AgentSession};

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var(var)
        .ok()
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// The kernel, downloaded and unpacked once per cache.
fn cached_kernel(cache: &Path) -> kernel::Kernel {
    let package = kernel::resolve_package(kernel::KERNEL_PACKAGE).expect("resolve kernel package");
    let deb = kernel::fetch_deb(cache, &package).expect("fetch kernel deb");
    kernel::unpack(cache, &deb).expect("unpack kernel")
}

/// Kills QEMU when the test ends, however it ends.
struct Vm {
    child: tokio::process::Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_and_runs_echo_through_the_agent() {
    let agent = env_path(
        "STACYVM_AGENT_PATH",
        "/var/cache/stacyvm/agent/stacyvm-agent",
    );
    assert!(
        agent.is_file(),
        "static agent {} missing: run `scripts/build-agent /var/cache/stacyvm/agent`",
        agent.display()
    );
    let cache = env_path("STACYVM_MICROVM_CACHE", "/var/cache/stacyvm/microvm");
    let kern = tokio::task::spawn_blocking(move || cached_kernel(&cache))
        .await
        .expect("join");

    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initrd.cpio");
    kernel::build_initramfs(&agent, &kern, Some(Path::new("/bin/busybox")), &initrd)
        .expect("initramfs");
    let sock = dir.path().join("agent.sock");
    let console = dir.path().join("console.log");
    let token: [u8; 16] = rand::random();
    let append = format!(
        "{} stacyvm.hostname=microvm-test stacyvm.token={}",
        super::KERNEL_ARGS,
        hex::encode(token)
    );

    let started = Instant::now();
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "256"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kern.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
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
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let mut vm = Vm { child };

    // QEMU holds the host's bytes until the guest opens the port, so the
    // handshake waits for the boot; it times out after 5 s, so retry.
    let deadline = started + Duration::from_secs(120);
    let client = loop {
        assert!(
            vm.child.try_wait().expect("qemu status").is_none(),
            "qemu exited; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "no agent handshake in 120 s; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        let Ok(stream) = tokio::net::UnixStream::connect(&sock).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        match AgentClient::handshake(stream, Some(&token)).await {
            Ok(c) => break c,
            Err(e) => eprintln!("handshake: {e} (retrying)"),
        }
    };
    let boot = started.elapsed();
    eprintln!("microvm: qemu start to agent handshake in {boot:?}");

    let session = AgentSession::new("microvm-test", client);
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(16);
    let spec = ExecSpec {
        argv: vec!["echo".into(), "hello".into()],
        ..ExecSpec::default()
    };
    let collect = async move {
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            if c.stream == StreamKind::Stdout {
                out.extend_from_slice(&c.data);
            }
        }
        out
    };
    let (status, out) = tokio::join!(session.exec(&spec, tx), collect);
    let status = status.expect("exec echo");
    assert_eq!(status.code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "hello\n");

    let (tx, mut rx) = mpsc::channel::<OutputChunk>(16);
    let spec = ExecSpec {
        argv: vec!["cat".into(), "/proc/sys/kernel/hostname".into()],
        ..ExecSpec::default()
    };
    let collect = async move {
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            out.extend_from_slice(&c.data);
        }
        out
    };
    let (status, out) = tokio::join!(session.exec(&spec, tx), collect);
    assert_eq!(status.expect("exec cat").code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "microvm-test\n");

    vm.child.start_kill().expect("kill qemu");
    vm.child.wait().await.expect("reap qemu");
    drop(vm);
    let path = dir.path().to_path_buf();
    dir.close().expect("remove temp dir");
    assert!(std::fs::metadata(path).is_err());
}
