//! The store contract suite: every engine must pass these checks.
//!
//! Use [`store_contract_tests!`](crate::store_contract_tests) to emit one
//! `#[tokio::test]` per case for an engine.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use stacyvm_core::store::{
    AdminAuditRecord, ArtifactRecord, BuildRecord, EnvironmentSpecRecord, ExecLogRecord, Fence,
    OpAuditFilter, OpAuditRecord, QuotaRecord, RegistryConnectionRecord, SandboxRecord,
    SnapshotRecord, Store, TemplateRecord, VolumeRecord, WorkerRecord,
};
use stacyvm_core::ErrorKind;

/// The current time at the precision every engine keeps (microseconds:
/// Postgres `TIMESTAMPTZ`; SQLite keeps more).
pub fn now() -> chrono::DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// Inserts a running sandbox with the given id.
pub async fn insert_sample(s: &dyn Store, id: &str) -> SandboxRecord {
    let now = now();
    let rec = SandboxRecord {
        id: id.to_string(),
        state: "running".into(),
        provider: "mock".into(),
        image: "host".into(),
        memory_mb: 256,
        vcpus: 1,
        metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
        owner_id: "alice".into(),
        tenant_id: String::new(),
        vm_id: String::new(),
        worker_id: "local".into(),
        created_at: now,
        expires_at: now + chrono::Duration::minutes(30),
        updated_at: now,
        idle_timeout_secs: 0,
        on_timeout: String::new(),
        idle_deadline: Default::default(),
    };
    s.insert_sandbox(&rec).await.expect("insert sandbox");
    rec
}

pub async fn sandbox_lifecycle(s: &dyn Store) {
    let rec = insert_sample(s, "sb-00000001").await;
    let got = s.get_sandbox("sb-00000001").await.expect("get");
    assert_eq!(got.id, rec.id);
    assert_eq!(got.metadata, rec.metadata);
    assert_eq!(
        got.created_at, rec.created_at,
        "timestamps round-trip (to the microsecond)"
    );
    // Metadata replaced whole (egress policies live there), a live row only.
    let mut md = rec.metadata.clone();
    md.insert(
        "stacyvm.sys.network".into(),
        "{\"deny_out\":[\"0.0.0.0/0\"]}".into(),
    );
    s.set_sandbox_metadata("sb-00000001", &md)
        .await
        .expect("set metadata");
    assert_eq!(
        s.get_sandbox("sb-00000001").await.expect("get").metadata,
        md
    );
    let e = s
        .set_sandbox_metadata("sb-ffffffff", &md)
        .await
        .expect_err("metadata of missing");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let dup = s.insert_sandbox(&rec).await.expect_err("duplicate");
    assert_eq!(dup.kind(), ErrorKind::Conflict);
    let missing = s.get_sandbox("sb-ffffffff").await.expect_err("missing");
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    s.set_sandbox_state("sb-00000001", "destroyed", None)
        .await
        .expect("destroy");
    assert!(s.list_active_sandboxes().await.expect("list").is_empty());
    assert_eq!(
        s.get_sandbox("sb-00000001")
            .await
            .expect("soft delete keeps row")
            .state,
        "destroyed"
    );
    let e = s
        .set_sandbox_expiry("sb-00000001", Utc::now(), None)
        .await
        .expect_err("expiry of destroyed");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = s
        .set_sandbox_metadata("sb-00000001", &md)
        .await
        .expect_err("metadata of destroyed");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(
        s.set_sandbox_state("sb-ffffffff", "x", None)
            .await
            .expect_err("state of missing")
            .kind(),
        ErrorKind::NotFound
    );
}

pub async fn sandbox_listing_order_and_expiry(s: &dyn Store) {
    let a = insert_sample(s, "sb-0000000a").await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    insert_sample(s, "sb-0000000b").await;
    let list = s.list_active_sandboxes().await.expect("list");
    let ids: Vec<&str> = list.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["sb-0000000b", "sb-0000000a"], "newest first");
    s.set_sandbox_expiry(&a.id, Utc::now() - chrono::Duration::seconds(1), None)
        .await
        .expect("expire");
    let expired = s.list_expired_sandboxes(Utc::now()).await.expect("expired");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, a.id);
}

pub async fn exec_logs(s: &dyn Store) {
    insert_sample(s, "sb-00000e0e").await;
    for i in 0..3 {
        s.insert_exec_log(&ExecLogRecord {
            sandbox_id: "sb-00000e0e".into(),
            command: format!("echo {i}"),
            exit_code: i,
            stdout: format!("{i}\n"),
            stderr: String::new(),
            duration: "1ms".into(),
            created_at: Utc::now(),
        })
        .await
        .expect("insert log");
    }
    let logs = s.list_exec_logs("sb-00000e0e", 2).await.expect("logs");
    assert_eq!(logs.len(), 2);
    assert_eq!(logs[0].command, "echo 2", "newest first");
}

