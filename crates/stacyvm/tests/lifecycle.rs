//! What outlives the server, tested with the real binary: a graceful stop
//! takes the warm pool down; after `kill -9` in the middle of spawns every
//! acknowledged sandbox comes back and nothing the store never recorded
//! keeps running.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path, port: u16, pool: usize) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.with_extension("log"))
        .expect("log");
    let child = Command::new(BIN)
        .arg("serve")
        .env("STACYVM_SERVER_HOST", "127.0.0.1")
        .env("STACYVM_SERVER_PORT", port.to_string())
        .env("STACYVM_SERVER_DATA_DIR", data)
        .env("STACYVM_PROVIDERS_NATIVE_WARM_POOL", pool.to_string())
        .env("STACYVM_LOGGING_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let s = Server {
        child,
        url: format!("http://127.0.0.1:{port}/api/v1"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("stacyvm serve did not listen within 30 s");
}

/// Live sandbox inits (`stacyvm-agent boot`) whose state is under `data`.
fn inits_under(data: &Path) -> Vec<(i32, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.len() >= 4
            && args[0].ends_with("stacyvm-agent")
            && args[1] == "boot"
            && Path::new(&args[3]).starts_with(data)
        {
            // Zombies and exiting processes are not alive.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().to_string());
            if !state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X')) {
                out.push((pid, PathBuf::from(&args[3])));
            }
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn graceful_stop_takes_the_warm_pool_down() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let mut s = start(&data, free_port(), 2);
    wait_for("two warm sandboxes", Duration::from_secs(30), || {
        inits_under(&data).len() == 2
    });
    let pid = nix_pid(&s.child);
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if s.child.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        inits_under(&data),
        vec![],
        "pool sandboxes outlived the server"
    );
    let pool_dirs: Vec<_> = std::fs::read_dir(data.join("native/sandboxes"))
        .expect("sandboxes")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pool-"))
        .collect();
    assert!(pool_dirs.is_empty(), "{pool_dirs:?}");
}

fn nix_pid(c: &Child) -> u32 {
    c.id()
}

#[test]
fn kill_9_mid_spawn_keeps_acknowledged_sandboxes_and_reaps_the_rest() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let port = free_port();
    let mut s = start(&data, port, 0);
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (acked, stop, url) = (acked.clone(), stop.clone(), s.url.clone());
        clients.push(rt.spawn(async move {
            let http = reqwest::Client::new();
            for _ in 0..50 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let r = http
                    .post(format!("{url}/sandboxes"))
                    .body(r#"{"ttl":"30m"}"#)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let Ok(r) = r else { return };
                if !r.status().is_success() {
                    return;
                }
                let Ok(v) = r.json::<serde_json::Value>().await else {
                    return;
                };
                if let Some(id) = v["id"].as_str() {
                    acked.lock().expect("lock").push(id.to_string());
                }
            }
        }));
    }
    // Let some spawns land, then kill the server in the middle of others.
    wait_for("some acknowledged spawns", Duration::from_secs(60), || {
        acked.lock().expect("lock").len() >= 8
    });
    let st = Command::new("kill")
        .args(["-KILL", &s.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let _ = s.child.wait();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        let _ = rt.block_on(c);
    }
    let acked: Vec<String> = acked.lock().expect("lock").clone();
    let s2 = start(&data, port, 0);
    let http = reqwest::Client::new();
    for id in &acked {
        let v: serde_json::Value = rt.block_on(async {
            http.get(format!("{}/sandboxes/{id}", s2.url))
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json")
        });
        assert_eq!(v["state"], "running", "acknowledged {id} came back: {v}");
        let r: serde_json::Value = rt.block_on(async {
            http.post(format!("{}/sandboxes/{id}/exec", s2.url))
                .body(r#"{"command":"echo alive"}"#)
                .send()
                .await
                .expect("exec")
                .json()
                .await
                .expect("json")
        });
        assert_eq!(r["stdout"], "alive\n", "{id}: {r}");
    }
    // Exactly the recorded sandboxes run (the acknowledged ones, plus any
    // the server recorded just before it died): nothing unrecorded
    // survives the restart.
    let listed: serde_json::Value = rt.block_on(async {
        http.get(format!("{}/sandboxes", s2.url))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json")
    });
    let mut recorded: Vec<String> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect();
    recorded.sort();
    for id in &acked {
        assert!(recorded.contains(id), "acknowledged {id} is listed");
    }
    assert!(
        recorded.len() <= acked.len() + 10,
        "at most one in flight per client"
    );
    let inits = inits_under(&data);
    let mut running: Vec<String> = inits
        .iter()
        .filter_map(|(_, spec)| {
            spec.parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().to_string())
        })
        .collect();
    running.sort();
    assert_eq!(running, recorded, "running inits vs recorded sandboxes");
    for id in &recorded {
        let _ = rt.block_on(http.delete(format!("{}/sandboxes/{id}", s2.url)).send());
    }
    wait_for("every sandbox destroyed", Duration::from_secs(30), || {
        inits_under(&data).is_empty()
    });
    drop(s2);
}
