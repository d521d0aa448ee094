//! Directory transfer against the real binary on the native provider:
//! `GET`/`PUT /sandboxes/{id}/archive` (tar and tar.gz, the SHA-256 header
//! checked before anything is kept, the trailer on the way out, hostile
//! and broken archives refused with nothing left) and `stacyvm cp` both
//! ways with a gibibyte of data, compared by checksum.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

fn serve(dir: &Path) -> common::Server {
    common::Server::start(dir, &[("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")])
}

async fn spawn(http: &reqwest::Client, base: &str) -> String {
    let v: Value = http
        .post(format!("{base}/sandboxes"))
        .json(&json!({}))
        .send()
        .await
        .expect("spawn")
        .json()
        .await
        .expect("json");
    v["id"].as_str().expect("id").to_string()
}

async fn sh(http: &reqwest::Client, base: &str, id: &str, script: &str) -> String {
    let v: Value = http
        .post(format!("{base}/sandboxes/{id}/exec"))
        .json(&json!({ "command": script }))
        .send()
        .await
        .expect("exec")
        .json()
        .await
        .expect("json");
    assert_eq!(v["exit_code"], 0, "{script}: {v}");
    v["stdout"].as_str().expect("stdout").to_string()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// A tar with the raw names given (no builder checks).
fn tar_of(entries: &[(tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut c = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = c.stdin.take().expect("stdin");
    let data = data.to_vec();
    let t = std::thread::spawn(move || stdin.write_all(&data).expect("feed gzip"));
    let out = c.wait_with_output().expect("gzip");
    t.join().expect("feeder");
    out.stdout
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut c = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = c.stdin.take().expect("stdin");
    let data = data.to_vec();
    let t = std::thread::spawn(move || stdin.write_all(&data).expect("feed gzip"));
    let out = c.wait_with_output().expect("gunzip");
    t.join().expect("feeder");
    assert!(out.status.success(), "not gzip");
    out.stdout
}

/// `GET` over raw HTTP/1.1 with `TE: trailers`: the de-chunked body and
/// the trailer lines.
fn get_with_trailers(base: &str, path: &str) -> (Vec<u8>, Vec<String>) {
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/api/v1")
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        s,
        "GET /api/v1{path} HTTP/1.1\r\nHost: {addr}\r\nTE: trailers\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &raw[split + 4..];
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("size line");
        let size_text = String::from_utf8_lossy(&rest[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("chunk size");
        rest = &rest[eol + 2..];
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    let trailers = String::from_utf8_lossy(rest)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_lowercase)
        .collect();
    (body, trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_over_http_with_gzip_checksums_and_refusals() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    let base = server.url.clone();
    let http = reqwest::Client::new();
    let id = spawn(&http, &base).await;
    let put = |path: &str, body: Vec<u8>, sum: Option<String>| {
        let mut r = http
            .put(format!("{base}/sandboxes/{id}/archive"))
            .query(&[("path", path)])
            .body(body);
        if let Some(s) = sum {
            r = r.header("X-StacyVM-Archive-SHA256", s);
        }
        async move {
            let resp = r.send().await.expect("put");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };

    let good = tar_of(&[
        (tar::EntryType::Directory, "d/", b""),
        (tar::EntryType::Regular, "d/a.txt", b"alpha"),
        (tar::EntryType::Regular, "top.txt", b"top"),
    ]);
    let (s, v) = put("/workspace/in", good.clone(), Some(sha256_hex(&good))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["entries"].as_u64(), v["bytes"].as_u64()),
        (Some(3), Some(8)),
        "{v}"
    );
    assert_eq!(v["sha256"], sha256_hex(&good));
    assert_eq!(
        sh(
            &http,
            &base,
            &id,
            "cat /workspace/in/d/a.txt /workspace/in/top.txt"
        )
        .await,
        "alphatop"
    );
    // Gzip is recognised by itself.
    let (s, v) = put("/workspace/gz", gzip(&good), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        sh(&http, &base, &id, "cat /workspace/gz/d/a.txt").await,
        "alpha"
    );

    // A wrong checksum keeps nothing.
    let (s, v) = put("/workspace/badsum", good.clone(), Some("0".repeat(64))).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("SHA-256"),
        "{v}"
    );
    let (s, v) = put("/workspace/badsum", good.clone(), Some("nothex".into())).await;
    assert_eq!(s, 400, "{v}");
    // Hostile and broken archives: refused, nothing left, typed errors.
    for (name, body, want) in [
        (
            "dotdot",
            tar_of(&[
                (tar::EntryType::Regular, "ok.txt", b"ok"),
                (tar::EntryType::Regular, "../../etc/evil", b"x"),
            ]),
            "climbs out",
        ),
        (
            "absolute",
            tar_of(&[(tar::EntryType::Regular, "/etc/evil", b"x")]),
            "absolute",
        ),
        (
            "device",
            tar_of(&[(tar::EntryType::Block, "sda", b"")]),
            "device node",
        ),
        (
            "hardlink",
            tar_of(&[(tar::EntryType::Link, "pw", b"")]),
            "hard link",
        ),
        ("garbage", b"definitely not a tar archive".repeat(40), "tar"),
        ("cut-gzip", gzip(&good)[..30].to_vec(), "gzip"),
    ] {
        let (s, v) = put(&format!("/workspace/bad-{name}"), body, None).await;
        assert_eq!(s, 400, "{name}: {v}");
        assert!(
            v["message"].as_str().unwrap_or("").contains(want),
            "{name}: {v}"
        );
    }
    assert_eq!(
        sh(
            &http,
            &base,
            &id,
            "for d in /workspace/badsum /workspace/bad-*; do [ -d $d ] && ls -A $d; done; \
             test ! -e /etc/evil && echo clean"
        )
        .await,
        "clean\n"
    );

    // Out: tar, tar.gz (the same bytes inside), the checksum trailer.
    let plain = http
        .get(format!("{base}/sandboxes/{id}/archive?path=/workspace/in"))
        .send()
        .await
        .expect("get");
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.headers()["content-type"], "application/x-tar");
    let plain = plain.bytes().await.expect("body").to_vec();
    let mut names = Vec::new();
    for e in tar::Archive::new(plain.as_slice()).entries().expect("tar") {
        names.push(
            e.expect("entry")
                .path()
                .expect("p")
                .to_string_lossy()
                .to_string(),
        );
    }
    assert_eq!(names, vec!["d", "d/a.txt", "top.txt"]);
    let gz = http
        .get(format!(
            "{base}/sandboxes/{id}/archive?path=/workspace/in&format=tar.gz"
        ))
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body")
        .to_vec();
    assert_eq!(gunzip(&gz), plain);
    let (body, trailers) = get_with_trailers(
        &base,
        &format!("/sandboxes/{id}/archive?path=/workspace/in"),
    );
    assert_eq!(body, plain);
    assert_eq!(
        trailers,
        vec![format!("x-stacyvm-archive-sha256: {}", sha256_hex(&body))]
    );
    for (q, want) in [
        ("path=/workspace/nothing", 404),
        ("path=/workspace/in&format=zip", 400),
        ("path=relative-to-workspace", 404),
        ("path=/../../..", 400),
        ("", 400),
    ] {
        let r = http
            .get(format!("{base}/sandboxes/{id}/archive?{q}"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), want, "{q}");
    }
}

/// `stacyvm cp SRC DEST` against the server at `url`.
fn cp(url: &str, src: &str, dest: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["cp", src, dest])
        .env("STACYVM_URL", url)
        .output()
        .expect("stacyvm cp")
}

fn sha256sums(dir: &Path, files: &[&str]) -> String {
    let out = Command::new("sha256sum")
        .args(files)
        .current_dir(dir)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_moves_a_gibibyte_both_ways_intact() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    let base = server.url.clone();
    let http = reqwest::Client::new();
    let id = spawn(&http, &base).await;
    let url = base.trim_end_matches("/api/v1").to_string();

    let local = tempfile::tempdir().expect("local");
    let src = local.path().join("src");
    std::fs::create_dir_all(src.join("nested")).expect("mkdir");
    for (name, mib) in [("a.bin", 640), ("nested/b.bin", 384)] {
        let st = Command::new("head")
            .arg("-c")
            .arg((mib * 1024 * 1024).to_string())
            .arg("/dev/urandom")
            .stdout(std::fs::File::create(src.join(name)).expect("create"))
            .status()
            .expect("head");
        assert!(st.success());
    }
    std::fs::write(src.join("small.txt"), b"small").expect("write");
    std::os::unix::fs::symlink("nested/b.bin", src.join("link")).expect("symlink");
    let files = ["a.bin", "nested/b.bin", "small.txt"];
    let want = sha256sums(&src, &files);

    let up = cp(
        &url,
        &src.to_string_lossy(),
        &format!("{id}:/workspace/big"),
    );
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("copied 5 entries (1.0 GiB)"),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let inside = sh(
        &http,
        &base,
        &id,
        "cd /workspace/big && sha256sum a.bin nested/b.bin small.txt && readlink link",
    )
    .await;
    assert_eq!(inside, format!("{want}nested/b.bin\n"));

    let back = local.path().join("back");
    let down = cp(
        &url,
        &format!("{id}:/workspace/big"),
        &back.to_string_lossy(),
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(sha256sums(&back, &files), want);
    assert_eq!(
        std::fs::read_link(back.join("link")).expect("link"),
        Path::new("nested/b.bin")
    );

    // Single files, renamed on the way, in both directions.
    let one = cp(
        &url,
        &src.join("small.txt").to_string_lossy(),
        &format!("{id}:/workspace/renamed.txt"),
    );
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    assert_eq!(
        sh(&http, &base, &id, "cat /workspace/renamed.txt").await,
        "small"
    );
    let got = local.path().join("got.txt");
    let one = cp(
        &url,
        &format!("{id}:/workspace/renamed.txt"),
        &got.to_string_lossy(),
    );
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    assert_eq!(std::fs::read(&got).expect("read"), b"small");
    let bad = cp(&url, "a", "b");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ID:/absolute/path"));
}