/// Retention: exec logs past their age and destroyed sandboxes past
/// theirs are deleted; newer rows and live sandboxes stay.
pub async fn retention(s: &dyn Store) {
    insert_sample(s, "sb-0000a001").await;
    insert_sample(s, "sb-0000a002").await;
    let now = now();
    for (i, age_h) in [(0, 200), (1, 190), (2, 1)] {
        s.insert_exec_log(&ExecLogRecord {
            sandbox_id: "sb-0000a001".into(),
            command: format!("echo {i}"),
            exit_code: 0,
            stdout: "x".repeat(1000),
            stderr: String::new(),
            duration: "1ms".into(),
            created_at: now - chrono::Duration::hours(age_h),
        })
        .await
        .expect("insert log");
    }
    let n = s
        .prune_exec_logs(now - chrono::Duration::hours(168))
        .await
        .expect("prune logs");
    assert_eq!(n, 2);
    let logs = s.list_exec_logs("sb-0000a001", 10).await.expect("logs");
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].command, "echo 2");
    // A live sandbox is never removed, however old; a destroyed one is,
    // together with its logs, once it is past the cutoff.
    s.set_sandbox_state("sb-0000a002", "destroyed", None)
        .await
        .expect("destroy");
    let n = s
        .prune_destroyed_sandboxes(now - chrono::Duration::hours(1))
        .await
        .expect("prune");
    assert_eq!(n, 0, "destroyed just now");
    s.set_sandbox_state("sb-0000a001", "destroyed", None)
        .await
        .expect("destroy");
    let n = s
        .prune_destroyed_sandboxes(Utc::now() + chrono::Duration::seconds(5))
        .await
        .expect("prune");
    assert_eq!(n, 2);
    assert!(s.get_sandbox("sb-0000a001").await.is_err());
    assert!(s
        .list_exec_logs("sb-0000a001", 10)
        .await
        .expect("logs")
        .is_empty());
    insert_sample(s, "sb-0000a003").await;
    let n = s
        .prune_destroyed_sandboxes(Utc::now() + chrono::Duration::hours(1))
        .await
        .expect("prune");
    assert_eq!(n, 0);
    assert!(s.get_sandbox("sb-0000a003").await.is_ok());
}

fn template(name: &str) -> TemplateRecord {
    let now = now();
    TemplateRecord {
        name: name.into(),
        version: 1,
        image: "python:3.12".into(),
        description: "d".into(),
        setup: vec!["pip install x".into()],
        allowed_hosts: vec![],
        memory_mb: 512,
        cpu_cores: 1,
        ttl_seconds: 300,
        env: BTreeMap::from([("A".to_string(), "1".to_string())]),
        secrets: vec![],
        pool_size: 0,
        files: BTreeMap::from([("/etc/motd".to_string(), "hi\n".to_string())]),
        provider: String::new(),
        metadata: BTreeMap::new(),
        created_at: now,
        updated_at: now,
    }
}

pub async fn templates(s: &dyn Store) {
    s.create_template(&template("b")).await.expect("create b");
    s.create_template(&template("a")).await.expect("create a");
    let e = s.create_template(&template("a")).await.expect_err("dup");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(e.to_string(), "conflict: template already exists");
    let names: Vec<String> = s
        .list_templates()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    let mut t = s.get_template("a").await.expect("get");
    let created = t.created_at;
    t.image = "alpine".into();
    t.updated_at = Utc::now();
    let u = s.update_template(&t).await.expect("update");
    assert_eq!(u.image, "alpine");
    assert_eq!(u.created_at, created, "update keeps created_at");
    assert_eq!(
        s.update_template(&template("zz"))
            .await
            .expect_err("missing")
            .kind(),
        ErrorKind::NotFound
    );
    s.delete_template("a").await.expect("delete");
    assert_eq!(
        s.delete_template("a").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        s.get_template("a").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
}

pub async fn quotas(s: &dyn Store) {
    let now = now();
    let q = QuotaRecord {
        owner_id: "bob".into(),
        max_sandboxes: 3,
        max_ttl_seconds: 3600,
        max_exec_timeout_seconds: 0,
        created_at: now,
        updated_at: now,
    };
    let saved = s.upsert_quota(&q).await.expect("upsert");
    assert_eq!(saved.max_sandboxes, 3);
    let mut q2 = q.clone();
    q2.max_sandboxes = 5;
    q2.created_at = now + chrono::Duration::hours(1);
    let saved2 = s.upsert_quota(&q2).await.expect("upsert again");
    assert_eq!(saved2.max_sandboxes, 5);
    assert_eq!(saved2.created_at, now, "created_at preserved");
    assert_eq!(s.list_quotas().await.expect("list").len(), 1);
    s.delete_quota("bob").await.expect("delete");
    let e = s.get_quota("bob").await.expect_err("gone");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.to_string(), "not found: owner_quota \"bob\"");
}

