//! A cluster on one machine, with real processes: two control planes and
//! two workers (`stacyvm serve`, `stacyvm worker`) over one Postgres
//! (`STACYVM_TEST_PG_DSN`), worker RPC over mutual TLS with certificates
//! made here (rcgen). Sandboxes run on the workers (native provider).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stacyvm_core::store::Store;
use stacyvm_store::{testpg, PostgresStore};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");
const ADMIN: &str = "cluster-admin-key-0123456789abcdef";
const RPC_TOKEN: &str = "cluster-rpc-token-0123456789abcdef";
const SIGNING: &str = "cluster-signing-key-0123456789abcdef0123";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// Test certificates: a CA, the workers' server certificate, the control
/// planes' client certificate, and a client certificate of another CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).expect("write pem");
        };
        let ca = |cn: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            let cert = p.self_signed(&key).expect("ca");
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("stacyvm test CA");
        let (rogue_cert, rogue_key) = ca("someone else's CA");
        write("ca.pem", ca_cert.pem());
        let leaf = |sans: Vec<String>,
                    purpose: ExtendedKeyUsagePurpose,
                    issuer: (&rcgen::Certificate, &KeyPair),
                    name: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(sans).expect("params");
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![purpose];
            let cert = p.signed_by(&key, issuer.0, issuer.1).expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            (&ca_cert, &ca_key),
            "worker",
        );
        leaf(
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            (&ca_cert, &ca_key),
            "control-plane",
        );
        leaf(
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            (&rogue_cert, &rogue_key),
            "rogue",
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

/// A `stacyvm` process; SIGTERM (then SIGKILL) on drop unless killed.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(name: &str, dir: &Path, args: &[&str], env: &[(&str, String)]) -> Proc {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("data dir");
        let log = data.join("log");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(&data)
            .env("STACYVM_SERVER_DATA_DIR", data.join("data"))
            .env("STACYVM_LOGGING_LEVEL", "info")
            .env("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")
            .env("HOME", &data)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn stacyvm"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, without waiting.
    fn term(&self) {
        let _ = Command::new("kill")
            .arg("-15")
            .arg(self.child.id().to_string())
            .status();
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-15")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(port: u16) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{port}/api/v1"),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(
                method.parse().expect("method"),
                format!("{}{path}", self.base),
            )
            .header("X-Admin-API-Key", ADMIN)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        match rb.send().await {
            Ok(r) => {
                let st = r.status().as_u16();
                (st, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({"transport": e.to_string()})),
        }
    }

    async fn wait_ready(&self, p: &Proc) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let (200, _) = self.call("GET", "/live", None).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "control plane did not start: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn exec(&self, id: &str, cmd: &str) -> (u16, Value) {
        self.call(
            "POST",
            &format!("/sandboxes/{id}/exec"),
            Some(json!({"command": cmd})),
        )
        .await
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    pki: Pki,
    dsn: String,
}

