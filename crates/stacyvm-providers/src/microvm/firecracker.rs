//! Firecracker's API over its unix socket, and its hybrid vsock.
//!
//! The client side of what a `firecracker` provider does with a VM:
//! configure it (machine, boot source with our kernel and initramfs, the
//! root drive, vsock, entropy), start it, pause/resume it, create and load
//! snapshots, and reach the guest agent over the hybrid vsock socket
//! (`CONNECT <port>\n` → `OK <host port>\n`). Facts from Firecracker's own
//! API specification are summarised in `docs/notes/firecracker-api.md`.
//!
//! No Firecracker binary can run on this project's CI hosts (no KVM that
//! boots guests), so every call is tested against a recording fake of the
//! socket (see the tests), which also checks what Firecracker is strict
//! about: `Content-Length` bodies, IDs that match the path, no unknown keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use stacyvm_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A Firecracker API socket.
#[derive(Debug, Clone)]
pub struct FcApi {
    sock: PathBuf,
}

/// What a VM is configured with before `InstanceStart`.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Uncompressed `vmlinux` (Firecracker v1.16 on x86_64 boots no bzImage).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub boot_args: String,
    /// The VM's own writable raw disk.
    pub rootfs: PathBuf,
    /// Host side of the hybrid vsock (Firecracker binds it).
    pub vsock_uds: PathBuf,
    pub guest_cid: u32,
    /// A virtio-net card `eth0` on this host tap, with this MAC.
    pub nic: Option<Nic>,
}

/// A VM's network card: the tap Firecracker opens by name.
#[derive(Debug, Clone)]
pub struct Nic {
    pub host_dev_name: String,
    pub guest_mac: String,
}

impl FcApi {
    pub fn new(sock: &Path) -> Self {
        Self {
            sock: sock.to_path_buf(),
        }
    }