pub async fn audit(s: &dyn Store) {
    for (i, action) in ["exec", "file.write", "exec"].iter().enumerate() {
        s.insert_op_audit(&OpAuditRecord {
            id: 0,
            actor: "alice".into(),
            action: (*action).into(),
            sandbox_id: format!("sb-{i}"),
            resource: "echo".into(),
            provider: "mock".into(),
            status: "success".into(),
            detail: String::new(),
            tenant_id: if i == 2 { "acme".into() } else { String::new() },
            request_id: "r".into(),
            created_at: Utc::now(),
        })
        .await
        .expect("insert op audit");
    }
    let f = OpAuditFilter {
        action: "exec".into(),
        ..Default::default()
    };
    assert_eq!(s.list_op_audit(&f).await.expect("by action").len(), 2);
    let f = OpAuditFilter {
        tenant_id: "acme".into(),
        ..Default::default()
    };
    assert_eq!(s.list_op_audit(&f).await.expect("by tenant").len(), 1);
    let f = OpAuditFilter {
        since: Some(Utc::now() + chrono::Duration::seconds(5)),
        ..Default::default()
    };
    assert!(s.list_op_audit(&f).await.expect("since").is_empty());
    s.insert_admin_audit(&AdminAuditRecord {
        id: 0,
        actor: "admin".into(),
        method: "GET".into(),
        path: "/api/v1/admin/audit".into(),
        status: 200,
        duration_ms: 1,
        request_id: "r".into(),
        remote_addr: "127.0.0.1".into(),
        user_agent: "t".into(),
        tenant_id: String::new(),
        created_at: Utc::now(),
    })
    .await
    .expect("admin audit");
}

pub async fn workers(s: &dyn Store) {
    let now = now();
    let w = WorkerRecord {
        id: "local".into(),
        hostname: "h".into(),
        status: "online".into(),
        providers: vec!["native".into()],
        capabilities: vec!["api".into()],
        capacity: serde_json::json!({"max_sandboxes": 0}),
        last_heartbeat: now,
        created_at: now,
        updated_at: now,
    };
    s.upsert_worker(&w).await.expect("upsert");
    let mut w2 = w.clone();
    w2.status = "draining".into();
    w2.created_at = now + chrono::Duration::hours(1);
    let got = s.upsert_worker(&w2).await.expect("upsert 2");
    assert_eq!(got.status, "draining");
    assert_eq!(got.created_at, now);
    assert_eq!(s.list_workers().await.expect("list").len(), 1);
    assert_eq!(s.get_worker("local").await.expect("get").status, "draining");
    s.delete_worker("local").await.expect("delete");
    assert_eq!(
        s.get_worker("local").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        s.delete_worker("local").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
}

pub async fn snapshots(s: &dyn Store) {
    let now = now();
    let rec = |id: &str, tenant: &str, secs: i64| SnapshotRecord {
        id: id.into(),
        provider: "qemu".into(),
        source_sandbox_id: "sb-0000aaaa".into(),
        image: "busybox:1".into(),
        memory_mb: 256,
        vcpus: 1,
        network_mode: "none".into(),
        size_bytes: 5 << 30,
        owner_id: "alice".into(),
        tenant_id: tenant.into(),
        created_at: now + chrono::Duration::seconds(secs),
    };
    s.insert_snapshot(&rec("snap-b", "t1", 2))
        .await
        .expect("insert");
    s.insert_snapshot(&rec("snap-a", "t1", 1))
        .await
        .expect("insert");
    s.insert_snapshot(&rec("snap-c", "t2", 0))
        .await
        .expect("insert");
    assert_eq!(
        s.insert_snapshot(&rec("snap-a", "t2", 0))
            .await
            .expect_err("duplicate")
            .kind(),
        ErrorKind::Conflict
    );
    assert_eq!(
        s.get_snapshot("snap-b").await.expect("get"),
        rec("snap-b", "t1", 2)
    );
    let ids = |l: Vec<SnapshotRecord>| l.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_snapshots(Some("t1")).await.expect("list")),
        ["snap-a", "snap-b"]
    );
    assert_eq!(
        ids(s.list_snapshots(None).await.expect("list")),
        ["snap-c", "snap-a", "snap-b"]
    );
    s.delete_snapshot("snap-a").await.expect("delete");
    assert_eq!(
        s.delete_snapshot("snap-a").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        s.get_snapshot("snap-a").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
}

