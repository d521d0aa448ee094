//! The proot provider: the conformance suite (host and imported busybox
//! images) and what a sandbox or a caller must not be able to do.

use std::time::Duration;

use super::*;
use crate::conformance::{self, sh};

pub struct Fixture {
    dir: tempfile::TempDir,
    pub max: usize,
    pub proot_binary: String,
}

pub fn fixture() -> Fixture {
    assert!(
        nix::unistd::geteuid().is_root(),
        "proot provider tests need root (CI runs as root)"
    );
    Fixture {
        dir: tempfile::tempdir().expect("tmp"),
        max: 0,
        proot_binary: "proot".into(),
    }
}

impl Fixture {
    pub fn base(&self) -> PathBuf {
        self.dir.path().join("proot/sandboxes")
    }

    pub fn opts(&self) -> ProotOptions {
        let agent = crate::native::find_agent("").expect(
            "stacyvm-agent not found next to the test binary: run `cargo build --workspace --bins` first",
        );
        ProotOptions {
            base: self.base(),
            images_dir: self.dir.path().join("images"),
            rootfs_path: self.dir.path().join("proot/rootfs"),
            hidden: vec![self.dir.path().display().to_string()],
            agent_path: agent,
            proot_binary: self.proot_binary.clone(),
            max_sandboxes: self.max,
            max_memory_mb: 4096,
            pids_limit: 512,
            exec_timeout: Duration::from_secs(120),
            subordinate_ids: ids::IdRange::parse(ids::DEFAULT_RANGE).expect("range"),
            disk: disk::DiskCaps::default(),
        }
    }

    pub fn make(&self) -> ProotProvider {
        ProotProvider::new(self.opts()).expect("proot provider")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Whatever a failed test left running.
        let Ok(rd) = std::fs::read_dir(self.base()) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            let meta = read_meta(&e.path());
            teardown_blocking(&e.path(), &id, meta.as_ref());
        }
    }
}

impl conformance::Fixture for Fixture {
    fn supports_users(&self) -> bool {
        false
    }
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.make())
    }
    fn image(&self) -> String {
        "host".into()
    }
    fn survives_restart(&self) -> bool {
        true
    }
    /// The freezer needs the cgroups a root server makes.
    fn supports_pause(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }
}

crate::conformance_tests!(proot_conformance, fixture());

/// The same suite on an imported image (busybox, no host libc: the
/// agent must be static).
pub struct BusyboxFixture {
    inner: Fixture,
}

const BUSYBOX_TAG: &str = "stacyvm-test/busybox:1";

pub fn busybox_fixture() -> BusyboxFixture {
    let inner = fixture();
    let archive = crate::image::import::tests::busybox_archive(inner.dir.path(), BUSYBOX_TAG);
    inner
        .make()
        .images()
        .import(&archive, None, &mut |_, _, _| {})
        .expect("import busybox image");
    BusyboxFixture { inner }
}

impl conformance::Fixture for BusyboxFixture {
    fn supports_users(&self) -> bool {
        false
    }
    fn provider(&self) -> Arc<dyn Provider> {
        self.inner.provider()
    }
    fn image(&self) -> String {
        BUSYBOX_TAG.into()
    }
    fn survives_restart(&self) -> bool {
        true
    }
    fn supports_pause(&self) -> bool {
        self.inner.supports_pause()
    }
}

crate::conformance_tests!(proot_busybox_conformance, busybox_fixture());

fn spec(image: &str) -> SpawnSpec {
    conformance::spawn_spec(image)
}

