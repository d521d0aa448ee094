//! The provider conformance suite, written once and run for every provider.
//!
//! A provider's test module implements [`Fixture`] and calls
//! [`conformance_tests!`](crate::conformance_tests), which emits one
//! `#[tokio::test]` per case. Cases cover lifecycle, shell vs argv
//! literalness, exit codes, env/workdir, streaming order, timeouts that kill
//! the whole process tree, stdin, every file operation (binary content, a
//! 10 MiB file), symlink escapes on every file operation, concurrency, and
//! what a fresh provider instance (a server restart) sees.
//!
//! Scripts address sandbox files as `${SANDBOX_ROOT}/workspace/…`. Real
//! sandboxes leave `SANDBOX_ROOT` unset, so that is `/workspace/…`; only the
//! mock test double, whose commands run on the host, sets it to its
//! stand-in root directory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use stacyvm_core::provider::{ExecSpec, OutputChunk, Provider, SpawnSpec, StreamKind};
use stacyvm_core::{paths, ErrorKind};
use tokio::sync::mpsc;

/// How a test obtains providers.
pub trait Fixture: Send + Sync {
    /// A provider instance; every call returns a NEW instance over the same
    /// state, as a restarted server would create.
    fn provider(&self) -> Arc<dyn Provider>;
    /// An image that exists for this provider and has a POSIX shell,
    /// coreutils and `sleep`.
    fn image(&self) -> String;
    /// Whether a new instance re-discovers running sandboxes (adoption).
    fn survives_restart(&self) -> bool;
    /// Whether pty execs are supported (the mock test double has none).
    fn supports_pty(&self) -> bool {
        true
    }
    /// Whether the sandbox has its own /dev and /proc (the mock test
    /// double runs on the host and has neither).
    fn has_devices(&self) -> bool {
        true
    }
    /// Whether commands can run as another uid of the sandbox (the mock
    /// and a remote StacyVM refuse with `Unsupported`).
    fn supports_users(&self) -> bool {
        true
    }
    /// Whether directories can be watched (the mock and a remote StacyVM
    /// refuse with `Unsupported`).
    fn supports_watch(&self) -> bool {
        true
    }
    /// Whether ports inside the sandbox can be connected to (the mock and
    /// a remote E2B refuse with `Unsupported`).
    fn supports_connect(&self) -> bool {
        true
    }
    /// Whether directories move as tar streams (`archive_read`/`write`);
    /// providers without an agent in the sandbox refuse with `Unsupported`.
    fn supports_archives(&self) -> bool {
        true
    }
    /// Whether sandboxes can be paused and resumed (native and PRoot with
    /// cgroups, docker, QEMU); the others refuse with `Unsupported`.
    fn supports_pause(&self) -> bool {
        false
    }
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub chunks: Vec<(StreamKind, Vec<u8>, Duration)>,
}

/// The suite's spawn request for `image` (256 MiB, 1 vCPU, 10 minutes).
pub fn spawn_spec(image: &str) -> SpawnSpec {
    SpawnSpec {
        id: paths::new_sandbox_id(),
        image: image.to_string(),
        memory_mb: 256,
        vcpus: 1,
        metadata: BTreeMap::from([("suite".to_string(), "conformance".to_string())]),
        owner_id: "conformance".into(),
        tenant_id: String::new(),
        expires_at: Utc::now() + chrono::Duration::minutes(10),
        network_mode: String::new(),
        snapshot: None,
        egress: None,
        volumes: Vec::new(),
    }
}

pub async fn spawn(p: &dyn Provider, image: &str) -> String {
    let spec = spawn_spec(image);
    let s = p.spawn(&spec).await.expect("spawn");
    assert!(!s.runtime_id.is_empty(), "runtime id must not be empty");
    s.runtime_id
}

pub async fn run_spec(p: &dyn Provider, id: &str, spec: ExecSpec) -> stacyvm_core::Result<Ran> {
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(16);
    let start = Instant::now();
    let collect = async move {
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push((c.stream, c.data, start.elapsed()));
        }
        chunks
    };
    let (res, chunks) = tokio::join!(p.exec(id, &spec, tx), collect);
    let status = res?;
    let join = |k: StreamKind| {
        let bytes: Vec<u8> = chunks
            .iter()
            .filter(|c| c.0 == k)
            .flat_map(|c| c.1.clone())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(Ran {
        code: status.code,
        stdout: join(StreamKind::Stdout),
        stderr: join(StreamKind::Stderr),
        chunks,
    })
}

pub async fn sh(p: &dyn Provider, id: &str, script: &str) -> Ran {
    let argv = paths::build_argv("shell", script, &[]).expect("argv");
    run_spec(
        p,
        id,
        ExecSpec {
            argv,
            ..ExecSpec::default()
        },
    )
    .await
    .expect("exec")
}

pub async fn lifecycle(f: &dyn Fixture) {
    let p = f.provider();
    p.health().await.expect("healthy");
    let id = spawn(p.as_ref(), &f.image()).await;
    assert_eq!(p.status(&id).await.expect("status").state, "running");
    let r = sh(p.as_ref(), &id, "echo hello").await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "hello\n"));
    p.destroy(&id).await.expect("destroy");
    let e = p.status(&id).await.expect_err("status after destroy");
    assert_eq!(e.kind(), ErrorKind::SandboxNotFound);
    p.destroy(&id).await.expect("destroy is idempotent");
    let e = p
        .exec(
            &id,
            &ExecSpec {
                argv: vec!["true".into()],
                ..Default::default()
            },
            mpsc::channel(1).0,
        )
        .await
        .expect_err("exec after destroy");
    assert_eq!(e.kind(), ErrorKind::SandboxNotFound);
    assert_eq!(
        p.status("sb-00000000").await.expect_err("unknown").kind(),
        ErrorKind::SandboxNotFound
    );
}

pub async fn exec_shell_and_argv(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let r = sh(p.as_ref(), &id, "echo $((40+2))").await;
    assert_eq!(r.stdout, "42\n");
    // Shell mode quotes args: the payload stays one literal word.
    let argv = paths::build_argv("shell", "echo", &["$HOME;echo pwned".into()]).expect("argv");
    let r = run_spec(
        p.as_ref(),
        &id,
        ExecSpec {
            argv,
            ..Default::default()
        },
    )
    .await
    .expect("exec");
    assert_eq!(r.stdout, "$HOME;echo pwned\n");
    // Argv mode never involves a shell.
    let argv = paths::build_argv("argv", "echo", &["$HOME;echo pwned".into(), "a b".into()])
        .expect("argv");
    let r = run_spec(
        p.as_ref(),
        &id,
        ExecSpec {
            argv,
            ..Default::default()
        },
    )
    .await
    .expect("exec");
    assert_eq!(r.stdout, "$HOME;echo pwned a b\n");
    assert!(!r.stdout.contains("pwned\npwned"));
    p.destroy(&id).await.expect("destroy");
}

pub async fn exit_codes(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let r = sh(p.as_ref(), &id, "echo out; echo err >&2; exit 3").await;
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (3, "out\n", "err\n")
    );
    let r = run_spec(
        p.as_ref(),
        &id,
        ExecSpec {
            argv: vec!["/definitely/not/here".into()],
            ..Default::default()
        },
    )
    .await
    .expect("missing program is an exec result");
    assert_eq!(r.code, 127, "missing program exits 127 like a shell");
    let r = sh(p.as_ref(), &id, "kill -9 $$").await;
    assert_eq!(r.code, 137, "killed by signal 9 reports 128+9");
    p.destroy(&id).await.expect("destroy");
}

