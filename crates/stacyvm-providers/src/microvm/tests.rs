//! The qemu provider on this host (TCG where KVM cannot boot guests): the
//! conformance suite on an imported busybox image, isolation seen from
//! inside the guest, teardown, adoption after a restart, and bad input.
//!
//! Needs root, `qemu-system-x86_64`, `mkfs.ext4`, `apt-get` (the kernel .deb
//! is downloaded once into the cache) and a static agent built from this
//! tree: `STACYVM_AGENT_PATH`, else `/var/cache/stacyvm/agent/stacyvm-agent`
//! (`scripts/build-agent DIR`). Cache: `STACYVM_MICROVM_CACHE`, else
//! `/var/cache/stacyvm/microvm`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use stacyvm_core::provider::Provider;
use stacyvm_core::ErrorKind;

use super::qemu::{QemuOptions, QemuProvider};
use super::Accel;
use crate::conformance::{self, sh};

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var(var)
        .ok()
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

pub const BUSYBOX_TAG: &str = "stacyvm-test/busybox:1";

pub struct Fixture {
    dir: tempfile::TempDir,
}

pub fn fixture() -> Fixture {
    assert!(
        nix::unistd::geteuid().is_root(),
        "qemu provider tests need root (CI runs as root)"
    );
    let fx = Fixture {
        dir: tempfile::tempdir().expect("tmp"),
    };
    let archive = crate::image::import::tests::busybox_archive(fx.dir.path(), BUSYBOX_TAG);
    fx.make()
        .images()
        .import(&archive, None, &mut |_, _, _| {})
        .expect("import busybox image");
    fx
}

impl Fixture {
    /// The fixture's own directory (data dir of its providers).
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("qemu/sandboxes")
    }

    pub fn opts(&self) -> QemuOptions {
        let agent = env_path(
            "STACYVM_AGENT_PATH",
            "/var/cache/stacyvm/agent/stacyvm-agent",
        );
        assert!(
            crate::agent::elf_is_static(&agent) == Some(true),
            "static agent {} missing: run `scripts/build-agent /var/cache/stacyvm/agent`",
            agent.display()
        );
        QemuOptions {
            base: self.base(),
            cache: env_path("STACYVM_MICROVM_CACHE", "/var/cache/stacyvm/microvm"),
            images_dir: self.dir.path().join("images"),
            hidden: vec![self.dir.path().display().to_string()],
            agent_path: agent,
            qemu_binary: "qemu-system-x86_64".into(),
            accel: Accel::Auto,
            kernel_package: super::kernel::KERNEL_PACKAGE.into(),
            default_image: String::new(),
            max_sandboxes: 0,
            max_memory_mb: 2048,
            max_vcpus: 2,
            disk_mb: 64,
            // Two cores shared by parallel TCG boots.
            boot_timeout: Duration::from_secs(180),
            exec_timeout: Duration::from_secs(120),
            snapshots: true,
            subordinate_ids: crate::native::ids::IdRange::parse(crate::native::ids::DEFAULT_RANGE)
                .expect("range"),
            network_mode: "none".into(),
            bridge: crate::native::net::BridgeOptions::default(),
        }
    }

    pub fn make(&self) -> QemuProvider {
        QemuProvider::new(self.opts()).expect("qemu provider")
    }

    /// QEMU processes started for this fixture's sandboxes.
    fn qemus(&self) -> Vec<i32> {
        let needle = self.base().display().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Whatever a failed test left running.
        for pid in self.qemus() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Ok(rd) = std::fs::read_dir(self.base()) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path().join("meta.json")) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                        let dirs: Vec<PathBuf> = v["cgroups"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|d| d.as_str().map(PathBuf::from))
                            .collect();
                        stacyvm_sandbox::cgroup::destroy(&dirs);
                        // And what it held outside the directory.
                        if let Ok(att) = serde_json::from_value::<crate::native::net::Attachment>(
                            v["net"].clone(),
                        ) {
                            crate::native::net::release(&att);
                        }
                        if let Some(uid) = v["uid"].as_u64().and_then(|u| u32::try_from(u).ok()) {
                            crate::native::ids::release_lease(uid);
                        }
                    }
                }
            }
        }
    }
}

impl conformance::Fixture for Fixture {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.make())
    }
    fn image(&self) -> String {
        BUSYBOX_TAG.into()
    }
    fn survives_restart(&self) -> bool {
        true
    }
    /// QMP `stop` and `cont`.
    fn supports_pause(&self) -> bool {
        true
    }
}

crate::conformance_tests!(qemu_conformance, fixture());

