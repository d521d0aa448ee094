//! Named volumes through the API, as a user drives them: data that outlives
//! its sandboxes and a `kill -9` of the server, one read-write mount at a
//! time, read-only mounts, the size cap, export and import (a tar.gz round
//! trip, a hostile archive refused), the same volume on native and docker,
//! and bad input. Every volume is deleted again (the suite leaves no mount
//! behind; a failing test's guard unmounts what it made).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

/// Unmounts every volume file system under a data dir on drop (a test that
/// panics before deleting its volumes).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let root = self.0.join("volumes");
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for mp in text.lines().filter_map(|l| l.split(' ').nth(4)) {
            if Path::new(mp).starts_with(&root) {
                let _ = std::process::Command::new("umount")
                    .args(["-l", mp])
                    .status();
            }
        }
    }
}

fn mounted_under(dir: &Path) -> Vec<String> {
    let root = dir.join("volumes");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| Path::new(mp).starts_with(&root))
        .map(str::to_string)
        .collect()
}

async fn spawn_with(api: &common::Api, body: serde_json::Value) -> String {
    let (s, v) = api.post("/sandboxes", body).await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_outlive_sandboxes_and_crashes_with_one_writer_at_a_time() {
    let dir = tempfile::tempdir().expect("dir");
    let _unmount = Unmount(dir.path().to_path_buf());
    let env = [("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")];
    let server = common::Server::start(dir.path(), &env);
    let api = common::Api::new(&server);

    // Bad input first: names, sizes, duplicates.
    for (body, want) in [
        (json!({"name": "Bad Name"}), 400),
        (json!({"name": "data", "size_mb": 1}), 400),
        (json!({"name": "data", "size_mb": 10_000_000}), 400),
        (json!({"name": "data", "size_mb": 32, "extra": 1}), 400),
    ] {
        let (s, v) = api.post("/volumes", body.clone()).await;
        assert_eq!(s, want, "{body}: {v}");
    }
    let (s, v) = api
        .post("/volumes", json!({"name": "data", "size_mb": 32}))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["size_mb"].as_i64(), v["mounts"].as_array().map(Vec::len)),
        (Some(32), Some(0)),
        "{v}"
    );
    let (s, v) = api
        .post("/volumes", json!({"name": "data", "size_mb": 32}))
        .await;
    assert_eq!(s, 409, "{v}");

    // A writer; a second writer is refused, a reader is not.
    let a = spawn_with(
        &api,
        json!({"volumes": [{"volume": "data", "path": "/data"}]}),
    )
    .await;
    let out = api
        .exec(
            &a,
            "echo kept > /data/f && mkdir /data/home && chown 1000:1000 /data/home && ln -s /etc/shadow /data/link && echo ok",
        )
        .await;
    assert_eq!(out["stdout"], "ok\n", "{out}");
    let (s, v) = api
        .post(
            "/sandboxes",
            json!({"volumes": [{"volume": "data", "path": "/data"}]}),
        )
        .await;
    assert_eq!(s, 409, "a second writer: {v}");
    let r = spawn_with(
        &api,
        json!({"volumes": [{"volume": "data", "path": "/mnt/ro", "read_only": true}]}),
    )
    .await;
    let out = api
        .exec(&r, "cat /mnt/ro/f; touch /mnt/ro/x 2>&1 || echo refused")
        .await;
    let text = out["stdout"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("kept\n") && text.ends_with("refused\n"),
        "{out}"
    );

    // Bad mounts.
    for (body, want) in [
        (
            json!({"volumes": [{"volume": "data", "path": "/proc/x", "read_only": true}]}),
            400,
        ),
        (
            json!({"volumes": [{"volume": "data", "path": "relative", "read_only": true}]}),
            400,
        ),
        (json!({"volumes": [{"volume": "nope", "path": "/x"}]}), 404),
        (
            json!({"volumes": [
                {"volume": "data", "path": "/a", "read_only": true},
                {"volume": "data", "path": "/b", "read_only": true}
            ]}),
            400,
        ),
    ] {
        let (s, v) = api.post("/sandboxes", body.clone()).await;
        assert_eq!(s, want, "{body}: {v}");
    }

    // The size is the cap: the sandbox gets ENOSPC, the host's disk is
    // not touched.
    let out = api
        .exec(
            &a,
            "dd if=/dev/zero of=/data/big bs=1M count=64 2>&1; rm -f /data/big; echo done",
        )
        .await;
    let text = out["stdout"].as_str().unwrap_or_default();
    assert!(
        text.contains("No space left") && text.ends_with("done\n"),
        "{out}"
    );

    // In use: no delete, no export.
    let (s, v) = api.delete("/volumes/data").await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = api.get("/volumes/data/archive").await;
    assert_eq!(s, 409, "{v}");
    let (_, v) = api.get("/volumes/data").await;
    assert_eq!(v["mounts"].as_array().map(Vec::len), Some(2), "{v}");

    // The sandboxes go, then the server dies hard: the data stays.
    for id in [&a, &r] {
        let (s, v) = api.delete(&format!("/sandboxes/{id}")).await;
        assert_eq!(s, 200, "{v}");
    }
    let pid = server.pid();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    drop(server);
    let server = common::Server::start(dir.path(), &env);
    let api = common::Api::new(&server);
    let (s, v) = api.get("/volumes/data").await;
    assert_eq!(s, 200, "{v}");
    assert!(v["used_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["mounts"].as_array().map(Vec::len), Some(0), "{v}");
    let b = spawn_with(
        &api,
        json!({"volumes": [{"volume": "data", "path": "/work"}]}),
    )
    .await;
    let out = api
        .exec(
            &b,
            "cat /work/f; stat -c %u:%g /work/home; readlink /work/link",
        )
        .await;
    assert_eq!(out["stdout"], "kept\n1000:1000\n/etc/shadow\n", "{out}");
    let (s, v) = api.delete(&format!("/sandboxes/{b}")).await;
    assert_eq!(s, 200, "{v}");

    // Export (tar.gz) and import into another volume.
    let resp = api
        .http
        .get(format!("{}/volumes/data/archive?format=tar.gz", api.base))
        .send()
        .await
        .expect("export");
    assert_eq!(resp.status().as_u16(), 200);
    let tgz = resp.bytes().await.expect("body").to_vec();
    assert_eq!(&tgz[..2], &[0x1f, 0x8b], "gzip");
    let (s, v) = api
        .post("/volumes", json!({"name": "copy", "size_mb": 32}))
        .await;
    assert_eq!(s, 201, "{v}");
    let resp = api
        .http
        .put(format!("{}/volumes/copy/archive", api.base))
        .body(tgz)
        .send()
        .await
        .expect("import");
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "{v}");
    let c = spawn_with(
        &api,
        json!({"volumes": [{"volume": "copy", "path": "/copy", "read_only": true}]}),
    )
    .await;
    let out = api
        .exec(
            &c,
            "cat /copy/f; stat -c %u /copy/home; readlink /copy/link",
        )
        .await;
    assert_eq!(out["stdout"], "kept\n1000\n/etc/shadow\n", "{out}");
    let (s, v) = api.delete(&format!("/sandboxes/{c}")).await;
    assert_eq!(s, 200, "{v}");

    // A hostile archive (an entry climbing out) is refused; nothing lands
    // outside the volume.
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.as_mut_bytes()[..11].copy_from_slice(b"../escaped\0");
    h.set_cksum();
    evil.append(&h, &b"evil"[..]).expect("append");
    let evil = evil.into_inner().expect("tar");
    let resp = api
        .http
        .put(format!("{}/volumes/copy/archive", api.base))
        .body(evil)
        .send()
        .await
        .expect("import");
    assert_eq!(resp.status().as_u16(), 400);
    assert!(!dir.path().join("volumes").join("escaped").exists());

    // Deleted: data and mounts gone.
    for name in ["data", "copy"] {
        let (s, v) = api.delete(&format!("/volumes/{name}")).await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = api.get("/volumes").await;
    assert_eq!((s, v.as_array().map(Vec::len)), (200, Some(0)), "{v}");
    assert!(
        mounted_under(dir.path()).is_empty(),
        "{:?}",
        mounted_under(dir.path())
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("volumes"))
        .expect("volumes dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_volume_serves_native_and_docker_sandboxes() {
    const IMAGE: &str = "stacyvm-test/docker-busybox:1";
    common::ensure_docker_image(IMAGE);
    let dir = tempfile::tempdir().expect("dir");
    let _unmount = Unmount(dir.path().to_path_buf());
    let server = common::Server::start(
        dir.path(),
        &[
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_PROVIDERS_DOCKER_ENABLED", "true"),
            ("STACYVM_PROVIDERS_DOCKER_DEFAULT_IMAGE", IMAGE),
        ],
    );
    let api = common::Api::new(&server);
    let (s, v) = api
        .post("/volumes", json!({"name": "shared", "size_mb": 32}))
        .await;
    assert_eq!(s, 201, "{v}");
    let n = spawn_with(
        &api,
        json!({"volumes": [{"volume": "shared", "path": "/shared"}]}),
    )
    .await;
    let out = api
        .exec(
            &n,
            "echo from-native > /shared/n && chown 1000:1000 /shared/n && echo ok",
        )
        .await;
    assert_eq!(out["stdout"], "ok\n", "{out}");
    let (s, v) = api.delete(&format!("/sandboxes/{n}")).await;
    assert_eq!(s, 200, "{v}");
    let d = spawn_with(
        &api,
        json!({"provider": "docker", "volumes": [{"volume": "shared", "path": "/shared"}]}),
    )
    .await;
    let out = api
        .exec(
            &d,
            "cat /shared/n; stat -c %u /shared/n; echo from-docker > /shared/d && echo ok",
        )
        .await;
    assert_eq!(out["stdout"], "from-native\n1000\nok\n", "{out}");
    let (s, v) = api.delete(&format!("/sandboxes/{d}")).await;
    assert_eq!(s, 200, "{v}");
    let n2 = spawn_with(
        &api,
        json!({"volumes": [{"volume": "shared", "path": "/shared", "read_only": true}]}),
    )
    .await;
    let out = api.exec(&n2, "cat /shared/d").await;
    assert_eq!(out["stdout"], "from-docker\n", "{out}");
    let (s, v) = api.delete(&format!("/sandboxes/{n2}")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api.delete("/volumes/shared").await;
    assert_eq!(s, 200, "{v}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !mounted_under(dir.path()).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(mounted_under(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_mounts_backs_up_and_restores_volumes() {
    let dir = tempfile::tempdir().expect("dir");
    let _unmount = Unmount(dir.path().to_path_buf());
    let server = common::Server::start(dir.path(), &[("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")]);
    let api = common::Api::new(&server);
    assert_eq!(
        common::cli(&server, &["volume", "create", "notes", "--size-mb", "24"]),
        "notes\n"
    );
    let id = common::cli(&server, &["spawn", "--volume", "notes:/notes"])
        .trim()
        .to_string();
    let out = api.exec(&id, "echo remember > /notes/todo").await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let listed: serde_json::Value =
        serde_json::from_str(&common::cli(&server, &["volume", "ls", "--json"])).expect("json");
    assert_eq!(listed[0]["name"], "notes", "{listed}");
    assert_eq!(
        listed[0]["mounts"][0]["sandbox_id"],
        id.as_str(),
        "{listed}"
    );
    let table = common::cli(&server, &["volume", "ls"]);
    assert!(
        table.contains("notes") && table.contains(&format!("{id}:/notes")),
        "{table}"
    );
    common::cli(&server, &["kill", &id]);
    let backup = dir.path().join("notes.tar.gz");
    common::cli(
        &server,
        &["volume", "export", "notes", "-o", &backup.to_string_lossy()],
    );
    let bytes = std::fs::read(&backup).expect("backup");
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "a .tar.gz name means gzip");
    common::cli(
        &server,
        &["volume", "create", "restored", "--size-mb", "24"],
    );
    common::cli(
        &server,
        &["volume", "import", "restored", &backup.to_string_lossy()],
    );
    let id = common::cli(&server, &["spawn", "-v", "restored:/r:ro"])
        .trim()
        .to_string();
    let out = api.exec(&id, "cat /r/todo").await;
    assert_eq!(out["stdout"], "remember\n", "{out}");
    common::cli(&server, &["kill", &id]);
    for name in ["notes", "restored"] {
        common::cli(&server, &["volume", "rm", name]);
    }
    assert!(mounted_under(dir.path()).is_empty());
}

/// What the security review tried: a snapshot whose files turn a volume's
/// path into a link to `/dev` (the bind must not follow it), writers
/// racing for one volume (exactly one wins, every time), and an export
/// that holds the volume so no writer can start meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_in_the_root_races_and_transfers_cannot_get_around_the_rules() {
    let dir = tempfile::tempdir().expect("dir");
    let _unmount = Unmount(dir.path().to_path_buf());
    let server = common::Server::start(dir.path(), &[("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")]);
    let api = common::Api::new(&server);
    let (s, v) = api
        .post("/volumes", json!({"name": "v", "size_mb": 16}))
        .await;
    assert_eq!(s, 201, "{v}");

    // A link planted in a snapshot: /root/x -> /dev. Mounting the volume
    // there is refused with a 400; nothing lands on /dev.
    let src = spawn_with(&api, json!({})).await;
    let out = api
        .exec(
            &src,
            "ln -s /dev /root/x && ln -s ../dev /root/rel && echo ok",
        )
        .await;
    assert_eq!(out["stdout"], "ok\n", "{out}");
    let (s, v) = api
        .post(&format!("/sandboxes/{src}/snapshot"), json!({}))
        .await;
    assert_eq!(s, 201, "{v}");
    let snap = v["id"].as_str().expect("snapshot").to_string();
    for path in ["/root/x", "/root/rel", "/root/x/null"] {
        let (s, v) = api
            .post(
                "/sandboxes",
                json!({"snapshot": snap, "volumes": [{"volume": "v", "path": path}]}),
            )
            .await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("symlink"),
            "{v}"
        );
    }
    let (s, v) = api.get("/volumes/v").await;
    assert_eq!(
        (s, v["mounts"].as_array().map(Vec::len)),
        (200, Some(0)),
        "nothing holds it: {v}"
    );

    // Writers race: of two spawns at once, one gets the volume.
    for _ in 0..4 {
        let body = json!({"volumes": [{"volume": "v", "path": "/v"}]});
        let (a, b) = tokio::join!(
            api.post("/sandboxes", body.clone()),
            api.post("/sandboxes", body)
        );
        let mut won = Vec::new();
        for (s, v) in [a, b] {
            match s {
                201 => won.push(v["id"].as_str().expect("id").to_string()),
                409 => {}
                other => panic!("{other}: {v}"),
            }
        }
        assert_eq!(won.len(), 1, "exactly one writer");
        for id in won {
            let (s, v) = api.delete(&format!("/sandboxes/{id}")).await;
            assert_eq!(s, 200, "{v}");
        }
    }

    // An export in progress holds the volume against writers.
    let w = spawn_with(&api, json!({"volumes": [{"volume": "v", "path": "/v"}]})).await;
    let out = api
        .exec(&w, "head -c 8000000 /dev/urandom > /v/big && echo ok")
        .await;
    assert_eq!(out["stdout"], "ok\n", "{out}");
    let (s, v) = api.delete(&format!("/sandboxes/{w}")).await;
    assert_eq!(s, 200, "{v}");
    let resp = api
        .http
        .get(format!("{}/volumes/v/archive", api.base))
        .send()
        .await
        .expect("export");
    assert_eq!(resp.status().as_u16(), 200);
    // Headers are in, the body is not read yet: the transfer is running.
    let (s, v) = api
        .post(
            "/sandboxes",
            json!({"volumes": [{"volume": "v", "path": "/v"}]}),
        )
        .await;
    assert_eq!(s, 409, "a writer during an export: {v}");
    let (s, v) = api.delete("/volumes/v").await;
    assert_eq!(s, 409, "a delete during an export: {v}");
    let body = resp.bytes().await.expect("body");
    assert!(body.len() > 8_000_000, "{}", body.len());
    // Done: the volume is free again.
    let mut freed = false;
    for _ in 0..50 {
        let (s, _) = api.delete("/volumes/v").await;
        if s == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the export's claim ends with it");
    let (s, v) = api.delete(&format!("/sandboxes/{src}")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api.delete(&format!("/snapshots/{snap}")).await;
    assert_eq!(s, 200, "{v}");
}