/// Nothing of a sandbox is left on the host: no state dir, no process
/// of its uid, no lease.
fn assert_gone(fx: &Fixture, id: &str) {
    assert!(
        std::fs::symlink_metadata(fx.base().join(id)).is_err(),
        "state dir of {id} left behind"
    );
    let marker = format!("{MARKER}={id}");
    let left = scan_procs(&|p, _| {
        std::fs::read(format!("/proc/{p}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
    });
    assert!(left.is_empty(), "processes of {id} left: {left:?}");
}

/// A root server's sandbox runs as an unprivileged leased uid with
/// no_new_privs, seccomp and landlock, in its own session and network
/// namespace; host files outside its binds are invisible and shared ones
/// unwritable, whatever path or syscall it uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_cannot_reach_or_change_the_host() {
    let fx = fixture();
    let p = fx.make();
    let id = conformance::spawn(&p, "host").await;
    let meta = p.meta(&id).expect("meta");
    let uid = meta.uid.expect("a root server leases a uid");
    assert!(uid >= 100_000_000, "{uid}");
    // Host view of proot: the leased uid, its own session, no_new_privs,
    // seccomp on, another network namespace.
    let status = std::fs::read_to_string(format!("/proc/{}/status", meta.pid)).expect("status");
    assert_eq!(
        status_field(&status, "Uid:"),
        Some(uid.to_string().as_str())
    );
    assert_eq!(status_field(&status, "NoNewPrivs:"), Some("1"));
    assert_eq!(status_field(&status, "Seccomp:"), Some("2"));
    assert_eq!(session_of(meta.pid), Some(meta.pid));
    let netns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns");
    assert_ne!(netns(meta.pid), netns(std::process::id() as i32));

    // Markers the host has outside the sandbox's binds. (The image
    // store's host path may exist inside as an ordinary guest path, e.g.
    // under the sandbox's own /tmp: only the host side is checked.)
    let marker_dir = tempfile::Builder::new()
        .prefix("stacyvm-proot-marker")
        .tempdir_in("/root")
        .expect("marker dir in /root");
    let marker = marker_dir.path().join("secret");
    std::fs::write(&marker, "host-secret").expect("marker");
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(marker_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let m = marker.display().to_string();
    let image_dir = p.images().rootfs_dir().display().to_string();
    let etc_layer = fx.dir.path().join("images/host-etc");

    let script = format!(
        r#"
        cat {m} 2>/dev/null && echo LEAK-read-marker
        cat /proc/self/root{m} 2>/dev/null && echo LEAK-proc-root
        cat /proc/1/root{m} 2>/dev/null && echo LEAK-proc-1-root
        echo x > /usr/stacyvm-proot-test 2>/dev/null && echo LEAK-write-usr
        touch /usr/bin/stacyvm-proot-test 2>/dev/null && echo LEAK-write-usr-bin
        echo x >> /etc/passwd 2>/dev/null && echo LEAK-write-etc
        mkdir -p {image_dir}/x 2>/dev/null
        echo x > /bin/stacyvm-proot-test 2>/dev/null && echo LEAK-write-bin
        cat /etc/shadow 2>/dev/null | head -c 1 | grep -q . && echo LEAK-shadow
        echo ok > /workspace/w && echo ok > /tmp/t && echo ok > /root/r && cat /workspace/w /tmp/t /root/r
        "#
    );
    let r = sh(&p, &id, &script).await;
    assert!(!r.stdout.contains("LEAK"), "{r:?}");
    assert_eq!(r.stdout.trim(), "ok\nok\nok", "{r:?}");

    // Syscalls proot does not translate, and proot itself, through
    // Python's ctypes: each must fail.
    let py = format!(
        r#"
import ctypes, os, signal, struct
libc = ctypes.CDLL(None, use_errno=True)
def ok(r): return r >= 0
how = ctypes.create_string_buffer(struct.pack('QQQ', 0, 0, 0))
buf = ctypes.create_string_buffer(512)
P = b'{m}'
res = {{}}
res['openat2'] = ok(libc.syscall(437, -100, P, how, 24))
res['statx'] = ok(libc.syscall(332, -100, P, 0, 0xfff, buf))
res['faccessat2'] = ok(libc.syscall(439, -100, P, 0, 0))
res['fchmodat2'] = ok(libc.syscall(452, -100, P, 0o666, 0))
res['open_tree'] = ok(libc.syscall(428, -100, b'/', 0))
res['io_uring_setup'] = ok(libc.syscall(425, 8, buf))
tracer = int(open('/proc/self/status').read().split('TracerPid:')[1].split()[0])
res['kill_proot'] = ok(libc.kill(tracer, 0))
res['kill_all'] = ok(libc.kill(-1, 0))
res['pidfd_proot'] = ok(libc.syscall(434, tracer, 0))
res['ptrace_proot'] = ok(libc.ptrace(16, tracer, 0, 0))
res['unshare_user'] = ok(libc.syscall(272, 0x10000000))
import socket
try:
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); res['unix_dgram'] = True
except OSError:
    res['unix_dgram'] = False
try:
    open('/proc/%d/mem' % tracer, 'wb'); res['proot_mem'] = True
except OSError:
    res['proot_mem'] = False
print(sorted(k for k, v in res.items() if v))
"#
    );
    p.write_file(&id, "/workspace/probe.py", py.as_bytes(), 0o644)
        .await
        .expect("write probe");
    let r = sh(&p, &id, "python3 /workspace/probe.py").await;
    assert_eq!((r.code, r.stdout.trim()), (0, "[]"), "{r:?}");

    // The image store and the host's /usr are untouched.
    assert!(std::fs::symlink_metadata("/usr/stacyvm-proot-test").is_err());
    assert!(std::fs::symlink_metadata("/usr/bin/stacyvm-proot-test").is_err());
    assert!(std::fs::symlink_metadata(p.images().rootfs_dir().join("x")).is_err());
    assert!(std::fs::read_dir(&etc_layer).is_ok());
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker"),
        "host-secret"
    );

    p.destroy(&id).await.expect("destroy");
    assert_gone(&fx, &id);
    assert!(
        scan_procs(&|_, s| status_field(s, "Uid:") == Some(uid.to_string().as_str())).is_empty()
    );
}