pub async fn environment_specs(s: &dyn Store) {
    let now = now();
    let rec = |id: &str, owner: &str, name: &str, tenant: &str, secs: i64| EnvironmentSpecRecord {
        id: id.into(),
        owner_id: owner.into(),
        tenant_id: tenant.into(),
        name: name.into(),
        base_image: "debian:12".into(),
        python_packages: vec!["requests==2.32.3".into()],
        apt_packages: vec!["curl".into(), "jq".into()],
        python_version: "3.11".into(),
        dockerfile: if id == "es-b" {
            "FROM debian:12\nRUN true\n".into()
        } else {
            String::new()
        },
        context_sha256: String::new(),
        created_at: now + chrono::Duration::seconds(secs),
        updated_at: now + chrono::Duration::seconds(secs),
    };
    s.insert_environment_spec(&rec("es-a", "alice", "web", "t1", 0))
        .await
        .expect("insert");
    s.insert_environment_spec(&rec("es-b", "alice", "ml", "t1", 1))
        .await
        .expect("insert");
    s.insert_environment_spec(&rec("es-c", "bob", "web", "t2", 2))
        .await
        .expect("insert");
    assert_eq!(
        s.insert_environment_spec(&rec("es-d", "alice", "web", "t1", 3))
            .await
            .expect_err("same owner and name")
            .kind(),
        ErrorKind::Conflict
    );
    assert_eq!(
        s.get_environment_spec("es-b").await.expect("get"),
        rec("es-b", "alice", "ml", "t1", 1)
    );
    let ids = |l: Vec<EnvironmentSpecRecord>| l.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_environment_specs(Some("t1")).await.expect("list")),
        ["es-b", "es-a"]
    );
    assert_eq!(s.list_environment_specs(None).await.expect("all").len(), 3);
    s.set_environment_spec_context("es-b", &"ab".repeat(32))
        .await
        .expect("context");
    let b = s.get_environment_spec("es-b").await.expect("get");
    assert_eq!(
        (b.dockerfile.as_str(), b.context_sha256.len()),
        ("FROM debian:12\nRUN true\n", 64)
    );
    assert_eq!(
        s.set_environment_spec_context("es-none", "x")
            .await
            .expect_err("missing")
            .kind(),
        ErrorKind::NotFound
    );
    s.delete_environment_spec("es-a").await.expect("delete");
    assert_eq!(
        s.get_environment_spec("es-a")
            .await
            .expect_err("gone")
            .kind(),
        ErrorKind::NotFound
    );
}

pub async fn builds(s: &dyn Store) {
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let spec = EnvironmentSpecRecord {
        id: "es-b1".into(),
        owner_id: "alice".into(),
        tenant_id: "t1".into(),
        name: "web".into(),
        base_image: "debian:bookworm".into(),
        python_packages: vec![],
        apt_packages: vec!["curl".into()],
        python_version: String::new(),
        dockerfile: String::new(),
        context_sha256: String::new(),
        created_at: t0,
        updated_at: t0,
    };
    s.insert_environment_spec(&spec).await.expect("spec");
    let rec = |id: &str, tenant: &str, secs: i64| BuildRecord {
        id: id.into(),
        spec_id: "es-b1".into(),
        owner_id: "alice".into(),
        tenant_id: tenant.into(),
        provider: "native".into(),
        builder: String::new(),
        status: "queued".into(),
        current_step: String::new(),
        log: "build queued".into(),
        image_size_bytes: 0,
        digest_local: String::new(),
        error: String::new(),
        artifacts: vec![ArtifactRecord {
            target: "local".into(),
            connection_id: String::new(),
            image_ref: format!("local/stacyvm-env:web-{id}"),
            digest: String::new(),
            status: "pending".into(),
            error: String::new(),
            created_at: t0,
            updated_at: t0,
        }],
        created_at: t0 + chrono::Duration::seconds(secs),
        finished_at: None,
        updated_at: t0 + chrono::Duration::seconds(secs),
    };
    for (id, tenant, secs) in [("bd-1", "t1", 0), ("bd-2", "t1", 1), ("bd-3", "t2", 2)] {
        s.insert_build(&rec(id, tenant, secs))
            .await
            .expect("insert");
    }
    assert_eq!(
        s.get_build("bd-1").await.expect("get"),
        rec("bd-1", "t1", 0)
    );
    let ids = |l: Vec<BuildRecord>| l.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_builds(Some("t1"), 10).await.expect("list")),
        ["bd-2", "bd-1"]
    );
    assert_eq!(
        ids(s.list_builds(None, 2).await.expect("limit")),
        ["bd-3", "bd-2"]
    );
    // A finished build keeps its log, error, artifacts and end time.
    let mut done = rec("bd-1", "t1", 0);
    done.status = "failed".into();
    done.log = "line one\nline two\n".into();
    done.error = "apt-get exited with 100".into();
    done.artifacts[0].status = "failed".into();
    done.finished_at = Some(t0 + chrono::Duration::seconds(30));
    done.updated_at = t0 + chrono::Duration::seconds(30);
    s.update_build(&done).await.expect("update");
    assert_eq!(s.get_build("bd-1").await.expect("get"), done);
    assert_eq!(
        ids(s.unfinished_builds().await.expect("unfinished")),
        ["bd-2", "bd-3"]
    );
    // One claim of a queued build wins; a finished one cannot be claimed.
    assert!(s.claim_build("bd-2", "cp-1", t0).await.expect("claim"));
    assert!(!s
        .claim_build("bd-2", "cp-1", t0)
        .await
        .expect("claim again"));
    assert!(!s
        .claim_build("bd-1", "cp-1", t0)
        .await
        .expect("claim finished"));
    // The running log is saved while building, never over a final state.
    assert_eq!(
        s.save_build_log("bd-2", "so far\n", t0)
            .await
            .expect("save"),
        "building"
    );
    assert_eq!(s.get_build("bd-2").await.expect("get").log, "so far\n");
    assert_eq!(
        s.save_build_log("bd-1", "late\n", t0).await.expect("save"),
        "failed"
    );
    assert_ne!(s.get_build("bd-1").await.expect("get").log, "late\n");
    let claimed = s.get_build("bd-2").await.expect("get");
    assert_eq!(
        (claimed.status.as_str(), claimed.builder.as_str()),
        ("building", "cp-1")
    );
    assert_eq!(
        s.update_build(&rec("bd-none", "t1", 0))
            .await
            .expect_err("gone")
            .kind(),
        ErrorKind::NotFound
    );
    // Deleting the spec deletes its builds' records.
    s.delete_environment_spec("es-b1")
        .await
        .expect("delete spec");
    assert_eq!(
        s.get_build("bd-2")
            .await
            .expect_err("gone with its spec")
            .kind(),
        ErrorKind::NotFound
    );
}