    /// One request; returns the status and body. Firecracker reads bodies
    /// by `Content-Length` only, which `Full` always sets.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Bytes)> {
        let call = async {
            let stream = tokio::net::UnixStream::connect(&self.sock)
                .await
                .map_err(|e| {
                    Error::unavailable(format!("firecracker API {}: {e}", self.sock.display()))
                })?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| Error::unavailable(format!("firecracker API handshake: {e}")))?;
            tokio::spawn(conn);
            let data = body
                .map(|b| serde_json::to_vec(b).unwrap_or_default())
                .unwrap_or_default();
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("Host", "localhost")
                .header("Accept", "application/json");
            if body.is_some() {
                req = req.header("Content-Type", "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(data)))
                .map_err(|e| Error::internal(format!("firecracker request: {e}")))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| Error::unavailable(format!("firecracker {method} {path}: {e}")))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::unavailable(format!("firecracker {method} {path}: {e}")))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| Error::unavailable(format!("firecracker {method} {path}: no answer")))?
    }

    /// A call that must succeed with 2xx; Firecracker's `fault_message` is
    /// the error otherwise.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Bytes> {
        let (status, bytes) = self.request(method, path, body.as_ref()).await?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let fault = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("fault_message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(Error::internal(format!(
            "firecracker {method} {path} failed ({status}): {fault}"
        )))
    }

    /// `GET /`: the instance state (`Not started`, `Running`, `Paused`).
    pub async fn state(&self) -> Result<String> {
        let b = self.call("GET", "/", None).await?;
        let v: Value = serde_json::from_slice(&b)
            .map_err(|e| Error::internal(format!("firecracker GET /: {e}")))?;
        Ok(v.get("state")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    /// Configures a VM and boots it.
    pub async fn configure_and_start(&self, c: &VmConfig) -> Result<()> {
        if c.vcpus == 0 || c.vcpus > 32 {
            return Err(Error::invalid(format!(
                "firecracker takes 1 to 32 vCPUs, not {}",
                c.vcpus
            )));
        }
        if c.guest_cid < 3 {
            return Err(Error::invalid("a guest CID must be at least 3"));
        }
        let path = |p: &Path| p.to_string_lossy().to_string();
        self.call(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": c.vcpus, "mem_size_mib": c.memory_mib})),
        )
        .await?;
        self.call(
            "PUT",
            "/boot-source",
            Some(json!({
                "kernel_image_path": path(&c.kernel),
                "initrd_path": path(&c.initrd),
                "boot_args": c.boot_args,
            })),
        )
        .await?;
        // Not the root device: the initramfs's agent mounts it itself.
        self.call(
            "PUT",
            "/drives/rootfs",
            Some(json!({
                "drive_id": "rootfs",
                "path_on_host": path(&c.rootfs),
                "is_root_device": false,
                "is_read_only": false,
            })),
        )
        .await?;
        // Firecracker binds the socket during this call: a stale one fails
        // it. (A relative path is Firecracker's working directory's, which
        // the caller made fresh: never removed from ours.)
        if c.vsock_uds.is_absolute() {
            let _ = std::fs::remove_file(&c.vsock_uds);
        }
        self.call(
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": c.guest_cid, "uds_path": path(&c.vsock_uds)})),
        )
        .await?;
        if let Some(n) = &c.nic {
            self.call(
                "PUT",
                "/network-interfaces/eth0",
                Some(json!({
                    "iface_id": "eth0",
                    "host_dev_name": n.host_dev_name,
                    "guest_mac": n.guest_mac,
                })),
            )
            .await?;
        }
        self.call("PUT", "/entropy", Some(json!({}))).await?;
        self.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        )
        .await
        .map(|_| ())
    }

    pub async fn pause(&self) -> Result<()> {
        self.call("PATCH", "/vm", Some(json!({"state": "Paused"})))
            .await
            .map(|_| ())
    }

    pub async fn resume(&self) -> Result<()> {
        self.call("PATCH", "/vm", Some(json!({"state": "Resumed"})))
            .await
            .map(|_| ())
    }

    /// Whether the VM is paused (`GET /`: the instance's `state`).
    pub async fn is_paused(&self) -> bool {
        match self.call("GET", "/", None).await {
            Ok(b) => serde_json::from_slice::<Value>(&b)
                .ok()
                .and_then(|v| v.get("state").and_then(Value::as_str).map(str::to_string))
                .is_some_and(|s| s == "Paused"),
            Err(_) => false,
        }
    }

    /// A full snapshot of a paused VM: device state and guest memory.
    pub async fn snapshot_create(&self, state: &Path, memory: &Path) -> Result<()> {
        self.call(
            "PUT",
            "/snapshot/create",
            Some(json!({
                "snapshot_type": "Full",
                "snapshot_path": state.to_string_lossy(),
                "mem_file_path": memory.to_string_lossy(),
            })),
        )
        .await
        .map(|_| ())
    }

    /// Loads a snapshot into a fresh (unconfigured) Firecracker, memory
    /// mapped from the file, and resumes it.
    pub async fn snapshot_load(&self, state: &Path, memory: &Path) -> Result<()> {
        self.call(
            "PUT",
            "/snapshot/load",
            Some(json!({
                "snapshot_path": state.to_string_lossy(),
                "mem_backend": {"backend_type": "File", "backend_path": memory.to_string_lossy()},
                "resume_vm": true,
            })),
        )
        .await
        .map(|_| ())
    }
}

