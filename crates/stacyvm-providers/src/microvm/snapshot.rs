//! Snapshot-restore spawns: a booted guest of each (image, memory, vCPUs,
//! initramfs, accelerator) is frozen once and every later spawn of that
//! shape resumes a copy of it instead of booting a kernel.
//!
//! A snapshot (`CACHE/snapshots/<key>/`) is made by booting a template VM
//! whose RAM is a shared file (`mem`, `memory-backend-file,share=on`),
//! stopping it once its agent answers, and migrating its device state
//! into `vmstate` with QMP's `x-ignore-shared` capability (the RAM stays in
//! `mem`, nothing is copied). Its root disk overlay is kept as
//! `disk.qcow2`. A clone maps `mem` copy-on-write (`share=off`: pages are
//! shared with every sibling until written), gets its own qcow2 overlay on
//! top of `disk.qcow2`, loads `vmstate` through `-incoming defer` +
//! `migrate-incoming`, and is resumed. The agent then gives the clone a
//! fresh identity (hostname, clock, CRNG reseed, machine id).
//!
//! A snapshot directory appears by rename once complete (`meta.json` is
//! written last), so a half-made one is never used; builds race safely
//! between processes (the first rename wins).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stacyvm_core::{Error, Result};
use stacyvm_sandbox::procs::Identity;
use tokio::io::AsyncWriteExt;

use super::qemu::{launch, wait_agent, Launch};
use super::{qcow2, qmp, Accel};

/// How long the template's agent gets to notice its host left.
pub(super) const SETTLE: Duration = Duration::from_millis(300);

/// What is recorded of a snapshot (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapMeta {
    /// The directory name (see [`key`]).
    pub id: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub accel: String,
    /// The template's kernel command line values, which clones keep.
    pub hostname: String,
    pub token: String,
    pub created_at: DateTime<Utc>,
    /// Bytes on disk (RAM file blocks, state, disk overlay).
    pub size_bytes: u64,
}

/// The snapshot directory name of a VM shape.
pub fn key(
    image_key: &str,
    memory_mb: i64,
    vcpus: i64,
    initrd: &Path,
    accel: Accel,
    networked: bool,
) -> String {
    let mut h = Sha256::new();
    h.update(initrd.to_string_lossy().as_bytes());
    let short = &image_key[..image_key.len().min(16)];
    format!(
        "{short}-{memory_mb}m-{vcpus}c-{}-{}{}",
        &hex::encode(h.finalize())[..12],
        accel.as_str(),
        if networked { "-net" } else { "" }
    )
}

fn root(cache: &Path) -> PathBuf {
    cache.join("snapshots")
}

/// The complete snapshot `key`, if there is one.
pub fn find(cache: &Path, key: &str) -> Option<(PathBuf, SnapMeta)> {
    let dir = root(cache).join(key);
    let meta: SnapMeta =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    let complete = ["mem", "vmstate", "disk.qcow2"]
        .iter()
        .all(|f| dir.join(f).is_file());
    complete.then_some((dir, meta))
}

/// Every complete snapshot in the cache.
pub fn list(cache: &Path) -> Vec<SnapMeta> {
    let Ok(rd) = std::fs::read_dir(root(cache)) else {
        return Vec::new();
    };
    let mut out: Vec<SnapMeta> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            (!name.starts_with('.'))
                .then(|| find(cache, &name).map(|(_, m)| m))
                .flatten()
        })
        .collect();
    out.sort_by_key(|s| s.created_at);
    out
}

/// Removes a snapshot (running clones keep their open files).
pub fn remove(cache: &Path, key: &str) -> Result<()> {
    if key.is_empty() || key.contains('/') || key.starts_with('.') {
        return Err(Error::invalid(format!("bad snapshot id {key:?}")));
    }
    let dir = root(cache).join(key);
    if !dir.is_dir() {
        return Err(Error::not_found(format!("snapshot {key}")));
    }
    std::fs::remove_dir_all(&dir)
        .map_err(|e| Error::internal(format!("removing {}: {e}", dir.display())))
}