pub async fn env_and_workdir(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let r = sh(
        p.as_ref(),
        &id,
        "[ \"$(pwd)\" = \"${SANDBOX_ROOT}/workspace\" ] && echo yes",
    )
    .await;
    assert_eq!(r.stdout, "yes\n", "default workdir is /workspace");
    let spec = ExecSpec {
        argv: paths::build_argv(
            "shell",
            "echo \"$FOO|$BAR\"; [ \"$(pwd)\" = \"${SANDBOX_ROOT}/tmp\" ] && echo /tmp",
            &[],
        )
        .expect("argv"),
        env: BTreeMap::from([
            ("FOO".into(), "foo value".into()),
            ("BAR".into(), "x=y".into()),
        ]),
        workdir: "/tmp".into(),
        ..Default::default()
    };
    let r = run_spec(p.as_ref(), &id, spec).await.expect("exec");
    assert_eq!(r.stdout, "foo value|x=y\n/tmp\n");
    let spec = ExecSpec {
        argv: vec!["true".into()],
        workdir: "/no/such/dir".into(),
        ..Default::default()
    };
    let e = run_spec(p.as_ref(), &id, spec)
        .await
        .expect_err("missing workdir");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    p.destroy(&id).await.expect("destroy");
}

/// A command run as uid/gid 1000 is that identity, owns what it
/// creates, and holds none of root's powers.
pub async fn exec_as_user(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let spec = ExecSpec {
        argv: paths::build_argv(
            "shell",
            "id -u; id -g; id -G; f=${SANDBOX_ROOT}/tmp/by-user; touch $f; ls -ln $f | awk '{print $3\":\"$4}'; \
             touch ${SANDBOX_ROOT}/etc/planted 2>/dev/null && echo wrote-etc || echo denied",
            &[],
        )
        .expect("argv"),
        user: Some(stacyvm_core::provider::ExecUser {
            uid: 1000,
            gid: 1000,
        }),
        ..Default::default()
    };
    let r = run_spec(p.as_ref(), &id, spec).await;
    if !f.supports_users() {
        let e = r.expect_err("a provider without users must refuse");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    let r = r.expect("exec as user");
    assert_eq!(
        r.stdout, "1000\n1000\n1000\n1000:1000\ndenied\n",
        "uid, gid, no supplementary groups, ownership, no root powers: {r:?}"
    );
    let r = sh(p.as_ref(), &id, "id -u").await;
    assert_eq!(r.stdout, "0\n", "the default stays root");
    p.destroy(&id).await.expect("destroy");
}

/// Waits (at most 10 s) until `events` has shown every `(op, name)` of
/// `want`; returns all it saw.
async fn expect_events(
    events: &mut stacyvm_core::provider::FsEvents,
    want: &[(stacyvm_core::provider::FsOp, &str)],
) -> Vec<(stacyvm_core::provider::FsOp, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !want
        .iter()
        .all(|(op, n)| seen.iter().any(|(o, s)| o == op && s == n))
    {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Ok(batch))) => seen.extend(batch.into_iter().map(|e| (e.op, e.name))),
            other => panic!("waiting for {want:?}: got {other:?} after {seen:?}"),
        }
    }
    seen
}

