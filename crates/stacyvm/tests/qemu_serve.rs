//! The qemu provider end to end with the real binary (TCG here): `stacyvm
//! image import` of a busybox image, then `stacyvm serve` with
//! `providers.default: qemu`: the provider report, spawn with no image
//! (the configured default image), exec, a file round trip, logs, a fork
//! into two children, the snapshot list, destroy; and a spawn of `host` with no default image is
//! a 400 that says what to do. Volumes on qemu: a disk the guest mounts,
//! held by that VM alone, back on the host after it is destroyed. An
//! environment build on qemu: its steps in a guest, its image a layer
//! over the base that native runs too.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

fn agent() -> String {
    std::env::var("STACYVM_AGENT_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/var/cache/stacyvm/agent/stacyvm-agent".into())
}

fn cache() -> String {
    std::env::var("STACYVM_MICROVM_CACHE")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/var/cache/stacyvm/microvm".into())
}

/// A `docker save` archive of the host's static busybox with its applets.
fn busybox_archive(dir: &std::path::Path) -> PathBuf {
    let script = r#"
import tarfile, io, json, hashlib, subprocess, sys
applets = subprocess.run(["/bin/busybox","--list"],capture_output=True,text=True).stdout.split()
lb = io.BytesIO()
with tarfile.open(fileobj=lb, mode="w") as t:
    for d in ["bin","tmp","workspace","etc","root"]:
        ti = tarfile.TarInfo(d); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; t.addfile(ti)
    t.add("/bin/busybox", arcname="bin/busybox")
    for a in applets:
        if a != "busybox":
            ti = tarfile.TarInfo("bin/"+a); ti.type = tarfile.SYMTYPE; ti.linkname = "busybox"; t.addfile(ti)
layer = lb.getvalue()
diff = "sha256:" + hashlib.sha256(layer).hexdigest()
cfg = json.dumps({"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":[diff]}}).encode()
man = json.dumps([{"Config":"config.json","RepoTags":["e2e/busybox:1"],"Layers":["layer.tar"]}]).encode()
with tarfile.open(sys.argv[1],"w") as t:
    for name, data in [("manifest.json",man),("config.json",cfg),("layer.tar",layer)]:
        ti = tarfile.TarInfo(name); ti.size = len(data); t.addfile(ti, io.BytesIO(data))
"#;
    let out = dir.join("busybox.tar");
    let st = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&out)
        .status()
        .expect("python3");
    assert!(st.success());
    out
}

/// Kills whatever QEMU a failed run left for `dir` (VMs outlive a
/// server by design; a test must not leave them behind).
struct VmReaper(PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        let needle = self.0.display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
        // Their cgroups, once empty.
        std::thread::sleep(Duration::from_millis(200));
        let vms = self.0.join("qemu/sandboxes");
        for e in std::fs::read_dir(vms).into_iter().flatten().flatten() {
            let Ok(b) = std::fs::read(e.path().join("meta.json")) else {
                continue;
            };
            let meta: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
            for d in meta["cgroups"].as_array().into_iter().flatten() {
                if let Some(d) = d.as_str() {
                    let _ = std::fs::remove_dir(d);
                }
            }
        }
    }
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json::<Value>().await.unwrap_or(Value::Null))
}