/// A paused VM's clock stands still (QMP `stop`); on resume the agent sets
/// it to the host's again, so the guest is not behind by the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_clock_catches_up_after_a_pause() {
    let fx = fixture();
    let p = fx.make();
    let spec = conformance::spawn_spec(BUSYBOX_TAG);
    p.spawn(&spec).await.expect("spawn");
    let id = spec.id.clone();
    p.pause(&id).await.expect("pause");
    tokio::time::sleep(Duration::from_secs(4)).await;
    p.resume(&id).await.expect("resume");
    let r = sh(&p, &id, "date +%s").await;
    let guest: i64 = r.stdout.trim().parse().expect("seconds");
    let host = chrono::Utc::now().timestamp();
    assert!(
        (host - guest).abs() <= 2,
        "guest clock {guest}, host {host}: behind by the pause?"
    );
    p.destroy(&id).await.expect("destroy");
}

/// An environment build's image (a layer over its base, with a whiteout)
/// boots: the provider runs a flattened copy, made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_layered_image_boots_flattened() {
    let fx = fixture();
    let p = fx.make();
    let images = p.images();
    let base = images.find(BUSYBOX_TAG).expect("base");
    let layer_id = format!("sha256:{}", "c7".repeat(32));
    let layer = images.rootfs_dir().join("c7".repeat(32));
    std::fs::create_dir_all(layer.join("srv")).expect("layer");
    std::fs::write(layer.join("srv/built"), "from the build\n").expect("file");
    std::fs::create_dir_all(layer.join("bin")).expect("bin");
    nix::sys::stat::mknod(
        &layer.join("bin/vi"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .expect("whiteout");
    images
        .record(crate::image::store::ImageRecord {
            id: layer_id,
            names: vec!["local/stacyvm-env:layered-1".into()],
            layers: 1,
            size_bytes: 16,
            imported_at: String::new(),
            source: "test".into(),
            parent: Some(base.id.clone()),
            build_key: Some("test".into()),
        })
        .expect("record");
    let spec = conformance::spawn_spec("local/stacyvm-env:layered-1");
    p.spawn(&spec).await.expect("spawn a layered image");
    let r = sh(
        &p,
        &spec.id,
        "cat /srv/built; test -e /bin/vi && echo vi || echo no-vi; echo ok | cat",
    )
    .await;
    assert_eq!(r.stdout, "from the build\nno-vi\nok\n", "{r:?}");
    p.destroy(&spec.id).await.expect("destroy");
}

/// Inside the guest: its own kernel (not the host's), none of the host's
/// files or processes, no network but loopback, the sandbox's hostname,
/// memory and vCPUs as asked, a clock that agrees with the host's, ptys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_is_its_own_machine() {
    let fx = fixture();
    let p = fx.make();
    let mut spec = conformance::spawn_spec(BUSYBOX_TAG);
    spec.memory_mb = 192;
    spec.vcpus = 2;
    p.spawn(&spec).await.expect("spawn");
    let id = spec.id.clone();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let r = sh(
        &p,
        &id,
        "cat /proc/sys/kernel/osrelease; hostname; nproc; \
         awk '/MemTotal/ {print $2}' /proc/meminfo; ls /sys/class/net; \
         date +%s; cat /proc/1/comm; ls /dev/pts >/dev/null && echo pts",
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[0].contains("cloud-amd64"), "guest kernel: {r:?}");
    assert_ne!(
        lines[0],
        host_release.trim(),
        "the guest runs its own kernel"
    );
    assert_eq!(lines[1], id);
    assert_eq!(lines[2], "2");
    let mem_kb: u64 = lines[3].parse().expect("MemTotal");
    assert!(
        (100_000..=200_000).contains(&mem_kb),
        "192 MiB guest reports {mem_kb} kB"
    );
    assert_eq!(lines[4], "lo", "no network device in mode none: {r:?}");
    let guest_now: i64 = lines[5].parse().expect("date");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (guest_now - now).abs() < 30,
        "guest clock {guest_now} vs host {now}"
    );
    assert_eq!(lines[6], "init", "the agent is PID 1");
    assert_eq!(lines[7], "pts");

    // A marker file and the host's processes (this test, QEMU) are
    // invisible to the guest.
    let marker = fx.dir.path().join("host-secret");
    std::fs::write(&marker, "secret").expect("marker");
    let me = std::fs::read_to_string("/proc/self/comm").expect("comm");
    let r = sh(
        &p,
        &id,
        &format!("cat {} 2>&1; cat /proc/[0-9]*/comm", marker.display()),
    )
    .await;
    assert!(r.stdout.contains("No such file"), "{r:?}");
    assert!(!r.stdout.contains("secret\n"), "{r:?}");
    assert!(
        !r.stdout.contains(me.trim()),
        "host process {me} visible: {r:?}"
    );
    assert!(!r.stdout.contains("qemu"), "{r:?}");
    p.destroy(&id).await.expect("destroy");
}