pub async fn registry_connections(s: &dyn Store) {
    let now = now();
    let rec =
        |id: &str, owner: &str, user: &str, tenant: &str, secs: i64| RegistryConnectionRecord {
            id: id.into(),
            owner_id: owner.into(),
            tenant_id: tenant.into(),
            provider: "registry".into(),
            host: "localhost:5000".into(),
            username: user.into(),
            secret_ref: "REGISTRY_TOKEN".into(),
            is_default: secs == 0,
            created_at: now + chrono::Duration::seconds(secs),
            updated_at: now + chrono::Duration::seconds(secs),
        };
    s.insert_registry_connection(&rec("rc-a", "alice", "ci", "t1", 0))
        .await
        .expect("insert");
    s.insert_registry_connection(&rec("rc-b", "alice", "bot", "t1", 1))
        .await
        .expect("insert");
    s.insert_registry_connection(&rec("rc-c", "bob", "ci", "t2", 2))
        .await
        .expect("insert");
    assert_eq!(
        s.insert_registry_connection(&rec("rc-d", "alice", "ci", "t1", 3))
            .await
            .expect_err("same owner, provider and user")
            .kind(),
        ErrorKind::Conflict
    );
    let t1 = s.list_registry_connections(Some("t1")).await.expect("list");
    assert_eq!(
        t1,
        [
            rec("rc-b", "alice", "bot", "t1", 1),
            rec("rc-a", "alice", "ci", "t1", 0)
        ]
    );
    assert_eq!(
        s.list_registry_connections(None).await.expect("all").len(),
        3
    );
    s.delete_registry_connection("rc-a").await.expect("delete");
    assert_eq!(
        s.delete_registry_connection("rc-a")
            .await
            .expect_err("gone")
            .kind(),
        ErrorKind::NotFound
    );
}

pub async fn volumes(s: &dyn Store) {
    let now = now();
    let rec = |id: &str, name: &str, tenant: &str, secs: i64| VolumeRecord {
        id: id.into(),
        name: name.into(),
        size_mb: 1024,
        owner_id: "alice".into(),
        tenant_id: tenant.into(),
        created_at: now + chrono::Duration::seconds(secs),
    };
    s.insert_volume(&rec("vol-b", "data", "t1", 2))
        .await
        .expect("insert");
    s.insert_volume(&rec("vol-a", "cache", "t1", 1))
        .await
        .expect("insert");
    // The same name in another tenant is another volume.
    s.insert_volume(&rec("vol-c", "data", "t2", 0))
        .await
        .expect("insert");
    for dup in [
        rec("vol-d", "data", "t1", 3),
        rec("vol-a", "other", "t1", 3),
    ] {
        assert_eq!(
            s.insert_volume(&dup).await.expect_err("duplicate").kind(),
            ErrorKind::Conflict,
            "{dup:?}"
        );
    }
    assert_eq!(
        s.get_volume("vol-b").await.expect("get"),
        rec("vol-b", "data", "t1", 2)
    );
    let ids = |l: Vec<VolumeRecord>| l.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_volumes(Some("t1")).await.expect("list")),
        ["vol-a", "vol-b"]
    );
    assert_eq!(
        ids(s.list_volumes(None).await.expect("list")),
        ["vol-c", "vol-a", "vol-b"]
    );
    s.delete_volume("vol-a").await.expect("delete");
    assert_eq!(
        s.delete_volume("vol-a").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        s.get_volume("vol-a").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
}

