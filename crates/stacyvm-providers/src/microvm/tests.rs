//! Boots a real microVM (QEMU TCG) and talks to its agent.
//!
//! Needs `qemu-system-x86_64`, `apt-get` (the kernel .deb is downloaded
//! once into the cache), `/bin/busybox` (static) and a static agent built
//! from this tree: `STACYVM_AGENT_PATH`, else
//! `/var/cache/stacyvm/agent/stacyvm-agent` (`scripts/build-agent DIR`).
//! Cache: `STACYVM_MICROVM_CACHE`, else `/var/cache/stacyvm/microvm`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stacyvm_core::provider::{ExecSpec, OutputChunk, SandboxIo, StreamKind};
use tokio::sync::mpsc;

use super::kernel;
use super::qemu::{QemuVm, VmSpec};
use crate::agent::AgentSession;

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
    let token: [u8; 16] = rand::random();
    let spec = VmSpec {
        hostname: "microvm-test".into(),
        memory_mb: 256,
        token: token.to_vec(),
        boot_timeout: Duration::from_secs(120),
    };
    let mut vm = QemuVm::boot(&kern, &initrd, dir.path(), &spec)
        .await
        .unwrap_or_else(|e| {
            let console = std::fs::read_to_string(dir.path().join("console.log"));
            panic!("boot: {e}; console:\n{}", console.unwrap_or_default())
        });
    eprintln!(
        "microvm: qemu start to agent handshake in {:?}",
        vm.boot_time
    );
    assert!(vm.is_running());

    let session = AgentSession::new("microvm-test", vm.client().clone());
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

    drop(session);
    vm.destroy().await.expect("destroy");
    let path = dir.path().to_path_buf();
    dir.close().expect("remove temp dir");
    assert!(std::fs::metadata(path).is_err());
}