/// Files written inside an imported image's sandbox never reach the
/// shared image; the file API sees the guest's paths (gaps C-18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_shared_read_only_and_paths_are_the_guests() {
    let fx = busybox_fixture();
    let p = fx.inner.make();
    let id = conformance::spawn(&p, BUSYBOX_TAG).await;
    let r = sh(&p, &id, "cat /etc/os-release; echo changed > /etc/os-release 2>/dev/null || echo refused; echo data > /tmp/f").await;
    assert!(r.stdout.starts_with("NAME=stacyvm-test-busybox"), "{r:?}");
    assert!(r.stdout.contains("refused"), "{r:?}");
    assert_eq!(
        p.read_file(&id, "/tmp/f").await.expect("read /tmp/f"),
        b"data\n"
    );
    assert!(p
        .read_file(&id, "/etc/os-release")
        .await
        .expect("read os-release")
        .starts_with(b"NAME=stacyvm-test-busybox"));
    let rec = p.images().find(BUSYBOX_TAG).expect("record");
    assert_eq!(
        std::fs::read_to_string(p.images().rootfs_of(&rec).join("etc/os-release"))
            .expect("image file"),
        "NAME=stacyvm-test-busybox\n"
    );
    // Another sandbox of the same image sees none of it.
    let other = conformance::spawn(&p, BUSYBOX_TAG).await;
    let r = sh(&p, &other, "cat /tmp/f 2>&1 || echo none").await;
    assert!(r.stdout.contains("none"), "{r:?}");
    for i in [&id, &other] {
        p.destroy(i).await.expect("destroy");
        assert_gone(&fx.inner, i);
    }
}

/// `max_sandboxes` is a typed resource limit; a destroy frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sandboxes_is_a_resource_limit() {
    let mut fx = fixture();
    fx.max = 1;
    let p = fx.make();
    let id = conformance::spawn(&p, "host").await;
    let s = spec("host");
    let e = p.spawn(&s).await.expect_err("over the limit");
    assert_eq!(e.kind(), ErrorKind::ResourceLimit, "{e}");
    assert!(e.to_string().contains("max_sandboxes"), "{e}");
    assert_gone(&fx, &s.id);
    p.destroy(&id).await.expect("destroy");
    let again = conformance::spawn(&p, "host").await;
    p.destroy(&again).await.expect("destroy");
}