/// Imports the busybox image into `data` (printing its id).
fn import_busybox(data: &std::path::Path) -> std::process::Output {
    let archive = busybox_archive(data);
    let import = std::process::Command::new(BIN)
        .args(["image", "import"])
        .arg(&archive)
        .env("STACYVM_SERVER_DATA_DIR", data)
        .output()
        .expect("image import");
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    import
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_volumes_are_disks_the_guest_owns_alone() {
    let data = tempfile::tempdir().expect("tmp");
    let _reaper = VmReaper(data.path().to_path_buf());
    import_busybox(data.path());
    let (agent, cache) = (agent(), cache());
    let env = [
        ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ("STACYVM_PROVIDERS_QEMU_ENABLED", "true"),
        ("STACYVM_PROVIDERS_DEFAULT", "qemu"),
        ("STACYVM_PROVIDERS_QEMU_DEFAULT_IMAGE", "e2e/busybox:1"),
        ("STACYVM_PROVIDERS_QEMU_BOOT_TIMEOUT", "180s"),
        ("STACYVM_AGENT_PATH", agent.as_str()),
        ("STACYVM_MICROVM_CACHE", cache.as_str()),
    ];
    let s = common::Server::start(data.path(), &env);
    let url = |p: &str| format!("{}{p}", s.url);
    let exec = |id: String, cmd: &'static str| {
        let u = url(&format!("/sandboxes/{id}/exec"));
        async move {
            let (status, v) = call(reqwest::Method::POST, u, Some(json!({ "command": cmd }))).await;
            assert_eq!(status, 200, "{v}");
            v
        }
    };
    let (status, v) = call(
        reqwest::Method::POST,
        url("/volumes"),
        Some(json!({"name": "data", "size_mb": 64})),
    )
    .await;
    assert_eq!(status, 201, "{v}");

    // The guest mounts the volume's disk; its writes are its own.
    let (status, v) = call(
        reqwest::Method::POST,
        url("/sandboxes"),
        Some(json!({"memory_mb": 224, "volumes": [{"volume": "data", "path": "/data"}]})),
    )
    .await;
    assert_eq!(status, 201, "spawn with a volume: {v}");
    let vm = v["id"].as_str().expect("id").to_string();
    let v = exec(
        vm.clone(),
        "grep ' /data ' /proc/mounts; echo from-the-vm > /data/f; sync; cat /data/f",
    )
    .await;
    let out = v["stdout"].as_str().expect("stdout");
    assert!(out.contains("/dev/vd") && out.contains(" ext4 "), "{v}");
    assert!(out.contains("nosuid") && out.contains("nodev"), "{v}");
    assert!(out.ends_with("from-the-vm\n"), "{v}");

    // While the VM has it, nothing else does: not a reader, not an
    // export, not a deletion, not a snapshot of the VM.
    let (status, v) = call(
        reqwest::Method::POST,
        url("/sandboxes"),
        Some(json!({"provider": "native", "volumes": [{"volume": "data", "path": "/data", "read_only": true}]})),
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert!(v.to_string().contains("attached to microVM"), "{v}");
    let r = reqwest::get(url("/volumes/data/archive"))
        .await
        .expect("export");
    assert_eq!(r.status().as_u16(), 409);
    let (status, v) = call(reqwest::Method::DELETE, url("/volumes/data"), None).await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = call(
        reqwest::Method::POST,
        url(&format!("/sandboxes/{vm}/snapshot")),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = call(reqwest::Method::GET, url("/volumes/data"), None).await;
    assert_eq!(status, 200, "listed while attached: {v}");
    assert!(v.to_string().contains(&vm), "who mounts it: {v}");

    // Destroyed: the host has the file system back, with the VM's file.
    let (status, v) = call(
        reqwest::Method::DELETE,
        url(&format!("/sandboxes/{vm}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(
        reqwest::Method::POST,
        url("/sandboxes"),
        Some(json!({"provider": "native", "volumes": [{"volume": "data", "path": "/data"}]})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let native = v["id"].as_str().expect("id").to_string();
    let v = exec(native.clone(), "cat /data/f; echo from-native > /data/g").await;
    assert_eq!(v["stdout"], "from-the-vm\n", "{v}");
    let (status, v) = call(
        reqwest::Method::DELETE,
        url(&format!("/sandboxes/{native}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // Read-only: the guest reads, and cannot write.
    let (status, v) = call(
        reqwest::Method::POST,
        url("/sandboxes"),
        Some(json!({"memory_mb": 224, "volumes": [{"volume": "data", "path": "/ro", "read_only": true}]})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let vm = v["id"].as_str().expect("id").to_string();
    let v = exec(
        vm.clone(),
        "cat /ro/f /ro/g; touch /ro/h && echo WROTE; true",
    )
    .await;
    assert_eq!(v["stdout"], "from-the-vm\nfrom-native\n", "{v}");
    let (status, v) = call(
        reqwest::Method::DELETE,
        url(&format!("/sandboxes/{vm}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(reqwest::Method::DELETE, url("/volumes/data"), None).await;
    assert_eq!(status, 200, "the volume goes once no VM has it: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_builds_run_their_steps_in_a_guest() {
    let data = tempfile::tempdir().expect("tmp");
    let _reaper = VmReaper(data.path().to_path_buf());
    import_busybox(data.path());
    let (agent, cache) = (agent(), cache());
    let env = [
        ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ("STACYVM_PROVIDERS_QEMU_ENABLED", "true"),
        ("STACYVM_PROVIDERS_QEMU_DEFAULT_IMAGE", "e2e/busybox:1"),
        ("STACYVM_PROVIDERS_QEMU_BOOT_TIMEOUT", "180s"),
        ("STACYVM_AGENT_PATH", agent.as_str()),
        ("STACYVM_MICROVM_CACHE", cache.as_str()),
    ];
    let s = common::Server::start(data.path(), &env);
    let url = |p: &str| format!("{}{p}", s.url);
    // Steps that add, change and remove files, and report where they ran.
    let dockerfile = "FROM e2e/busybox:1\n\
        RUN uname -r > /etc/built-on && echo added > /etc/added\n\
        RUN rm /bin/vi && mkdir -p /opt/tool && echo 'echo tool ran' > /opt/tool/run && chmod 755 /opt/tool/run\n";
    let (status, v) = call(
        reqwest::Method::POST,
        url("/environments/specs"),
        Some(json!({"name": "in-guest", "dockerfile": dockerfile})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let spec_id = v["id"].as_str().expect("spec").to_string();
    let build = |spec_id: String| {
        let u = url("/environments/builds");
        let base = s.url.clone();
        async move {
            let (status, b) = call(
                reqwest::Method::POST,
                u,
                Some(json!({"spec_id": spec_id, "provider": "qemu"})),
            )
            .await;
            assert_eq!(status, 201, "{b}");
            let id = b["id"].as_str().expect("id").to_string();
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let (_, v) = call(
                    reqwest::Method::GET,
                    format!("{base}/environments/builds/{id}"),
                    None,
                )
                .await;
                if matches!(v["status"].as_str(), Some("ready" | "failed" | "canceled")) {
                    return v;
                }
                assert!(Instant::now() < deadline, "build did not end: {v}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let b = build(spec_id.clone()).await;
    assert_eq!(b["status"], "ready", "{b}");
    let image = b["artifacts"][0]["image_ref"]
        .as_str()
        .expect("image")
        .to_string();

    // The steps ran in the guest (its kernel), and the image holds what
    // they did, on qemu and on native alike.
    for provider in ["qemu", "native"] {
        let (status, v) = call(
            reqwest::Method::POST,
            url("/sandboxes"),
            Some(json!({"image": image, "provider": provider, "memory_mb": 224})),
        )
        .await;
        assert_eq!(status, 201, "spawn on {provider}: {v}");
        let id = v["id"].as_str().expect("id").to_string();
        let (status, v) = call(
            reqwest::Method::POST,
            url(&format!("/sandboxes/{id}/exec")),
            Some(json!({"command": "cat /etc/built-on /etc/added; /opt/tool/run; test -e /bin/vi && echo vi-still-there; test -e /bin/sh && echo sh-kept"})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let out = v["stdout"].as_str().expect("stdout");
        assert!(
            out.contains("cloud-amd64"),
            "built in the guest's kernel: {v}"
        );
        assert!(
            out.contains("added\ntool ran\nsh-kept\n"),
            "{provider}: {v}"
        );
        assert!(
            !out.contains("vi-still-there"),
            "a removed file stays removed: {v}"
        );
        let (status, _) = call(
            reqwest::Method::DELETE,
            url(&format!("/sandboxes/{id}")),
            None,
        )
        .await;
        assert_eq!(status, 200);
    }

    // The same steps on the same base: the image is reused, no VM booted.
    let again = build(spec_id).await;
    assert_eq!(again["status"], "ready", "{again}");
    assert_eq!(
        again["artifacts"][0]["image_ref"],
        image.as_str(),
        "{again}"
    );
    assert!(
        again["log"]
            .as_str()
            .unwrap_or_default()
            .contains("reusing"),
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_provider_end_to_end() {
    let data = tempfile::tempdir().expect("tmp");
    let _reaper = VmReaper(data.path().to_path_buf());
    let (agent, cache) = (agent(), cache());
    let import = import_busybox(data.path());
    // Restore points are keyed by image content (another run may have
    // built this one under another name): `<first 16 hex of the id>-…`.
    let printed = String::from_utf8_lossy(&import.stdout).to_string()
        + &String::from_utf8_lossy(&import.stderr);
    let image_key = printed
        .split("sha256:")
        .nth(1)
        .map(|h| h.chars().take(16).collect::<String>())
        .expect("image id printed by image import");
    let env = [
        ("STACYVM_PROVIDERS_NATIVE_ENABLED", "false"),
        ("STACYVM_PROVIDERS_QEMU_ENABLED", "true"),
        ("STACYVM_PROVIDERS_DEFAULT", "qemu"),
        ("STACYVM_PROVIDERS_QEMU_DEFAULT_IMAGE", "e2e/busybox:1"),
        ("STACYVM_PROVIDERS_QEMU_BOOT_TIMEOUT", "180s"),
        ("STACYVM_AGENT_PATH", agent.as_str()),
        ("STACYVM_MICROVM_CACHE", cache.as_str()),
    ];
    let s = common::Server::start(data.path(), &env);

    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/providers/qemu", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let text = v.to_string();
    assert!(text.contains("microvm"), "isolation class: {v}");

    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes", s.url),
        Some(json!({"memory_mb": 224})),
    )
    .await;
    assert!(status == 200 || status == 201, "spawn: {status} {v}");
    assert_eq!(v["provider"], "qemu", "{v}");
    let id = v["id"].as_str().expect("id").to_string();

    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/exec", s.url),
        Some(json!({"command": "uname -r; hostname; echo hi > /workspace/f; cat /workspace/f"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let out = v["stdout"].as_str().expect("stdout");
    assert!(out.contains("cloud-amd64"), "the guest kernel: {v}");
    assert!(out.contains(&id), "hostname: {v}");
    assert!(out.ends_with("hi\n"), "{v}");

    let got = reqwest::get(format!("{}/sandboxes/{id}/files?path=/workspace/f", s.url))
        .await
        .expect("read");
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(got.bytes().await.expect("body").as_ref(), b"hi\n");

    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{id}/logs", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // Fork: two children with the source's file, each its own machine.
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/fork", s.url),
        Some(json!({"count": 2})),
    )
    .await;
    assert_eq!(status, 201, "fork: {v}");
    let children: Vec<String> = v["sandboxes"]
        .as_array()
        .expect("children")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(children.len(), 2, "{v}");
    for c in &children {
        let (status, v) = call(
            reqwest::Method::POST,
            format!("{}/sandboxes/{c}/exec", s.url),
            Some(json!({"command": "hostname; cat /workspace/f"})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["stdout"], format!("{c}\nhi\n"), "{v}");
        let (status, v) = call(
            reqwest::Method::DELETE,
            format!("{}/sandboxes/{c}", s.url),
            None,
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }

    // The cold boot leaves a restore point of this shape behind.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (status, v) = call(reqwest::Method::GET, format!("{}/snapshots", s.url), None).await;
        assert_eq!(status, 200, "{v}");
        let listed = v.as_array().into_iter().flatten().any(|x| {
            x["provider"] == "qemu"
                && x["id"].as_str().is_some_and(|i| i.starts_with(&image_key))
                && x["memory_mb"] == 224
        });
        if listed {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot listed: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (status, v) = call(
        reqwest::Method::DELETE,
        format!("{}/sandboxes/{id}", s.url),
        None,
    )
    .await;
    assert!(status == 200 || status == 204, "{status} {v}");
    drop(s);

    // Without a default image, `host` (the server default) is refused.
    let env2: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "STACYVM_PROVIDERS_QEMU_DEFAULT_IMAGE")
        .collect();
    let s = common::Server::start(data.path(), &env2);
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes", s.url),
        Some(json!({"image": "host"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("default_image"), "{v}");
}