/// Connects to guest vsock `port` through Firecracker's hybrid vsock
/// socket `uds`. Firecracker answers `OK <host port>\n`, or closes the
/// connection (nothing listens yet, a bad request): that is an error the
/// caller retries while the guest boots.
pub async fn vsock_connect(uds: &Path, port: u32) -> Result<tokio::net::UnixStream> {
    let mut s = tokio::net::UnixStream::connect(uds)
        .await
        .map_err(|e| Error::unavailable(format!("vsock {}: {e}", uds.display())))?;
    // One write: Firecracker parses the line from a non-blocking socket.
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| Error::unavailable(format!("vsock CONNECT: {e}")))?;
    let mut line = Vec::with_capacity(32);
    let mut b = [0u8; 1];
    let ack = async {
        while line.len() < 32 {
            let n = s.read(&mut b).await?;
            if n == 0 {
                break;
            }
            if b[0] == b'\n' {
                return Ok::<bool, std::io::Error>(true);
            }
            line.push(b[0]);
        }
        Ok(false)
    };
    let complete = tokio::time::timeout(Duration::from_secs(5), ack)
        .await
        .map_err(|_| Error::unavailable("vsock CONNECT: no answer"))?
        .map_err(|e| Error::unavailable(format!("vsock CONNECT: {e}")))?;
    let text = String::from_utf8_lossy(&line);
    if !complete || !text.starts_with("OK ") {
        return Err(Error::unavailable(format!(
            "vsock CONNECT {port} refused (guest not listening yet?): {text:?}"
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// One request the fake saw.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        content_length: Option<usize>,
        body: Value,
    }

    /// A recording fake of Firecracker's API socket. Like Firecracker it
    /// refuses bodies without Content-Length, IDs that differ from the
    /// path, unknown keys in the calls it knows, and calls out of order
    /// (configuration after InstanceStart).
    async fn fake(sock: PathBuf) -> Arc<Mutex<Vec<Seen>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let log = seen.clone();
        tokio::spawn(async move {
            let started = Arc::new(Mutex::new(false));
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (log, started) = (log.clone(), started.clone());
                tokio::spawn(async move {
                    let (rd, mut wr) = s.into_split();
                    let mut rd = BufReader::new(rd);
                    loop {
                        let mut first = String::new();
                        if rd.read_line(&mut first).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = first.split_whitespace();
                        let method = parts.next().unwrap_or_default().to_string();
                        let path = parts.next().unwrap_or_default().to_string();
                        let mut content_length = None;
                        let mut chunked = false;
                        loop {
                            let mut h = String::new();
                            rd.read_line(&mut h).await.expect("header");
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            let lower = h.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                content_length = v.trim().parse().ok();
                            }
                            if lower.starts_with("transfer-encoding:") {
                                chunked = true;
                            }
                        }
                        let mut body = vec![0u8; content_length.unwrap_or(0)];
                        rd.read_exact(&mut body).await.expect("body");
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let fault = judge(&method, &path, &body, chunked, &started);
                        log.lock().expect("log").push(Seen {
                            method: method.clone(),
                            path: path.clone(),
                            content_length,
                            body: body.clone(),
                        });
                        let resp = match (fault, method.as_str(), path.as_str()) {
                            (Some(f), _, _) => {
                                let b = json!({"fault_message": f}).to_string();
                                format!("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())
                            }
                            (None, "GET", "/") => {
                                let state = if *started.lock().expect("s") {
                                    "Running"
                                } else {
                                    "Not started"
                                };
                                let b = json!({"app_name": "Firecracker", "id": "fake", "state": state, "vmm_version": "1.16.1"}).to_string();
                                format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())
                            }
                            _ => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
                        };
                        if wr.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        seen
    }

    /// Firecracker's rules for the calls the client makes.
    fn judge(
        method: &str,
        path: &str,
        body: &Value,
        chunked: bool,
        started: &Mutex<bool>,
    ) -> Option<String> {
        if chunked {
            return Some("chunked bodies are not read".into());
        }
        let keys = |allowed: &[&str]| -> Option<String> {
            let obj = body.as_object()?;
            obj.keys()
                .find(|k| !allowed.contains(&k.as_str()))
                .map(|k| format!("unknown field `{k}`"))
        };
        let mut st = started.lock().expect("started");
        let pre_boot = matches!(
            path,
            "/machine-config" | "/boot-source" | "/vsock" | "/entropy" | "/snapshot/load"
        );
        if *st && method == "PUT" && pre_boot {
            return Some("not supported after starting the microVM".into());
        }
        match (method, path) {
            ("PUT", "/machine-config") => keys(&[
                "vcpu_count",
                "mem_size_mib",
                "smt",
                "track_dirty_pages",
                "huge_pages",
                "cpu_template",
            ]),
            ("PUT", "/boot-source") => keys(&["kernel_image_path", "boot_args", "initrd_path"]),
            ("PUT", p) if p.starts_with("/drives/") => {
                let id = &p["/drives/".len()..];
                if body["drive_id"] != id {
                    return Some("drive id does not match the path".into());
                }
                keys(&[
                    "drive_id",
                    "is_root_device",
                    "path_on_host",
                    "is_read_only",
                    "partuuid",
                    "cache_type",
                    "io_engine",
                    "rate_limiter",
                    "socket",
                ])
            }
            ("PUT", "/vsock") => {
                if body["guest_cid"].as_u64().unwrap_or(0) < 3 {
                    return Some("guest_cid below 3".into());
                }
                keys(&["guest_cid", "uds_path", "vsock_id"])
            }
            ("PUT", p) if p.starts_with("/network-interfaces/") => {
                if *st {
                    return Some("not supported after starting the microVM".into());
                }
                let id = &p["/network-interfaces/".len()..];
                if body["iface_id"] != id {
                    return Some("iface id does not match the path".into());
                }
                if body["host_dev_name"].as_str().is_none_or(str::is_empty) {
                    return Some("host_dev_name is required".into());
                }
                keys(&[
                    "iface_id",
                    "host_dev_name",
                    "guest_mac",
                    "rx_rate_limiter",
                    "tx_rate_limiter",
                ])
            }
            ("PUT", "/entropy") => keys(&["rate_limiter"]),
            ("PUT", "/actions") => {
                if body["action_type"] == "InstanceStart" {
                    if *st {
                        return Some("already started".into());
                    }
                    *st = true;
                }
                keys(&["action_type"])
            }
            ("PATCH", "/vm") => {
                if !*st {
                    return Some("not supported before starting the microVM".into());
                }
                keys(&["state"])
            }
            ("PUT", "/snapshot/create") => {
                if !*st {
                    return Some("not supported before starting the microVM".into());
                }
                keys(&["snapshot_type", "snapshot_path", "mem_file_path"])
            }
            ("PUT", "/snapshot/load") => {
                *st = true;
                keys(&[
                    "snapshot_path",
                    "mem_backend",
                    "mem_file_path",
                    "enable_diff_snapshots",
                    "track_dirty_pages",
                    "resume_vm",
                    "network_overrides",
                    "vsock_override",
                ])
            }
            ("GET", "/") => None,
            _ => Some(format!("invalid request {method} {path}")),
        }
    }

    fn config(dir: &Path) -> VmConfig {
        VmConfig {
            vcpus: 2,
            memory_mib: 256,
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd.cpio"),
            boot_args: "console=ttyS0 stacyvm.transport=vsock".into(),
            rootfs: dir.join("rootfs.ext4"),
            vsock_uds: dir.join("v.sock"),
            guest_cid: 3,
            nic: None,
        }
    }

    #[tokio::test]
    async fn configure_start_pause_snapshot_resume() {
        let dir = tempfile::tempdir().expect("tmp");
        let seen = fake(dir.path().join("api.sock")).await;
        let api = FcApi::new(&dir.path().join("api.sock"));
        assert_eq!(api.state().await.expect("state"), "Not started");
        api.configure_and_start(&config(dir.path()))
            .await
            .expect("start");
        assert_eq!(api.state().await.expect("state"), "Running");
        api.pause().await.expect("pause");
        api.snapshot_create(&dir.path().join("vmstate"), &dir.path().join("mem"))
            .await
            .expect("snapshot");
        api.resume().await.expect("resume");

        let seen = seen.lock().expect("seen").clone();
        let calls: Vec<String> = seen
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect();
        assert_eq!(
            calls,
            [
                "GET /",
                "PUT /machine-config",
                "PUT /boot-source",
                "PUT /drives/rootfs",
                "PUT /vsock",
                "PUT /entropy",
                "PUT /actions",
                "GET /",
                "PATCH /vm",
                "PUT /snapshot/create",
                "PATCH /vm",
            ]
        );
        for s in seen.iter().filter(|s| s.method != "GET") {
            assert!(
                s.content_length.is_some_and(|n| n > 0),
                "{s:?} has a Content-Length body"
            );
        }
        let body = |p: &str| {
            seen.iter()
                .find(|s| s.path == p)
                .expect("call")
                .body
                .clone()
        };
        assert_eq!(
            body("/machine-config"),
            json!({"vcpu_count": 2, "mem_size_mib": 256})
        );
        let boot = body("/boot-source");
        assert!(boot["kernel_image_path"]
            .as_str()
            .expect("kernel")
            .ends_with("vmlinux"));
        assert!(boot["initrd_path"]
            .as_str()
            .expect("initrd")
            .ends_with("initrd.cpio"));
        assert_eq!(boot["boot_args"], "console=ttyS0 stacyvm.transport=vsock");
        assert_eq!(body("/drives/rootfs")["is_read_only"], false);
        assert_eq!(body("/vsock")["guest_cid"], 3);
        assert_eq!(body("/actions"), json!({"action_type": "InstanceStart"}));
        assert_eq!(body("/snapshot/create")["snapshot_type"], "Full");
        assert_eq!(seen[8].body, json!({"state": "Paused"}));
        assert_eq!(seen[10].body, json!({"state": "Resumed"}));
    }

    #[tokio::test]
    async fn a_network_card_is_configured_before_the_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let seen = fake(dir.path().join("api.sock")).await;
        let api = FcApi::new(&dir.path().join("api.sock"));
        let mut c = config(dir.path());
        c.nic = Some(Nic {
            host_dev_name: "svm0123456789".into(),
            guest_mac: "52:54:0a:58:00:07".into(),
        });
        api.configure_and_start(&c).await.expect("start");
        let seen = seen.lock().expect("seen").clone();
        let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
        let nic = paths
            .iter()
            .position(|p| *p == "/network-interfaces/eth0")
            .expect("nic configured");
        let start = paths.iter().position(|p| *p == "/actions").expect("start");
        assert!(nic < start, "{paths:?}");
        assert_eq!(
            seen[nic].body,
            json!({"iface_id": "eth0", "host_dev_name": "svm0123456789", "guest_mac": "52:54:0a:58:00:07"})
        );
    }

    #[tokio::test]
    async fn faults_are_errors_with_the_message() {
        let dir = tempfile::tempdir().expect("tmp");
        let _seen = fake(dir.path().join("api.sock")).await;
        let api = FcApi::new(&dir.path().join("api.sock"));
        // Pausing before the start is refused by Firecracker.
        let e = api.pause().await.expect_err("pause before start");
        assert!(e.to_string().contains("before starting"), "{e}");
        api.configure_and_start(&config(dir.path()))
            .await
            .expect("start");
        // A second start is refused, with Firecracker's message.
        let e = api
            .configure_and_start(&config(dir.path()))
            .await
            .expect_err("twice");
        assert!(e.to_string().contains("after starting"), "{e}");
        // Bad input never reaches the socket.
        let mut c = config(dir.path());
        c.vcpus = 0;
        assert_eq!(
            api.configure_and_start(&c)
                .await
                .expect_err("0 vcpus")
                .kind(),
            stacyvm_core::ErrorKind::InvalidInput
        );
        // Nothing listening: unavailable.
        let gone = FcApi::new(&dir.path().join("none.sock"));
        assert_eq!(
            gone.state().await.expect_err("no socket").kind(),
            stacyvm_core::ErrorKind::ProviderUnavailable
        );
    }

    #[tokio::test]
    async fn snapshot_load_into_a_fresh_vmm() {
        let dir = tempfile::tempdir().expect("tmp");
        let seen = fake(dir.path().join("api.sock")).await;
        let api = FcApi::new(&dir.path().join("api.sock"));
        api.snapshot_load(&dir.path().join("vmstate"), &dir.path().join("mem"))
            .await
            .expect("load");
        let seen = seen.lock().expect("seen").clone();
        assert_eq!(seen[0].path, "/snapshot/load");
        assert_eq!(seen[0].body["mem_backend"]["backend_type"], "File");
        assert_eq!(seen[0].body["resume_vm"], true);
        assert!(
            seen[0].body.get("mem_file_path").is_none(),
            "the deprecated field is not sent"
        );
    }

    /// The hybrid vsock handshake as Firecracker speaks it: the whole
    /// `CONNECT <port>\n` line, `OK <host port>\n`, then raw bytes; a
    /// refusal is a closed connection.
    #[tokio::test]
    async fn hybrid_vsock_connect() {
        let dir = tempfile::tempdir().expect("tmp");
        let uds = dir.path().join("v.sock");
        let l = tokio::net::UnixListener::bind(&uds).expect("bind");
        let srv = tokio::spawn(async move {
            // First connection: accepted, echoed.
            let (s, _) = l.accept().await.expect("accept");
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.expect("line");
            assert_eq!(line, "CONNECT 1024\n");
            r.get_mut().write_all(b"OK 1073741824\n").await.expect("ok");
            let mut buf = [0u8; 5];
            r.read_exact(&mut buf).await.expect("payload");
            r.get_mut().write_all(&buf).await.expect("echo");
            // Second: nothing listens in the guest, Firecracker closes.
            let (s, _) = l.accept().await.expect("accept");
            drop(s);
        });
        let mut s = vsock_connect(&uds, 1024).await.expect("connect");
        s.write_all(b"hello").await.expect("write");
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"hello");
        let e = vsock_connect(&uds, 1024).await.expect_err("refused");
        assert_eq!(e.kind(), stacyvm_core::ErrorKind::ProviderUnavailable);
        srv.await.expect("server");
    }
}