/// Destroy leaves no QEMU process, socket, state or cgroup behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_leaves_nothing() {
    let fx = fixture();
    let p = fx.make();
    let id = conformance::spawn(&p, BUSYBOX_TAG).await;
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.base().join(&id).join("meta.json")).expect("meta"),
    )
    .expect("json");
    let cgroups: Vec<PathBuf> = meta["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .filter_map(|d| d.as_str().map(PathBuf::from))
        .collect();
    assert_eq!(fx.qemus().len(), 1);
    // QEMU runs as the sandbox's leased, unprivileged uid, never root.
    let uid = meta["uid"].as_u64().expect("a leased uid") as u32;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", fx.qemus()[0])).expect("status");
    let real_uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line")
        .split_whitespace()
        .map(|u| u.parse::<u32>().expect("uid"))
        .collect::<Vec<_>>();
    assert!(
        real_uids.iter().all(|u| *u == uid),
        "QEMU uids {real_uids:?}, leased {uid}"
    );
    let lease = std::path::Path::new("/run/stacyvm/ids").join(uid.to_string());
    assert!(lease.exists(), "lease held while the VM runs");
    // The state dir is the server's: QEMU's uid owns only run/.
    use std::os::unix::fs::MetadataExt;
    let d = std::fs::metadata(fx.base().join(&id)).expect("dir");
    assert_eq!(d.uid(), 0);
    p.destroy(&id).await.expect("destroy");
    assert!(!lease.exists(), "lease released");
    assert!(fx.qemus().is_empty(), "QEMU left running");
    assert!(!fx.base().join(&id).exists(), "state dir left");
    for d in cgroups {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    assert_eq!(
        p.status(&id).await.expect_err("gone").kind(),
        ErrorKind::SandboxNotFound
    );
    p.destroy(&id).await.expect("destroying twice is fine");
}

/// A sandbox keeps running across a provider restart with its files, and
/// a VMM killed from outside is reported gone and swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_adoption_and_a_dead_vmm() {
    let fx = fixture();
    let p = fx.make();
    let id = conformance::spawn(&p, BUSYBOX_TAG).await;
    assert_eq!(sh(&p, &id, "echo kept > /workspace/f").await.code, 0);
    drop(p);
    let q = fx.make();
    let r = sh(&q, &id, "cat /workspace/f").await;
    assert_eq!(r.stdout, "kept\n", "{r:?}");
    assert_eq!(q.status(&id).await.expect("status").state, "running");
    assert!(
        !q.logs(&id, 200).await.expect("logs").is_empty(),
        "console captured"
    );

    for pid in fx.qemus() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill qemu");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let inv = q.list_runtimes().await.expect("inventory");
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].state, "destroyed");
    let e = sh_err(&q, &id).await;
    assert!(
        matches!(
            e,
            ErrorKind::SandboxNotFound | ErrorKind::ProviderUnavailable
        ),
        "{e:?}"
    );
    // A new instance sweeps the dead VM's state.
    drop(fx.make());
    assert!(!fx.base().join(&id).exists());
}

async fn sh_err(p: &dyn Provider, id: &str) -> ErrorKind {
    let spec = stacyvm_core::provider::ExecSpec {
        argv: vec!["true".into()],
        ..Default::default()
    };
    conformance::run_spec(p, id, spec)
        .await
        .expect_err("exec on a dead VM")
        .kind()
}

/// Bad requests are typed errors and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spawns_are_refused() {
    let fx = fixture();
    let p = fx.make();
    let mut s = conformance::spawn_spec("host");
    let e = p.spawn(&s).await.expect_err("host image");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("default_image"), "{e}");
    s.image = BUSYBOX_TAG.into();
    s.memory_mb = 32;
    assert_eq!(
        p.spawn(&s).await.expect_err("tiny").kind(),
        ErrorKind::InvalidInput
    );
    s.memory_mb = 4096;
    assert_eq!(
        p.spawn(&s).await.expect_err("huge").kind(),
        ErrorKind::InvalidInput
    );
    s.memory_mb = 128;
    s.vcpus = 3;
    assert_eq!(
        p.spawn(&s).await.expect_err("vcpus").kind(),
        ErrorKind::InvalidInput
    );
    // Beyond the host, whatever the caps allow.
    let mut big = fx.opts();
    big.max_memory_mb = 0;
    big.max_vcpus = 4096;
    let unbounded = QemuProvider::new(big).expect("provider");
    s.memory_mb = 64 << 20;
    let e = unbounded
        .spawn(&s)
        .await
        .expect_err("more memory than the host");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("host"), "{e}");
    s.memory_mb = 128;
    s.vcpus = 4096;
    let e = unbounded
        .spawn(&s)
        .await
        .expect_err("more CPUs than the host");
    assert!(e.to_string().contains("CPUs"), "{e}");
    s.vcpus = 1;
    s.network_mode = "host".into();
    let e = p.spawn(&s).await.expect_err("net");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("none, bridge"), "{e}");
    s.network_mode = "none".into();
    s.image = "nope:1".into();
    assert_eq!(
        p.spawn(&s).await.expect_err("image").kind(),
        ErrorKind::InvalidInput
    );
    assert!(fx.qemus().is_empty());
    assert_eq!(std::fs::read_dir(fx.base()).expect("base").count(), 0);
}