impl Cluster {
    async fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tmp");
        let pki = Pki::make(dir.path());
        Cluster {
            dsn: testpg::fresh_database().await,
            pki,
            dir,
        }
    }

    fn control_plane(&self, name: &str, port: u16) -> Proc {
        self.control_plane_with(name, port, &[])
    }

    fn control_plane_with(&self, name: &str, port: u16, extra: &[(&'static str, &str)]) -> Proc {
        let mut env = vec![
            ("STACYVM_SERVER_HOST", "127.0.0.1".to_string()),
            ("STACYVM_SERVER_PORT", port.to_string()),
            ("STACYVM_DATABASE_DRIVER", "postgres".into()),
            ("STACYVM_DATABASE_DSN", self.dsn.clone()),
            ("STACYVM_WORKER_ID", name.into()),
            ("STACYVM_WORKER_LOCAL_SANDBOXES", "false".into()),
            ("STACYVM_WORKER_STALE_AFTER", "3s".into()),
            ("STACYVM_AUTH_ADMIN_API_KEY", ADMIN.into()),
            ("STACYVM_AUTH_WORKER_TOKEN", RPC_TOKEN.into()),
            ("STACYVM_AUTH_WORKER_SIGNING_KEY", SIGNING.into()),
            ("STACYVM_WORKER_RPC_TLS_ENABLED", "true".into()),
            ("STACYVM_WORKER_RPC_TLS_CA_FILE", self.pki.path("ca.pem")),
            (
                "STACYVM_WORKER_RPC_TLS_CLIENT_CERT_FILE",
                self.pki.path("control-plane.pem"),
            ),
            (
                "STACYVM_WORKER_RPC_TLS_CLIENT_KEY_FILE",
                self.pki.path("control-plane.key"),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        Proc::start(name, self.dir.path(), &["serve"], &env)
    }

    fn worker(&self, name: &str, cp_port: u16, rpc_port: u16) -> Proc {
        self.worker_with(name, cp_port, rpc_port, &[])
    }

    fn worker_with(
        &self,
        name: &str,
        cp_port: u16,
        rpc_port: u16,
        extra: &[(&'static str, &str)],
    ) -> Proc {
        let mut env = vec![
            ("STACYVM_AUTH_WORKER_TOKEN", RPC_TOKEN.to_string()),
            ("STACYVM_WORKER_RPC_TLS_ENABLED", "true".into()),
            (
                "STACYVM_WORKER_RPC_TLS_SERVER_CERT_FILE",
                self.pki.path("worker.pem"),
            ),
            (
                "STACYVM_WORKER_RPC_TLS_SERVER_KEY_FILE",
                self.pki.path("worker.key"),
            ),
            (
                "STACYVM_WORKER_RPC_TLS_CLIENT_CA_FILE",
                self.pki.path("ca.pem"),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let cp = format!("http://127.0.0.1:{cp_port}");
        let listen = format!("127.0.0.1:{rpc_port}");
        Proc::start(
            name,
            self.dir.path(),
            &[
                "worker",
                "--id",
                name,
                "--control-plane",
                &cp,
                "--listen",
                &listen,
                "--bootstrap-admin-key",
                ADMIN,
                "--heartbeat-interval",
                "1",
            ],
            &env,
        )
    }
}

async fn wait_workers(api: &Api, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = api.call("GET", "/workers", None).await;
        let online: Vec<String> = v
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|w| {
                        w["status"] == "online"
                            && w["stale"] == false
                            && w["capacity"]["rpc_url"].is_string()
                    })
                    .filter_map(|w| w["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if want.iter().all(|w| online.iter().any(|o| o == w)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "workers {want:?} did not register: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn state_of(api: &Api, id: &str) -> String {
    api.call("GET", &format!("/sandboxes/{id}"), None).await.1["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_control_planes_two_workers_over_mutual_tls() {
    let c = Cluster::new().await;
    let (pa, pb) = (free_port(), free_port());
    let mut cp_a = c.control_plane("cp-a", pa);
    let cp_b = c.control_plane("cp-b", pb);
    let (a, b) = (Api::new(pa), Api::new(pb));
    a.wait_ready(&cp_a).await;
    b.wait_ready(&cp_b).await;
    let (r1, r2) = (free_port(), free_port());
    let mut w1 = c.worker("w1", pa, r1);
    let w2 = c.worker("w2", pb, r2);
    wait_workers(&b, &["w1", "w2"]).await;

    // Four sandboxes through one control plane: spread over both workers.
    let mut ids = Vec::new();
    let mut on: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for _ in 0..4 {
        let (st, v) = a
            .call("POST", "/sandboxes", Some(json!({"ttl": "10m"})))
            .await;
        assert_eq!(st, 201, "{v}\n{}\n{}", w1.log(), cp_a.log());
        let id = v["id"].as_str().expect("id").to_string();
        on.entry(v["worker_id"].as_str().expect("worker").to_string())
            .or_default()
            .push(id.clone());
        ids.push(id);
    }
    assert_eq!(
        on.get("w1").map(Vec::len),
        Some(2),
        "load-aware placement: {on:?}"
    );
    assert_eq!(
        on.get("w2").map(Vec::len),
        Some(2),
        "load-aware placement: {on:?}"
    );

    // The other control plane serves each of them.
    for id in &ids {
        let (st, v) = b.exec(id, "hostname").await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["stdout"].as_str().expect("out").trim(), id);
    }
    // A file bigger than any RPC buffer, written through one control
    // plane and read through the other.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = reqwest::Client::new()
        .put(format!(
            "{}/sandboxes/{}/files?path=/workspace/big.bin",
            a.base, ids[0]
        ))
        .header("X-Admin-API-Key", ADMIN)
        .body(big.clone())
        .send()
        .await
        .expect("upload");
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    let got = reqwest::Client::new()
        .get(format!(
            "{}/sandboxes/{}/files?path=/workspace/big.bin",
            b.base, ids[0]
        ))
        .header("X-Admin-API-Key", ADMIN)
        .send()
        .await
        .expect("download")
        .bytes()
        .await
        .expect("body");
    assert!(got.as_ref() == big.as_slice(), "the file came back changed");

    // Worker RPC refuses: another CA's client certificate, no token, and a
    // lease generation older than one it has seen.
    let w1_url = format!("https://127.0.0.1:{r1}");
    let client = |cert: &str| {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(c.pki.path("ca.pem")).expect("ca"))
            .expect("ca");
        let mut pem = std::fs::read(c.pki.path(&format!("{cert}.pem"))).expect("cert");
        pem.extend(std::fs::read(c.pki.path(&format!("{cert}.key"))).expect("key"));
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .build()
            .expect("client")
    };
    let w1_sandbox = &on["w1"][0];
    let rogue = client("rogue")
        .get(format!("{w1_url}/health"))
        .header("X-Worker-ID", "w1")
        .header("X-Worker-Token", RPC_TOKEN)
        .send()
        .await;
    assert!(
        rogue.is_err(),
        "a client certificate of another CA must be refused: {rogue:?}"
    );
    let good = client("control-plane");
    let r = good
        .get(format!("{w1_url}/health"))
        .header("X-Worker-ID", "w1")
        .send()
        .await
        .expect("health");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.version(),
        reqwest::Version::HTTP_2,
        "worker RPC speaks HTTP/2"
    );
    // The tunnel, archive and pause routes need the same credentials.
    for (method, path) in [
        (reqwest::Method::GET, format!("/connect/{w1_sandbox}/8080")),
        (
            reqwest::Method::GET,
            format!("/archive?sandbox_id={w1_sandbox}&path=/workspace&max_bytes=1&max_entries=1"),
        ),
        (reqwest::Method::POST, format!("/pause/{w1_sandbox}")),
        (reqwest::Method::POST, format!("/resume/{w1_sandbox}")),
    ] {
        let r = good
            .request(method.clone(), format!("{w1_url}{path}"))
            .header("X-Worker-ID", "w1")
            .header(reqwest::header::UPGRADE, "stacyvm-port")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 401, "{method} {path} without a token");
    }
    let r = good
        .post(format!("{w1_url}/exec"))
        .header("X-Worker-ID", "w1")
        .header("X-Worker-Token", RPC_TOKEN)
        .header("X-Stacyvm-Lease", "w1:0")
        .json(&json!({"sandbox_id": w1_sandbox, "command": "true"}))
        .send()
        .await
        .expect("exec");
    assert_eq!(
        r.status().as_u16(),
        409,
        "a stale lease generation is refused"
    );
    let r = good
        .post(format!("{w1_url}/exec"))
        .header("X-Worker-ID", "w1")
        .header("X-Worker-Token", RPC_TOKEN)
        .header("X-Stacyvm-Lease", "w2:99")
        .json(&json!({"sandbox_id": w1_sandbox, "command": "true"}))
        .send()
        .await
        .expect("exec");
    assert_eq!(
        r.status().as_u16(),
        409,
        "a lease held by another worker is refused"
    );

    // Kill -9 a control plane: the other serves every sandbox.
    cp_a.kill9();
    for id in &ids {
        let (st, v) = b.exec(id, "echo alive").await;
        assert_eq!(st, 200, "{v}");
    }

    // Kill -9 a worker in the middle of 20 execs: the other worker's
    // execs finish, the dead one's fail with a typed error, none hangs.
    let started = Instant::now();
    let execs = (0..20).map(|i| {
        let id = ids[i % ids.len()].clone();
        let b = &b;
        async move { (id.clone(), b.exec(&id, "sleep 1.5; echo done").await) }
    });
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        w1.kill9();
    };
    let (results, ()) = tokio::join!(futures::future::join_all(execs), killer);
    assert!(started.elapsed() < Duration::from_secs(25), "execs hung");
    for (id, (st, v)) in &results {
        if on["w2"].contains(id) {
            assert_eq!(*st, 200, "{id} on w2: {v}");
            assert_eq!(v["stdout"], "done\n", "{v}");
        } else {
            assert!(
                *st >= 500,
                "{id} on the killed worker must fail with a server error: {st} {v}"
            );
            assert!(v["code"].is_string(), "typed error: {v}");
        }
    }
    // Its sandboxes are marked; the others are not; no record is lost.
    let deadline = Instant::now() + Duration::from_secs(20);
    while state_of(&b, &on["w1"][0]).await != "unhealthy" {
        assert!(Instant::now() < deadline, "w1's sandboxes were not marked");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for id in &on["w1"] {
        assert_eq!(state_of(&b, id).await, "unhealthy");
        let (st, v) = b.exec(id, "true").await;
        assert_eq!(st, 503, "{v}");
    }
    for id in &on["w2"] {
        assert_eq!(state_of(&b, id).await, "running");
    }
    let store = PostgresStore::connect(&c.dsn).await.expect("store");
    assert_eq!(store.list_active_sandboxes().await.expect("list").len(), 4);

    // The worker comes back: its sandboxes are reachable again.
    let _w1 = c.worker("w1", pb, r1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(&b, &on["w1"][0]).await != "running" {
        assert!(
            Instant::now() < deadline,
            "w1's sandboxes did not come back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The restarted worker still refuses the lease generations it had
    // seen before the kill (its fences are kept on disk).
    for id in &on["w1"] {
        let r = good
            .post(format!("{w1_url}/exec"))
            .header("X-Worker-ID", "w1")
            .header("X-Worker-Token", RPC_TOKEN)
            .header("X-Stacyvm-Lease", "w1:0")
            .json(&json!({"sandbox_id": id, "command": "true"}))
            .send()
            .await
            .expect("exec");
        assert_eq!(
            r.status().as_u16(),
            409,
            "a restarted worker must still refuse a stale lease generation for {id}"
        );
    }
    for id in &on["w1"] {
        let (st, v) = b.exec(id, "echo back").await;
        assert_eq!(st, 200, "{id} after the worker's restart: {v}");
    }

    // The killed control plane comes back: it reconciles and serves every
    // sandbox again, on both workers, with the same records.
    cp_a = c.control_plane("cp-a", pa);
    a.wait_ready(&cp_a).await;
    for id in &ids {
        let (st, v) = a.exec(id, "echo reconciled").await;
        assert_eq!(st, 200, "{id} through the restarted control plane: {v}");
        assert_eq!(v["stdout"], "reconciled\n");
    }
    assert_eq!(store.list_active_sandboxes().await.expect("list").len(), 4);

    // Destroy everything through the surviving control plane.
    for id in &ids {
        let (st, v) = b.call("DELETE", &format!("/sandboxes/{id}"), None).await;
        assert_eq!(st, 200, "{v}");
    }
    assert!(store
        .list_active_sandboxes()
        .await
        .expect("list")
        .is_empty());
    let leases = store.list_leases().await.expect("leases");
    assert!(leases.is_empty(), "leases left: {leases:?}");
    drop(w2);
    drop(cp_b);
}

/// Events reach every control plane, a sandbox destroyed through one is
/// gone on the other at once (its cached copy is dropped), and
/// `defaults.max_sandboxes` holds for the cluster, not per control plane.
/// E2B traffic for a sandbox on a worker: a control plane's E2B API
/// (create, envd's process and filesystem RPCs, `/files`, kill) reaches it
/// through worker RPC. The client is StacyVM's own E2B provider, which
/// speaks E2B's wire contract as the official SDKs do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_traffic_reaches_the_owning_worker() {
    use stacyvm_core::config::{E2bConfig, Secret};
    use stacyvm_core::provider::Provider;
    use stacyvm_providers::conformance::{sh, spawn};
    const KEY: &str = "cluster-e2b-api-key-0123456789abcdef";
    let c = Cluster::new().await;
    let p = free_port();
    let cp = c.control_plane_with("cp-a", p, &[("STACYVM_AUTH_API_KEY", KEY)]);
    let a = Api::new(p);
    a.wait_ready(&cp).await;
    let w = c.worker("w1", p, free_port());
    wait_workers(&a, &["w1"]).await;
    let root = format!("http://127.0.0.1:{p}");
    let e2b = stacyvm_providers::remote::e2b::E2bProvider::from_config(&E2bConfig {
        enabled: true,
        api_key: Secret::new(KEY),
        base_url: root.clone(),
        sandbox_url: root,
        template: "base".into(),
    })
    .expect("e2b client");
    let id = spawn(&e2b, "base").await;
    let store = PostgresStore::connect(&c.dsn).await.expect("store");
    assert_eq!(
        store.get_sandbox(&id).await.expect("record").worker_id,
        "w1",
        "the E2B sandbox runs on the worker"
    );
    e2b.write_file(&id, "/workspace/e.txt", b"via e2b", 0o644)
        .await
        .expect("envd upload");
    assert_eq!(
        e2b.read_file(&id, "/workspace/e.txt")
            .await
            .expect("envd download"),
        b"via e2b"
    );
    let r = sh(&e2b, &id, "cat /workspace/e.txt; echo; id -u").await;
    assert_eq!(r.code, 0, "{r:?}\n{}", w.log());
    assert!(r.stdout.starts_with("via e2b\n"), "{r:?}");
    let listed = e2b.list_files(&id, "/workspace").await.expect("envd list");
    assert!(
        listed.iter().any(|f| f.path.ends_with("/e.txt")),
        "{listed:?}"
    );
    e2b.destroy(&id).await.expect("kill");
    assert_eq!(
        store.get_sandbox(&id).await.expect("record").state,
        "destroyed"
    );
    assert!(w.log().contains(&id), "the worker served it: {}", w.log());
}

/// What a sandbox on a worker does through the control plane's API like a
/// local one: a live preview (the `connect` tunnel over the worker RPC's
/// mutual TLS), a directory archive both ways (`archive`, framed), pause
/// and the wake on the next exec (`pause`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_archives_and_pause_reach_a_worker() {
    let c = Cluster::new().await;
    let p = free_port();
    let cp = c.control_plane("cp-a", p);
    let a = Api::new(p);
    a.wait_ready(&cp).await;
    let w = c.worker("w1", p, free_port());
    wait_workers(&a, &["w1"]).await;
    let (st, sb) = a
        .call("POST", "/sandboxes", Some(json!({"ttl": "10m"})))
        .await;
    assert_eq!(st, 201, "{sb}\n{}", cp.log());
    let id = sb["id"].as_str().expect("id").to_string();
    assert_eq!(sb["worker_id"], "w1", "{sb}");

    // Preview: a web server inside, reached by path through the tunnel.
    let (st, v) = a
        .exec(
            &id,
            "mkdir -p /workspace/site && echo hello-from-w1 > /workspace/site/index.html && \
             cd /workspace/site && setsid python3 -m http.server 8080 --bind 127.0.0.1 \
             >/dev/null 2>&1 </dev/null & sleep 0.5",
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = a
        .call(
            "POST",
            &format!("/sandboxes/{id}/ports/8080"),
            Some(json!({"mode": "public"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let page = reqwest::get(format!("http://127.0.0.1:{p}/preview/{id}/8080/"))
        .await
        .expect("preview");
    assert_eq!(page.status().as_u16(), 200, "{}", w.log());
    assert_eq!(page.text().await.expect("body"), "hello-from-w1\n");

    // Archive: download the directory, upload it elsewhere, compare.
    let tar = a
        .http
        .get(format!(
            "{}/sandboxes/{id}/archive?path=/workspace/site",
            a.base
        ))
        .header("X-Admin-API-Key", ADMIN)
        .send()
        .await
        .expect("archive");
    assert_eq!(tar.status().as_u16(), 200);
    let tar = tar.bytes().await.expect("tar");
    assert!(tar.len() >= 1024, "a tar: {} bytes", tar.len());
    let up = a
        .http
        .put(format!(
            "{}/sandboxes/{id}/archive?path=/workspace/copy",
            a.base
        ))
        .header("X-Admin-API-Key", ADMIN)
        .body(tar.to_vec())
        .send()
        .await
        .expect("upload");
    assert_eq!(up.status().as_u16(), 200, "{:?}", up.text().await);
    let (st, v) = a.exec(&id, "cat /workspace/copy/index.html").await;
    assert_eq!(
        (st, v["stdout"].as_str()),
        (200, Some("hello-from-w1\n")),
        "{v}"
    );

    // Pause on the worker; the next exec wakes it.
    let (st, v) = a
        .call("POST", &format!("/sandboxes/{id}/pause"), None)
        .await;
    assert_eq!((st, v["state"].as_str()), (200, Some("paused")), "{v}");
    let (st, v) = a.exec(&id, "echo awake").await;
    assert_eq!((st, v["stdout"].as_str()), (200, Some("awake\n")), "{v}");
    assert_eq!(state_of(&a, &id).await, "running");
    let (st, _) = a.call("DELETE", &format!("/sandboxes/{id}"), None).await;
    assert_eq!(st, 200);
}

/// A worker draining with `drain_policy: migrate`: a control plane moves
/// its sandboxes to another worker, ids, records and `/workspace` files
/// (modes included) kept, and the drained worker leaves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_its_sandboxes_to_another() {
    let c = Cluster::new().await;
    let p = free_port();
    let cp = c.control_plane("cp-a", p);
    let a = Api::new(p);
    a.wait_ready(&cp).await;
    let mut w1 = c.worker_with(
        "w1",
        p,
        free_port(),
        &[
            ("STACYVM_WORKER_SHUTDOWN_TIMEOUT", "120s"),
            ("STACYVM_WORKER_DRAIN_POLICY", "migrate"),
        ],
    );
    wait_workers(&a, &["w1"]).await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let (st, v) = a.call("POST", "/sandboxes", Some(json!({}))).await;
        assert_eq!(st, 201, "{v}");
        let id = v["id"].as_str().expect("id").to_string();
        let (st, v) = a
            .exec(
                &id,
                &format!("mkdir -p /workspace/d && echo {i}-data > /workspace/d/f.txt && printf x > /workspace/top && chmod 751 /workspace/top"),
            )
            .await;
        assert_eq!((st, &v["exit_code"]), (200, &json!(0)), "{v}");
        ids.push(id);
    }
    let w2 = c.worker("w2", p, free_port());
    wait_workers(&a, &["w1", "w2"]).await;
    let store = PostgresStore::connect(&c.dsn).await.expect("store");
    for id in &ids {
        assert_eq!(store.get_sandbox(id).await.expect("record").worker_id, "w1");
    }

    w1.term();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut on_w2 = 0;
        for id in &ids {
            if store.get_sandbox(id).await.expect("record").worker_id == "w2" {
                on_w2 += 1;
            }
        }
        if on_w2 == ids.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sandboxes did not move: {}\n{}",
            cp.log(),
            w1.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(state_of(&a, id).await, "running");
        let (st, v) = a
            .exec(id, "cat /workspace/d/f.txt; stat -c %a /workspace/top")
            .await;
        assert_eq!(st, 200, "{v}\n{}", w2.log());
        assert_eq!(v["stdout"], format!("{i}-data\n751\n"), "{v}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w1.exited() {
        assert!(
            Instant::now() < deadline,
            "w1 kept waiting after its sandboxes moved: {}",
            w1.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        w1.log().contains("drained: no sandbox left"),
        "{}",
        w1.log()
    );
    // Every move is audited (the audit is written in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = store
            .list_op_audit(&Default::default())
            .await
            .expect("audit");
        let moves = rows
            .iter()
            .filter(|r| r.action == "sandbox.migrate" && r.status == "success")
            .count();
        if moves == ids.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{moves} moves audited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        let (st, v) = a.call("DELETE", &format!("/sandboxes/{id}"), None).await;
        assert_eq!(st, 200, "{v}");
    }
    assert!(store
        .list_leases()
        .await
        .expect("leases")
        .iter()
        .all(|l| !l.resource_id.starts_with("sb-")));
    drop(w2);
}

/// SIGTERM: the worker drains. It takes no new sandbox, keeps serving and
/// heartbeating for the ones it has, and goes offline as soon as the last
/// one is destroyed, long before its shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_serves_its_sandboxes_until_they_finish() {
    let c = Cluster::new().await;
    let p = free_port();
    let cp = c.control_plane("cp-a", p);
    let a = Api::new(p);
    a.wait_ready(&cp).await;
    let mut w = c.worker_with(
        "w1",
        p,
        free_port(),
        &[("STACYVM_WORKER_SHUTDOWN_TIMEOUT", "90s")],
    );
    wait_workers(&a, &["w1"]).await;
    let (st, v) = a.call("POST", "/sandboxes", Some(json!({}))).await;
    assert_eq!(st, 201, "{v}\n{}", w.log());
    let id = v["id"].as_str().expect("id").to_string();

    let started = Instant::now();
    w.term();
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.call("GET", "/workers/w1", None).await.1["status"] != "draining" {
        assert!(
            Instant::now() < deadline,
            "w1 never said it drains: {}",
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, v) = a.exec(&id, "echo still").await;
    assert_eq!(st, 200, "a draining worker still serves: {v}");
    assert_eq!(v["stdout"], "still\n");
    let (st, v) = a.call("POST", "/sandboxes", Some(json!({}))).await;
    assert_eq!(st, 429, "no new sandbox goes to a draining worker: {v}");
    // It keeps heartbeating: past the control plane's stale_after (3 s) its
    // sandbox is still running, not unhealthy.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!w.exited(), "w1 left with a sandbox still there");
    assert_eq!(state_of(&a, &id).await, "running");
    let (st, v) = a.call("GET", "/workers/w1", None).await;
    assert_eq!((st, &v["stale"]), (200, &json!(false)), "{v}");

    let (st, v) = a.call("DELETE", &format!("/sandboxes/{id}"), None).await;
    assert_eq!(st, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.exited() {
        assert!(
            Instant::now() < deadline,
            "w1 did not go once drained: {}",
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "it waited for the timeout"
    );
    assert_eq!(
        a.call("GET", "/workers/w1", None).await.1["status"],
        "offline"
    );
    assert!(w.log().contains("drained: no sandbox left"), "{}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_caches_and_admission_span_control_planes() {
    let c = Cluster::new().await;
    let (pa, pb) = (free_port(), free_port());
    let limit = [("STACYVM_DEFAULTS_MAX_SANDBOXES", "3")];
    let cp_a = c.control_plane_with("cp-a", pa, &limit);
    let cp_b = c.control_plane_with("cp-b", pb, &limit);
    let (a, b) = (Api::new(pa), Api::new(pb));
    a.wait_ready(&cp_a).await;
    b.wait_ready(&cp_b).await;
    let w = c.worker("w1", pa, free_port());
    wait_workers(&a, &["w1"]).await;

    // An SSE subscriber on B.
    let sse = reqwest::Client::new()
        .get(format!("{}/events", b.base))
        .header("X-Admin-API-Key", ADMIN)
        .send()
        .await
        .expect("events");
    assert_eq!(sse.status().as_u16(), 200);
    let mut sse = sse.bytes_stream();

    let (st, v) = a.call("POST", "/sandboxes", Some(json!({}))).await;
    assert_eq!(st, 201, "{v}\n{}", w.log());
    let id = v["id"].as_str().expect("id").to_string();
    // A has it cached now.
    assert_eq!(state_of(&a, &id).await, "running");

    use futures::StreamExt as _;
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(&format!("\"sandbox_id\":\"{id}\"")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sse.next()).await {
            Ok(Some(Ok(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            _ => panic!("control plane B never saw the spawn on A: {seen}"),
        }
    }
    assert!(seen.contains("sandbox.created"), "{seen}");

    let (st, v) = b.call("DELETE", &format!("/sandboxes/{id}"), None).await;
    assert_eq!(st, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (st, v) = a.call("GET", &format!("/sandboxes/{id}"), None).await;
        if st == 404 {
            assert!(
                v["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("destroyed"),
                "{v}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A still shows the sandbox B destroyed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Six spawns at once, three through each control plane: three fit.
    let spawns = (0..6).map(|i| {
        let api = if i % 2 == 0 { &a } else { &b };
        async move { api.call("POST", "/sandboxes", Some(json!({}))).await }
    });
    let results = futures::future::join_all(spawns).await;
    let admitted: Vec<String> = results
        .iter()
        .filter(|(st, _)| *st == 201)
        .filter_map(|(_, v)| v["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(admitted.len(), 3, "{results:?}");
    for (st, v) in results.iter().filter(|(st, _)| *st != 201) {
        assert_eq!(*st, 429, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("max sandboxes reached (3)"),
            "{v}"
        );
    }
    let (_, adm) = b
        .call("POST", "/sandboxes/admission", Some(json!({})))
        .await;
    assert_eq!(adm["allowed"], false, "{adm}");
    assert_eq!(adm["active_sandboxes"], 3, "{adm}");
    for id in &admitted {
        let (st, v) = a.call("DELETE", &format!("/sandboxes/{id}"), None).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = b.call("POST", "/sandboxes", Some(json!({}))).await;
    assert_eq!(st, 201, "room again after the destroys: {v}");
    let (st, _) = b
        .call(
            "DELETE",
            &format!("/sandboxes/{}", v["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(st, 200);
    drop(w);
}

/// A loopback TCP proxy to Postgres that can be cut (every connection
/// dropped, new ones refused) and restored.
struct PgProxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl PgProxy {
    async fn start(upstream: String) -> PgProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let (u, c) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                c.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(tokio::spawn(async move {
                        if let Ok(mut out) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    }));
            }
        });
        PgProxy {
            port,
            up,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for h in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Postgres goes away for 30 s: what needs it answers 503 `store
/// unavailable`, what does not keeps working, and everything is back, with
/// nothing lost, when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_is_503_and_recovers() {
    let dsn = testpg::fresh_database().await;
    // The DSN's host:port, for the proxy.
    let authority = dsn.split_once('@').expect("dsn").1;
    let upstream = authority.split('/').next().expect("host:port").to_string();
    let proxy = PgProxy::start(upstream.clone()).await;
    let proxied = dsn.replace(&upstream, &format!("127.0.0.1:{}", proxy.port));
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let cp = Proc::start(
        "cp",
        dir.path(),
        &["serve"],
        &[
            ("STACYVM_SERVER_HOST", "127.0.0.1".into()),
            ("STACYVM_SERVER_PORT", port.to_string()),
            ("STACYVM_DATABASE_DRIVER", "postgres".into()),
            ("STACYVM_DATABASE_DSN", proxied.clone()),
            ("STACYVM_AUTH_ADMIN_API_KEY", ADMIN.into()),
        ],
    );
    let api = Api::new(port);
    api.wait_ready(&cp).await;
    let (st, v) = api.call("POST", "/sandboxes", Some(json!({}))).await;
    assert_eq!(st, 201, "{v}\n{}", cp.log());
    let before = v["id"].as_str().expect("id").to_string();

    proxy.cut();
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let (st, v) = api.call("GET", "/sandboxes", None).await;
        assert_eq!(st, 503, "{v}");
        assert_eq!(v["code"], "UNAVAILABLE", "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("store unavailable"),
            "{v}"
        );
        let (st, v) = api.call("POST", "/sandboxes", Some(json!({}))).await;
        assert_eq!(st, 503, "a spawn without its store is refused: {v}");
        let (st, _) = api.call("GET", "/ready", None).await;
        assert_eq!(st, 503);
        refused += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(refused >= 3);
    // A running sandbox still runs commands (it needs no row to do so).
    let (st, v) = api.exec(&before, "echo still").await;
    assert_eq!(st, 200, "{v}");

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = api.call("GET", "/sandboxes", None).await;
        if st == 200 {
            let ids: Vec<&str> = v
                .as_array()
                .expect("list")
                .iter()
                .filter_map(|s| s["id"].as_str())
                .collect();
            assert_eq!(
                ids,
                vec![before.as_str()],
                "nothing lost, nothing half-made"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store did not come back: {st} {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (st, v) = api.call("POST", "/sandboxes", Some(json!({}))).await;
    assert_eq!(st, 201, "{v}");
    let after = v["id"].as_str().expect("id").to_string();
    for id in [&before, &after] {
        let (st, v) = api.call("DELETE", &format!("/sandboxes/{id}"), None).await;
        assert_eq!(st, 200, "{v}");
    }
    let store = PostgresStore::connect(&dsn).await.expect("store");
    assert!(store
        .list_active_sandboxes()
        .await
        .expect("list")
        .is_empty());
}