/// Bad input is a typed error with the fix, and leaves nothing: no dir,
/// lease or process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_typed_and_leaves_nothing() {
    let fx = fixture();
    let p = fx.make();
    // Leases naming one of this test's state dirs.
    let leases = |base: &Path| {
        let Ok(rd) = std::fs::read_dir(p.ids.as_ref().expect("ids").lease_dir()) else {
            return 0;
        };
        rd.flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path())
                    .is_ok_and(|t| t.contains(&base.display().to_string()))
            })
            .count()
    };

    let s = spec("alpine:3.20");
    let e = p.spawn(&s).await.expect_err("unknown image");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("stacyvm image import"), "{e}");
    assert_gone(&fx, &s.id);

    // A root without a shell (image `rootfs` pointed at one).
    let rootfs = fx.dir.path().join("proot/rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).expect("rootfs");
    std::fs::write(rootfs.join("etc/hostname"), "empty\n").expect("file");
    let s = spec("rootfs");
    let e = p.spawn(&s).await.expect_err("no shell");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("/bin/sh"), "{e}");
    assert_gone(&fx, &s.id);

    // proot missing.
    let mut missing = fixture();
    missing.proot_binary = "/nonexistent/proot".into();
    let q = missing.make();
    assert!(q.health().await.is_err());
    let s = spec("host");
    let e = q.spawn(&s).await.expect_err("no proot");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    assert!(e.to_string().contains("apt-get install proot"), "{e}");
    assert_gone(&missing, &s.id);

    // A proot that dies at start.
    let mut dying = fixture();
    // Where the sandbox's uid can run it (its /tmp is its own).
    let fake_dir = tempfile::tempdir_in("/var/tmp").expect("tmp");
    std::fs::set_permissions(fake_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let fake = fake_dir.path().join("fake-proot");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake proot: cannot trace' >&2\nexit 3\n",
    )
    .expect("fake");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dying.proot_binary = fake.display().to_string();
    let q = dying.make();
    let s = spec("host");
    let e = q.spawn(&s).await.expect_err("proot dies");
    assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
    assert!(e.to_string().contains("cannot trace"), "{e}");
    assert_gone(&dying, &s.id);
    for f in [&fx, &missing, &dying] {
        assert_eq!(leases(&f.base()), 0, "an id lease was left behind");
    }
}

/// A new provider instance over the same state finds running sandboxes
/// (reconnecting to their agents), and removes dead ones and state dirs
/// nobody recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_keeps_live_sandboxes_and_cleans_the_rest() {
    let fx = fixture();
    let p = fx.make();
    let live = conformance::spawn(&p, "host").await;
    let dead = conformance::spawn(&p, "host").await;
    sh(&p, &live, "echo kept > /workspace/k").await;
    let dead_meta = p.meta(&dead).expect("meta");
    tokio::task::spawn_blocking(move || kill_all(&dead_meta))
        .await
        .expect("kill");
    let orphan = fx.base().join("sb-0badcafe");
    std::fs::create_dir_all(orphan.join("rw/workspace")).expect("orphan");
    drop(p);

    let q = fx.make();
    assert!(
        std::fs::symlink_metadata(&orphan).is_err(),
        "orphan dir kept"
    );
    assert_gone(&fx, &dead);
    assert_eq!(q.status(&live).await.expect("status").state, "running");
    let r = sh(&q, &live, "cat /workspace/k").await;
    assert_eq!(r.stdout, "kept\n");
    let ids: Vec<String> = q
        .list_runtimes()
        .await
        .expect("inventory")
        .into_iter()
        .map(|r| r.sandbox_id)
        .collect();
    assert_eq!(ids, vec![live.clone()]);
    assert_eq!(
        q.status(&dead).await.expect_err("dead").kind(),
        ErrorKind::SandboxNotFound
    );
    q.destroy(&live).await.expect("destroy");
    assert_gone(&fx, &live);
}

/// The provider's exec timeout caps a request's (`default_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_timeout_caps_every_exec() {
    let fx = fixture();
    let mut opts = fx.opts();
    opts.exec_timeout = Duration::from_secs(1);
    let p = ProotProvider::new(opts).expect("provider");
    let id = conformance::spawn(&p, "host").await;
    let e = conformance::run_spec(
        &p,
        &id,
        ExecSpec {
            argv: vec!["sleep".into(), "30".into()],
            timeout: Some(Duration::from_secs(600)),
            ..ExecSpec::default()
        },
    )
    .await
    .expect_err("capped");
    assert_eq!(e.kind(), ErrorKind::ExecTimeout, "{e}");
    p.destroy(&id).await.expect("destroy");
}