/// A guest that never answers: the spawn times out with the console in
/// the error, QEMU is killed, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers_times_out_cleanly() {
    let fx = fixture();
    let mut o = fx.opts();
    o.boot_timeout = Duration::from_secs(5);
    // busybox as the guest's /init: the guest boots and never serves the
    // agent port.
    o.agent_path = PathBuf::from("/bin/busybox");
    o.accel = Accel::Tcg;
    let p = QemuProvider::new(o).expect("provider");
    let s = conformance::spawn_spec(BUSYBOX_TAG);
    let e = p.spawn(&s).await.expect_err("no answer in 5 s");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    assert!(fx.qemus().is_empty(), "QEMU killed");
    assert!(!fx.base().join(&s.id).exists());
}

/// Snapshot-restore spawns: after a cold boot the provider freezes a guest
/// of that shape; later spawns resume copies of it. Each clone has its own
/// identity (hostname, random numbers, clock) and private writes, and a
/// file the template's image holds is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawns_restore_snapshots_with_fresh_identity_and_private_writes() {
    let fx = fixture();
    let p = fx.make();
    // A shape no other test uses, so this test's first spawn boots.
    let spec = |mb| {
        let mut s = conformance::spawn_spec(BUSYBOX_TAG);
        s.memory_mb = mb;
        s
    };
    let cache = fx.opts().cache;
    forget_snapshots_of(&cache, 160);
    let first = spec(160);
    p.spawn(&first).await.expect("cold spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let snap = loop {
        let found = super::snapshot::list(&cache)
            .into_iter()
            .find(|m| m.memory_mb == 160 && m.image == BUSYBOX_TAG);
        if let Some(m) = found {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot built");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(snap.size_bytes > 0);
    p.destroy(&first.id).await.expect("destroy");

    let (a, b) = (spec(160), spec(160));
    let started = std::time::Instant::now();
    p.spawn(&a).await.expect("restored spawn a");
    eprintln!("restore spawn took {:?}", started.elapsed());
    p.spawn(&b).await.expect("restored spawn b");
    for s in [&a, &b] {
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fx.base().join(&s.id).join("meta.json")).expect("meta"),
        )
        .expect("json");
        assert_eq!(meta["snapshot"], snap.id.as_str(), "restored, not booted");
        // A clone's QEMU runs as its own leased uid too.
        let uid = meta["uid"].as_u64().expect("a leased uid");
        let pid = meta["pid"].as_i64().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
        assert!(
            line.split_whitespace()
                .skip(1)
                .all(|u| u == uid.to_string()),
            "clone QEMU {line}, leased {uid}"
        );
    }
    let probe = "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; \
                 ls /bin/busybox; echo $0 > /workspace/who; cat /workspace/who";
    let ra = sh(&p, &a.id, &probe.replace("$0", &a.id)).await;
    let rb = sh(&p, &b.id, &probe.replace("$0", &b.id)).await;
    assert_eq!(ra.code, 0, "{ra:?}");
    let (la, lb): (Vec<&str>, Vec<&str>) =
        (ra.stdout.lines().collect(), rb.stdout.lines().collect());
    assert_eq!(la[0], a.id, "clone a has its own hostname");
    assert_eq!(lb[0], b.id, "clone b has its own hostname");
    assert_eq!(la[1].len(), 32);
    assert_ne!(la[1], lb[1], "clones draw different random numbers");
    let now = chrono::Utc::now().timestamp();
    for l in [&la, &lb] {
        let t: i64 = l[2].parse().expect("date");
        assert!(
            (t - now).abs() < 30,
            "clock stepped to the host's: {t} vs {now}"
        );
    }
    assert_eq!(la[3], "/bin/busybox");
    assert_eq!(la[4], a.id, "a reads its own write");
    assert_eq!(lb[4], b.id, "b reads its own write");
    let again = sh(&p, &a.id, "cat /workspace/who").await;
    assert_eq!(again.stdout.trim(), a.id, "b's write did not reach a");

    // A snapshot that cannot be restored is removed and the spawn boots.
    let (dir, _) = super::snapshot::find(&cache, &snap.id).expect("still there");
    std::fs::write(dir.join("vmstate"), b"not a migration stream").expect("corrupt");
    let c = spec(160);
    p.spawn(&c).await.expect("spawn falls back to a boot");
    assert!(
        super::snapshot::find(&cache, &snap.id).is_none(),
        "corrupt snapshot removed"
    );
    for s in [&a, &b, &c] {
        p.destroy(&s.id).await.expect("destroy");
    }
    assert!(fx.qemus().is_empty());
}