/// Removes snapshots of the same image and size made for another
/// initramfs or accelerator (an older agent): nothing restores them.
fn remove_superseded(cache: &Path, key: &str) {
    let split = |k: &str| -> (String, bool) {
        match k.strip_suffix("-net") {
            Some(b) => (b.to_string(), true),
            None => (k.to_string(), false),
        }
    };
    let (base, networked) = split(key);
    let Some(shape) = base.rsplitn(3, '-').nth(2) else {
        return;
    };
    let prefix = format!("{shape}-");
    let Ok(rd) = std::fs::read_dir(root(cache)) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let (rest, net) = split(rest);
        if name != key && net == networked && rest.matches('-').count() == 1 {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// What a template boot needs.
pub(super) struct Template<'a> {
    /// The leased uid the template's QEMU drops to.
    pub(super) runas: Option<u32>,
    pub(super) qemu: &'a Path,
    pub(super) cache: &'a Path,
    pub(super) assets: &'a super::qemu::Assets,
    pub(super) accel: Accel,
    /// The image's ext4 disk.
    pub(super) base: &'a Path,
    pub(super) image: &'a str,
    pub(super) key: &'a str,
    pub(super) memory_mb: i64,
    pub(super) vcpus: i64,
    pub(super) boot_timeout: Duration,
    /// With a NIC (for `bridge` clones): the template's is on a tap of
    /// its own that joins no bridge, and its guest leaves `eth0` down.
    pub(super) networked: bool,
}

/// Boots a template, freezes it and stores the snapshot under `t.key`.
/// The template VM is killed whatever happens (also when this future is
/// dropped).
pub(super) async fn build(t: &Template<'_>) -> Result<SnapMeta> {
    let parent = root(t.cache);
    std::fs::create_dir_all(&parent)
        .map_err(|e| Error::internal(format!("creating {}: {e}", parent.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&parent)
        .map_err(|e| Error::internal(format!("snapshot build dir: {e}")))?;
    let dir = tmp.path();
    let size = std::fs::metadata(t.base)
        .map_err(|e| Error::internal(format!("root disk {}: {e}", t.base.display())))?
        .len();
    let disk = dir.join("disk.qcow2");
    qcow2::create_overlay(&disk, t.base, qcow2::Backing::Raw, size)
        .map_err(|e| Error::internal(format!("creating {}: {e}", disk.display())))?;
    let token: [u8; 32] = rand::random();
    let hostname = "stacyvm-snapshot";
    let mem = dir.join("mem");
    let tap = if t.networked {
        let name = crate::native::net::host_if_name(&format!("snapshot-{}", t.key));
        Some(
            stacyvm_sandbox::ifconfig::open_tap(&name)
                .map_err(|e| Error::internal(format!("creating the template's tap {name}: {e}")))?,
        )
    } else {
        None
    };
    let l = Launch {
        dir,
        assets: t.assets,
        accel: t.accel,
        disk: Some(&disk),
        memory_mb: t.memory_mb,
        vcpus: t.vcpus,
        hostname,
        token: &token,
        memory_file: Some((&mem, true)),
        incoming: false,
        kill_on_drop: true,
        runas: t.runas,
        volumes: &[],
        nic: tap.as_ref().map(|fd| super::qemu::Nic {
            tap: fd,
            mac: "52:54:00:00:00:01".into(),
            boot_config: None,
        }),
    };
    let (pid, child) = launch(t.qemu, &l).await?;
    let ident = Identity::of(pid).ok_or_else(|| Error::internal("QEMU exited at once"))?;
    let qmp_sock = dir.join("qmp.sock");
    qmp::execute(&qmp_sock, "cont", None).await?;
    let client = wait_agent(&dir.join("agent.sock"), &token, t.boot_timeout, &ident).await?;
    // A settled guest: the agent has answered, and nothing else runs.
    client.ping().await?;
    // Disconnect and let the agent see it: the frozen agent must be
    // waiting for a new host, not holding a session no clone can finish.
    drop(client);
    tokio::time::sleep(SETTLE).await;
    qmp::execute(&qmp_sock, "stop", None).await?;
    migrate_out(&qmp_sock, &dir.join("vmstate"), true).await?;
    // The RAM is in `mem` (shared mapping); the template must not run on.
    ident.kill();
    drop(child);
    for f in [
        "mig.sock",
        "qmp.sock",
        "agent.sock",
        "console.sock",
        "qemu.log",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let meta = SnapMeta {
        id: t.key.to_string(),
        image: t.image.to_string(),
        memory_mb: t.memory_mb,
        vcpus: t.vcpus,
        accel: t.accel.as_str().to_string(),
        hostname: hostname.to_string(),
        token: hex::encode(token),
        created_at: Utc::now(),
        size_bytes: allocated(dir),
    };
    std::fs::write(
        dir.join("meta.json"),
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )
    .map_err(|e| Error::internal(format!("writing snapshot meta: {e}")))?;
    let built = tmp.keep();
    let target = root(t.cache).join(t.key);
    if std::fs::rename(&built, &target).is_err() {
        // Another build of the same shape finished first: keep theirs.
        let _ = std::fs::remove_dir_all(&built);
    }
    remove_superseded(t.cache, t.key);
    Ok(meta)
}

/// Migrates the stopped VM behind `qmp_sock` into the file `state`: the
/// stream comes back over a socket pair whose far end QEMU receives over
/// QMP (it runs as an unprivileged uid by now and opens no path of ours).
/// `ignore_shared`: leave RAM in shared memory backends out of the stream
/// (a template's RAM is its `mem` file); otherwise every RAM page goes in.
pub(super) async fn migrate_out(qmp_sock: &Path, state: &Path, ignore_shared: bool) -> Result<()> {
    qmp::execute(
        qmp_sock,
        "migrate-set-capabilities",
        Some(serde_json::json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": ignore_shared}
        ]})),
    )
    .await?;
    // The device state comes back over a socket pair whose far end QEMU
    // receives over QMP (it runs as an unprivileged uid by now).
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Error::internal(format!("socket pair: {e}")))?;
    ours.set_nonblocking(true)
        .map_err(|e| Error::internal(format!("socket pair: {e}")))?;
    let mut ours = tokio::net::UnixStream::from_std(ours)
        .map_err(|e| Error::internal(format!("socket pair: {e}")))?;
    let receive = async {
        let mut f = tokio::fs::File::create(state)
            .await
            .map_err(|e| Error::internal(format!("creating vmstate: {e}")))?;
        tokio::io::copy(&mut ours, &mut f)
            .await
            .map_err(|e| Error::internal(format!("receiving vmstate: {e}")))?;
        f.flush()
            .await
            .map_err(|e| Error::internal(format!("writing vmstate: {e}")))?;
        Ok::<(), Error>(())
    };
    let (sent, received) = tokio::join!(
        qmp::execute_with_fd(
            qmp_sock,
            std::os::fd::OwnedFd::from(theirs),
            "snapshot",
            "migrate",
            Some(serde_json::json!({ "uri": "fd:snapshot" })),
        ),
        tokio::time::timeout(Duration::from_secs(60), receive)
    );
    sent?;
    received.map_err(|_| Error::internal("the migration stream did not end within 60 s"))??;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = qmp::execute(qmp_sock, "query-migrate", None).await?;
        match r.get("status").and_then(serde_json::Value::as_str) {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => {
                return Err(Error::internal(format!(
                    "snapshot migration failed: {}",
                    r.get("error-desc")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("no reason given")
                )))
            }
            _ if Instant::now() >= deadline => {
                return Err(Error::internal("snapshot migration did not complete"))
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_shape() {
        let k = key(
            "abcdef0123456789ffff",
            256,
            1,
            Path::new("/c/initramfs/x.cpio"),
            Accel::Tcg,
            false,
        );
        assert!(k.starts_with("abcdef0123456789-256m-1c-"), "{k}");
        assert!(k.ends_with("-tcg"));
        let networked = key(
            "abcdef0123456789ffff",
            256,
            1,
            Path::new("/c/initramfs/x.cpio"),
            Accel::Tcg,
            true,
        );
        assert_eq!(networked, format!("{k}-net"));
        assert_ne!(
            k,
            key(
                "abcdef0123456789ffff",
                256,
                2,
                Path::new("/c/initramfs/x.cpio"),
                Accel::Tcg,
                false
            )
        );
        assert_ne!(
            k,
            key(
                "abcdef0123456789ffff",
                256,
                1,
                Path::new("/c/initramfs/y.cpio"),
                Accel::Tcg,
                false
            )
        );
    }

    #[test]
    fn superseded_snapshots_go_and_others_stay() {
        let d = tempfile::tempdir().expect("tmp");
        let r = root(d.path());
        for n in [
            "img-256m-1c-aaaa-tcg",
            "img-256m-1c-bbbb-tcg",
            "img-512m-1c-aaaa-tcg",
            "other-256m-1c-aaaa-tcg",
            "img-256m-1c-aaaa-tcg-net",
            "img-256m-1c-cccc-tcg-net",
        ] {
            std::fs::create_dir_all(r.join(n)).expect("mkdir");
        }
        remove_superseded(d.path(), "img-256m-1c-bbbb-tcg");
        // A networked shape is another shape; its own variants go alike.
        remove_superseded(d.path(), "img-256m-1c-cccc-tcg-net");
        let mut left: Vec<String> = std::fs::read_dir(&r)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "img-256m-1c-bbbb-tcg",
                "img-256m-1c-cccc-tcg-net",
                "img-512m-1c-aaaa-tcg",
                "other-256m-1c-aaaa-tcg"
            ]
        );
        assert!(remove(d.path(), "../x").is_err());
        assert_eq!(
            remove(d.path(), "nope").expect_err("missing").kind(),
            stacyvm_core::ErrorKind::NotFound
        );
    }
}