pub async fn leases(s: &dyn Store) {
    let ttl = Duration::from_secs(60);
    let l = s
        .acquire_lease("sb-1", "sandbox", "w1", ttl)
        .await
        .expect("acquire");
    assert_eq!(l.generation, 1);
    let l = s
        .acquire_lease("sb-1", "sandbox", "w1", ttl)
        .await
        .expect("re-acquire by holder");
    assert_eq!(l.generation, 2);
    let e = s
        .acquire_lease("sb-1", "sandbox", "w2", ttl)
        .await
        .expect_err("held elsewhere");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(e.to_string(), "conflict: lease is held by another worker");
    let l = s.renew_lease("sb-1", "w1", ttl).await.expect("renew");
    assert_eq!(l.generation, 3);
    assert_eq!(
        s.renew_lease("sb-1", "w2", ttl)
            .await
            .expect_err("renew by other")
            .kind(),
        ErrorKind::Conflict
    );
    // An expired lease can be taken over.
    s.acquire_lease("sb-2", "sandbox", "w1", Duration::from_millis(1))
        .await
        .expect("short");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        s.renew_lease("sb-2", "w1", ttl)
            .await
            .expect_err("expired renew")
            .kind(),
        ErrorKind::Conflict
    );
    let taken = s
        .acquire_lease("sb-2", "sandbox", "w2", ttl)
        .await
        .expect("take over expired");
    assert_eq!(taken.holder_id, "w2");
    assert_eq!(taken.generation, 2);
    assert_eq!(
        s.release_lease("sb-1", "w2")
            .await
            .expect_err("not holder")
            .kind(),
        ErrorKind::NotFound
    );
    s.release_lease("sb-1", "w1").await.expect("release");
    assert_eq!(
        s.get_lease("sb-1").await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(s.list_leases().await.expect("list").len(), 1);
    assert!(s.acquire_lease("", "sandbox", "w1", ttl).await.is_err());
}

/// Admission counted in the store: limits hold under concurrent inserts.
pub async fn admission(s: &dyn Store) {
    let sample = |i: usize, owner: &str| {
        let now = now();
        SandboxRecord {
            id: format!("sb-ad{i:06}"),
            state: "creating".into(),
            provider: "mock".into(),
            image: "host".into(),
            memory_mb: 1,
            vcpus: 1,
            metadata: BTreeMap::new(),
            owner_id: owner.into(),
            tenant_id: String::new(),
            vm_id: String::new(),
            worker_id: "w1".into(),
            created_at: now,
            expires_at: now + chrono::Duration::minutes(5),
            updated_at: now,
            idle_timeout_secs: 0,
            on_timeout: String::new(),
            idle_deadline: Default::default(),
        }
    };
    let recs: Vec<SandboxRecord> = (0..12)
        .map(|i| sample(i, if i % 2 == 0 { "alice" } else { "bob" }))
        .collect();
    let results =
        futures::future::join_all(recs.iter().map(|r| s.insert_sandbox_admitted(r, 5, 0))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 5, "exactly the limit is admitted: {results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.kind(), ErrorKind::ResourceLimit);
        assert_eq!(
            r.to_string(),
            "resource limit exceeded: max sandboxes reached (5)"
        );
    }
    // Destroyed rows free their slots; per-owner limits count the owner only.
    for r in &recs {
        let _ = s.set_sandbox_state(&r.id, "destroyed", None).await;
    }
    let results = futures::future::join_all(
        (20..30)
            .map(|i| sample(i, "alice"))
            .collect::<Vec<_>>()
            .iter()
            .map(|r| async move { s.insert_sandbox_admitted(r, 0, 3).await }),
    )
    .await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        3,
        "{results:?}"
    );
    s.insert_sandbox_admitted(&sample(40, "bob"), 0, 3)
        .await
        .expect("another owner");
    s.insert_sandbox_admitted(&sample(41, ""), 0, 1)
        .await
        .expect("no owner, no per-owner limit");
    s.set_sandbox_runtime("sb-ad000040", "running", "vm-1", None)
        .await
        .expect("runtime");
    let got = s.get_sandbox("sb-ad000040").await.expect("get");
    assert_eq!(
        (got.state.as_str(), got.vm_id.as_str()),
        ("running", "vm-1")
    );
    assert_eq!(
        s.set_sandbox_runtime("sb-ffffffff", "running", "", None)
            .await
            .expect_err("missing")
            .kind(),
        ErrorKind::NotFound
    );
}

/// Many holders race for the same free resources: each resource has
/// exactly one winner, every loser gets `Conflict`, and the generation is
/// the first one.
pub async fn lease_race(s: &dyn Store) {
    let ttl = Duration::from_secs(60);
    for round in 0..5 {
        let resource = format!("sb-race{round}");
        let attempts = (0..16).map(|i| {
            let resource = resource.clone();
            async move {
                s.acquire_lease(&resource, "sandbox", &format!("w{i}"), ttl)
                    .await
            }
        });
        let results = futures::future::join_all(attempts).await;
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "exactly one winner in round {round}");
        assert_eq!(winners[0].generation, 1);
        for r in &results {
            if let Err(e) = r {
                assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
            }
        }
        let held = s.get_lease(&resource).await.expect("lease");
        assert_eq!(held.holder_id, winners[0].holder_id);
    }
}

