//! Docker provider tests against the real dockerd that `scripts/test`
//! installs and starts: the conformance suite on runc and gVisor, security
//! checks from inside a sandbox, adoption by a new provider instance, a
//! pull from a loopback registry, and bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{
    CreateImageOptionsBuilder, PushImageOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use chrono::Utc;
use futures::StreamExt;
use stacyvm_core::config::DockerConfig;
use stacyvm_core::provider::{Provider, SpawnSpec};
use stacyvm_core::{paths, ErrorKind};

use super::*;
use crate::conformance::{self, sh};

/// The image every docker test uses, built here from Debian's busybox-static.
pub const TEST_IMAGE: &str = "stacyvm-test/docker-busybox:1";

/// The static agent: `STACYVM_AGENT_PATH`, else where `scripts/test` puts it.
pub fn static_agent() -> PathBuf {
    let p = std::env::var("STACYVM_AGENT_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/stacyvm/agent/stacyvm-agent"),
            PathBuf::from,
        );
    assert!(
        p.is_file(),
        "static agent {} missing: run `scripts/build-agent /var/cache/stacyvm/agent` (docker tests bind-mount it into containers)",
        p.display()
    );
    p
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, path, data).expect("tar file");
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, path, std::io::empty())
        .expect("tar dir");
}

/// A root filesystem tar: busybox with its applets, a `sandbox` user (1000).
fn busybox_rootfs() -> Vec<u8> {
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin/", "etc/", "root/", "home/", "home/sandbox/"] {
        add_dir(&mut b, d, 0o755);
    }
    add_dir(&mut b, "tmp/", 0o1777);
    add_file(&mut b, "bin/busybox", &busybox, 0o755);
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("tar link");
    }
    add_file(
        &mut b,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/home/sandbox:/bin/sh\n",
        0o644,
    );
    add_file(&mut b, "etc/group", b"root:x:0:\nsandbox:x:1000:\n", 0o644);
    b.into_inner().expect("tar")
}

/// Imports [`TEST_IMAGE`] into the engine unless it is there (like `docker import`).
pub async fn ensure_test_image(d: &Docker) {
    if d.inspect_image(TEST_IMAGE).await.is_ok() {
        return;
    }
    let (repo, tag) = TEST_IMAGE.split_once(':').expect("tag");
    let opts = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .build();
    let mut s = d.create_image(
        Some(opts),
        Some(bollard::body_full(busybox_rootfs().into())),
        None,
    );
    while let Some(r) = s.next().await {
        r.expect("importing the busybox test image");
    }
}

pub struct Fixture {
    dir: tempfile::TempDir,
    pub config: DockerConfig,
    pub agent: PathBuf,
}

/// A fixture for `runtime` with the provider's defaults otherwise.
pub fn fixture(runtime: &str) -> Fixture {
    assert!(
        nix::unistd::geteuid().is_root(),
        "docker provider tests need root (CI runs as root)"
    );
    let config = DockerConfig {
        enabled: true,
        runtime: runtime.into(),
        default_image: TEST_IMAGE.into(),
        network_mode: "none".into(),
        // A network of the test's own, removed with the fixture.
        bridge_network: format!("svt-{}", paths::new_sandbox_id()),
        ..DockerConfig::default()
    };
    Fixture {
        dir: tempfile::tempdir().expect("tmp"),
        config,
        agent: static_agent(),
    }
}

impl Fixture {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("docker")
    }

    pub fn make(&self) -> DockerProvider {
        DockerProvider::new(DockerOptions::new(
            self.config.clone(),
            self.state_dir(),
            self.agent.clone(),
        ))
        .expect("docker provider")
    }

    /// A provider whose engine is reachable and has the test image.
    pub async fn ready(&self) -> DockerProvider {
        let p = self.make();
        let d = p
            .engine()
            .await
            .expect("dockerd must be running for docker tests (scripts/test starts it)");
        ensure_test_image(d).await;
        p
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Remove whatever a failed test left behind: containers whose host
        // dir lives in this fixture's state dir, and its sandbox network
        // with its iptables rules.
        let state = self.state_dir();
        let network = self.config.bridge_network.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(d) = Docker::connect_with_defaults() else {
                    return;
                };
                let Ok(d) = d.negotiate_version().await else {
                    return;
                };
                for c in leftovers(&state) {
                    let _ = d
                        .remove_container(
                            &c,
                            Some(
                                RemoveContainerOptionsBuilder::default()
                                    .force(true)
                                    .v(true)
                                    .build(),
                            ),
                        )
                        .await;
                }
                let bridge = d
                    .inspect_network(&network, None)
                    .await
                    .ok()
                    .and_then(|n| n.options)
                    .and_then(|o| o.get(net::OPT_BRIDGE_NAME).cloned());
                let _ = d.remove_network(&network).await;
                if let Some(bridge) = bridge {
                    net::remove_rules(&network, &bridge, &[], &net::host_resolvers());
                }
            });
        })
        .join();
    }
}

/// Sandboxes whose host dir is still under `state` (a destroyed sandbox
/// has none).
fn leftovers(state: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| paths::is_sandbox_id(n))
        .collect()
}

/// The suite gets a ready provider per call; `provider()` is sync, so the
/// image is ensured once when the fixture is made.
pub struct SuiteFixture(Fixture);

pub fn suite_fixture(runtime: &str) -> SuiteFixture {
    let fx = fixture(runtime);
    let p = fx.make();
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async {
                let d = p
                    .engine()
                    .await
                    .expect("dockerd must be running for docker tests (scripts/test starts it)");
                ensure_test_image(d).await;
                assert!(
                    p.has_runtime(runtime).await.expect("engine info"),
                    "docker runtime {runtime} is not registered (scripts/test registers runsc in /etc/docker/daemon.json)"
                );
            });
        })
        .join()
        .expect("setup");
    });
    SuiteFixture(fx)
}

impl conformance::Fixture for SuiteFixture {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.0.make())
    }
    fn supports_pause(&self) -> bool {
        true
    }
    fn image(&self) -> String {
        TEST_IMAGE.into()
    }
    fn survives_restart(&self) -> bool {
        true
    }
    fn supports_users(&self) -> bool {
        self.0
            .make()
            .capabilities()
            .iter()
            .any(|c| c == stacyvm_core::provider::capability::EXEC_USER)
    }
}

crate::conformance_tests!(docker_runc_conformance, suite_fixture("runc"));

/// With CAP_SETUID and CAP_SETGID added back, commands run as other
/// users (the default, which drops every capability, refuses with
/// `Unsupported`: the conformance case above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_as_user_with_setuid_caps() {
    for runtime in ["runc", "runsc"] {
        let mut fx = suite_fixture(runtime);
        fx.0.config.added_caps = vec!["SETUID".into(), "CAP_SETGID".into()];
        assert!(conformance::Fixture::supports_users(&fx), "{runtime}");
        conformance::exec_as_user(&fx).await;
    }
}
crate::conformance_tests!(docker_runsc_conformance, suite_fixture("runsc"));
// gVisor registered with `--host-uds=create`: the agent's socket reaches
// the host, so no relay exec is needed (scripts/test registers both).
crate::conformance_tests!(
    docker_runsc_hostuds_conformance,
    suite_fixture("runsc-hostuds")
);

fn spawn_spec(image: &str, memory_mb: i64) -> SpawnSpec {
    SpawnSpec {
        id: paths::new_sandbox_id(),
        image: image.to_string(),
        memory_mb,
        vcpus: 1,
        metadata: BTreeMap::from([("purpose".to_string(), "test".to_string())]),
        owner_id: "alice".into(),
        tenant_id: "acme".into(),
        expires_at: Utc::now() + chrono::Duration::minutes(10),
        network_mode: String::new(),
        snapshot: None,
        egress: None,
        volumes: Vec::new(),
    }
}

