//! Native snapshots beyond the conformance case: what lands on the host's
//! disk, layers kept for running children of a deleted snapshot, a
//! restarted provider's sweep, and trees a sandbox makes to break the copy.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use stacyvm_core::provider::Provider;
use stacyvm_core::{paths, ErrorKind};

use super::tests::fixture;
use crate::conformance::{sh, spawn, spawn_spec};

fn child_of(snap: &str) -> stacyvm_core::provider::SpawnSpec {
    let mut s = spawn_spec("host");
    s.snapshot = Some(snap.to_string());
    s.network_mode = "none".into();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_hold_sandbox_ids_stay_private_and_outlive_deletion_while_used() {
    let fx = fixture();
    let p = fx.make();
    let id = spawn(&p, "host").await;
    // A directory of the image (a lower layer) removed and made again must
    // stay opaque in children: none of the image's files come back.
    let made = sh(
        &p,
        &id,
        "set -e; for d in /etc/*/; do if [ -n \"$(ls -A $d)\" ]; then echo $d; break; fi; done",
    )
    .await;
    let lower_dir = made.stdout.trim().trim_end_matches('/').to_string();
    assert!(lower_dir.starts_with("/etc/"), "{made:?}");
    let prep = sh(
        &p,
        &id,
        &format!(
            "set -e; rm -rf {lower_dir} && mkdir {lower_dir} && echo mine > {lower_dir}/only \
             && echo root > /workspace/r && echo user > /workspace/u && chown 1000:1000 /workspace/u \
             && cp /bin/true /workspace/suid && chmod 4755 /workspace/suid \
             && ln -s /etc/shadow /workspace/shadow-link"
        ),
    )
    .await;
    assert_eq!(prep.code, 0, "{prep:?}");
    let snap = paths::new_snapshot_id();
    p.snapshot_sandbox(&id, &snap).await.expect("snapshot");

    // On the host: ids are the sandbox's own (0 = sandbox root, 1000), the
    // link is a link, and nobody but the server can reach any of it.
    let layer = fx.state_dir().join("snapshots").join(&snap).join("layer");
    let ws = layer.join("workspace");
    let r = std::fs::metadata(ws.join("r")).expect("r");
    let u = std::fs::metadata(ws.join("u")).expect("u");
    assert_eq!((r.uid(), r.gid()), (0, 0));
    assert_eq!((u.uid(), u.gid()), (1000, 1000));
    let suid = std::fs::metadata(ws.join("suid")).expect("suid");
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755, "modes are kept");
    let link = std::fs::symlink_metadata(ws.join("shadow-link")).expect("link");
    assert!(
        link.file_type().is_symlink(),
        "the link itself, never the host file it names"
    );
    for d in [
        fx.state_dir().join("snapshots"),
        fx.state_dir().join("snapshots").join(&snap),
    ] {
        let m = std::fs::metadata(&d).expect("dir");
        assert_eq!(
            (m.uid(), m.permissions().mode() & 0o777),
            (0, 0o700),
            "{}",
            d.display()
        );
    }

    let child = p.spawn(&child_of(&snap)).await.expect("child").runtime_id;
    let seen = sh(
        &p,
        &child,
        &format!("ls -A {lower_dir}; stat -c %u:%a /workspace/u /workspace/suid; id -u"),
    )
    .await;
    assert_eq!(seen.stdout, "only\n1000:644\n0:4755\n0\n", "{seen:?}");

    // Deleted while the child runs: the layer stays until the child goes.
    p.delete_snapshot(&snap).await.expect("delete");
    assert!(layer.exists(), "a running child's layer stays");
    let again = sh(&p, &child, "cat /workspace/r").await;
    assert_eq!(again.stdout, "root\n");
    assert_eq!(
        p.spawn(&child_of(&snap)).await.expect_err("deleted").kind(),
        ErrorKind::NotFound
    );
    p.destroy(&child).await.expect("destroy child");
    assert!(
        !fx.state_dir().join("snapshots").join(&snap).exists(),
        "the last child takes the deleted snapshot's layer along"
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_sweeps_deleted_snapshots_and_paused_sources_stay_paused() {
    let fx = fixture();
    let p = fx.make();
    let id = spawn(&p, "host").await;
    let w = sh(&p, &id, "echo kept > /workspace/f").await;
    assert_eq!(w.code, 0, "{w:?}");
    p.pause(&id).await.expect("pause");
    let snap = paths::new_snapshot_id();
    p.snapshot_sandbox(&id, &snap)
        .await
        .expect("snapshot of a paused sandbox");
    assert_eq!(p.status(&id).await.expect("status").state, "paused");
    p.resume(&id).await.expect("resume");
    let child = p.spawn(&child_of(&snap)).await.expect("child").runtime_id;
    p.delete_snapshot(&snap).await.expect("delete");
    let dir = fx.state_dir().join("snapshots").join(&snap);
    assert!(dir.join("deleted").exists());
    // The child's state goes while no provider runs (as a crashed server
    // would leave it); the next provider instance removes the layer.
    let meta = p.meta(&child).expect("meta");
    drop(p);
    if let Some(i) = meta.init() {
        i.kill();
    }
    super::remove_tree(&fx.state_dir().join("sandboxes").join(&child)).expect("rm child");
    let p = fx.make();
    assert!(!dir.exists(), "swept at start");
    p.destroy(&child).await.expect("destroy child");
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_too_deep_to_copy_are_refused_and_nothing_is_left() {
    let fx = fixture();
    let p = fx.make();
    let id = spawn(&p, "host").await;
    let deep = sh(
        &p,
        &id,
        "cd /workspace && i=0; while [ $i -lt 300 ]; do mkdir d && cd d; i=$((i+1)); done; echo ok",
    )
    .await;
    assert_eq!(deep.stdout, "ok\n", "{deep:?}");
    let snap = paths::new_snapshot_id();
    let e = p.snapshot_sandbox(&id, &snap).await.expect_err("too deep");
    assert_eq!(e.kind(), ErrorKind::ResourceLimit, "{e}");
    assert!(e.to_string().contains("deeper"), "{e}");
    let left: Vec<_> = std::fs::read_dir(fx.state_dir().join("snapshots"))
        .expect("snapshots dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "nothing half-made: {left:?}");
    // The source was thawed and runs on.
    assert_eq!(sh(&p, &id, "echo alive").await.stdout, "alive\n");
    // Unknown and malformed snapshot names: nothing to start from.
    for bad in ["snap-00000000", "../../etc", ""] {
        let e = p.spawn(&child_of(bad)).await.expect_err("no such snapshot");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{bad}: {e}");
    }
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_files_stay_sparse_and_count_for_what_they_hold() {
    let fx = fixture();
    let p = fx.make();
    let id = spawn(&p, "host").await;
    // 64 GiB apparent, one 4 KiB block of data at 1 GiB: copying it byte
    // for byte would fill the host's disk.
    let made = sh(
        &p,
        &id,
        "truncate -s 64G /workspace/sparse && printf data | dd of=/workspace/sparse bs=1 seek=1073741824 conv=notrunc 2>/dev/null && echo ok",
    )
    .await;
    assert_eq!(made.stdout, "ok\n", "{made:?}");
    let snap = paths::new_snapshot_id();
    let taken = p.snapshot_sandbox(&id, &snap).await.expect("snapshot");
    assert!(taken.size_bytes < 16 << 20, "{taken:?}");
    let copy = fx
        .state_dir()
        .join("snapshots")
        .join(&snap)
        .join("layer/workspace/sparse");
    let m = std::fs::metadata(&copy).expect("copy");
    assert_eq!(m.len(), 64 << 30, "the size is kept");
    assert!(
        m.blocks() * 512 < 1 << 20,
        "holes stay holes: {} blocks",
        m.blocks()
    );
    let child = p.spawn(&child_of(&snap)).await.expect("child").runtime_id;
    let seen = sh(
        &p,
        &child,
        "dd if=/workspace/sparse bs=1 skip=1073741824 count=4 2>/dev/null",
    )
    .await;
    assert_eq!(seen.stdout, "data", "{seen:?}");
    p.destroy(&child).await.expect("destroy");
    p.delete_snapshot(&snap).await.expect("delete");
    p.destroy(&id).await.expect("destroy");
}