/// Directory watches report creates, writes, renames, chmods and removals
/// by name; a recursive one follows directories made after it began; bad
/// paths are typed errors.
pub async fn watch_dir_reports_changes(f: &dyn Fixture) {
    use stacyvm_core::provider::FsOp;
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let w = p.watch_dir(&id, "/workspace", false).await;
    if !f.supports_watch() {
        let e = w.expect_err("a provider without watches must refuse");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    let mut w = w.expect("watch /workspace");
    p.write_file(&id, "/workspace/w.txt", b"hello", 0o644)
        .await
        .expect("write");
    expect_events(&mut w, &[(FsOp::Create, "w.txt"), (FsOp::Write, "w.txt")]).await;
    let r = sh(
        p.as_ref(),
        &id,
        "cd /workspace && chmod 600 w.txt && mv w.txt v.txt && rm v.txt && mkdir d && echo x > d/inner",
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let seen = expect_events(
        &mut w,
        &[
            (FsOp::Chmod, "w.txt"),
            (FsOp::Rename, "w.txt"),
            (FsOp::Create, "v.txt"),
            (FsOp::Remove, "v.txt"),
            (FsOp::Create, "d"),
        ],
    )
    .await;
    assert!(
        !seen.iter().any(|(_, n)| n.contains('/')),
        "a flat watch sees no deeper changes: {seen:?}"
    );
    drop(w);

    // Recursive: existing and new subdirectories alike.
    let mut w = p
        .watch_dir(&id, "/workspace", true)
        .await
        .expect("recursive watch");
    let r = sh(
        p.as_ref(),
        &id,
        "cd /workspace && echo y > d/inner && mkdir -p new/deeper && sleep 0.3 && echo z > new/deeper/f",
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    expect_events(
        &mut w,
        &[
            (FsOp::Write, "d/inner"),
            (FsOp::Create, "new"),
            (FsOp::Create, "new/deeper/f"),
        ],
    )
    .await;
    drop(w);

    let e = p
        .watch_dir(&id, "/workspace/none", false)
        .await
        .expect_err("missing");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = p
        .watch_dir(&id, "/workspace/d/inner", false)
        .await
        .expect_err("a file");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");

    // The watched directory going away ends the watch.
    let mut w = p
        .watch_dir(&id, "/workspace/d", false)
        .await
        .expect("watch d");
    let r = sh(p.as_ref(), &id, "rm -rf /workspace/d").await;
    assert_eq!(r.code, 0, "{r:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, w.recv()).await {
            Ok(None) => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("the watch must end when its directory goes: {other:?}"),
        }
    }
    p.destroy(&id).await.expect("destroy");
}

/// Providers that announce `stats` report a running sandbox's CPU and
/// memory (a sandbox holding 64 MiB shows at least that much); the rest
/// refuse with `Unsupported`. A destroyed sandbox has no stats.
pub async fn stats_report_usage(f: &dyn Fixture) {
    use stacyvm_core::provider::capability;
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    // Capabilities are what the last health check learnt.
    p.health().await.expect("health");
    let announced = p.capabilities().iter().any(|c| c == capability::STATS);
    if !announced {
        let e = p.stats(&id).await.expect_err("stats not announced");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    // Hold 64 MiB in one process while sampling (awk doubles a string:
    // no pipe, few syscalls, fast under TCG, ptrace and gVisor alike).
    let holder = {
        let p = p.clone();
        let id = id.clone();
        tokio::spawn(async move {
            sh(
                p.as_ref(),
                &id,
                "awk 'BEGIN { s = \"a\"; while (length(s) < 67108864) s = s s; system(\"sleep 120\"); print length(s) }'",
            )
            .await
        })
    };
    let mut peak = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        let s = p.stats(&id).await.expect("stats");
        assert!(s.cpu_pct.is_finite() && s.cpu_pct >= 0.0, "{s:?}");
        assert!(
            s.mem_limit_bytes == 0 || s.mem_bytes <= s.mem_limit_bytes,
            "{s:?}"
        );
        peak = peak.max(s.mem_bytes);
        if peak >= 64 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    holder.abort();
    assert!(
        peak >= 64 << 20,
        "a sandbox holding 64 MiB reported at most {peak} bytes"
    );
    p.destroy(&id).await.expect("destroy");
    assert!(p.stats(&id).await.is_err(), "stats of a destroyed sandbox");
}

/// `connect` reaches a server on the sandbox's loopback (the preview
/// proxy's way in): bytes both ways, a half-close, and a port nothing
/// listens on is `NotFound`.
pub async fn connect_reaches_a_port(f: &dyn Fixture) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    if !f.supports_connect() {
        let e = p
            .connect(&id, 18123)
            .await
            .err()
            .expect("connect not supported");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    let e = p.connect(&id, 18124).await.err().expect("nothing listens");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // An echo server (busybox nc), in the background.
    let started = sh(
        p.as_ref(),
        &id,
        "if command -v busybox >/dev/null; then NC='busybox nc'; else NC=nc; fi; \
         setsid $NC -ll -p 18123 -e cat </dev/null >/dev/null 2>&1 & echo started",
    )
    .await;
    assert_eq!(started.code, 0, "{started:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match p.connect(&id, 18123).await {
            Ok(c) => break c,
            Err(e) if e.kind() == ErrorKind::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(&mut conn);
    let send = async {
        wr.write_all(&payload).await.expect("write");
        wr.flush().await.expect("flush");
    };
    let recv = async {
        let mut got = vec![0u8; payload.len()];
        rd.read_exact(&mut got).await.expect("read the echo");
        got
    };
    let ((), got) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
            .await
            .expect("echo within 60 s");
    assert!(got == payload, "the echo differs from what was sent");
    drop(conn);
    p.destroy(&id).await.expect("destroy");
}

/// Collects a stream's chunks, or its error.
async fn collect_stream(
    mut s: stacyvm_core::provider::FileStream,
) -> stacyvm_core::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(c) = s.chunks.recv().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

/// `data` as an upload channel in 64 KiB pieces.
fn upload_of(data: &[u8]) -> mpsc::Receiver<Vec<u8>> {
    let pieces: Vec<Vec<u8>> = data.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let (tx, rx) = mpsc::channel(pieces.len().max(1));
    for p in pieces {
        tx.try_send(p).expect("queue");
    }
    rx
}

/// A tar entry whose raw name skips the builder's own checks.
fn raw_tar_entry(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    b.append(&h, data).expect("append");
}

pub async fn archives_round_trip(f: &dyn Fixture) {
    use stacyvm_core::provider::ArchiveLimits;
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let limits = ArchiveLimits {
        max_bytes: 1 << 30,
        max_entries: 10_000,
    };
    if !f.supports_archives() {
        let e = p
            .archive_read(&id, "/tmp", limits)
            .await
            .expect_err("archives not supported");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    let made = sh(
        p.as_ref(),
        &id,
        "set -e; mkdir -p /tmp/arc/src/sub/deep /tmp/arc/src/empty; printf hello > /tmp/arc/src/sub/a.txt; \
         head -c 200000 /dev/urandom > /tmp/arc/src/big.bin; ln -s sub/a.txt /tmp/arc/src/link; \
         ln -s /etc/hostname /tmp/arc/src/abs; sha256sum /tmp/arc/src/big.bin | cut -c1-64",
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    let sum = made.stdout.trim().to_string();

    // Packed: every kind of entry, links as links.
    let tar_bytes = collect_stream(
        p.archive_read(&id, "/tmp/arc/src", limits)
            .await
            .expect("pack"),
    )
    .await
    .expect("pack stream");
    let mut seen = BTreeMap::new();
    let mut a = tar::Archive::new(tar_bytes.as_slice());
    for e in a.entries().expect("a tar") {
        let e = e.expect("entry");
        let name = e
            .path()
            .expect("name")
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let link = e
            .link_name()
            .expect("link")
            .map(|l| l.to_string_lossy().to_string())
            .unwrap_or_default();
        seen.insert(name, (e.header().entry_type(), e.size(), link));
    }
    let kinds: Vec<(&str, tar::EntryType)> = seen.iter().map(|(k, v)| (k.as_str(), v.0)).collect();
    assert_eq!(
        kinds,
        vec![
            ("abs", tar::EntryType::Symlink),
            ("big.bin", tar::EntryType::Regular),
            ("empty", tar::EntryType::Directory),
            ("link", tar::EntryType::Symlink),
            ("sub", tar::EntryType::Directory),
            ("sub/a.txt", tar::EntryType::Regular),
            ("sub/deep", tar::EntryType::Directory),
        ]
    );
    assert_eq!(seen["big.bin"].1, 200_000);
    assert_eq!(seen["link"].2, "sub/a.txt");
    assert_eq!(seen["abs"].2, "/etc/hostname");

    // Extracted elsewhere: the same tree.
    let r = p
        .archive_write(&id, "/tmp/arc/dst", upload_of(&tar_bytes), limits)
        .await
        .expect("unpack");
    assert_eq!((r.entries, r.bytes), (7, 200_005));
    let check = sh(
        p.as_ref(),
        &id,
        "cd /tmp/arc/dst && cat sub/a.txt && echo && readlink link && readlink abs && \
         test -d empty && test -d sub/deep && sha256sum big.bin | cut -c1-64",
    )
    .await;
    assert_eq!(
        check.stdout,
        format!("hello\nsub/a.txt\n/etc/hostname\n{sum}\n"),
        "{check:?}"
    );

    // A hostile archive: refused, and what it made before is gone.
    let mut b = tar::Builder::new(Vec::new());
    raw_tar_entry(&mut b, tar::EntryType::Regular, "fine.txt", b"fine");
    raw_tar_entry(&mut b, tar::EntryType::Regular, "../escape.txt", b"x");
    let bad = b.into_inner().expect("tar");
    let e = p
        .archive_write(&id, "/tmp/arc/bad", upload_of(&bad), limits)
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let left = sh(
        p.as_ref(),
        &id,
        "ls -A /tmp/arc/bad; test ! -e /tmp/arc/escape.txt && echo clean",
    )
    .await;
    assert_eq!(left.stdout, "clean\n", "{left:?}");

    // Limits bound both directions.
    let few = ArchiveLimits {
        max_bytes: 1 << 30,
        max_entries: 3,
    };
    let e = match p.archive_read(&id, "/tmp/arc/src", few).await {
        Ok(s) => collect_stream(s).await.expect_err("over the entry limit"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    let e = p
        .archive_write(&id, "/tmp/arc/few", upload_of(&tar_bytes), few)
        .await
        .expect_err("over the entry limit");
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    let e = p
        .archive_read(&id, "/tmp/arc/missing", limits)
        .await
        .expect_err("missing");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    p.destroy(&id).await.expect("destroy");
}

pub async fn pause_freezes_processes(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    if !f.supports_pause() {
        let e = p.pause(&id).await.expect_err("pause not supported");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    // A ticker appending a line every 50 ms. Counted from the host's side
    // (a VM's own clock stops while it is paused, so the guest could not
    // tell).
    let started = sh(
        p.as_ref(),
        &id,
        "setsid sh -c 'while :; do echo t >> /tmp/ticks; sleep 0.05; done' \
         >/dev/null 2>&1 </dev/null & echo started",
    )
    .await;
    assert_eq!(started.code, 0, "{started:?}");
    let count = |out: Ran| -> usize {
        assert_eq!(out.code, 0, "{out:?}");
        out.stdout.trim().parse().expect("a count")
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = count(sh(p.as_ref(), &id, "wc -l < /tmp/ticks").await);
    assert!(before >= 2, "the ticker runs: {before} ticks in 400 ms");
    p.pause(&id).await.expect("pause");
    p.pause(&id)
        .await
        .expect("pausing a paused sandbox is fine");
    assert_eq!(p.status(&id).await.expect("status").state, "paused");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.resume(&id).await.expect("resume");
    p.resume(&id)
        .await
        .expect("resuming a running sandbox is fine");
    assert_eq!(p.status(&id).await.expect("status").state, "running");
    let after = count(sh(p.as_ref(), &id, "wc -l < /tmp/ticks").await);
    // 1.5 s running would be ~30 ticks; frozen, only what the two execs'
    // own time let through.
    assert!(
        after - before <= 6,
        "the ticker ran while paused: {before} ticks before, {after} after"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = count(sh(p.as_ref(), &id, "wc -l < /tmp/ticks").await);
    assert!(
        later >= after + 3,
        "the ticker runs again after resume: {after} then {later} ticks 500 ms later"
    );
    // A paused sandbox can be destroyed.
    p.pause(&id).await.expect("pause");
    p.destroy(&id).await.expect("destroy a paused sandbox");
    let gone = p.status(&id).await;
    assert!(
        gone.as_ref().is_err() || gone.as_ref().is_ok_and(|s| s.state == "destroyed"),
        "{gone:?}"
    );
}

pub async fn streaming(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let r = sh(
        p.as_ref(),
        &id,
        "i=1; while [ $i -le 2000 ]; do echo line$i; echo err$i >&2; i=$((i+1)); done",
    )
    .await;
    let want_out: String = (1..=2000).map(|i| format!("line{i}\n")).collect();
    let want_err: String = (1..=2000).map(|i| format!("err{i}\n")).collect();
    assert_eq!(r.stdout, want_out, "stdout complete and in order");
    assert_eq!(r.stderr, want_err, "stderr complete and in order");
    // Output is delivered while the command runs, not at the end.
    let r = sh(p.as_ref(), &id, "echo first; sleep 2; echo second").await;
    let first = r
        .chunks
        .iter()
        .find(|c| String::from_utf8_lossy(&c.1).contains("first"))
        .expect("first chunk");
    let second = r
        .chunks
        .iter()
        .find(|c| String::from_utf8_lossy(&c.1).contains("second"))
        .expect("second chunk");
    assert!(
        second.2 > first.2 + Duration::from_millis(1000),
        "first chunk streamed before the command ended: {:?} vs {:?}",
        first.2,
        second.2
    );
    p.destroy(&id).await.expect("destroy");
}

pub async fn timeout_kills_process_tree(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let spec = ExecSpec {
        argv: paths::build_argv(
            "shell",
            "(sleep 2; echo leaked > ${SANDBOX_ROOT}/workspace/after) & sleep 30",
            &[],
        )
        .expect("argv"),
        timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    let start = Instant::now();
    let e = run_spec(p.as_ref(), &id, spec).await.expect_err("timeout");
    assert_eq!(e.kind(), ErrorKind::ExecTimeout, "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "timeout returned promptly"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = p
        .read_file(&id, "/workspace/after")
        .await
        .expect_err("background child must be dead");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    // The sandbox still works afterwards.
    assert_eq!(sh(p.as_ref(), &id, "echo ok").await.stdout, "ok\n");
    p.destroy(&id).await.expect("destroy");
}

pub async fn stdin_is_delivered(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let spec = ExecSpec {
        argv: vec!["cat".into()],
        stdin: Some(b"from stdin\n".to_vec()),
        ..Default::default()
    };
    let r = run_spec(p.as_ref(), &id, spec).await.expect("exec");
    assert_eq!(r.stdout, "from stdin\n");
    // Without stdin, reading it hits EOF immediately instead of hanging.
    let spec = ExecSpec {
        argv: vec!["cat".into()],
        timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    let r = run_spec(p.as_ref(), &id, spec).await.expect("exec");
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    p.destroy(&id).await.expect("destroy");
}

pub async fn file_operations(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let p = p.as_ref();
    p.write_file(&id, "/workspace/dir/sub/a.txt", b"hello", 0o600)
        .await
        .expect("write creates parents");
    assert_eq!(
        p.read_file(&id, "/workspace/dir/sub/a.txt")
            .await
            .expect("read"),
        b"hello"
    );
    assert_eq!(
        sh(p, &id, "cat ${SANDBOX_ROOT}/workspace/dir/sub/a.txt")
            .await
            .stdout,
        "hello",
        "exec sees API writes"
    );
    let st = p
        .stat_file(&id, "/workspace/dir/sub/a.txt")
        .await
        .expect("stat");
    assert_eq!(
        (
            st.path.as_str(),
            st.size,
            st.mode.as_str(),
            st.is_dir,
            st.name.as_str()
        ),
        ("/workspace/dir/sub/a.txt", 5, "600", false, "a.txt")
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(&st.mod_time).is_ok(),
        "mod_time is RFC 3339: {}",
        st.mod_time
    );
    p.chmod_file(&id, "/workspace/dir/sub/a.txt", 0o755)
        .await
        .expect("chmod");
    assert_eq!(
        p.stat_file(&id, "/workspace/dir/sub/a.txt")
            .await
            .expect("stat")
            .mode,
        "755"
    );
    p.write_file(&id, "/workspace/dir/b.py", b"print(1)", 0o644)
        .await
        .expect("write b");
    let list = p.list_files(&id, "/workspace/dir").await.expect("list");
    let names: Vec<(&str, bool)> = list.iter().map(|f| (f.path.as_str(), f.is_dir)).collect();
    assert_eq!(
        names,
        vec![("/workspace/dir/b.py", false), ("/workspace/dir/sub", true)]
    );
    assert_eq!(
        p.glob_files(&id, "/workspace/dir/*.py")
            .await
            .expect("glob"),
        vec!["/workspace/dir/b.py".to_string()]
    );
    assert_eq!(
        p.glob_files(&id, "/workspace/dir/**/*.txt")
            .await
            .expect("glob **")
            .len(),
        1
    );
    assert!(p
        .glob_files(&id, "/workspace/*.nomatch")
        .await
        .expect("glob no match")
        .is_empty());
    p.move_file(&id, "/workspace/dir/b.py", "/workspace/new/place/c.py")
        .await
        .expect("move creates parent");
    assert_eq!(
        p.read_file(&id, "/workspace/new/place/c.py")
            .await
            .expect("moved"),
        b"print(1)"
    );
    assert_eq!(
        p.read_file(&id, "/workspace/dir/b.py")
            .await
            .expect_err("old gone")
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        p.move_file(&id, "/workspace/nope", "/workspace/x")
            .await
            .expect_err("move missing")
            .kind(),
        ErrorKind::NotFound
    );
    let e = p
        .delete_file(&id, "/workspace/dir", false)
        .await
        .expect_err("non-empty dir needs recursive");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    p.delete_file(&id, "/workspace/dir", true)
        .await
        .expect("recursive delete");
    assert_eq!(
        p.stat_file(&id, "/workspace/dir")
            .await
            .expect_err("deleted")
            .kind(),
        ErrorKind::NotFound
    );
    p.delete_file(&id, "/workspace/never-existed", false)
        .await
        .expect("deleting a missing path is ok");
    assert_eq!(
        p.read_file(&id, "/workspace/missing")
            .await
            .expect_err("missing")
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        p.list_files(&id, "/workspace/missing")
            .await
            .expect_err("missing dir")
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        p.read_file(&id, "/workspace")
            .await
            .expect_err("read dir")
            .kind(),
        ErrorKind::InvalidInput
    );
    // Overwrite replaces content entirely.
    p.write_file(&id, "/workspace/o.txt", b"long content", 0o644)
        .await
        .expect("write");
    p.write_file(&id, "/workspace/o.txt", b"short", 0o644)
        .await
        .expect("overwrite");
    assert_eq!(
        p.read_file(&id, "/workspace/o.txt").await.expect("read"),
        b"short"
    );
    p.destroy(&id).await.expect("destroy");
}

pub async fn binary_and_large_files(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let bin: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    p.write_file(&id, "/workspace/bin.dat", &bin, 0o644)
        .await
        .expect("write binary");
    assert_eq!(
        p.read_file(&id, "/workspace/bin.dat")
            .await
            .expect("read binary"),
        bin
    );
    let big: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    p.write_file(&id, "/workspace/big.bin", &big, 0o644)
        .await
        .expect("write 10 MiB");
    let back = p
        .read_file(&id, "/workspace/big.bin")
        .await
        .expect("read 10 MiB");
    assert!(back == big, "10 MiB round trip differs");
    assert_eq!(
        sh(p.as_ref(), &id, "wc -c < ${SANDBOX_ROOT}/workspace/big.bin")
            .await
            .stdout
            .trim(),
        "10485760"
    );
    p.destroy(&id).await.expect("destroy");
}

/// Files a caller must not be able to turn into a server-side hazard:
/// devices, FIFOs, huge sparse files and procfs oddities are refused with
/// a typed client error, quickly, and the sandbox keeps working.
pub async fn hostile_file_reads_are_refused(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let quick = Duration::from_secs(10);
    let refused = |what: &str, r: stacyvm_core::Result<stacyvm_core::provider::FileStream>| {
        let e = r.expect_err(what);
        assert!(
            matches!(
                e.kind(),
                ErrorKind::InvalidInput | ErrorKind::PayloadTooLarge | ErrorKind::NotFound
            ),
            "{what}: a client error, got {:?}: {e}",
            e.kind()
        );
        e.kind()
    };
    if f.has_devices() {
        for dev in ["/dev/zero", "/dev/urandom", "/dev/null"] {
            let r = tokio::time::timeout(quick, p.read_file_stream(&id, dev, 1 << 30))
                .await
                .expect("a device read must not hang");
            assert_eq!(refused(dev, r), ErrorKind::InvalidInput, "{dev}");
        }
        let r = tokio::time::timeout(quick, p.read_file_stream(&id, "/proc/self/mem", 1 << 30))
            .await
            .expect("/proc/self/mem must not hang");
        if let Err(e) = r {
            assert_ne!(e.kind(), ErrorKind::Internal, "/proc/self/mem: {e}");
        }
    }
    let made = sh(
        p.as_ref(),
        &id,
        "mkfifo ${SANDBOX_ROOT}/workspace/fifo && truncate -s 10G ${SANDBOX_ROOT}/workspace/sparse && echo made",
    )
    .await;
    assert_eq!(made.stdout, "made\n", "{made:?}");
    let r = tokio::time::timeout(quick, p.read_file_stream(&id, "/workspace/fifo", 1 << 30))
        .await
        .expect("a FIFO read must not hang");
    assert_eq!(refused("fifo", r), ErrorKind::InvalidInput);
    let r = tokio::time::timeout(quick, p.read_file_stream(&id, "/workspace/sparse", 1 << 30))
        .await
        .expect("a sparse file read must not hang");
    assert_eq!(refused("sparse 10G", r), ErrorKind::PayloadTooLarge);
    assert_eq!(sh(p.as_ref(), &id, "echo alive").await.stdout, "alive\n");
    p.destroy(&id).await.expect("destroy");
}

/// Streamed reads and writes: many chunks in order, limits enforced on
/// both sides, and a refused upload leaves the old file as it was.
pub async fn streamed_transfers_are_bounded(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let chunk = |i: u32| -> Vec<u8> {
        (0..1024 * 1024u32)
            .map(|j| (j.wrapping_mul(31).wrapping_add(i * 7) >> 3) as u8)
            .collect()
    };
    let (tx, rx) = mpsc::channel(2);
    let feed = tokio::spawn(async move {
        for i in 0..12 {
            if tx.send(chunk(i)).await.is_err() {
                break;
            }
        }
    });
    let n = p
        .write_file_stream(&id, "/workspace/s.bin", 0o600, rx, 64 << 20)
        .await
        .expect("streamed write");
    feed.await.expect("feeder");
    assert_eq!(n, 12 << 20);
    let mut s = p
        .read_file_stream(&id, "/workspace/s.bin", 64 << 20)
        .await
        .expect("streamed read");
    assert_eq!(s.size, 12 << 20);
    let mut got = Vec::new();
    while let Some(c) = s.chunks.recv().await {
        got.extend_from_slice(&c.expect("chunk"));
    }
    let want: Vec<u8> = (0..12).flat_map(chunk).collect();
    assert!(got == want, "12 MiB streamed round trip differs");
    // Over the read limit: refused before any content.
    let e = p
        .read_file_stream(&id, "/workspace/s.bin", 1 << 20)
        .await
        .expect_err("over the read limit");
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    // Over the write limit: refused, the old file intact.
    let (tx, rx) = mpsc::channel(2);
    let feed = tokio::spawn(async move {
        for i in 0..6 {
            if tx.send(chunk(i + 100)).await.is_err() {
                break;
            }
        }
    });
    let e = p
        .write_file_stream(&id, "/workspace/s.bin", 0o600, rx, 3 << 20)
        .await
        .expect_err("over the write limit");
    feed.await.expect("feeder");
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
    let again = p.read_file(&id, "/workspace/s.bin").await.expect("read");
    assert!(again == want, "a refused upload must not change the file");
    p.destroy(&id).await.expect("destroy");
}

/// A directory of 20,000 long names lists completely, a runaway glob is
/// bounded, and neither disturbs an exec in flight on the same sandbox.
pub async fn large_listings_and_globs_stay_bounded(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let made = sh(
        p.as_ref(),
        &id,
        "mkdir ${SANDBOX_ROOT}/workspace/big && cd ${SANDBOX_ROOT}/workspace/big && i=0; \
         pad=$(printf '%0180d' 0); while [ $i -lt 20000 ]; do : > \"$pad$i\"; i=$((i+1)); done; ls | wc -l",
    )
    .await;
    assert_eq!(made.stdout.trim(), "20000", "{made:?}");
    let in_flight = {
        let p = p.clone();
        let id = id.clone();
        tokio::spawn(async move { sh(p.as_ref(), &id, "sleep 1; echo still-here").await })
    };
    let list = p
        .list_files(&id, "/workspace/big")
        .await
        .expect("list 20,000 entries");
    assert_eq!(list.len(), 20_000);
    let started = Instant::now();
    match p.glob_files(&id, "/**/**/**/**/**/*").await {
        Ok(v) => assert!(!v.is_empty()),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::PayloadTooLarge | ErrorKind::InvalidInput
            ),
            "a runaway glob is a typed client error: {e}"
        ),
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "glob is bounded in time"
    );
    let r = in_flight.await.expect("exec task");
    assert_eq!(r.stdout, "still-here\n", "{r:?}");
    assert_eq!(sh(p.as_ref(), &id, "echo ok").await.stdout, "ok\n");
    p.destroy(&id).await.expect("destroy");
}

/// Creates a host file with unique content outside every sandbox.
fn host_marker() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let marker = format!("HOST-MARKER-{}", paths::new_sandbox_id());
    let path = dir.path().join("marker.txt");
    std::fs::write(&path, &marker).expect("marker");
    (dir, path.to_string_lossy().to_string(), marker)
}

pub async fn symlink_escapes_are_contained(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let p = p.as_ref();
    let (_keep, host_path, marker) = host_marker();
    let host_dir = std::path::Path::new(&host_path)
        .parent()
        .expect("parent")
        .to_string_lossy()
        .to_string();
    let ups = "../".repeat(30);
    let script = format!(
        "cd ${{SANDBOX_ROOT}}/workspace && ln -s {host_path} abs && ln -s {ups}{rel} rel && ln -s {host_dir} dirlink && echo ok",
        rel = host_path.trim_start_matches('/')
    );
    assert_eq!(sh(p, &id, &script).await.stdout, "ok\n");
    if let Ok(list) = p.list_files(&id, "/workspace/dirlink").await {
        assert!(
            list.iter().all(|f| f.name != "marker.txt"),
            "list through a dir link reached the host"
        );
    }
    let globbed = p
        .glob_files(&id, "/workspace/dirlink/*")
        .await
        .unwrap_or_default();
    assert!(
        globbed.iter().all(|g| !g.ends_with("marker.txt")),
        "glob through a dir link reached the host: {globbed:?}"
    );
    for link in [
        "/workspace/abs",
        "/workspace/rel",
        "/workspace/dirlink/marker.txt",
    ] {
        if let Ok(data) = p.read_file(&id, link).await {
            assert!(
                !String::from_utf8_lossy(&data).contains(&marker),
                "read through {link} reached the host file"
            );
        }
        if let Ok(st) = p.stat_file(&id, link).await {
            assert_ne!(
                st.size,
                marker.len() as u64,
                "stat through {link} looks like the host file"
            );
        }
        let _ = p.write_file(&id, link, b"overwritten", 0o644).await;
        let _ = p.chmod_file(&id, link, 0o777).await;
    }
    let _ = p
        .move_file(
            &id,
            "/workspace/dirlink/marker.txt",
            "/workspace/stolen.txt",
        )
        .await;
    let _ = p
        .delete_file(&id, "/workspace/dirlink/marker.txt", false)
        .await;
    let _ = p.delete_file(&id, "/workspace/dirlink", true).await;
    let host_now = std::fs::read_to_string(&host_path).expect("host file still exists");
    assert_eq!(host_now, marker, "host file content unchanged");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&host_path)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_ne!(mode, 0o777, "host file mode unchanged");
    p.destroy(&id).await.expect("destroy");
}

pub async fn traversal_is_rejected_before_providers(_f: &dyn Fixture) {
    // The orchestrator normalises every path before a provider sees it;
    // climbing above the root is an error for every operation's input.
    for bad in [
        "../../etc/passwd",
        "/../etc/passwd",
        "/workspace/../../x",
        "a/../../../b",
    ] {
        let e = paths::normalize(bad).expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
    assert!(paths::normalize_pattern("/workspace/../*").is_err());
    assert!(paths::normalize("a\0b").is_err());
}

pub async fn sandboxes_are_separate(f: &dyn Fixture) {
    let p = f.provider();
    let a = spawn(p.as_ref(), &f.image()).await;
    let b = spawn(p.as_ref(), &f.image()).await;
    p.write_file(&a, "/workspace/only-a.txt", b"a", 0o644)
        .await
        .expect("write a");
    assert_eq!(
        p.read_file(&b, "/workspace/only-a.txt")
            .await
            .expect_err("not in b")
            .kind(),
        ErrorKind::NotFound
    );
    p.destroy(&a).await.expect("destroy a");
    assert_eq!(
        sh(p.as_ref(), &b, "echo alive").await.stdout,
        "alive\n",
        "destroying a leaves b running"
    );
    p.destroy(&b).await.expect("destroy b");
}

pub async fn interactive_stdin_and_signals(f: &dyn Fixture) {
    use stacyvm_core::provider::ExecInput;
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    // Stdin arrives while the command runs; its output streams back.
    let (in_tx, in_rx) = mpsc::channel(8);
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(16);
    let spec = ExecSpec {
        argv: vec!["cat".into()],
        timeout: Some(Duration::from_secs(20)),
        ..Default::default()
    };
    let p2 = p.clone();
    let id2 = id.clone();
    let run = tokio::spawn(async move { p2.exec_interactive(&id2, &spec, tx, in_rx).await });
    in_tx
        .send(ExecInput::Stdin(b"first line\n".to_vec()))
        .await
        .expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("echo in time")
        .expect("chunk");
    assert_eq!(
        echoed.data, b"first line\n",
        "output arrives before stdin closes"
    );
    in_tx.send(ExecInput::CloseStdin).await.expect("close");
    let status = run.await.expect("task").expect("exec");
    assert_eq!(status.code, 0, "cat exits at end of input");
    // A signal reaches the running command.
    let (in_tx, in_rx) = mpsc::channel(8);
    let (tx, _rx) = mpsc::channel::<OutputChunk>(16);
    let argv = paths::build_argv("shell", "sleep 30", &[]).expect("argv");
    let spec = ExecSpec {
        argv,
        timeout: Some(Duration::from_secs(20)),
        ..Default::default()
    };
    let p2 = p.clone();
    let id2 = id.clone();
    let run = tokio::spawn(async move { p2.exec_interactive(&id2, &spec, tx, in_rx).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_tx.send(ExecInput::Signal(15)).await.expect("signal");
    let status = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("ends after SIGTERM")
        .expect("task")
        .expect("exec");
    assert_eq!(status.code, 143, "killed by SIGTERM reports 128+15");
    // Closing stdin does not close the input: a signal still arrives.
    let (in_tx, in_rx) = mpsc::channel(8);
    let (tx, _rx) = mpsc::channel::<OutputChunk>(16);
    let argv = paths::build_argv("shell", "sleep 30", &[]).expect("argv");
    let spec = ExecSpec {
        argv,
        timeout: Some(Duration::from_secs(20)),
        ..Default::default()
    };
    let p2 = p.clone();
    let id2 = id.clone();
    let run = tokio::spawn(async move { p2.exec_interactive(&id2, &spec, tx, in_rx).await });
    in_tx.send(ExecInput::CloseStdin).await.expect("close");
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_tx.send(ExecInput::Signal(9)).await.expect("signal");
    let status = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("ends after SIGKILL with stdin closed")
        .expect("task")
        .expect("exec");
    assert_eq!(status.code, 137, "killed by SIGKILL reports 128+9");
    // A signal sent together with the start is not lost while the
    // command is still being started.
    for _ in 0..3 {
        let (in_tx, in_rx) = mpsc::channel(8);
        let (tx, _rx) = mpsc::channel::<OutputChunk>(16);
        let argv = paths::build_argv("shell", "sleep 30", &[]).expect("argv");
        let spec = ExecSpec {
            argv,
            timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        in_tx.send(ExecInput::Signal(9)).await.expect("signal");
        let status = tokio::time::timeout(
            Duration::from_secs(10),
            p.exec_interactive(&id, &spec, tx, in_rx),
        )
        .await
        .expect("an early SIGKILL ends the command")
        .expect("exec");
        assert_eq!(status.code, 137, "killed by the early SIGKILL");
    }
    p.destroy(&id).await.expect("destroy");
}

pub async fn pty_exec_with_resize(f: &dyn Fixture) {
    use stacyvm_core::provider::ExecInput;
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let argv = paths::build_argv(
        "shell",
        "stty size; read line; stty size; echo \"got:$line\"",
        &[],
    )
    .expect("argv");
    let spec = ExecSpec {
        argv,
        timeout: Some(Duration::from_secs(20)),
        pty: Some((30, 90)),
        ..Default::default()
    };
    if !f.supports_pty() {
        let e = run_spec(p.as_ref(), &id, spec)
            .await
            .expect_err("pty unsupported");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        p.destroy(&id).await.expect("destroy");
        return;
    }
    let (in_tx, in_rx) = mpsc::channel(8);
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
    let p2 = p.clone();
    let id2 = id.clone();
    let run = tokio::spawn(async move { p2.exec_interactive(&id2, &spec, tx, in_rx).await });
    let mut out = String::new();
    let wait_for = |needle: &'static str| needle;
    while !out.contains(wait_for("30 90")) {
        let c = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("initial size in time")
            .expect("chunk");
        assert_eq!(
            c.stream,
            StreamKind::Stdout,
            "a pty merges everything into stdout"
        );
        out.push_str(&String::from_utf8_lossy(&c.data));
    }
    in_tx
        .send(ExecInput::Resize(40, 100))
        .await
        .expect("resize");
    tokio::time::sleep(Duration::from_millis(100)).await;
    in_tx
        .send(ExecInput::Stdin(b"typed\n".to_vec()))
        .await
        .expect("stdin");
    while let Ok(Some(c)) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        out.push_str(&String::from_utf8_lossy(&c.data));
        if out.contains("got:typed") {
            break;
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("exits")
        .expect("task")
        .expect("exec");
    assert_eq!(status.code, 0, "{out}");
    assert!(
        out.contains("40 100"),
        "resize seen by the command: {out:?}"
    );
    assert!(out.contains("got:typed"), "{out:?}");
    p.destroy(&id).await.expect("destroy");
}

pub async fn concurrent_execs(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let futs = (0..8).map(|i| {
        let p = p.clone();
        let id = id.clone();
        async move { sh(p.as_ref(), &id, &format!("sleep 0.2; echo {i}")).await }
    });
    let results = futures_join_all(futs).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.stdout, format!("{i}\n"));
    }
    p.destroy(&id).await.expect("destroy");
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

pub async fn restart_visibility(f: &dyn Fixture) {
    let first = f.provider();
    let id = spawn(first.as_ref(), &f.image()).await;
    first
        .write_file(&id, "/workspace/keep.txt", b"kept", 0o644)
        .await
        .expect("write");
    // A restart: the old instance is gone before the new one starts (a
    // microVM's agent port takes one host connection at a time).
    drop(first);
    let second = f.provider();
    if f.survives_restart() {
        assert_eq!(
            second
                .status(&id)
                .await
                .expect("status after restart")
                .state,
            "running"
        );
        assert_eq!(
            second
                .read_file(&id, "/workspace/keep.txt")
                .await
                .expect("read after restart"),
            b"kept"
        );
        assert_eq!(sh(second.as_ref(), &id, "echo back").await.stdout, "back\n");
        if let Ok(rts) = second.list_runtimes().await {
            assert!(
                rts.iter().any(|r| r.sandbox_id == id),
                "inventory lists the sandbox"
            );
        }
    } else {
        assert_eq!(
            second
                .status(&id)
                .await
                .expect_err("gone after restart")
                .kind(),
            ErrorKind::SandboxNotFound
        );
    }
    second.destroy(&id).await.expect("destroy via new instance");
}

/// Snapshots of sandboxes and their children (`sandbox_snapshots`): a
/// child starts with the source's files as they were at the snapshot
/// (contents, modes, owners, links, a removed file stays removed), writes
/// privately (neither the source nor a sibling sees its writes, nor it
/// theirs), and runs on after the snapshot is deleted, from which nothing
/// new can start. Providers without the capability refuse with
/// `Unsupported`.
pub async fn snapshots_fork_files(f: &dyn Fixture) {
    let p = f.provider();
    let id = spawn(p.as_ref(), &f.image()).await;
    let snap_id = paths::new_snapshot_id();
    if !p
        .capabilities()
        .iter()
        .any(|c| c == stacyvm_core::provider::capability::SANDBOX_SNAPSHOTS)
    {
        let e = p
            .snapshot_sandbox(&id, &snap_id)
            .await
            .expect_err("no snapshots");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    let ws = "${SANDBOX_ROOT}/workspace";
    let made = sh(
        p.as_ref(),
        &id,
        &format!(
            "set -e; mkdir -p {ws}/snap/deep/er && cd {ws}/snap \
             && printf 'from the source' > a && chmod 640 a \
             && head -c 1048576 /dev/urandom > big && ln -s a link && ln a hard \
             && printf x > deep/er/f && printf gone > removed && rm removed \
             && mkdir -p gone/dir && rm -r gone && mkdir gone && printf new > gone/only \
             && md5sum big | cut -c1-32"
        ),
    )
    .await;
    assert_eq!(made.code, 0, "{made:?}");
    let big_sum = made.stdout.trim().to_string();
    assert_eq!(big_sum.len(), 32, "a checksum: {made:?}");
    if f.supports_users() {
        let own = sh(p.as_ref(), &id, &format!("chown 1000:1000 {ws}/snap/a")).await;
        assert_eq!(own.code, 0, "{own:?}");
    }
    let taken = p.snapshot_sandbox(&id, &snap_id).await.expect("snapshot");
    assert!(taken.size_bytes > 1_000_000, "{taken:?}");
    // The source runs on; its later writes are its own.
    let later = sh(p.as_ref(), &id, &format!("printf later > {ws}/snap/a")).await;
    assert_eq!(later.code, 0, "{later:?}");

    let child_spec = || {
        let mut s = spawn_spec(&f.image());
        s.snapshot = Some(snap_id.clone());
        s.network_mode = taken.network_mode.clone();
        s
    };
    let (s1, s2) = (child_spec(), child_spec());
    let c1 = p.spawn(&s1).await.expect("child 1").runtime_id;
    let c2 = p.spawn(&s2).await.expect("child 2").runtime_id;
    let owner = if f.supports_users() {
        " && stat -c %u:%g:%a a"
    } else {
        " && stat -c %a a"
    };
    let look = format!(
        "cd {ws}/snap && cat a && echo && cat link && echo && cat hard && echo \
         && md5sum big | cut -c1-32 && cat deep/er/f && echo && ls gone \
         && (test -e removed && echo removed-is-back || echo removed-stays-removed){owner}"
    );
    for c in [&c1, &c2] {
        let seen = sh(p.as_ref(), c, &look).await;
        assert_eq!(seen.code, 0, "{seen:?}");
        let lines: Vec<&str> = seen.stdout.lines().collect();
        assert_eq!(lines[0], "from the source", "{seen:?}");
        assert_eq!(lines[1], "from the source", "the symlink: {seen:?}");
        assert_eq!(lines[2], "from the source", "the hard link: {seen:?}");
        assert_eq!(lines[3], big_sum, "the 1 MiB file: {seen:?}");
        assert_eq!(lines[4], "x", "{seen:?}");
        assert_eq!(
            lines[5], "only",
            "a directory removed and made again: {seen:?}"
        );
        assert_eq!(lines[6], "removed-stays-removed", "{seen:?}");
        if f.supports_users() {
            assert_eq!(lines[7], "1000:1000:640", "owner and mode: {seen:?}");
        } else {
            assert_eq!(lines[7], "640", "mode: {seen:?}");
        }
    }
    // Private writes: child 1 changes a file; child 2 and the source keep
    // theirs.
    let w = sh(
        p.as_ref(),
        &c1,
        &format!("printf child1 > {ws}/snap/a && rm {ws}/snap/big"),
    )
    .await;
    assert_eq!(w.code, 0, "{w:?}");
    let read = |c: String| {
        let p = p.clone();
        async move {
            sh(
                p.as_ref(),
                &c,
                &format!("cat {ws}/snap/a; test -e {ws}/snap/big && echo +big"),
            )
            .await
            .stdout
        }
    };
    assert_eq!(read(c1.clone()).await, "child1");
    assert_eq!(read(c2.clone()).await, "from the source+big\n");
    assert_eq!(read(id.clone()).await, "later+big\n");

    // Deleted while children run: they run on; nothing new starts from it.
    p.delete_snapshot(&snap_id).await.expect("delete");
    p.delete_snapshot(&snap_id)
        .await
        .expect("deleting twice is fine");
    assert_eq!(read(c2.clone()).await, "from the source+big\n");
    let e = p.spawn(&child_spec()).await.expect_err("deleted snapshot");
    assert!(
        matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput),
        "{e}"
    );
    for c in [&c1, &c2, &id] {
        p.destroy(c).await.expect("destroy");
    }
    // Unknown sandboxes have no snapshot.
    let e = p
        .snapshot_sandbox(&paths::new_sandbox_id(), &paths::new_snapshot_id())
        .await
        .expect_err("unknown sandbox");
    assert_eq!(e.kind(), ErrorKind::SandboxNotFound, "{e}");
}

/// Counts the processes whose command line contains `what`, from a
/// shell's view of /proc (the pattern escapes its spaces, so the counting
/// shell's own command line does not match).
fn count_procs_script(what: &str) -> String {
    let pattern = what.replace(' ', "\\ ");
    format!(
        "n=0; for d in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null); \
         case \"$c\" in *{pattern}*) n=$((n+1));; esac; done; echo $n"
    )
}

/// Pool mode: slots of one pool host are separate users in separate pid
/// and mount namespaces — none sees, reads or signals another's processes
/// or files — and closing a slot ends its processes and removes its
/// workspace. Providers without `pool_host` refuse slots.
pub async fn pool_slots_are_confined(f: &dyn Fixture) {
    use stacyvm_core::provider::{capability, slot_runtime_id, SlotSpec, POOL_HOST_METADATA};
    let slot = |uid: u32| SlotSpec {
        uid,
        private_network: true,
    };
    let p = f.provider();
    if !p.capabilities().iter().any(|c| c == capability::POOL_HOST) {
        let id = spawn(p.as_ref(), &f.image()).await;
        let e = p
            .slot_open(&id, &paths::new_sandbox_id(), &slot(10_001))
            .await
            .expect_err("a provider without pool hosts refuses slots");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        p.destroy(&id).await.expect("destroy");
        return;
    }
    let mut spec = spawn_spec(&f.image());
    spec.metadata
        .insert(POOL_HOST_METADATA.into(), "conformance".into());
    let host = p.spawn(&spec).await.expect("pool host").runtime_id;
    let (a, b) = (paths::new_sandbox_id(), paths::new_sandbox_id());
    p.slot_open(&host, &a, &slot(10_001)).await.expect("slot a");
    p.slot_open(&host, &b, &slot(10_002)).await.expect("slot b");
    p.slot_open(&host, &a, &slot(10_001))
        .await
        .expect("opening an open slot is idempotent");
    let mut listed = p.slots(&host).await.expect("slots");
    listed.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(listed, want);
    let (ra, rb) = (slot_runtime_id(&host, &a), slot_runtime_id(&host, &b));

    // A: its own identity and workspace; a secret and a long process.
    let r = sh(
        p.as_ref(),
        &ra,
        "id -u; id -g; pwd; echo $HOME; echo s3cret > /workspace/secret; chmod 644 /workspace/secret; \
         (sleep 3217 &); echo started",
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        ["10001", "10001", "/workspace", "/workspace", "started"],
        "{r:?}"
    );
    let r = sh(p.as_ref(), &ra, &count_procs_script("sleep 3217")).await;
    assert_eq!(r.stdout.trim(), "1", "A sees its own process: {r:?}");

    // B: none of A's files or processes, not even by A's host path.
    let script = format!(
        "id -u; ls -A /workspace | wc -l; cat /workspace/secret 2>/dev/null || echo no-secret; \
         ls /workspace/{a} 2>/dev/null || echo no-path; {}",
        count_procs_script("sleep 3217")
    );
    let r = sh(p.as_ref(), &rb, &script).await;
    let lines: Vec<&str> = r.stdout.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["10002", "0", "no-secret", "no-path", "0"],
        "B must see nothing of A: {r:?}"
    );
    let e = p
        .read_file(&rb, "/workspace/secret")
        .await
        .expect_err("the file API of B reads B's workspace");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    p.write_file(&rb, "/workspace/mine", b"b", 0o600)
        .await
        .expect("B writes its workspace");
    // Nothing else of the shared runtime is B's to change: the image is
    // read-only to it; its IPC namespace is its own.
    let r = sh(
        p.as_ref(),
        &rb,
        "touch /etc/planted 2>/dev/null && echo wrote-etc || echo denied; \
         echo x > /tmp/b-was-here && echo tmp-ok; \
         awk '$5 == \"/\" { o = $6 } END { split(o, f, \",\"); print f[1] }' /proc/self/mountinfo; \
         readlink /proc/self/ns/ipc",
    )
    .await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{r:?}");
    assert_eq!(lines[..3], ["denied", "tmp-ok", "ro"], "{r:?}");
    let a_ipc = sh(p.as_ref(), &ra, "readlink /proc/self/ns/ipc").await;
    assert!(lines[3].starts_with("ipc:["), "{r:?}");
    assert_ne!(
        a_ipc.stdout.trim(),
        lines[3],
        "each slot has its own IPC namespace"
    );
    // B signals everything it may: A's process lives on.
    let _ = sh(p.as_ref(), &rb, "kill -9 -1 2>/dev/null; echo done").await;
    let r = sh(
        p.as_ref(),
        &ra,
        &format!(
            "{}; ls /tmp/b-was-here 2>/dev/null || echo private-tmp",
            count_procs_script("sleep 3217")
        ),
    )
    .await;
    assert_eq!(
        r.stdout.lines().collect::<Vec<_>>(),
        ["1", "private-tmp"],
        "A's process survives B, and B's /tmp is not A's: {r:?}"
    );

    // Loopback is each slot's own: A's listener is A's alone.
    let r = sh(
        p.as_ref(),
        &ra,
        "if command -v python3 >/dev/null; then \
           (python3 -m http.server 7301 --bind 127.0.0.1 >/dev/null 2>&1 &); \
         else (nc -ll -p 7301 -e /bin/cat >/dev/null 2>&1 &); fi; echo listening",
    )
    .await;
    assert_eq!(r.stdout.trim(), "listening", "{r:?}");
    let mut reached = false;
    for _ in 0..50 {
        if p.connect(&ra, 7301).await.is_ok() {
            reached = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reached, "A's port is reachable in A");
    assert!(
        p.connect(&rb, 7301).await.is_err(),
        "A's port is not on B's loopback"
    );

    // Closing A ends its processes and its workspace; B stays.
    p.slot_close(&host, &a).await.expect("close a");
    p.slot_close(&host, &a)
        .await
        .expect("closing a closed slot succeeds");
    let e = run_spec(
        p.as_ref(),
        &ra,
        ExecSpec {
            argv: vec!["true".into()],
            ..Default::default()
        },
    )
    .await
    .expect_err("a closed slot runs nothing");
    assert_eq!(e.kind(), ErrorKind::SandboxNotFound, "{e}");
    assert_eq!(p.slots(&host).await.expect("slots"), vec![b.clone()]);
    p.slot_open(&host, &a, &slot(10_001))
        .await
        .expect("reopen a");
    let r = sh(p.as_ref(), &ra, "ls -A /workspace | wc -l").await;
    assert_eq!(
        r.stdout.trim(),
        "0",
        "a closed slot's workspace is gone: {r:?}"
    );
    let r = sh(p.as_ref(), &rb, "cat /workspace/mine").await;
    assert_eq!(r.stdout, "b", "{r:?}");

    // Ids of the image's own accounts are never a slot's.
    let e = p
        .slot_open(&host, &paths::new_sandbox_id(), &slot(0))
        .await
        .expect_err("root is no slot's uid");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = p
        .slot_open(&host, "../etc", &slot(10_003))
        .await
        .expect_err("a slot id is a sandbox id");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    p.destroy(&host).await.expect("destroy host");
    let e = run_spec(
        p.as_ref(),
        &rb,
        ExecSpec {
            argv: vec!["true".into()],
            ..Default::default()
        },
    )
    .await
    .expect_err("a destroyed host's slots run nothing");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::SandboxNotFound | ErrorKind::ProviderUnavailable
        ),
        "{e}"
    );
}

/// Emits one `#[tokio::test]` per conformance case for a fixture expression.
#[macro_export]
macro_rules! conformance_tests {
    // A fixture that exists only on some hosts (`Option`): where it is
    // `None` each case says so on stderr and passes without running.
    ($name:ident, optional $fixture:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_tests!(@optional $fixture; lifecycle, exec_shell_and_argv, exit_codes, env_and_workdir,
                exec_as_user, watch_dir_reports_changes, stats_report_usage, connect_reaches_a_port, archives_round_trip, pause_freezes_processes, streaming, timeout_kills_process_tree, stdin_is_delivered, file_operations,
                binary_and_large_files, symlink_escapes_are_contained, traversal_is_rejected_before_providers,
                sandboxes_are_separate, concurrent_execs, interactive_stdin_and_signals, pty_exec_with_resize, restart_visibility,
                hostile_file_reads_are_refused, streamed_transfers_are_bounded, large_listings_and_globs_stay_bounded,
                snapshots_fork_files, pool_slots_are_confined);
        }
    };
    (@optional $fixture:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(fx) = $fixture else { return };
                $crate::conformance::$case(&fx).await;
            }
        )*
    };
    ($name:ident, $fixture:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_tests!(@cases $fixture; lifecycle, exec_shell_and_argv, exit_codes, env_and_workdir,
                exec_as_user, watch_dir_reports_changes, stats_report_usage, connect_reaches_a_port, archives_round_trip, pause_freezes_processes, streaming, timeout_kills_process_tree, stdin_is_delivered, file_operations,
                binary_and_large_files, symlink_escapes_are_contained, traversal_is_rejected_before_providers,
                sandboxes_are_separate, concurrent_execs, interactive_stdin_and_signals, pty_exec_with_resize, restart_visibility,
                hostile_file_reads_are_refused, streamed_transfers_are_bounded, large_listings_and_globs_stay_bounded,
                snapshots_fork_files, pool_slots_are_confined);
        }
    };
    (@cases $fixture:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fx = $fixture;
                $crate::conformance::$case(&fx).await;
            }
        )*
    };
}