/// Fenced sandbox writes land only under the lease they name: a holder
/// whose lease was taken over (a newer generation, or another holder)
/// changes nothing and gets `Conflict`; an unknown sandbox stays
/// `NotFound`; concurrent fenced writers with the same stale fence all
/// fail.
pub async fn fenced_writes(s: &dyn Store) {
    let ttl = Duration::from_secs(60);
    let rec = insert_sample(s, "sb-fe000001").await;
    let first = s
        .acquire_lease(&rec.id, "sandbox", "w1", ttl)
        .await
        .expect("acquire")
        .fence();
    s.set_sandbox_state(&rec.id, "running", Some(&first))
        .await
        .expect("write under the current lease");
    s.set_sandbox_runtime(&rec.id, "running", "vm-9", Some(&first))
        .await
        .expect("runtime under the current lease");
    let later = now() + chrono::Duration::seconds(600);
    s.set_sandbox_expiry(&rec.id, later, Some(&first))
        .await
        .expect("expiry under the current lease");
    // The holder takes the lease again (a destroy does): the old
    // generation is stale from now on.
    let second = s
        .acquire_lease(&rec.id, "sandbox", "w1", ttl)
        .await
        .expect("re-acquire")
        .fence();
    assert_eq!(second.generation, first.generation + 1);
    let stale = [
        s.set_sandbox_state(&rec.id, "error", Some(&first)).await,
        s.set_sandbox_runtime(&rec.id, "error", "vm-x", Some(&first))
            .await,
        s.set_sandbox_expiry(&rec.id, now(), Some(&first)).await,
    ];
    for r in stale {
        let e = r.expect_err("stale generation");
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert!(e.to_string().contains("stale lease"), "{e}");
        assert!(e.to_string().contains("w1:2"), "names the lease now: {e}");
    }
    // Another holder with the right generation number is refused too.
    let forged = Fence {
        holder_id: "w2".into(),
        generation: second.generation,
    };
    let e = s
        .set_sandbox_state(&rec.id, "error", Some(&forged))
        .await
        .expect_err("wrong holder");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let got = s.get_sandbox(&rec.id).await.expect("get");
    assert_eq!(got.state, "running", "no stale write landed");
    assert_eq!(got.vm_id, "vm-9");
    assert_eq!(got.expires_at, later);
    // Many writers racing with the stale fence: none lands.
    let racers = (0..8).map(|_| s.set_sandbox_state(&rec.id, "error", Some(&first)));
    for r in futures::future::join_all(racers).await {
        assert_eq!(r.expect_err("stale racer").kind(), ErrorKind::Conflict);
    }
    assert_eq!(s.get_sandbox(&rec.id).await.expect("get").state, "running");
    // No lease at all: a fenced write is a conflict, an unknown sandbox
    // is not-found, a destroyed one is not-found for expiry.
    s.release_lease(&rec.id, "w1").await.expect("release");
    let e = s
        .set_sandbox_state(&rec.id, "error", Some(&second))
        .await
        .expect_err("released lease");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("no lease"), "{e}");
    let e = s
        .set_sandbox_state("sb-fe0000ff", "error", Some(&second))
        .await
        .expect_err("unknown");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let third = s
        .acquire_lease(&rec.id, "sandbox", "w1", ttl)
        .await
        .expect("acquire again")
        .fence();
    s.set_sandbox_state(&rec.id, "destroyed", Some(&third))
        .await
        .expect("destroy under the lease");
    let e = s
        .set_sandbox_expiry(&rec.id, later, Some(&third))
        .await
        .expect_err("destroyed");
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// A lease handed from one worker to another in one step (a sandbox
/// moving off a draining worker): only from the current holder and
/// generation; the old holder's fence is stale afterwards; the record
/// moves under the new holder's fence only.
pub async fn lease_transfer(s: &dyn Store) {
    let ttl = Duration::from_secs(60);
    let rec = insert_sample(s, "sb-7f000001").await;
    let old = s
        .acquire_lease(&rec.id, "sandbox", "w1", ttl)
        .await
        .expect("acquire")
        .fence();
    let forged = Fence {
        holder_id: "w1".into(),
        generation: old.generation + 5,
    };
    let e = s
        .transfer_lease(&rec.id, &forged, "w2", ttl)
        .await
        .expect_err("wrong generation");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let moved = s
        .transfer_lease(&rec.id, &old, "w2", ttl)
        .await
        .expect("transfer");
    assert_eq!(moved.holder_id, "w2");
    assert_eq!(moved.generation, old.generation + 1);
    // Twice with the same fence: the second is stale.
    let e = s
        .transfer_lease(&rec.id, &old, "w3", ttl)
        .await
        .expect_err("stale transfer");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let e = s
        .set_sandbox_worker(&rec.id, "w1", "", "running", &old)
        .await
        .expect_err("old holder");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    s.set_sandbox_worker(&rec.id, "w2", "vm-2", "running", &moved.fence())
        .await
        .expect("move under the new lease");
    let got = s.get_sandbox(&rec.id).await.expect("get");
    assert_eq!((got.worker_id.as_str(), got.vm_id.as_str()), ("w2", "vm-2"));
    let e = s
        .transfer_lease("sb-7f0000ff", &old, "w2", ttl)
        .await
        .expect_err("no lease");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
}

