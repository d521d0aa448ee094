//! The conformance suite through the custom provider, against the
//! reference backend (`examples/custom-provider/backend.py`, bubblewrap).
//!
//! The backend is started once per test process on a free loopback port
//! and exits when this process does: it watches its stdin, a pipe only this
//! process holds (`--exit-on-stdin-eof`), and keeps its state in a
//! temporary directory it removes on exit (`--ephemeral`). Sandboxed
//! commands die with it (`bwrap --die-with-parent`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};

use stacyvm_core::config::{CustomConfig, Dur, Secret};
use stacyvm_core::provider::Provider;

use crate::remote::http::CustomProvider;

const API_KEY: &str = "conformance-key";

/// The reference backend program.
pub fn backend_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/custom-provider/backend.py")
}

/// A running reference backend; killed when dropped (or when this process
/// exits, through its stdin).
pub struct Backend {
    child: Child,
    pub url: String,
}

impl Backend {
    /// Starts `backend.py` with `args` and waits for its address.
    pub fn start(args: &[&str]) -> Backend {
        let mut child = Command::new("python3")
            .arg(backend_script())
            .args(["--port", "0", "--exit-on-stdin-eof", "--api-key", API_KEY])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the reference backend (python3)");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("backend address");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("backend did not start: {line:?}"))
            .to_string();
        Backend { child, url }
    }

    pub fn provider(&self) -> CustomProvider {
        CustomProvider::from_config(&CustomConfig {
            enabled: true,
            name: "custom".into(),
            base_url: self.url.clone(),
            api_key: Secret::new(API_KEY),
            timeout: Dur::secs(120),
        })
        .expect("provider")
    }

    /// Stops the backend the way a service manager would (SIGTERM).
    pub fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Closing stdin makes it clean up and exit; kill is the fallback.
        drop(self.child.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shared() -> &'static Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    BACKEND.get_or_init(|| Backend::start(&["--ephemeral"]))
}

struct Fixture;

impl crate::conformance::Fixture for Fixture {
    fn supports_users(&self) -> bool {
        false
    }
    fn supports_watch(&self) -> bool {
        false
    }
    /// The custom-provider contract has no port stream.
    fn supports_connect(&self) -> bool {
        false
    }
    /// Nor archives.
    fn supports_archives(&self) -> bool {
        false
    }
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(shared().provider())
    }
    fn image(&self) -> String {
        "host".into()
    }
    fn survives_restart(&self) -> bool {
        // A new provider instance talks to the same backend.
        true
    }
    fn supports_pty(&self) -> bool {
        // The contract has no terminal.
        false
    }
}

crate::conformance_tests!(custom_bwrap, Fixture);

/// Sandboxes and their files survive a restart of the backend itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_backend_restart_keeps_sandboxes() {
    let state = tempfile::tempdir().expect("tmp");
    let dir = state.path().to_str().expect("utf-8").to_string();
    let first = Backend::start(&["--state-dir", &dir]);
    let p = first.provider();
    let id = crate::conformance::spawn(&p, "host").await;
    p.write_file(&id, "/workspace/keep.txt", b"kept", 0o640)
        .await
        .expect("write");
    first.stop();
    let second = Backend::start(&["--state-dir", &dir]);
    let p = second.provider();
    assert_eq!(p.status(&id).await.expect("status").state, "running");
    assert_eq!(
        p.read_file(&id, "/workspace/keep.txt").await.expect("read"),
        b"kept"
    );
    let r = crate::conformance::sh(
        &p,
        &id,
        "cat /workspace/keep.txt; stat -c %a /workspace/keep.txt",
    )
    .await;
    assert_eq!(r.stdout, "kept640\n");
    p.destroy(&id).await.expect("destroy");
}

/// Without the key the backend refuses, and the error says which setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_backend_requires_its_api_key() {
    let b = shared();
    let p = CustomProvider::from_config(&CustomConfig {
        enabled: true,
        base_url: b.url.clone(),
        api_key: Secret::new("wrong"),
        ..CustomConfig::default()
    })
    .expect("provider");
    let e = p.health().await.expect_err("wrong key");
    assert!(e.to_string().contains("providers.custom.api_key"), "{e}");
}