/// A VMM that dies mid-exec: the exec ends with an error at once (not a
/// hang), the sandbox reports gone, and another VM is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_dies_mid_exec_fails_the_exec_only() {
    let fx = fixture();
    let p = Arc::new(fx.make());
    let victim = conformance::spawn(p.as_ref(), BUSYBOX_TAG).await;
    let other = conformance::spawn(p.as_ref(), BUSYBOX_TAG).await;
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.base().join(&victim).join("meta.json")).expect("meta"),
    )
    .expect("json");
    let pid = meta["pid"].as_i64().expect("pid") as i32;
    let runner = {
        let (p, id) = (p.clone(), victim.clone());
        tokio::spawn(async move {
            let spec = stacyvm_core::provider::ExecSpec {
                argv: vec!["sleep".into(), "60".into()],
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let r = conformance::run_spec(p.as_ref(), &id, spec).await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the VMM");
    let (r, took) = runner.await.expect("join");
    assert!(r.is_err(), "exec on a dead VM must fail: {r:?}");
    assert!(
        took < Duration::from_secs(30),
        "the exec ended promptly: {took:?}"
    );
    let r = sh(p.as_ref(), &other, "echo still here").await;
    assert_eq!(r.stdout, "still here\n", "{r:?}");
    p.destroy(&victim).await.expect("destroy a dead VM");
    p.destroy(&other).await.expect("destroy");
    assert!(fx.qemus().is_empty());
}

/// No kernel anywhere (offline, nothing cached): a typed error that says
/// how to get one, and nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_kernel_is_a_clear_error() {
    let fx = fixture();
    let mut o = fx.opts();
    o.cache = fx.dir.path().join("empty-cache");
    o.kernel_package = "linux-image-stacyvm-does-not-exist".into();
    let p = QemuProvider::new(o).expect("provider");
    let s = conformance::spawn_spec(BUSYBOX_TAG);
    let e = p.spawn(&s).await.expect_err("no kernel");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    assert!(e.to_string().contains("stacyvm image kernel"), "{e}");
    assert!(fx.qemus().is_empty());
    assert!(!fx.base().join(&s.id).exists());
}

/// Removes the restore points of a memory size a test owns, so its first
/// spawn boots and builds one for the current agent (an older cache keeps
/// snapshots of earlier agents until their replacement is built).
fn forget_snapshots_of(cache: &std::path::Path, memory_mb: i64) {
    for m in super::snapshot::list(cache) {
        if m.memory_mb == memory_mb {
            let _ = super::snapshot::remove(cache, &m.id);
        }
    }
}

/// Runs `probe LABEL HOST PORT` lines in parallel in the guest with
/// busybox nc: each prints `LABEL=<first line received>` or
/// `LABEL=blocked`.
fn nc_probes(targets: &[(String, String, u16)]) -> String {
    let mut script = String::from(
        "probe() { r=$(busybox nc -w 3 \"$2\" \"$3\" </dev/null 2>/dev/null | head -n1); echo \"$1=${r:-blocked}\"; }\n",
    );
    for (label, host, port) in targets {
        script.push_str(&format!("probe {label} {host} {port} &\n"));
    }
    script.push_str("wait\n");
    script
}

fn probe_results(stdout: &str) -> std::collections::BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// `bridge` microVMs sit on the native bridge behind the same egress rules
/// as native sandboxes: the public internet (a lab namespace) answers
/// through NAT, the host on any address, cloud metadata, private ranges and
/// the other VM do not, the resolver answers on port 53 only. The guest
/// is root of its own kernel, so the host pins each tap to its leased
/// address and MAC: a guest that takes another address or MAC is cut off.
/// A clone restored from a networked snapshot gets its own address and
/// MAC. Destroy removes tap, pins and lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_vms_reach_only_what_the_bridge_allows() {
    use crate::native::isolation_tests::{host, Lab};
    let mut lab = Lab::new();
    let fx = fixture();
    let mut opts = fx.opts();
    opts.bridge = lab.bridge_options();
    let p = QemuProvider::new(opts).expect("provider");
    let n = lab.n;
    let (outside, lan) = (lab.outside_ns.clone(), lab.lan_ns.clone());
    lab.serve(&outside, &[8080]);
    lab.serve(&lan, &[53, 80]);
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").expect("host listener");
    let host_port = host_listener.local_addr().expect("addr").port();
    let accepting = std::thread::spawn(move || {
        use std::io::Write;
        for mut c in host_listener.incoming().flatten() {
            let _ = c.write_all(b"host\n");
        }
    });
    let _ = accepting;

    // A shape of its own: the first spawn boots, the second restores.
    let spec = |mode: &str| {
        let mut s = conformance::spawn_spec(BUSYBOX_TAG);
        s.memory_mb = 176;
        s.network_mode = mode.into();
        s
    };
    forget_snapshots_of(&fx.opts().cache, 176);
    let a = spec("bridge");
    p.spawn(&a).await.expect("bridge spawn");
    let addr = |id: &str| {
        let p = &p;
        let id = id.to_string();
        async move {
            let r = sh(p, &id, "ip -4 -o addr show dev eth0; cat /sys/class/net/eth0/address; cat /etc/resolv.conf").await;
            assert_eq!(r.code, 0, "{r:?}");
            let ip = r
                .stdout
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|c| c.split('/').next())
                .unwrap_or_default()
                .to_string();
            (ip, r.stdout)
        }
    };
    let (ip_a, out) = addr(&a.id).await;
    assert!(ip_a.starts_with(&format!("10.89.{n}.")), "{out}");
    let ip: std::net::Ipv4Addr = ip_a.parse().expect("ip");
    assert!(
        out.contains(&crate::native::net::mac_for(ip)),
        "MAC from the lease: {out}"
    );
    assert!(
        out.contains(&format!("nameserver 172.31.{n}.53")),
        "resolver: {out}"
    );
    assert!(
        !out.contains("127.0.0.53"),
        "loopback resolvers are useless to a VM: {out}"
    );

    let mut targets: Vec<(String, String, u16)> = Vec::new();
    let addrs = host("ip -4 -o addr show | awk '{print $2, $4}'");
    for line in addrs.lines() {
        let mut w = line.split_whitespace();
        let (Some(dev), Some(cidr)) = (w.next(), w.next()) else {
            continue;
        };
        if dev == "lo" {
            continue;
        }
        let ip = cidr.split('/').next().unwrap_or_default();
        targets.push((
            format!("host_{}", ip.replace('.', "_")),
            ip.to_string(),
            host_port,
        ));
    }
    for (label, h, port) in [
        ("public", format!("192.88.99.{n}"), 8080),
        ("denied_public", format!("192.88.99.{}", n + 1), 8080),
        ("metadata", "169.254.169.254".to_string(), 80),
        ("allowed_private", format!("192.168.{n}.10"), 80),
        ("denied_private", format!("192.168.{n}.12"), 80),
        ("private", format!("192.168.{n}.20"), 80),
        ("resolver_dns", format!("172.31.{n}.53"), 53),
        ("resolver_http", format!("172.31.{n}.53"), 80),
    ] {
        targets.push((label.to_string(), h, port));
    }
    let r = sh(&p, &a.id, &nc_probes(&targets)).await;
    let got = probe_results(&r.stdout);
    assert_eq!(got.len(), targets.len(), "{r:?}");
    for (label, _, _) in &targets {
        let v = got.get(label).map(String::as_str).unwrap_or_default();
        if matches!(
            label.as_str(),
            "public" | "allowed_private" | "resolver_dns"
        ) {
            assert_ne!(v, "blocked", "{label} must be reachable: {r:?}");
        } else {
            assert_eq!(v, "blocked", "{label} must be unreachable: {r:?}");
        }
    }
    assert_eq!(got["public"], format!("10.214.{n}.1"), "through NAT: {r:?}");

    // The networked snapshot restores with the clone's own address and MAC.
    let cache = fx.opts().cache;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while !super::snapshot::list(&cache)
        .iter()
        .any(|m| m.memory_mb == 176 && m.id.ends_with("-net"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no networked snapshot built"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = spec("bridge");
    p.spawn(&b).await.expect("restored bridge spawn");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.base().join(&b.id).join("meta.json")).expect("meta"),
    )
    .expect("json");
    assert!(
        meta["snapshot"]
            .as_str()
            .is_some_and(|s| s.ends_with("-net")),
        "b was restored: {meta}"
    );
    let (ip_b, out) = addr(&b.id).await;
    assert!(
        ip_b.starts_with(&format!("10.89.{n}.")) && ip_b != ip_a,
        "{out}"
    );
    let ip: std::net::Ipv4Addr = ip_b.parse().expect("ip");
    assert!(
        out.contains(&crate::native::net::mac_for(ip)),
        "clone's own MAC: {out}"
    );
    let one = |label: &str, h: &str, port: u16| vec![(label.to_string(), h.to_string(), port)];
    let r = sh(
        &p,
        &b.id,
        &nc_probes(&one("public", &format!("192.88.99.{n}"), 8080)),
    )
    .await;
    assert_eq!(r.stdout.trim(), format!("public=10.214.{n}.1"), "{r:?}");
    // Per-sandbox egress rules hold for a VM as for a native sandbox (its
    // address is pinned, so the rules keyed on it cannot be dodged), and
    // change at runtime.
    let deny_all = stacyvm_core::egress::EgressRules {
        deny: vec!["0.0.0.0/0".parse().expect("cidr")],
        ..Default::default()
    };
    p.set_egress(&b.id, Some(&deny_all))
        .await
        .expect("egress rules");
    let public = one("public", &format!("192.88.99.{n}"), 8080);
    let r = sh(&p, &b.id, &nc_probes(&public)).await;
    assert_eq!(r.stdout.trim(), "public=blocked", "{r:?}");
    let denied = p.egress_denials(&b.id).await.expect("denials");
    assert!(
        denied
            .iter()
            .any(|d| d.address == format!("192.88.99.{n}") && d.port == 8080),
        "{denied:?}"
    );
    p.set_egress(&b.id, None).await.expect("rules cleared");
    let r = sh(&p, &b.id, &nc_probes(&public)).await;
    assert_eq!(r.stdout.trim(), format!("public=10.214.{n}.1"), "{r:?}");
    // Not each other: a listens, b knocks.
    let pa = &p;
    let (listen, knock) = tokio::join!(
        sh(
            pa,
            &a.id,
            "busybox timeout 8 busybox nc -l -p 9000 -e busybox echo peer; echo done"
        ),
        async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            sh(pa, &b.id, &nc_probes(&one("peer", &ip_a, 9000))).await
        }
    );
    assert_eq!(
        knock.stdout.trim(),
        "peer=blocked",
        "{knock:?} / {listen:?}"
    );

    // Spoofing: the guest's root changes its address, then its MAC; the
    // host drops what no longer matches the pin.
    let spoof_ip = format!(
        "ip addr flush dev eth0; ip addr add 10.89.{n}.250/24 dev eth0; \
         ip route add default via 10.89.{n}.1; {}",
        nc_probes(&one("public", &format!("192.88.99.{n}"), 8080))
    );
    let r = sh(&p, &a.id, &spoof_ip).await;
    assert_eq!(r.stdout.trim(), "public=blocked", "forged address: {r:?}");
    let spoof_mac = format!(
        "ip link set eth0 down; ip link set eth0 address 52:54:00:66:66:66; \
         ip link set eth0 up; ip route add default via 10.89.{n}.1; {}",
        nc_probes(&one("public", &format!("192.88.99.{n}"), 8080))
    );
    let r = sh(&p, &b.id, &spoof_mac).await;
    assert_eq!(r.stdout.trim(), "public=blocked", "forged MAC: {r:?}");

    // A pin whose tap is gone (its server died) is pruned when a server
    // sets the bridge up; live VMs' pins stay.
    host(&format!(
        "nft add element bridge stacyvm_{b} vmports '{{ \"svmdead00000\" }}'; \
         nft add element bridge stacyvm_{b} bound4 '{{ \"svmdead00000\" . 52:54:0a:59:00:fe . 10.89.{n}.254 }}'",
        b = lab.bridge
    ));
    crate::native::net::Bridge::new(lab.bridge_options())
        .ensure()
        .expect("bridge setup");
    let pins = host(&format!(
        "nft list set bridge stacyvm_{} bound4",
        lab.bridge
    ));
    assert!(!pins.contains("svmdead00000"), "stale pin kept: {pins}");
    assert!(
        pins.contains(&crate::native::net::host_if_name(&a.id)),
        "a live VM's pin went: {pins}"
    );

    let taps: Vec<String> = [&a.id, &b.id]
        .iter()
        .map(|id| crate::native::net::host_if_name(id))
        .collect();
    for t in &taps {
        assert!(
            std::path::Path::new("/sys/class/net").join(t).exists(),
            "tap {t}"
        );
    }
    // Destroy removes a VM's egress rules with its tap.
    p.set_egress(&b.id, Some(&deny_all))
        .await
        .expect("egress rules");
    let b_rules = crate::egress::Port::new(
        &lab.bridge,
        std::net::Ipv4Addr::UNSPECIFIED,
        std::net::Ipv4Addr::UNSPECIFIED,
        &crate::native::net::host_if_name(&b.id),
    )
    .key;
    assert!(host(&format!("nft list table inet {}", crate::egress::TABLE)).contains(&b_rules));
    for s in [&a, &b] {
        p.destroy(&s.id).await.expect("destroy");
    }
    let table = host(&format!("nft list table inet {}", crate::egress::TABLE));
    assert!(!table.contains(&b_rules), "egress rules of b left: {table}");
    let pins = host(&format!(
        "nft list set bridge stacyvm_{} vmports",
        lab.bridge
    ));
    for (t, ip) in taps.iter().zip([&ip_a, &ip_b]) {
        assert!(
            !std::path::Path::new("/sys/class/net").join(t).exists(),
            "tap {t} leaked"
        );
        assert!(!pins.contains(t.as_str()), "pin of {t} leaked: {pins}");
        let lease = std::path::Path::new("/run/stacyvm/net")
            .join(&lab.bridge)
            .join(ip);
        assert!(!lease.exists(), "lease {ip} leaked");
    }
    assert!(fx.qemus().is_empty());
}

