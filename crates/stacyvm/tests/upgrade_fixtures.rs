//! Databases and configs written by earlier versions of StacyVM (kept in
//! `tests/fixtures/upgrade/`, see its README for how each was made) pass
//! `upgrade rehearse`, migrate when this build serves them, and keep what
//! they held: templates, specs, registry connections, quotas, audit and
//! exec history; a sandbox whose runtime died with the old host is not
//! reported running.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// The admin key in the fixtures' configs.
const ADMIN_KEY: &str = "fixture-admin-key-0123456789abcdef0123456789";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upgrade")
        .join(name)
}

/// A copy of the fixture (never the file in the repository) with the
/// config's data dir pointing at it.
fn copy(name: &str, into: &Path) -> PathBuf {
    let src = fixture(name);
    std::fs::copy(src.join("stacyvm.db"), into.join("stacyvm.db")).expect("db");
    let cfg = std::fs::read_to_string(src.join("stacyvm.yaml"))
        .expect("config")
        .replace("@DATA_DIR@", &into.display().to_string());
    let path = into.join("stacyvm.yaml");
    std::fs::write(&path, cfg).expect("config copy");
    path
}

fn stacyvm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(args)
        .output()
        .expect("stacyvm")
}

fn schema_version(db: &Path) -> i64 {
    let out = stacyvm(&["db", "check", &db.display().to_string(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["schema_version"]
        .as_i64()
        .unwrap_or_else(|| panic!("{v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_7_database_rehearses_migrates_and_serves() {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = copy("schema7", dir.path());
    let db = dir.path().join("stacyvm.db");
    assert_eq!(schema_version(&db), 7);

    let out = stacyvm(&[
        "upgrade",
        "rehearse",
        "--config",
        &cfg.display().to_string(),
        "--json",
    ]);
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "rehearse: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The rehearsal changes nothing.
    assert_eq!(schema_version(&db), 7);

    // The fixture's admin key (a test value, in its config).
    let key = ADMIN_KEY.to_string();
    let cfg_s = cfg.display().to_string();
    let server = common::Server::start(
        dir.path(),
        &[
            ("STACYVM_CONFIG", cfg_s.as_str()),
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ],
    );
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http
            .get(format!("{}{path}", server.url))
            .header("X-API-Key", &key);
        async move {
            let r = req.send().await.expect("request");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let (s, t) = get("/templates").await;
    assert_eq!(s, 200, "{t}");
    assert!(t.to_string().contains("fixture-python"), "{t}");
    let (_, specs) = get("/environments/specs").await;
    assert_eq!(specs[0]["name"], "fixture-env", "{specs}");
    assert_eq!(specs[0]["apt_packages"], json!(["jq"]), "{specs}");
    let (_, conns) = get("/environments/registry-connections").await;
    assert_eq!(conns[0]["username"], "fixture-bot", "{conns}");
    assert!(!conns.to_string().contains("FIXTURE_REG"), "{conns}");
    let (_, builds) = get("/environments/builds").await;
    assert_eq!(builds, json!([]));
    // The sandbox the old server left running died with its host.
    let (_, list) = get("/sandboxes").await;
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .all(|s| s["state"] != "running"),
        "{list}"
    );
    // History stays.
    let (s, audit) = get("/admin/op-audit?limit=50").await;
    assert_eq!(s, 200, "{audit}");
    assert!(audit.to_string().contains("sandbox.spawn"), "{audit}");
    // And it works as a server of this version.
    let r = http
        .post(format!("{}/sandboxes", server.url))
        .header("X-API-Key", &key)
        .json(&json!({"template": "fixture-python"}))
        .send()
        .await
        .expect("spawn");
    assert_eq!(r.status().as_u16(), 201);
    let sb: serde_json::Value = r.json().await.expect("json");
    let id = sb["id"].as_str().expect("id");
    let r = http
        .post(format!("{}/sandboxes/{id}/exec", server.url))
        .header("X-API-Key", &key)
        .json(&json!({"command": "echo $FIXTURE_VAR"}))
        .send()
        .await
        .expect("exec");
    let out: serde_json::Value = r.json().await.expect("json");
    assert_eq!(out["stdout"], "from-the-fixture\n", "{out}");
    let _ = http
        .delete(format!("{}/sandboxes/{id}", server.url))
        .header("X-API-Key", &key)
        .send()
        .await;
    drop(server);
    assert_eq!(schema_version(&db), 8, "the server migrated the copy");
}
