//! Snapshots and fork through the API on the native provider, as a user
//! would drive them: a fork of three children with the source's files and
//! private writes, a kept snapshot listed and spawned from, everything
//! surviving a `kill -9` of the server, and a deleted snapshot whose data
//! goes with its last child.

mod common;

use std::time::Duration;

use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_children_keep_the_files_write_privately_and_survive_a_crash() {
    let dir = tempfile::tempdir().expect("dir");
    let env = [("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")];
    let server = common::Server::start(dir.path(), &env);
    let api = common::Api::new(&server);
    let sb = api.spawn(json!({})).await;
    let id = sb["id"].as_str().expect("id").to_string();
    let out = api
        .exec(
            &id,
            "mkdir -p /workspace/app && echo v1 > /workspace/app/version && head -c 2000000 /dev/urandom > /workspace/app/data && md5sum /workspace/app/data | cut -c1-32",
        )
        .await;
    let sum = out["stdout"].as_str().expect("stdout").trim().to_string();
    assert_eq!(sum.len(), 32, "{out}");

    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/fork"),
            json!({"count": 3, "keep_snapshot": true, "metadata": {"role": "child"}}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let children: Vec<String> = v["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .map(|c| c["id"].as_str().expect("child id").to_string())
        .collect();
    assert_eq!(children.len(), 3, "{v}");
    let snap = v["snapshot"]["id"]
        .as_str()
        .expect("kept snapshot")
        .to_string();
    assert!(
        v["snapshot"]["size_bytes"].as_u64().expect("size") >= 2_000_000,
        "{v}"
    );
    assert_eq!(v["snapshot"]["source_sandbox_id"], id.as_str(), "{v}");
    for (k, c) in children.iter().enumerate() {
        let out = api
            .exec(
                c,
                &format!("cat /workspace/app/version; md5sum /workspace/app/data | cut -c1-32; echo c{k} > /workspace/app/version"),
            )
            .await;
        assert_eq!(out["stdout"], format!("v1\n{sum}\n"), "{out}");
    }
    for (k, c) in children.iter().enumerate() {
        let out = api.exec(c, "cat /workspace/app/version").await;
        assert_eq!(out["stdout"], format!("c{k}\n"), "private writes: {out}");
    }
    let out = api.exec(&id, "cat /workspace/app/version").await;
    assert_eq!(out["stdout"], "v1\n", "the source keeps its own: {out}");
    let (s, list) = api.get("/snapshots").await;
    assert_eq!(s, 200, "{list}");
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .any(|x| x["id"] == snap.as_str() && x["provider"] == "native"),
        "{list}"
    );

    // The server dies hard; the next one finds the children and the
    // snapshot as they were.
    let pid = server.pid();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    drop(server);
    let server = common::Server::start(dir.path(), &env);
    let api = common::Api::new(&server);
    let out = api.exec(&children[1], "cat /workspace/app/version").await;
    assert_eq!(out["stdout"], "c1\n", "{out}");
    let (s, v) = api.post("/sandboxes", json!({"snapshot": snap})).await;
    assert_eq!(s, 201, "spawn from the kept snapshot: {v}");
    let late = v["id"].as_str().expect("id").to_string();
    let out = api.exec(&late, "cat /workspace/app/version").await;
    assert_eq!(out["stdout"], "v1\n", "{out}");

    // Asking a child of a snapshot for another image is refused.
    let (s, v) = api
        .post("/sandboxes", json!({"snapshot": snap, "image": "busybox"}))
        .await;
    assert_eq!(s, 400, "{v}");

    // Deleted while children run: they run on; its data goes with the
    // last of them.
    let (s, v) = api.delete(&format!("/snapshots/{snap}")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api.post("/sandboxes", json!({"snapshot": snap})).await;
    assert_eq!(s, 404, "{v}");
    let out = api.exec(&late, "cat /workspace/app/version").await;
    assert_eq!(out["stdout"], "v1\n", "{out}");
    let on_disk = dir.path().join("native").join("snapshots").join(&snap);
    assert!(on_disk.exists(), "kept for its children");
    for c in children.iter().chain([&late, &id]) {
        let (s, v) = api.delete(&format!("/sandboxes/{c}")).await;
        assert_eq!(s, 200, "{v}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while on_disk.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!on_disk.exists(), "the last child took the layer along");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_snapshots_forks_and_spawns_from_snapshots() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(dir.path(), &[("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")]);
    let api = common::Api::new(&server);
    let src = common::cli(&server, &["spawn"]).trim().to_string();
    let out = api.exec(&src, "echo cli-state > /workspace/s").await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let snap = common::cli(&server, &["snapshot", "create", &src])
        .trim()
        .to_string();
    assert!(snap.starts_with("snap-"), "{snap}");
    let child = common::cli(&server, &["spawn", "--snapshot", &snap])
        .trim()
        .to_string();
    assert_eq!(
        api.exec(&child, "cat /workspace/s").await["stdout"],
        "cli-state\n"
    );
    // A snapshot's child takes the snapshot's image: naming one is a usage error.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(["spawn", "--snapshot", &snap, "--image", "busybox"])
        .env("STACYVM_URL", server.url.trim_end_matches("/api/v1"))
        .output()
        .expect("stacyvm");
    assert!(!refused.status.success());
    let forked: serde_json::Value = serde_json::from_str(&common::cli(
        &server,
        &["snapshot", "fork", &src, "--count", "2", "--keep", "--json"],
    ))
    .expect("json");
    let kids: Vec<String> = forked["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(kids.len(), 2, "{forked}");
    let kept = forked["snapshot"]["id"].as_str().expect("kept").to_string();
    let listed: serde_json::Value =
        serde_json::from_str(&common::cli(&server, &["snapshot", "ls", "--json"])).expect("json");
    let ids: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(
        ids.contains(&snap.as_str()) && ids.contains(&kept.as_str()),
        "{listed}"
    );
    let table = common::cli(&server, &["snapshot", "ls"]);
    assert!(table.contains(&snap) && table.contains(&src), "{table}");
    for s in [&snap, &kept] {
        common::cli(&server, &["snapshot", "rm", s]);
    }
    let mut all = kids;
    all.extend([child, src]);
    let mut args = vec!["kill"];
    args.extend(all.iter().map(String::as_str));
    common::cli(&server, &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_environment_specs_and_registry_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(dir.path(), &[("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")]);
    let id = common::cli(
        &server,
        &[
            "env",
            "create",
            "web",
            "--base-image",
            "python:3.12",
            "--pip",
            "flask==3.0.3",
            "--apt",
            "curl",
        ],
    )
    .trim()
    .to_string();
    assert!(id.starts_with("es-"), "{id}");
    let table = common::cli(&server, &["env", "ls"]);
    assert!(
        table.contains("web") && table.contains("pip:flask==3.0.3") && table.contains("apt:curl"),
        "{table}"
    );
    // A registry connection names a server secret; the secret stays on the
    // server.
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets");
    std::fs::write(secrets.join("REGISTRY_TOKEN"), "token-value").expect("secret");
    let rc = common::cli(
        &server,
        &[
            "env",
            "registry",
            "add",
            "registry",
            "--host",
            "localhost:5000",
            "--username",
            "ci",
            "--secret",
            "REGISTRY_TOKEN",
        ],
    )
    .trim()
    .to_string();
    let listed = common::cli(&server, &["env", "registry", "ls", "--json"]);
    assert!(
        listed.contains(&rc)
            && !listed.contains("token-value")
            && !listed.contains("REGISTRY_TOKEN"),
        "{listed}"
    );
    common::cli(&server, &["env", "registry", "rm", &rc]);
    common::cli(&server, &["env", "rm", &id]);
    let listed: serde_json::Value =
        serde_json::from_str(&common::cli(&server, &["env", "ls", "--json"])).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}