/// A snapshot of a running sandbox and its children (fork): the source
/// pauses for the snapshot and runs on; each child starts with the
/// source's files, memory (a tmpfs file) and running processes as they
/// were, its own identity, and writes private to it. The snapshot can go
/// while children run. Bad input gets typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_snapshots_fork_children_with_state_and_private_writes() {
    let fx = fixture();
    let p = fx.make();
    let mut src = conformance::spawn_spec(BUSYBOX_TAG);
    src.memory_mb = 144;
    p.spawn(&src).await.expect("spawn source");
    let r = sh(
        &p,
        &src.id,
        "echo disk > /workspace/before; echo ram > /dev/shm/marker; \
         (i=0; while true; do i=$((i+1)); echo $i > /dev/shm/counter; sleep 0.2; done) >/dev/null 2>&1 & \
         echo started",
    )
    .await;
    assert_eq!(r.stdout.trim(), "started", "{r:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;

    let snap = format!("snap-{}", hex::encode(rand::random::<[u8; 8]>()));
    let t = std::time::Instant::now();
    let made = p.snapshot_sandbox(&src.id, &snap).await.expect("snapshot");
    eprintln!("snapshot took {:?}, {} bytes", t.elapsed(), made.size_bytes);
    assert!(made.size_bytes > 0);
    assert_eq!(made.network_mode, "none");
    // The source runs on, and what it does next is not in the snapshot.
    let r = sh(
        &p,
        &src.id,
        "echo later > /workspace/after; cat /workspace/before",
    )
    .await;
    assert_eq!(r.stdout.trim(), "disk", "{r:?}");
    assert_eq!(
        p.snapshot_sandbox(&src.id, &snap)
            .await
            .expect_err("same id twice")
            .kind(),
        ErrorKind::Conflict
    );

    let child = || {
        let mut s = conformance::spawn_spec(BUSYBOX_TAG);
        s.memory_mb = 144;
        s.snapshot = Some(snap.clone());
        s
    };
    let (c1, c2) = (child(), child());
    let t = std::time::Instant::now();
    p.spawn(&c1).await.expect("child 1");
    eprintln!("child spawn took {:?}", t.elapsed());
    p.spawn(&c2).await.expect("child 2");
    let probe = "hostname; cat /workspace/before /dev/shm/marker; ls /workspace/after 2>&1; \
                 a=$(cat /dev/shm/counter); sleep 1; b=$(cat /dev/shm/counter); \
                 [ \"$b\" -gt \"$a\" ] && echo counting";
    for c in [&c1, &c2] {
        let r = sh(&p, &c.id, probe).await;
        let l: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(
            l.first().copied(),
            Some(c.id.as_str()),
            "own hostname: {r:?}"
        );
        assert_eq!(
            &l[1..3],
            ["disk", "ram"],
            "files and memory of the source: {r:?}"
        );
        assert!(
            l[3].contains("No such file"),
            "the source's later write: {r:?}"
        );
        assert_eq!(
            l.get(4).copied(),
            Some("counting"),
            "the source's process runs on: {r:?}"
        );
    }
    sh(&p, &c1.id, "echo one > /workspace/mine").await;
    sh(&p, &c2.id, "echo two > /workspace/mine").await;
    let r1 = sh(&p, &c1.id, "cat /workspace/mine").await;
    let r2 = sh(&p, &c2.id, "cat /workspace/mine").await;
    assert_eq!((r1.stdout.trim(), r2.stdout.trim()), ("one", "two"));
    let r = sh(&p, &src.id, "ls /workspace/mine 2>&1").await;
    assert!(r.stdout.contains("No such file"), "{r:?}");

    // Children need nothing of the snapshot once started.
    p.delete_snapshot(&snap).await.expect("delete");
    p.delete_snapshot(&snap)
        .await
        .expect("delete is idempotent");
    let r = sh(
        &p,
        &c1.id,
        "echo still > /workspace/x && cat /workspace/x /workspace/before",
    )
    .await;
    assert_eq!(
        r.stdout.split_whitespace().collect::<Vec<_>>(),
        ["still", "disk"]
    );

    // Bad input.
    assert_eq!(
        p.spawn(&child())
            .await
            .expect_err("deleted snapshot")
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        p.snapshot_sandbox("sb-00000000", "snap-00aa")
            .await
            .expect_err("no such sandbox")
            .kind(),
        ErrorKind::SandboxNotFound
    );
    assert_eq!(
        p.snapshot_sandbox(&src.id, "snap-../../x")
            .await
            .expect_err("bad id")
            .kind(),
        ErrorKind::InvalidInput
    );
    let again = format!("snap-{}", hex::encode(rand::random::<[u8; 8]>()));
    p.snapshot_sandbox(&c2.id, &again)
        .await
        .expect("snapshot of a child");
    let mut wrong = child();
    wrong.snapshot = Some(again.clone());
    wrong.memory_mb = 256;
    assert_eq!(
        p.spawn(&wrong).await.expect_err("another size").kind(),
        ErrorKind::InvalidInput
    );
    let mut grandchild = child();
    grandchild.snapshot = Some(again.clone());
    p.spawn(&grandchild).await.expect("grandchild");
    let r = sh(&p, &grandchild.id, "cat /workspace/mine /workspace/before").await;
    assert_eq!(
        r.stdout.split_whitespace().collect::<Vec<_>>(),
        ["two", "disk"],
        "{r:?}"
    );
    p.delete_snapshot(&again).await.expect("delete");
    for s in [&src, &c1, &c2, &grandchild] {
        p.destroy(&s.id).await.expect("destroy");
    }
    assert!(fx.qemus().is_empty());
}