pub async fn concurrent_writers(s: &dyn Store) {
    // Many concurrent inserts must all land (busy handling, no lost writes).
    let now = now();
    let recs: Vec<SandboxRecord> = (0..50)
        .map(|i| SandboxRecord {
            id: format!("sb-c{i:07}"),
            state: "running".into(),
            provider: "mock".into(),
            image: "host".into(),
            memory_mb: 1,
            vcpus: 1,
            metadata: BTreeMap::new(),
            owner_id: String::new(),
            tenant_id: String::new(),
            vm_id: String::new(),
            worker_id: "local".into(),
            created_at: now,
            expires_at: now,
            updated_at: now,
            idle_timeout_secs: 0,
            on_timeout: String::new(),
            idle_deadline: Default::default(),
        })
        .collect();
    let results = futures::future::join_all(recs.iter().map(|r| s.insert_sandbox(r))).await;
    for r in results {
        r.expect("concurrent insert");
    }
    assert_eq!(s.list_active_sandboxes().await.expect("list").len(), 50);
}

pub async fn preview_ports(s: &dyn Store) {
    use stacyvm_core::store::{PortRecord, PreviewTokenRecord};
    let now = now();
    let port = |sb: &str, port: u16, mode: &str| PortRecord {
        sandbox_id: sb.into(),
        port,
        mode: mode.into(),
        created_by: "alice".into(),
        created_at: now,
    };
    let token = |id: &str, sb: &str, p: u16, secs: i64| PreviewTokenRecord {
        id: id.into(),
        sandbox_id: sb.into(),
        port: p,
        hash: format!("hash-{id}"),
        created_by: "alice".into(),
        created_at: now + chrono::Duration::seconds(secs),
        expires_at: now + chrono::Duration::hours(1),
        revoked: false,
    };
    assert_eq!(
        s.get_port("sb-1", 3000).await.expect_err("none").kind(),
        ErrorKind::NotFound
    );
    s.put_port(&port("sb-1", 8080, "public"))
        .await
        .expect("put");
    s.put_port(&port("sb-1", 3000, "public"))
        .await
        .expect("put");
    s.put_port(&port("sb-2", 3000, "public"))
        .await
        .expect("put");
    // A second put changes the mode.
    s.put_port(&port("sb-1", 3000, "token")).await.expect("put");
    assert_eq!(
        s.get_port("sb-1", 3000).await.expect("get"),
        port("sb-1", 3000, "token")
    );
    let ports: Vec<u16> = s
        .list_ports("sb-1")
        .await
        .expect("list")
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [3000, 8080]);

    s.insert_preview_token(&token("pt-b", "sb-1", 3000, 2))
        .await
        .expect("insert");
    s.insert_preview_token(&token("pt-a", "sb-1", 3000, 1))
        .await
        .expect("insert");
    s.insert_preview_token(&token("pt-c", "sb-2", 3000, 0))
        .await
        .expect("insert");
    // The secret's hash is unique, like the id.
    let mut dup = token("pt-d", "sb-1", 3000, 0);
    dup.hash = "hash-pt-a".into();
    assert_eq!(
        s.insert_preview_token(&dup)
            .await
            .expect_err("duplicate hash")
            .kind(),
        ErrorKind::Conflict
    );
    assert_eq!(
        s.find_preview_token("hash-pt-b").await.expect("find"),
        token("pt-b", "sb-1", 3000, 2)
    );
    let ids = |l: Vec<PreviewTokenRecord>| l.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_preview_tokens("sb-1", 3000).await.expect("list")),
        ["pt-a", "pt-b"]
    );
    // Revoking needs the right sandbox.
    assert_eq!(
        s.revoke_preview_token("sb-2", "pt-a")
            .await
            .expect_err("other sandbox")
            .kind(),
        ErrorKind::NotFound
    );
    s.revoke_preview_token("sb-1", "pt-a")
        .await
        .expect("revoke");
    assert!(
        s.find_preview_token("hash-pt-a")
            .await
            .expect("find")
            .revoked
    );
    // Unexposing a port drops its tokens, not other sandboxes'.
    s.delete_port("sb-1", 3000).await.expect("delete");
    assert_eq!(
        s.delete_port("sb-1", 3000).await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        s.find_preview_token("hash-pt-b")
            .await
            .expect_err("dropped")
            .kind(),
        ErrorKind::NotFound
    );
    assert!(s.find_preview_token("hash-pt-c").await.is_ok());
    assert_eq!(s.delete_sandbox_ports("sb-2").await.expect("drop"), 1);
    assert!(s.find_preview_token("hash-pt-c").await.is_err());
    assert_eq!(s.list_ports("sb-1").await.expect("list").len(), 1);
}

/// Emits one `#[tokio::test]` per contract case for a store constructor.
#[macro_export]
macro_rules! store_contract_tests {
    ($engine:ident, $make:expr) => {
        mod $engine {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_contract_tests!(@case $make, sandbox_lifecycle, sandbox_listing_order_and_expiry, exec_logs, retention, templates, quotas, audit, workers, leases, lease_race, fenced_writes, lease_transfer, admission, concurrent_writers, snapshots, volumes, registry_connections, environment_specs, builds, preview_ports);
        }
    };
    (@case $make:expr, $($case:ident),*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let store = $make.await;
                $crate::contract::$case(&store).await;
            }
        )*
    };
}
