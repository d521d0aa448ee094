//! Helpers shared by the integration tests of the `stacyvm` binary (each
//! test binary uses some of them).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's docker-registry serving plain HTTP on a free loopback port,
/// with filesystem storage under `dir`; killed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`
    pub addr: String,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Registry::launch(dir, None)
    }

    /// A registry that asks for `user` and `password` (htpasswd, basic
    /// auth over loopback HTTP, as Docker accepts for 127.0.0.0/8).
    pub fn start_with_auth(dir: &Path, user: &str, password: &str) -> Registry {
        let hash = bcrypt::hash(password, 5).expect("bcrypt");
        let file = dir.join("htpasswd");
        std::fs::write(&file, format!("{user}:{hash}\n")).expect("htpasswd");
        Registry::launch(dir, Some(&file))
    }

    fn launch(dir: &Path, htpasswd: Option<&Path>) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{}",
                dir.join("registry").display(),
                match htpasswd {
                    Some(f) => format!(
                        "auth:\n  htpasswd:\n    realm: stacyvm-test\n    path: {}\n",
                        f.display()
                    ),
                    None => String::new(),
                }
            ),
        )
        .expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (scripts/test installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "registry did not listen");
            std::thread::sleep(Duration::from_millis(25));
        }
        Registry { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `stacyvm serve` on a free loopback port with its data dir, stderr in
/// `<data>/server.log`; stopped with SIGTERM (then SIGKILL) on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:<port>/api/v1`
    pub url: String,
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `stacyvm serve` with `env` on top of a loopback listener and
    /// the data dir, and waits until it listens.
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(data.join("server.log")).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacyvm"));
        cmd.arg("serve")
            .env("STACYVM_SERVER_HOST", "127.0.0.1")
            .env("STACYVM_SERVER_PORT", port.to_string())
            .env("STACYVM_SERVER_DATA_DIR", data)
            .env("STACYVM_LOGGING_LEVEL", "warn")
            .current_dir(data)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn serve");
        let s = Server {
            child,
            url: format!("http://127.0.0.1:{port}/api/v1"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "stacyvm serve did not listen within 30 s: {}",
                std::fs::read_to_string(data.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-15")
            .arg(self.child.id().to_string())
            .status();
        // Longer than the server's own shutdown may take (the native warm
        // pool waits up to 30 s for boots in flight): a SIGKILL before it
        // ends would leave their sandboxes behind.
        let deadline = Instant::now() + Duration::from_secs(40);
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

/// JSON calls to a [`Server`]'s API.
pub struct Api {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:<port>/api/v1`
    pub base: String,
    /// `http://127.0.0.1:<port>`
    pub root: String,
}

impl Api {
    pub fn new(server: &Server) -> Api {
        Api {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            base: server.url.clone(),
            root: server.url.trim_end_matches("/api/v1").to_string(),
        }
    }

    /// The server's listening address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.root
            .trim_start_matches("http://")
            .parse()
            .expect("server address")
    }

    /// A client that resolves each of `hosts` (preview names) to the server.
    pub fn preview_client(&self, hosts: &[&str]) -> reqwest::Client {
        let mut b = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        for h in hosts {
            b = b.resolve(h, self.addr());
        }
        b.build().expect("client")
    }

    /// `method path` with a JSON body (none for `Value::Null`): the status
    /// and the body as JSON (a JSON string when it is not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            r = r.json(&body);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, serde_json::Value::Null)
            .await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::DELETE, path, serde_json::Value::Null)
            .await
    }

    /// `POST /sandboxes` with `body`; asserts 201.
    pub async fn spawn(&self, body: serde_json::Value) -> serde_json::Value {
        let (s, v) = self.post("/sandboxes", body).await;
        assert_eq!(s, 201, "spawn: {v}");
        v
    }

    /// A synchronous shell exec; asserts 200.
    pub async fn exec(&self, id: &str, command: &str) -> serde_json::Value {
        let (s, v) = self
            .post(
                &format!("/sandboxes/{id}/exec"),
                serde_json::json!({ "command": command }),
            )
            .await;
        assert_eq!(s, 200, "exec {command:?}: {v}");
        v
    }

    /// The sandbox's state, or the status code when the lookup fails.
    pub async fn state(&self, id: &str) -> String {
        match self.get(&format!("/sandboxes/{id}")).await {
            (200, v) => v["state"].as_str().unwrap_or_default().to_string(),
            (s, _) => s.to_string(),
        }
    }
}

/// A sandbox's `expires_at`.
pub fn expiry(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    v["expires_at"]
        .as_str()
        .expect("expires_at")
        .parse()
        .expect("time")
}

/// The docker CLI (test setup only).
pub fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI (test setup only)")
}

/// `docker import`s a busybox image as `image` unless it exists (test
/// setup only).
pub fn ensure_docker_image(image: &str) {
    if docker(&["image", "inspect", image]).status.success() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path();
    for d in ["bin", "etc", "tmp", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    // /tmp as in any image (the provider tests import the same tag with
    // it; whichever test imports first must build the same image).
    std::fs::set_permissions(
        root.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod tmp");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("link");
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/home/sandbox:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nsandbox:x:1000:\n").expect("group");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -c . | docker import - {image} >/dev/null",
            root.display()
        ))
        .status()
        .expect("import");
    assert!(st.success(), "docker import failed");
}

/// Runs the CLI against `server`; its stdout, failing the test on a
/// non-zero exit.
pub fn cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(args)
        .env("STACYVM_URL", server.url.trim_end_matches("/api/v1"))
        .output()
        .expect("stacyvm");
    assert!(
        out.status.success(),
        "stacyvm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