/// Asserts no container of this sandbox id exists (nothing half-created).
async fn assert_no_container(p: &DockerProvider, id: &str) {
    let d = p.engine().await.expect("engine");
    assert!(
        d.inspect_container(id, None).await.is_err(),
        "container {id} was left behind"
    );
}

async fn security_checks(runtime: &str) {
    let mut fx = fixture(runtime);
    fx.config.pids_limit = 64;
    let p = fx.ready().await;
    let spec = spawn_spec(TEST_IMAGE, 64);
    let id = p.spawn(&spec).await.expect("spawn").runtime_id;
    // No capabilities, no new privileges.
    let st = sh(
        &p,
        &id,
        "grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status",
    )
    .await;
    assert!(st.stdout.contains("CapEff:\t0000000000000000"), "{st:?}");
    assert!(st.stdout.contains("CapPrm:\t0000000000000000"), "{st:?}");
    if runtime == "runc" {
        // gVisor's /proc has no NoNewPrivs line (runsc sets it on the sandbox).
        assert!(st.stdout.contains("NoNewPrivs:\t1"), "{st:?}");
    }
    // Root without capabilities cannot do privileged things.
    let r = sh(&p, &id, "mount -t tmpfs none /mnt 2>&1; echo rc=$?").await;
    assert!(!r.stdout.contains("rc=0"), "mount must fail: {r:?}");
    // No network in `none` mode: loopback only.
    let net = sh(&p, &id, "ls /sys/class/net").await;
    assert_eq!(
        net.stdout.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{net:?}"
    );
    // A 16 MiB buffer fits; stats report the limit.
    let ok = sh(
        &p,
        &id,
        "dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null; echo rc=$?",
    )
    .await;
    assert!(ok.stdout.contains("rc=0"), "{ok:?}");
    let stats = p.stats(&id).await.expect("stats");
    assert_eq!(stats.mem_limit_bytes, 64 * 1024 * 1024);
    if runtime == "runsc" {
        // gVisor enforces the limits on the sandbox as a whole: exceeding
        // one ends the sandbox. The provider must say so, not hang.
        // 64 + the sentry's allowance (512): 1000 processes exceed it.
        let bomb = conformance::run_spec(&p, &id, fork_bomb(1000)).await;
        assert!(
            bomb.as_ref()
                .map_or(true, |r| !r.stdout.contains("all-started")),
            "pids limit holds: {bomb:?}"
        );
        await_stopped(&p, &id).await;
        p.destroy(&id).await.expect("destroy");
        let id = p
            .spawn(&spawn_spec(TEST_IMAGE, 64))
            .await
            .expect("spawn")
            .runtime_id;
        let big = conformance::run_spec(&p, &id, hog_memory()).await;
        assert!(
            big.as_ref().map_or(true, |r| r.code != 0),
            "memory limit holds: {big:?}"
        );
        await_stopped(&p, &id).await;
        let d = p.engine().await.expect("engine");
        // The engine records the exit and the OOM event separately; on a
        // loaded machine the exit can be recorded first, and the flag
        // follows shortly after.
        let mut st = None;
        for _ in 0..100 {
            let s = d
                .inspect_container(&id, None)
                .await
                .expect("inspect")
                .state
                .expect("state");
            let done = s.oom_killed == Some(true);
            st = Some(s);
            if done {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let st = st.expect("state");
        assert_eq!(st.oom_killed, Some(true), "{st:?}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    // runc: forking 300 sleeps fails part way; the agent survives.
    let bomb = conformance::run_spec(&p, &id, fork_bomb(300))
        .await
        .expect("exec");
    assert!(
        !bomb.stdout.contains("all-started"),
        "pids limit holds: {bomb:?}"
    );
    assert!(bomb.stderr.contains("fork"), "fork failed: {bomb:?}");
    // One process (no shell) frees the pids again. While every pid is held
    // the agent answers with a typed ResourceLimit (never a hang); the
    // bomb's own exec frees its pids as it winds down, so a caller retrying
    // gets through.
    let kill = stacyvm_core::provider::ExecSpec {
        argv: vec!["kill".into(), "-9".into(), "-1".into()],
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let mut attempts = 0;
    loop {
        match conformance::run_spec(&p, &id, kill.clone()).await {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::ResourceLimit && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("kill after the fork bomb: {e:?}"),
        }
    }
    assert_eq!(sh(&p, &id, "echo recovered").await.stdout, "recovered\n");
    // A 128 MiB buffer is OOM-killed; the sandbox lives on.
    let big = conformance::run_spec(&p, &id, hog_memory())
        .await
        .expect("exec");
    assert_eq!(big.code, 137, "the OOM killer ends the process: {big:?}");
    assert_eq!(sh(&p, &id, "echo alive").await.stdout, "alive\n");
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_from_inside_runc() {
    security_checks("runc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_from_inside_runsc() {
    security_checks("runsc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_root_keeps_a_writable_workspace() {
    let mut fx = fixture("runc");
    fx.config.read_only_rootfs = true;
    fx.config.tmpfs = BTreeMap::from([("/tmp".to_string(), "size=16m".to_string())]);
    let p = fx.ready().await;
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    let r = sh(&p, &id, "touch /rootfile 2>&1; echo rc=$?").await;
    assert!(r.stdout.contains("Read-only file system"), "{r:?}");
    assert!(!r.stdout.contains("rc=0"), "{r:?}");
    p.write_file(&id, "/workspace/a.txt", b"ok", 0o644)
        .await
        .expect("workspace is writable");
    assert_eq!(
        sh(&p, &id, "cat a.txt; touch /tmp/t && echo tmp-ok")
            .await
            .stdout,
        "oktmp-ok\n"
    );
    p.destroy(&id).await.expect("destroy");
    // With a non-root user the workspace is still writable.
    fx.config.user = "sandbox".into();
    let p = fx.make();
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    p.write_file(&id, "/workspace/b.txt", b"x", 0o644)
        .await
        .expect("write as sandbox");
    assert_eq!(
        sh(&p, &id, "id -u; stat -c %u b.txt").await.stdout,
        "1000\n1000\n"
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_user_owns_its_files() {
    let mut fx = fixture("runc");
    fx.config.user = "sandbox".into();
    let p = fx.ready().await;
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    assert_eq!(
        sh(&p, &id, "id -u; id -g; pwd; echo $HOME").await.stdout,
        "1000\n1000\n/workspace\n/home/sandbox\n"
    );
    // Files written through the API belong to the container user, who can
    // change them (gaps C-15), in the workspace and in new directories.
    p.write_file(&id, "/workspace/sub/f.txt", b"api\n", 0o644)
        .await
        .expect("write");
    let r = sh(
        &p,
        &id,
        "echo user >> sub/f.txt && cat sub/f.txt && stat -c '%u:%g' sub sub/f.txt",
    )
    .await;
    assert_eq!(r.stdout, "api\nuser\n1000:1000\n1000:1000\n", "{r:?}");
    // Outside its own files the user has no rights.
    let e = p
        .write_file(&id, "/etc/passwd", b"x", 0o644)
        .await
        .expect_err("not writable");
    assert_eq!(e.kind(), ErrorKind::Forbidden, "{e}");
    p.destroy(&id).await.expect("destroy");
    // A numeric uid that the image does not know works too.
    fx.config.user = "4242:4242".into();
    let p = fx.make();
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    assert_eq!(
        sh(&p, &id, "id -u; touch x && stat -c %u x").await.stdout,
        "4242\n4242\n"
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_after_restart() {
    let fx = fixture("runc");
    let first = fx.ready().await;
    let spec = spawn_spec(TEST_IMAGE, 64);
    let id = first.spawn(&spec).await.expect("spawn").runtime_id;
    sh(&first, &id, "echo state > kept.txt").await;
    drop(first);
    // A new instance (a restarted server) finds it through its labels.
    let second = fx.make();
    let rts = second.list_runtimes().await.expect("inventory");
    let rt = rts.iter().find(|r| r.sandbox_id == id).expect("listed");
    assert_eq!(rt.state, "running");
    assert_eq!(rt.image, TEST_IMAGE);
    assert_eq!(rt.owner_id, "alice");
    assert_eq!(rt.tenant_id, "acme");
    assert_eq!(rt.metadata["purpose"], "test");
    assert_eq!(
        rt.expires_at.map(|t| t.timestamp()),
        Some(spec.expires_at.timestamp())
    );
    assert!(rt.created_at.is_some());
    assert_eq!(sh(&second, &id, "cat kept.txt").await.stdout, "state\n");
    // A server with another data dir finds the socket through the mount.
    let moved = fixture("runc");
    let elsewhere = moved.make();
    assert_eq!(sh(&elsewhere, &id, "cat kept.txt").await.stdout, "state\n");
    drop(elsewhere);
    // A stopped container is listed as stopped (the orchestrator decides).
    let d = second.engine().await.expect("engine");
    d.kill_container(&id, None::<bollard::query_parameters::KillContainerOptions>)
        .await
        .expect("kill");
    let third = fx.make();
    assert_eq!(third.status(&id).await.expect("status").state, "stopped");
    let listed = third.list_runtimes().await.expect("inventory");
    assert_eq!(
        listed
            .iter()
            .find(|r| r.sandbox_id == id)
            .map(|r| r.state.as_str()),
        Some("stopped")
    );
    assert_eq!(
        sh_err(&third, &id).await,
        ErrorKind::ProviderUnavailable,
        "exec on a stopped sandbox says why"
    );
    third.destroy(&id).await.expect("destroy");
    assert_eq!(
        third.status(&id).await.expect_err("gone").kind(),
        ErrorKind::SandboxNotFound
    );
    assert!(!third
        .list_runtimes()
        .await
        .expect("inventory")
        .iter()
        .any(|r| r.sandbox_id == id));
    assert!(!fx.state_dir().join(&id).exists(), "host state removed");
    third.destroy(&id).await.expect("destroying twice is Ok");
}

/// Forks `n` sleeps, then says so.
fn fork_bomb(n: u32) -> stacyvm_core::provider::ExecSpec {
    stacyvm_core::provider::ExecSpec {
        argv: paths::build_argv(
            "shell",
            &format!("for i in $(seq 1 {n}); do sleep 30 & done; echo all-started"),
            &[],
        )
        .expect("argv"),
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    }
}

fn hog_memory() -> stacyvm_core::provider::ExecSpec {
    stacyvm_core::provider::ExecSpec {
        argv: paths::build_argv("shell", "dd if=/dev/zero of=/dev/null bs=128M count=1", &[])
            .expect("argv"),
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    }
}

/// Waits (bounded) until the sandbox's container has stopped.
async fn await_stopped(p: &DockerProvider, id: &str) {
    let mut state = String::new();
    for _ in 0..300 {
        state = p.status(id).await.expect("status").state;
        if state == "stopped" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("sandbox {id} still {state}");
}

async fn sh_err(p: &DockerProvider, id: &str) -> ErrorKind {
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let spec = stacyvm_core::provider::ExecSpec {
        argv: vec!["true".into()],
        ..Default::default()
    };
    p.exec(id, &spec, tx).await.expect_err("exec fails").kind()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_containers_are_not_touched() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let d = p.engine().await.expect("engine");
    // A container named like a sandbox but not created by StacyVM.
    let name = paths::new_sandbox_id();
    let body = ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        cmd: Some(vec!["sleep".into(), "60".into()]),
        ..Default::default()
    };
    d.create_container(
        Some(CreateContainerOptionsBuilder::default().name(&name).build()),
        body,
    )
    .await
    .expect("create");
    assert_eq!(
        p.status(&name).await.expect_err("not ours").kind(),
        ErrorKind::SandboxNotFound
    );
    // A spawn that collides with it fails and leaves it alone.
    let mut spec = spawn_spec(TEST_IMAGE, 64);
    spec.id = name.clone();
    let e = p.spawn(&spec).await.expect_err("name taken");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(
        d.inspect_container(&name, None).await.is_ok(),
        "still there"
    );
    p.destroy(&name).await.expect("destroy is Ok");
    assert!(
        d.inspect_container(&name, None).await.is_ok(),
        "still there"
    );
    assert!(!p
        .list_runtimes()
        .await
        .expect("inventory")
        .iter()
        .any(|r| r.sandbox_id == name));
    d.remove_container(
        &name,
        Some(RemoveContainerOptionsBuilder::default().force(true).build()),
    )
    .await
    .expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_by_the_agent() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    // The background sleeps outlive their shell and are re-parented to the
    // agent (PID 1), which must reap them.
    sh(&p, &id, "for i in 1 2 3; do (sleep 0.05 &) ; done; true").await;
    let zombies =
        "for f in /proc/[0-9]*/stat; do cat $f 2>/dev/null; echo; done | grep -c ') Z' || true";
    let mut left = String::new();
    for _ in 0..100 {
        left = sh(&p, &id, zombies).await.stdout.trim().to_string();
        if left == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, "0", "no zombies remain");
    assert_eq!(
        sh(&p, &id, "cat /proc/1/cmdline | tr '\\0' ' '")
            .await
            .stdout
            .trim(),
        "/.stacyvm/agent serve --socket /.stacyvm/run/agent.sock --token-file /proc/self/fd/0"
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_engine_and_runtimes() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    p.health().await.expect("healthy");
    let desc = p.describe();
    assert_eq!(desc["runtime"], "runc");
    assert!(desc.contains_key("api_version"), "{desc:?}");
    let mut bad = fixture("no-such-runtime");
    bad.config.runtime = "no-such-runtime".into();
    let e = bad.make().health().await.expect_err("unknown runtime");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable);
    assert!(
        e.to_string().contains("no-such-runtime") && e.to_string().contains("runc"),
        "{e}"
    );
    let mut gone = fixture("runc");
    gone.config.socket = "/nonexistent/docker.sock".into();
    let gp = gone.make();
    let e = gp.health().await.expect_err("unreachable");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    let e = gp
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect_err("unreachable");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
}

/// `host` (the orchestrator's default image) and no image both mean the
/// provider's `default_image`: a container cannot show the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_no_image_mean_the_default_image() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    for image in ["host", ""] {
        let spec = spawn_spec(image, 64);
        let id = p.spawn(&spec).await.expect("spawn").runtime_id;
        let d = p.engine().await.expect("engine");
        let c = d.inspect_container(&id, None).await.expect("inspect");
        assert_eq!(
            c.config.and_then(|c| c.image).as_deref(),
            Some(TEST_IMAGE),
            "image {image:?}"
        );
        p.destroy(&id).await.expect("destroy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_typed_and_leaves_nothing_behind() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    // Unknown runtime.
    let mut rfx = fixture("runc");
    rfx.config.runtime = "no-such-runtime".into();
    let rp = rfx.make();
    let spec = spawn_spec(TEST_IMAGE, 64);
    let e = rp.spawn(&spec).await.expect_err("unknown runtime");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("no-such-runtime"), "{e}");
    assert_no_container(&p, &spec.id).await;
    assert!(!rfx.state_dir().join(&spec.id).exists());
    // Image names with bad syntax never reach the engine.
    for bad in ["Bad/Name", "bad//name", "name:", "x@sha256:zz"] {
        let spec = spawn_spec(bad, 64);
        let e = p.spawn(&spec).await.expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(e.to_string().contains("invalid image reference"), "{e}");
    }
    // Memory below the engine's minimum.
    let spec = spawn_spec(TEST_IMAGE, 1);
    let e = p.spawn(&spec).await.expect_err("tiny memory");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().to_lowercase().contains("memory"), "{e}");
    assert_no_container(&p, &spec.id).await;
    // More CPUs than the host has.
    let mut spec = spawn_spec(TEST_IMAGE, 64);
    spec.vcpus = 4096;
    let e = p.spawn(&spec).await.expect_err("too many cpus");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_no_container(&p, &spec.id).await;
    // A user the image does not have.
    let mut ufx = fixture("runc");
    ufx.config.user = "nobody-here".into();
    let spec = spawn_spec(TEST_IMAGE, 64);
    let e = ufx.make().spawn(&spec).await.expect_err("unknown user");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("nobody-here"), "{e}");
    assert_no_container(&p, &spec.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_dying_at_start_reports_its_last_log_lines() {
    let mut fx = fixture("runc");
    // An "agent" that logs and exits: what a broken entrypoint looks like.
    let fake = fx.dir.path().join("dying-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho starting up\necho 'fatal: cannot continue' >&2\nexit 3\n",
    )
    .expect("script");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    fx.agent = fake;
    let p = fx.ready().await;
    let spec = spawn_spec(TEST_IMAGE, 64);
    let e = p.spawn(&spec).await.expect_err("dies");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("exit code 3"), "{msg}");
    assert!(
        msg.contains("starting up") && msg.contains("fatal: cannot continue"),
        "{msg}"
    );
    assert_no_container(&p, &spec.id).await;
    assert!(!fx.state_dir().join(&spec.id).exists());
}

/// A loopback `docker-registry` with filesystem storage in a temp dir.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().expect("tmp");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("config");
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        // Wait until it accepts connections.
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Registry {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_registry_and_reports_missing_images() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let d = p.engine().await.expect("engine");
    let reg = Registry::start();
    let repo = format!("localhost:{}/stacyvm-test/pulled", reg.port);
    let tag = paths::new_sandbox_id();
    let image = format!("{repo}:{tag}");
    d.tag_image(
        TEST_IMAGE,
        Some(
            TagImageOptionsBuilder::default()
                .repo(&repo)
                .tag(&tag)
                .build(),
        ),
    )
    .await
    .expect("tag");
    let mut push = d.push_image(
        &repo,
        Some(PushImageOptionsBuilder::default().tag(&tag).build()),
        None,
    );
    while let Some(r) = push.next().await {
        let info = r.expect("push");
        assert!(info.error_detail.is_none(), "push failed: {info:?}");
    }
    // Only the registry has it now.
    d.remove_image(
        &image,
        None::<bollard::query_parameters::RemoveImageOptions>,
        None,
    )
    .await
    .expect("untag");
    assert!(d.inspect_image(&image).await.is_err());
    let spec = spawn_spec(&image, 64);
    let id = p.spawn(&spec).await.expect("spawn pulls").runtime_id;
    assert_eq!(sh(&p, &id, "echo pulled").await.stdout, "pulled\n");
    let rts = p.list_runtimes().await.expect("inventory");
    assert_eq!(
        rts.iter()
            .find(|r| r.sandbox_id == id)
            .map(|r| r.image.clone()),
        Some(image.clone())
    );
    p.destroy(&id).await.expect("destroy");
    // A tag the registry does not have: the engine's reason, a 400.
    let spec = spawn_spec(&format!("{repo}:missing"), 64);
    let e = p.spawn(&spec).await.expect_err("missing tag");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    assert_no_container(&p, &spec.id).await;
    // A registry that is down: unavailable, with the reason.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let dead_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let spec = spawn_spec(&format!("localhost:{dead_port}/nothing:1"), 64);
    let e = p.spawn(&spec).await.expect_err("registry down");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    assert!(e.to_string().contains("connection refused"), "{e}");
    let _ = d
        .remove_image(
            &image,
            Some(RemoveImageOptionsBuilder::default().force(true).build()),
            None,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_does_not_answer_is_a_typed_timeout() {
    let mut fx = fixture("runc");
    // A socket that accepts connections and never answers.
    let sock = fx.dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().take(4) {
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    fx.config.socket = sock.to_string_lossy().to_string();
    let mut opts = DockerOptions::new(fx.config.clone(), fx.state_dir(), fx.agent.clone());
    opts.engine_timeout = Duration::from_secs(1);
    let p = DockerProvider::new(opts).expect("provider");
    let e = p.health().await.expect_err("no answer");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    assert!(e.to_string().contains("did not answer in time"), "{e}");
    let e = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect_err("no answer");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    drop(holder);
}

#[test]
fn gvisor_gets_a_pids_allowance_for_its_sentry() {
    assert_eq!(pids_cgroup_limit(64, "runc"), 64);
    assert_eq!(pids_cgroup_limit(0, "runc"), 256);
    assert_eq!(pids_cgroup_limit(-5, "kata"), 256);
    assert_eq!(pids_cgroup_limit(64, "runsc"), 64 + GVISOR_PIDS_ALLOWANCE);
    assert_eq!(
        pids_cgroup_limit(0, "runsc-kvm"),
        256 + GVISOR_PIDS_ALLOWANCE
    );
}

/// Kata is not packaged in Debian: where dockerd has a Kata runtime the
/// suite's basics run on it (through the relay); elsewhere health must say
/// that the configured runtime is missing and how to add it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kata_where_present_otherwise_health_explains() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let info = p
        .engine()
        .await
        .expect("engine")
        .info()
        .await
        .expect("info");
    let kata = info
        .runtimes
        .unwrap_or_default()
        .into_keys()
        .find(|r| r.contains("kata"));
    let mut kfx = fixture("runc");
    kfx.config.runtime = kata.clone().unwrap_or_else(|| "kata-runtime".into());
    let kp = kfx.make();
    match kata {
        Some(_) => {
            kp.health().await.expect("kata registered");
            let id = kp
                .spawn(&spawn_spec(TEST_IMAGE, 256))
                .await
                .expect("spawn")
                .runtime_id;
            assert_eq!(sh(&kp, &id, "echo kata").await.stdout, "kata\n");
            kp.destroy(&id).await.expect("destroy");
        }
        None => {
            let e = kp.health().await.expect_err("kata missing");
            assert_eq!(e.kind(), ErrorKind::ProviderUnavailable);
            let msg = e.to_string();
            assert!(
                msg.contains("kata-runtime") && msg.contains("/etc/docker/daemon.json"),
                "{msg}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_knobs_reach_the_container() {
    let mut fx = fixture("runc");
    // A seccomp profile (the provider sends the file's JSON) that denies mkdir.
    let profile = fx.dir.path().join("seccomp.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .expect("profile");
    fx.config.seccomp_profile = profile.to_string_lossy().to_string();
    fx.config.added_caps = vec!["CHOWN".into()];
    fx.config.network_mode = "bridge".into();
    let p = fx.ready().await;
    let mut spec = spawn_spec(TEST_IMAGE, 64);
    spec.vcpus = 1;
    let id = p.spawn(&spec).await.expect("spawn").runtime_id;
    let r = sh(&p, &id, "mkdir /workspace/d 2>&1; echo rc=$?").await;
    assert!(r.stdout.contains("Operation not permitted"), "{r:?}");
    let r = sh(&p, &id, "grep CapEff /proc/self/status; ls /sys/class/net | sort | tr '\\n' ' '; cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us").await;
    assert!(
        r.stdout.contains("CapEff:\t0000000000000001"),
        "only CHOWN: {r:?}"
    );
    assert!(r.stdout.contains("eth0 lo"), "bridge mode has eth0: {r:?}");
    assert!(
        r.stdout.contains("100000\n100000"),
        "one CPU of quota: {r:?}"
    );
    p.destroy(&id).await.expect("destroy");
    // A spawn's own network mode wins over the configured one.
    let mut spec = spawn_spec(TEST_IMAGE, 64);
    spec.network_mode = "none".into();
    let id = p.spawn(&spec).await.expect("spawn").runtime_id;
    assert_eq!(sh(&p, &id, "ls /sys/class/net").await.stdout, "lo\n");
    p.destroy(&id).await.expect("destroy");
    // An unreadable profile is a configuration error, before any container exists.
    fx.config.seccomp_profile = "/nonexistent/profile.json".into();
    let spec = spawn_spec(TEST_IMAGE, 64);
    let e = fx.make().spawn(&spec).await.expect_err("no profile");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("seccomp_profile"), "{e}");
    assert_no_container(&p, &spec.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_transport_follows_the_runtime_registration() {
    assert!(args_share_sockets(&[
        "--network=none".into(),
        "--host-uds=create".into()
    ]));
    assert!(!args_share_sockets(&["--network=none".into()]));
    for (runtime, transport) in [
        ("runc", "agent socket"),
        ("runsc", "agent relay over engine exec"),
        ("runsc-hostuds", "agent socket (host-uds)"),
    ] {
        let fx = fixture(runtime);
        let p = fx.ready().await;
        p.health().await.expect("healthy");
        assert_eq!(p.describe()["exec_transport"], transport, "{runtime}");
        let id = p
            .spawn(&spawn_spec(TEST_IMAGE, 128))
            .await
            .expect("spawn")
            .runtime_id;
        let host_sock = run_dir(&p, &id).await.join("agent.sock");
        assert_eq!(
            host_sock.exists(),
            runtime != "runsc",
            "{runtime}: socket visible on the host"
        );
        assert_eq!(sh(&p, &id, "echo ok").await.stdout, "ok\n");
        p.destroy(&id).await.expect("destroy");
    }
}

/// The host side of a sandbox's `/.stacyvm/run`.
async fn run_dir(p: &DockerProvider, id: &str) -> PathBuf {
    let info = p
        .engine()
        .await
        .expect("engine")
        .inspect_container(id, None)
        .await
        .expect("inspect");
    run_dir_of(&info).expect("run mount")
}

/// Forgets the cached agent connection, as a lost connection or a server
/// restart would.
fn drop_connection(p: &DockerProvider, id: &str) {
    p.conns.lock().expect("conns").remove(id);
}

/// Runs `script` on the host as `nobody`; returns its stdout and stderr.
fn as_nobody(script: &str) -> String {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/bin/sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv (util-linux)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// F-3 and F-8: host state is root's alone, the run dir is a small tmpfs
/// without setuid owned by the container user, a setuid file written into
/// it through the API is out of reach of other host users, the container
/// log rotates, and tmpfs mounts are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_state_is_private_and_bounded() {
    let mut fx = fixture("runc");
    fx.config.user = "sandbox".into();
    fx.config.tmpfs = BTreeMap::from([("/tmp".to_string(), String::new())]);
    // The data dir as an operator may leave it: traversable by everyone.
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let p = fx.ready().await;
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&fx.state_dir()), 0o700, "<data>/docker");
    assert_eq!(mode(&fx.state_dir().join(&id)), 0o700, "<data>/docker/<id>");
    let run = run_dir(&p, &id).await;
    let meta = std::fs::metadata(&run).expect("run dir");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "run dir");
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::MetadataExt::gid(&meta)
        ),
        (1000, 1000),
        "the run dir belongs to the container user"
    );
    // A setuid binary planted through the API.
    p.write_file(&id, "/.stacyvm/run/s", b"#!/bin/sh\nid -u\n", 0o4755)
        .await
        .expect("write");
    let planted = run.join("s");
    let seen = as_nobody(&format!(
        "{} id -u && echo REACHED; ls -l {} && echo LISTED; true",
        planted.display(),
        planted.display()
    ));
    assert!(
        !seen.contains("REACHED") && !seen.contains("LISTED"),
        "a host user reached the planted file: {seen}"
    );
    // Inside: the run dir is a 1 MiB tmpfs without setuid, devices or exec.
    let r = sh(
        &p,
        &id,
        "grep ' /.stacyvm/run ' /proc/mounts; dd if=/dev/zero of=/.stacyvm/run/fill bs=1M count=8 2>&1; echo rc=$?; rm -f /.stacyvm/run/fill /.stacyvm/run/s; grep ' /tmp ' /proc/mounts",
    )
    .await;
    let run_line = r.stdout.lines().next().unwrap_or_default();
    for opt in ["tmpfs", "nosuid", "nodev", "noexec", "size=1024k"] {
        assert!(run_line.contains(opt), "{opt}: {r:?}");
    }
    assert!(
        r.stdout.contains("No space left"),
        "run dir is capped: {r:?}"
    );
    assert!(!r.stdout.contains("rc=0"), "{r:?}");
    let tmp_line = r.stdout.lines().last().unwrap_or_default();
    assert!(
        tmp_line.contains("size=65536k") && tmp_line.contains("nosuid"),
        "configured tmpfs gets a cap: {r:?}"
    );
    // The container log rotates; the writable layer cap follows the driver.
    let info = p
        .engine()
        .await
        .expect("engine")
        .inspect_container(&id, None)
        .await
        .expect("inspect");
    let hc = info.host_config.expect("host config");
    let log = hc.log_config.expect("log config");
    assert_eq!(log.typ.as_deref(), Some("json-file"));
    let lc = log.config.unwrap_or_default();
    assert_eq!(lc.get("max-size").map(String::as_str), Some(LOG_MAX_SIZE));
    assert_eq!(lc.get("max-file").map(String::as_str), Some(LOG_MAX_FILES));
    assert_eq!(
        hc.storage_opt.is_some_and(|o| o.contains_key("size")),
        p.layer_quota().await,
        "storage_opt only where the driver honours it"
    );
    // Removed out of band without its volumes: destroy still finds the
    // run dir volume by its label.
    let d = p.engine().await.expect("engine");
    d.remove_container(
        &id,
        Some(RemoveContainerOptionsBuilder::default().force(true).build()),
    )
    .await
    .expect("docker rm");
    p.destroy(&id).await.expect("destroy");
    assert!(!fx.state_dir().join(&id).exists());
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{}={id}", spec::LABEL_SANDBOX)],
    )]);
    let vols = d
        .list_volumes(Some(
            bollard::query_parameters::ListVolumesOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("volumes");
    assert!(
        vols.volumes.unwrap_or_default().is_empty(),
        "run dir volume left"
    );
}

/// F-4: a sandbox that points its agent socket at another sandbox's gets
/// an error, never the other sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_agent_socket_never_reaches_another_sandbox() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let a = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn a")
        .runtime_id;
    let b = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn b")
        .runtime_id;
    sh(&p, &b, "echo b-secret > /workspace/secret").await;
    let b_sock = run_dir(&p, &b).await.join("agent.sock");
    let r = sh(
        &p,
        &a,
        &format!(
            "rm /.stacyvm/run/agent.sock && ln -s {} /.stacyvm/run/agent.sock && echo swapped",
            b_sock.display()
        ),
    )
    .await;
    assert_eq!(r.stdout, "swapped\n", "{r:?}");
    // The next call reconnects: through this provider and a restarted one.
    drop_connection(&p, &a);
    let restarted = fx.make();
    for prov in [&p, &restarted] {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let spec = stacyvm_core::provider::ExecSpec {
            argv: paths::build_argv("shell", "hostname; cat /workspace/secret", &[]).expect("argv"),
            timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let res = prov.exec(&a, &spec, tx).await;
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            out.extend_from_slice(&c.data);
        }
        let out = String::from_utf8_lossy(&out).to_string();
        assert!(
            !out.contains(&b) && !out.contains("b-secret"),
            "sandbox A reached sandbox B: {out}"
        );
        let e = res.expect_err("the swapped socket is refused");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    }
    // B is untouched.
    assert_eq!(
        sh(&p, &b, "cat /workspace/secret").await.stdout,
        "b-secret\n"
    );
    p.destroy(&a).await.expect("destroy");
    p.destroy(&b).await.expect("destroy");
}

/// A stand-in "agent" bound at `path`: `garbage` floods bytes, otherwise it
/// accepts and never answers. Stops when `stop` is set.
fn fake_agent(
    path: &Path,
    garbage: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind fake agent");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !stop.load(std::sync::atomic::Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            if let Ok((mut c, _)) = listener.accept() {
                if garbage {
                    let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
                    let junk = vec![0xffu8; 1 << 20];
                    for _ in 0..64 {
                        if c.write_all(&junk).is_err() {
                            break;
                        }
                    }
                }
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// F-11: a sandbox whose socket is a stand-in that never answers (or floods
/// garbage) gets a typed error in bounded time, and another sandbox's
/// calls go on meanwhile, also through a restarted provider that must
/// reconnect to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_stalls_nobody_else() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let a = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn a")
        .runtime_id;
    let b = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn b")
        .runtime_id;
    let a_sock = run_dir(&p, &a).await.join("agent.sock");
    for garbage in [false, true] {
        sh(&p, &a, "rm -f /.stacyvm/run/agent.sock").await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fake = fake_agent(&a_sock, garbage, stop.clone());
        let restarted = Arc::new(fx.make());
        let started = std::time::Instant::now();
        let on_a = {
            let (prov, a) = (restarted.clone(), a.clone());
            tokio::spawn(async move {
                let (tx, _rx) = tokio::sync::mpsc::channel(8);
                let spec = stacyvm_core::provider::ExecSpec {
                    argv: vec!["true".into()],
                    ..Default::default()
                };
                prov.exec(&a, &spec, tx).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(3), sh(&*restarted, &b, "echo b-ok"))
            .await
            .expect("sandbox B is not held up by A's agent");
        assert_eq!(r.stdout, "b-ok\n");
        assert!(t.elapsed() < Duration::from_secs(3));
        let e = on_a
            .await
            .expect("join")
            .expect_err("the stand-in is refused");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
        assert!(
            started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2),
            "bounded: {:?}",
            started.elapsed()
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        fake.join().expect("fake agent");
        let _ = std::fs::remove_file(&a_sock);
    }
    p.destroy(&a).await.expect("destroy");
    p.destroy(&b).await.expect("destroy");
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// "The outside" for egress tests: a network namespace behind a veth, with
/// a private address and the cloud metadata address, routed from the
/// host, and a TCP listener on port 8080 that answers `reached`.
struct Outside {
    ns: String,
    host_if: String,
    private: String,
    /// A globally routable-looking address (no blocked range), routed to
    /// the namespace by a host route for it alone.
    public: String,
    listener: std::process::Child,
    dns: Option<std::process::Child>,
    metadata: bool,
}

const METADATA: &str = "169.254.169.254";

impl Outside {
    /// With a host route to the metadata address (one test at a time may
    /// hold it: the route is the host's).
    fn start() -> Outside {
        Outside::start_with(true)
    }

    fn start_with(metadata: bool) -> Outside {
        let tag = &paths::new_sandbox_id()[3..];
        let ns = format!("svt-{tag}");
        let host_if = format!("svh{tag}");
        let peer = format!("svp{tag}");
        // 10.213.<n>.0/30 for this run.
        let n = u8::from_str_radix(&tag[..2], 16).expect("hex");
        let (host_ip, private) = (format!("10.213.{n}.1"), format!("10.213.{n}.2"));
        assert!(ip(&["netns", "add", &ns]), "ip netns add");
        let public = format!("192.88.97.{n}");
        let mut o = Outside {
            ns: ns.clone(),
            host_if: host_if.clone(),
            private: private.clone(),
            public: public.clone(),
            listener: std::process::Command::new("true").spawn().expect("true"),
            dns: None,
            metadata,
        };
        let x = |args: &[&str]| {
            let mut v = vec!["netns", "exec", &ns, "ip"];
            v.extend_from_slice(args);
            assert!(ip(&v), "ip {args:?} in {ns}");
        };
        assert!(ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer
        ]));
        assert!(ip(&["link", "set", &peer, "netns", &ns]));
        assert!(ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if
        ]));
        assert!(ip(&["link", "set", &host_if, "up"]));
        x(&["addr", "add", &format!("{private}/30"), "dev", &peer]);
        x(&["addr", "add", &format!("{METADATA}/32"), "dev", &peer]);
        x(&["addr", "add", &format!("{public}/32"), "dev", &peer]);
        x(&["link", "set", &peer, "up"]);
        x(&["link", "set", "lo", "up"]);
        x(&["route", "add", "default", "via", &host_ip]);
        let routed: &[&str] = if metadata {
            &[METADATA, public.as_str()]
        } else {
            &[public.as_str()]
        };
        for dst in routed {
            assert!(ip(&["route", "add", &format!("{dst}/32"), "via", &private]));
        }
        o.listener = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "busybox",
                "nc",
                "-ll",
                "-p",
                "8080",
                "-e",
                "/bin/echo",
                "reached",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("listener");
        // The listener answers the host on its addresses.
        for addr in [
            private.as_str(),
            if metadata { METADATA } else { public.as_str() },
        ] {
            let mut got = String::new();
            for _ in 0..50 {
                got = host_nc(addr, 8080);
                if got.contains("reached") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(got.contains("reached"), "listener on {addr}: {got:?}");
        }
        o
    }
}

impl Outside {
    /// A DNS server on UDP 53 of the public address: A records for
    /// `names`, NXDOMAIN for the rest.
    fn serve_dns(&mut self, names: &[(&str, &str)]) {
        let code = crate::egress::dns::test_server_program(&self.public, names);
        self.dns = Some(
            std::process::Command::new("ip")
                .args(["netns", "exec", &self.ns, "python3", "-c", &code])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("dns server"),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        if let Some(c) = &mut self.dns {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.metadata {
            ip(&["route", "del", &format!("{METADATA}/32")]);
        }
        ip(&["route", "del", &format!("{}/32", self.public)]);
        // Deleting the namespace deletes the veth pair.
        ip(&["netns", "del", &self.ns]);
        ip(&["link", "del", &self.host_if]);
    }
}

/// `busybox nc -w 2 addr port` on the host.
fn host_nc(addr: &str, port: u16) -> String {
    std::process::Command::new("busybox")
        .args(["nc", "-w", "2", addr, &port.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// Runs `script` in a plain container on Docker's default bridge (no
/// StacyVM filter) and returns its output: proof that the test's outside
/// is reachable from a container at all.
async fn on_default_bridge(d: &Docker, script: &str) -> String {
    let name = format!("svt-ctl-{}", &paths::new_sandbox_id()[3..]);
    let body = ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
        host_config: Some(HostConfig {
            network_mode: Some("bridge".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    d.create_container(
        Some(CreateContainerOptionsBuilder::default().name(&name).build()),
        body,
    )
    .await
    .expect("create control");
    d.start_container(&name, None).await.expect("start control");
    let mut wait = d.wait_container(&name, None::<WaitContainerOptions>);
    let _ = tokio::time::timeout(Duration::from_secs(30), wait.next()).await;
    let mut logs = d.logs(
        &name,
        Some(
            LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    let mut out = String::new();
    while let Some(Ok(l)) = logs.next().await {
        out.push_str(&String::from_utf8_lossy(&l.into_bytes()));
    }
    let _ = d
        .remove_container(
            &name,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
    out
}

/// Per-sandbox egress rules on the sandbox network: deny-all at spawn,
/// an allowed address at runtime, then a domain rule served by the egress
/// proxy (the allowed name reaches the outside, another does not), with
/// the denials reported and nothing left after destroy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_rules_narrow_and_domains_go_through_the_proxy() {
    use stacyvm_core::egress::{Domain, EgressRules};
    let mut fx = fixture("runc");
    fx.config.network_mode = "bridge".into();
    let p = fx.ready().await;
    let mut outside = Outside::start_with(false);
    let public = outside.public.clone();
    outside.serve_dns(&[("allowed.test", &public), ("other.test", &public)]);
    let all: stacyvm_core::cidr::Cidr = "0.0.0.0/0".parse().expect("cidr");
    let mut spec = spawn_spec(TEST_IMAGE, 64);
    spec.egress = Some(EgressRules {
        deny: vec![all],
        ..EgressRules::default()
    });
    let id = p.spawn(&spec).await.expect("spawn").runtime_id;
    let plain = format!("nc -w 2 {public} 8080 </dev/null; echo done");
    let r = sh(&p, &id, &plain).await;
    assert_eq!(r.stdout.trim(), "done", "denied address reached: {r:?}");
    let denied = p.egress_denials(&id).await.expect("denials");
    assert!(
        denied
            .iter()
            .any(|d| d.address == public && d.port == 8080 && d.reason == "cidr"),
        "{denied:?}"
    );

    p.set_egress(
        &id,
        Some(&EgressRules {
            allow: vec![format!("{public}/32").parse().expect("cidr")],
            deny: vec![all],
            ..EgressRules::default()
        }),
    )
    .await
    .expect("allow one");
    let r = sh(&p, &id, &plain).await;
    assert!(r.stdout.contains("reached"), "allowed address: {r:?}");

    p.set_egress(
        &id,
        Some(&EgressRules {
            domains: vec![Domain::parse("allowed.test").expect("domain")],
            deny: vec![all],
            dns: Some(vec![public.parse().expect("ip")]),
            ..EgressRules::default()
        }),
    )
    .await
    .expect("domains");
    let http = |host: &str| {
        format!("printf 'GET / HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 3 {public} 8080; echo done")
    };
    let r = sh(&p, &id, &http("allowed.test")).await;
    assert!(r.stdout.contains("reached"), "allowed name: {r:?}");
    let r = sh(&p, &id, &http("other.test")).await;
    assert_eq!(r.stdout.trim(), "done", "other name reached: {r:?}");
    let denied = p.egress_denials(&id).await.expect("denials");
    assert!(
        denied
            .iter()
            .any(|d| d.host == "other.test" && d.reason == "domain"),
        "{denied:?}"
    );
    let key = crate::egress::Port::new(
        "x",
        std::net::Ipv4Addr::UNSPECIFIED,
        std::net::Ipv4Addr::UNSPECIFIED,
        &id,
    )
    .key;
    p.destroy(&id).await.expect("destroy");
    let table = std::process::Command::new("nft")
        .args(["list", "table", "inet", crate::egress::TABLE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(!table.contains(&key), "egress rules of {id} left: {table}");
}

/// F-7: on `bridge`, a sandbox reaches neither cloud metadata, nor private
/// ranges, nor the host, nor another sandbox, and has no IPv6; the same
/// targets are reachable from an unfiltered container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_sandboxes_reach_only_the_public_internet() {
    let mut fx = fixture("runc");
    fx.config.network_mode = "bridge".into();
    let p = fx.ready().await;
    let d = p.engine().await.expect("engine");
    let outside = Outside::start();
    let probe = format!(
        "nc -w 2 {} 8080 </dev/null; nc -w 2 {METADATA} 8080 </dev/null; echo done",
        outside.private
    );
    let control = on_default_bridge(d, &probe).await;
    assert_eq!(
        control.matches("reached").count(),
        2,
        "an unfiltered container reaches both: {control}"
    );
    let a = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn a")
        .runtime_id;
    let b = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn b")
        .runtime_id;
    let r = sh(&p, &a, &probe).await;
    assert!(r.stdout.contains("done"), "{r:?}");
    assert!(
        !r.stdout.contains("reached"),
        "metadata or private range reached: {r:?}"
    );
    // Another sandbox on the network listens; it answers itself only.
    sh(
        &p,
        &b,
        "setsid nc -ll -p 9090 -e /bin/echo peer >/dev/null 2>&1 </dev/null & sleep 0.3; nc -w 2 127.0.0.1 9090 </dev/null",
    )
    .await;
    let net = fx.config.bridge_network.clone();
    let info = d.inspect_container(&b, None).await.expect("inspect b");
    let settings = info
        .network_settings
        .and_then(|n| n.networks)
        .and_then(|mut n| n.remove(&net))
        .expect("b is on the sandbox network");
    let b_ip = settings.ip_address.expect("b's address");
    let gateway = settings.gateway.expect("gateway");
    let self_check = sh(&p, &b, "nc -w 2 127.0.0.1 9090 </dev/null").await;
    assert_eq!(self_check.stdout.trim(), "peer", "{self_check:?}");
    let r = sh(
        &p,
        &a,
        &format!("nc -w 2 {b_ip} 9090 </dev/null; echo done"),
    )
    .await;
    assert_eq!(r.stdout.trim(), "done", "sandbox B reached: {r:?}");
    // The host itself (a listener on all its addresses) is out of reach.
    let host = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    host.set_nonblocking(true).expect("nb");
    let port = host.local_addr().expect("addr").port();
    sh(
        &p,
        &a,
        &format!("nc -w 2 {gateway} {port} </dev/null; true"),
    )
    .await;
    assert!(
        host.accept().is_err(),
        "the host was reached from a sandbox"
    );
    // No IPv6 at all: not even a link-local address to talk from.
    let v6 = sh(
        &p,
        &a,
        "cat /proc/net/if_inet6; cat /proc/sys/net/ipv6/conf/all/disable_ipv6",
    )
    .await;
    assert_eq!(v6.stdout.trim(), "1", "{v6:?}");
    // Docker's own chains come first in FORWARD; ours live in DOCKER-USER.
    let fwd = std::process::Command::new("iptables")
        .args(["-w", "-S", "FORWARD"])
        .output()
        .expect("iptables");
    let fwd = String::from_utf8_lossy(&fwd.stdout);
    // (The native provider appends its own bridge's accepts, commented
    // `stacyvm:<bridge>`, after Docker's chains; none may come first.)
    let lines: Vec<&str> = fwd
        .lines()
        .filter(|l| l.starts_with("-A FORWARD"))
        .collect();
    let docker_user = lines
        .iter()
        .position(|l| l.contains("-j DOCKER-USER"))
        .expect("DOCKER-USER jump in FORWARD");
    assert!(
        lines[..docker_user].iter().all(|l| !l.contains("stacyvm")),
        "a StacyVM rule ahead of Docker's chains in FORWARD: {fwd}"
    );
    p.destroy(&a).await.expect("destroy");
    p.destroy(&b).await.expect("destroy");
    p.remove_bridge_network().await.expect("remove network");
    let left = std::process::Command::new("iptables")
        .args(["-w", "-S"])
        .output()
        .expect("iptables");
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("stacyvm:{net}")),
        "rules removed with the network"
    );
}

/// F-11: sandbox processes (same uid as the agent) cannot read the agent's
/// environment or memory map, nor its file descriptors (its stdout is the
/// container log). runc only: gVisor's /proc ignores non-dumpability (see
/// docs/security.md), which the handshake token's delivery accounts for.
async fn agent_is_private(runtime: &str) {
    let mut fx = fixture(runtime);
    fx.config.user = "sandbox".into();
    let p = fx.ready().await;
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 128))
        .await
        .expect("spawn")
        .runtime_id;
    let r = sh(
        &p,
        &id,
        "id -u; stat -c %u /proc/1; for f in environ maps; do cat /proc/1/$f >/dev/null 2>&1 && echo $f-READABLE; done; ls /proc/1/fd >/dev/null 2>&1 && echo fd-READABLE; echo checked",
    )
    .await;
    assert!(r.stdout.starts_with("1000\n"), "{r:?}");
    assert!(r.stdout.contains("checked"), "{r:?}");
    assert!(!r.stdout.contains("READABLE"), "{runtime}: {r:?}");
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_private_runc() {
    agent_is_private("runc").await;
}

/// F-4/F-11 with the authenticated handshake: a sandbox that runs its own
/// agent (the real binary, without the token) at its socket path is
/// refused on reconnect, directly (runc) and through the relay (runsc);
/// the token is nowhere in the container's config, arguments or the
/// agent's environment.
async fn impostor_is_refused(runtime: &str) {
    let fx = fixture(runtime);
    let p = fx.ready().await;
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 128))
        .await
        .expect("spawn")
        .runtime_id;
    let token = hex::encode(read_token(&fx.state_dir().join(&id)).expect("host copy"));
    let info = p
        .engine()
        .await
        .expect("engine")
        .inspect_container(&id, None)
        .await
        .expect("inspect");
    let seen = format!("{:?}", info.config);
    assert!(!seen.contains(&token), "token in the container config");
    let r = sh(
        &p,
        &id,
        "tr '\\0' ' ' </proc/1/cmdline; echo; tr '\\0' '\\n' </proc/1/environ 2>/dev/null; env",
    )
    .await;
    assert!(
        !r.stdout.contains(&token),
        "{runtime}: token visible: {r:?}"
    );
    let key = std::os::unix::fs::MetadataExt::mode(
        &std::fs::metadata(fx.state_dir().join(&id).join(TOKEN_FILE)).expect("token file"),
    );
    assert_eq!(key & 0o777, 0o600);
    sh(
        &p,
        &id,
        "rm -f /.stacyvm/run/agent.sock; setsid /.stacyvm/agent serve --socket /.stacyvm/run/agent.sock >/dev/null 2>&1 </dev/null & for i in $(seq 50); do [ -S /.stacyvm/run/agent.sock ] && break; sleep 0.1; done",
    )
    .await;
    drop_connection(&p, &id);
    let e = sh_err(&p, &id).await;
    assert_eq!(
        e,
        ErrorKind::ProviderUnavailable,
        "{runtime}: impostor accepted"
    );
    let restarted = fx.make();
    assert_eq!(
        sh_err(&restarted, &id).await,
        ErrorKind::ProviderUnavailable
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_agent_is_refused_runc() {
    impostor_is_refused("runc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_agent_is_refused_runsc() {
    impostor_is_refused("runsc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zz_stdin_probe() {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let d = p.engine().await.expect("engine");
    let name = "svt-stdin-probe";
    let _ = d
        .remove_container(
            name,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
    let body = ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        cmd: Some(vec![
            "sh".into(),
            "-c".into(),
            "cat /proc/self/fd/0 | od -c | head; echo end".into(),
        ]),
        attach_stdin: Some(true),
        open_stdin: Some(true),
        stdin_once: Some(true),
        ..Default::default()
    };
    d.create_container(
        Some(CreateContainerOptionsBuilder::default().name(name).build()),
        body,
    )
    .await
    .expect("create");
    p.start_with_token(name, b"\x01\x02").await.expect("start");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut logs = d.logs(
        name,
        Some(
            LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    while let Some(Ok(l)) = logs.next().await {
        eprintln!("LOG {}", String::from_utf8_lossy(&l.into_bytes()));
    }
    let _ = d
        .remove_container(
            name,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_images_are_reserved_labels_are_the_childs_and_deleted_images_go_with_the_last_child(
) {
    let fx = fixture("runc");
    let p = fx.ready().await;
    let d = p.engine().await.expect("engine");
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    let w = sh(&p, &id, "echo kept > /workspace/f").await;
    assert_eq!(w.code, 0, "{w:?}");
    let snap = paths::new_snapshot_id();
    p.snapshot_sandbox(&id, &snap).await.expect("snapshot");
    let image = snapshot::image_of(&snap);

    // Naming the snapshot's image (however spelled) or an image id is no
    // way around the snapshot's tenancy.
    let image_id = d
        .inspect_image(&image)
        .await
        .expect("image")
        .id
        .expect("id");
    for name in [
        image.clone(),
        format!("docker.io/library/{image}"),
        format!("docker.io/{image}"),
        format!("index.docker.io/{image}"),
        format!("registry-1.docker.io/library/{image}"),
        format!("library/{image}"),
        format!("stacyvm-snapshot@{image_id}"),
        image_id.clone(),
    ] {
        let e = p
            .spawn(&spawn_spec(&name, 64))
            .await
            .expect_err("reserved image");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name}: {e}");
    }
    assert!(
        !p.local_images()
            .await
            .iter()
            .any(|i| i.contains("stacyvm-snapshot")),
        "snapshot images are not offered as images"
    );
    // Another name for the same image is no way around either.
    d.tag_image(
        &image,
        Some(
            bollard::query_parameters::TagImageOptionsBuilder::default()
                .repo("innocent-looking")
                .tag("1")
                .build(),
        ),
    )
    .await
    .expect("tag");
    let e = p
        .spawn(&spawn_spec("innocent-looking:1", 64))
        .await
        .expect_err("a snapshot under another name");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    d.remove_image(
        "innocent-looking:1",
        None::<bollard::query_parameters::RemoveImageOptions>,
        None,
    )
    .await
    .expect("untag");

    // A child with no owner, tenant or metadata of its own does not wear
    // its source's (the image carries the source's labels).
    let mut spec = spawn_spec(TEST_IMAGE, 64);
    spec.snapshot = Some(snap.clone());
    spec.owner_id = String::new();
    spec.tenant_id = String::new();
    spec.metadata.clear();
    let child = p.spawn(&spec).await.expect("child").runtime_id;
    assert_eq!(sh(&p, &child, "cat /workspace/f").await.stdout, "kept\n");
    let rt = p
        .list_runtimes()
        .await
        .expect("inventory")
        .into_iter()
        .find(|r| r.sandbox_id == child)
        .expect("child listed");
    assert_eq!(
        (
            rt.owner_id.as_str(),
            rt.tenant_id.as_str(),
            rt.metadata.len()
        ),
        ("", "", 0),
        "{rt:?}"
    );

    // Deleted while the child runs: untagged, kept for it, gone with it.
    p.delete_snapshot(&snap).await.expect("delete");
    assert!(d.inspect_image(&image).await.is_err(), "untagged");
    assert!(
        d.inspect_image(&image_id).await.is_ok(),
        "kept for the child"
    );
    assert_eq!(sh(&p, &child, "cat /workspace/f").await.stdout, "kept\n");
    assert_eq!(
        p.spawn(&spec).await.expect_err("deleted").kind(),
        ErrorKind::NotFound
    );
    p.destroy(&child).await.expect("destroy child");
    assert!(
        d.inspect_image(&image_id).await.is_err(),
        "the last child takes the deleted snapshot's image along"
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_roots_have_no_snapshots() {
    let mut fx = fixture("runc");
    fx.config.read_only_rootfs = true;
    let p = fx.ready().await;
    assert!(!p
        .capabilities()
        .iter()
        .any(|c| c == stacyvm_core::provider::capability::SANDBOX_SNAPSHOTS));
    let id = p
        .spawn(&spawn_spec(TEST_IMAGE, 64))
        .await
        .expect("spawn")
        .runtime_id;
    let e = p
        .snapshot_sandbox(&id, &paths::new_snapshot_id())
        .await
        .expect_err("no snapshots on tmpfs");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("read_only_rootfs"), "{e}");
    p.destroy(&id).await.expect("destroy");
}
