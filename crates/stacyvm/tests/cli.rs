//! The real `stacyvm` binary: `serve` on the native provider, the CLI
//! against it, and a server restart that re-adopts running sandboxes.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

struct Server {
    child: Child,
    url: String,
    data: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start(data: &Path, port: u16) -> Server {
    let log = std::fs::File::create(data.join(format!(
        "server-{}.log",
        Instant::now().elapsed().as_nanos()
    )))
    .expect("log");
    let child = Command::new(BIN)
        .arg("serve")
        .env("STACYVM_SERVER_HOST", "127.0.0.1")
        .env("STACYVM_SERVER_PORT", port.to_string())
        .env("STACYVM_SERVER_DATA_DIR", data)
        .env("STACYVM_LOGGING_LEVEL", "warn")
        .current_dir(data)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        data: data.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    panic!("stacyvm serve did not listen within 30 s");
}

impl Server {
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("STACYVM_URL", &self.url)
            .output()
            .expect("run cli")
    }

    fn stop(mut self) {
        let _ = nix_kill(self.child.id(), 15);
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Gracefully first: a stopping server takes its warm pool down.
        let _ = nix_kill(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.data;
    }
}

fn nix_kill(pid: u32, sig: i32) -> std::io::Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("version").output().expect("version");
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with("stacyvm "),
        "{}",
        text(&out.stdout)
    );
    let out = Command::new(BIN).arg("--help").output().expect("help");
    let help = text(&out.stdout);
    for cmd in ["serve", "spawn", "exec", "list", "kill", "logs", "version"] {
        assert!(help.contains(cmd), "--help lists {cmd}");
    }
}

#[test]
fn invalid_config_stops_serve_with_the_key_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "defaults:\n  ttl: forever\n").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("defaults.ttl") && err.contains("forever"),
        "{err}"
    );
    let out = Command::new(BIN)
        .arg("serve")
        .env("STACYVM_AUTH_ENABLED", "true")
        .env("STACYVM_SERVER_DATA_DIR", dir.path())
        .output()
        .expect("serve");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("refusing to start"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn cli_drives_native_sandboxes_and_restart_readopts_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let s = start(dir.path(), port);
    let out = s.cli(&["spawn", "--ttl", "10m", "--meta", "suite=cli"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert!(id.starts_with("sb-"), "spawn prints the id: {id}");
    assert!(
        text(&out.stderr).contains("provider: native"),
        "{}",
        text(&out.stderr)
    );

    let out = s.cli(&["exec", &id, "--", "python3", "-c", "print(40+2)"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "42\n".to_string()),
        "{}",
        text(&out.stderr)
    );
    let out = s.cli(&["exec", &id, "--", "sh", "-c", "echo err >&2; exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit code of exec is the command's"
    );
    assert_eq!(text(&out.stderr), "err\n");
    let out = s.cli(&["exec", &id, "--", "echo", "$HOME;echo pwned"]);
    assert_eq!(
        text(&out.stdout),
        "$HOME;echo pwned\n",
        "argv mode by default"
    );
    let out = s.cli(&[
        "exec",
        "--shell",
        &id,
        "--",
        "echo kept > /workspace/state.txt && echo $((2*21))",
    ]);
    assert_eq!(text(&out.stdout), "42\n");
    let out = s.cli(&[
        "exec",
        "--no-stream",
        &id,
        "--",
        "cat",
        "/workspace/state.txt",
    ]);
    assert_eq!(text(&out.stdout), "kept\n");

    let out = s.cli(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json list");
    assert_eq!(list[0]["id"], id.as_str());
    let out = s.cli(&["list"]);
    assert!(text(&out.stdout).contains(&id) && text(&out.stdout).contains("STATE"));
    let out = s.cli(&["logs", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Restart: the sandbox keeps running and is re-adopted with its files.
    s.stop();
    let s = start(dir.path(), port);
    let out = s.cli(&["exec", &id, "--", "cat", "/workspace/state.txt"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "kept\n".to_string()),
        "after restart: {}",
        text(&out.stderr)
    );

    let out = s.cli(&["kill", &id]);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("destroyed"));
    let out = s.cli(&["exec", &id, "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exec on a destroyed sandbox fails"
    );
    assert!(
        text(&out.stderr).contains("sandbox destroyed"),
        "{}",
        text(&out.stderr)
    );
    let out = s.cli(&["list"]);
    assert!(text(&out.stderr).contains("No active sandboxes"));
    // An unreachable server is one clear line, for plain and interactive
    // commands alike.
    for args in [
        &["list", "--url", "http://127.0.0.1:1"][..],
        &[
            "exec",
            "-i",
            "--url",
            "http://127.0.0.1:1",
            "sb-1",
            "--",
            "true",
        ][..],
    ] {
        let out = Command::new(BIN).args(args).output().expect("cli");
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            text(&out.stderr),
            "error: cannot reach the server at http://127.0.0.1:1: connection refused; \
             is `stacyvm serve` running?\n",
            "{args:?}"
        );
    }
}

/// Runs the CLI with `input` on its stdin.
fn cli_with_stdin(s: &Server, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(BIN)
        .args(args)
        .env("STACYVM_URL", &s.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cli");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait");
    feeder.join().expect("feeder");
    out
}

/// Runs `command` on a pseudo-terminal (util-linux `script`), feeding it
/// `input`; returns the exit code and what the terminal showed.
fn on_a_terminal(s: &Server, command: &str, input: &[u8]) -> (Option<i32>, String) {
    use std::io::Write as _;
    let mut child = Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .env("STACYVM_URL", &s.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("input");
    let out = child.wait_with_output().expect("wait");
    drop(stdin);
    (out.status.code(), text(&out.stdout))
}

#[test]
fn exec_pipes_stdin_and_runs_ttys_like_docker_exec() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = start(dir.path(), free_port());
    let out = s.cli(&["spawn"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();

    // -i pipes stdin; the remote exit code is ours.
    let out = cli_with_stdin(&s, &["exec", "-i", &id, "--", "cat"], b"hi\n");
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "hi\n".into()),
        "{}",
        text(&out.stderr)
    );
    let out = cli_with_stdin(
        &s,
        &[
            "exec",
            "-i",
            &id,
            "--",
            "sh",
            "-c",
            "read x; echo got $x >&2; exit $x",
        ],
        b"7\n",
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stderr), "got 7\n");
    // Binary stdin and stdout pass byte for byte (no UTF-8 mangling).
    let blob: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = cli_with_stdin(&s, &["exec", "-i", &id, "--", "cat"], &blob);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        out.stdout == blob,
        "binary round trip differs ({} bytes)",
        out.stdout.len()
    );

    // -t needs a terminal, and says so.
    let out = cli_with_stdin(&s, &["exec", "-t", &id, "--", "true"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a terminal"),
        "{}",
        text(&out.stderr)
    );

    // On a terminal: a pty remotely, its exit code locally.
    let (code, screen) = on_a_terminal(
        &s,
        &format!("{BIN} exec -t {id} -- sh -c 'tty; stty size; exit 5'"),
        b"",
    );
    assert_eq!(code, Some(5), "{screen}");
    assert!(screen.contains("/dev/pts/"), "{screen}");
    // `shell` is an interactive login shell.
    let (code, screen) = on_a_terminal(
        &s,
        &format!("{BIN} shell {id}"),
        b"echo $((6*7)) $0; exit 3\n",
    );
    assert_eq!(code, Some(3), "{screen}");
    assert!(
        screen.contains("42 bash") || screen.contains("42 sh"),
        "{screen}"
    );
    // bash says goodbye to a login shell.
    assert!(
        !screen.contains("42 bash") || screen.contains("logout"),
        "{screen}"
    );
}

/// Builds a one-layer `docker save` archive of busybox with the system tar.
fn busybox_archive(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    for applet in ["sh", "echo", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("link");
    }
    let run = |args: &[&str]| {
        let st = Command::new("tar")
            .args(args)
            .current_dir(dir)
            .status()
            .expect("tar");
        assert!(st.success(), "tar {args:?}");
    };
    run(&["-cf", "layer.tar", "-C", "rootfs", "."]);
    // Docker needs rootfs.diff_ids (the sha256 of the uncompressed layer).
    let digest = Command::new("sha256sum")
        .arg(dir.join("layer.tar"))
        .output()
        .expect("sha256sum");
    let hex = text(&digest.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"os":"linux","architecture":"amd64","rootfs":{{"type":"layers","diff_ids":["sha256:{hex}"]}}}}"#
        ),
    )
    .expect("config");
    std::fs::write(
        dir.join("manifest.json"),
        r#"[{"Config":"config.json","RepoTags":["mini/busybox:1"],"Layers":["layer.tar"]}]"#,
    )
    .expect("manifest");
    run(&[
        "-cf",
        "image.tar",
        "manifest.json",
        "config.json",
        "layer.tar",
    ]);
    dir.join("image.tar")
}

#[test]
fn image_import_ls_rm_and_spawn() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let archive = busybox_archive(dir.path());
    let image = |args: &[&str]| {
        Command::new(BIN)
            .arg("image")
            .args(args)
            .env("STACYVM_SERVER_DATA_DIR", &data)
            .output()
            .expect("image cmd")
    };
    let out = image(&["import", archive.to_str().expect("utf8"), "--name", "mini"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("sha256:"), "prints the id");
    assert!(
        text(&out.stderr).contains("mini/busybox:1") && text(&out.stderr).contains("mini:latest"),
        "{}",
        text(&out.stderr)
    );
    let out = image(&["ls"]);
    assert!(text(&out.stdout).contains("mini/busybox:1") && text(&out.stdout).contains("host"));
    let out = image(&["import", "/nonexistent.tar"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nonexistent.tar"),
        "{}",
        text(&out.stderr)
    );

    let s = start(&data, free_port());
    let out = s.cli(&["spawn", "--image", "mini"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let out = s.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "ls /bin | head -3; test -e /usr/bin/python3 || echo isolated-root",
    ]);
    assert_eq!(
        text(&out.stdout),
        "busybox\ncat\necho\nisolated-root\n",
        "{}",
        text(&out.stderr)
    );
    let out = s.cli(&["spawn", "--image", "nope:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("stacyvm image import"),
        "{}",
        text(&out.stderr)
    );
    s.cli(&["kill", &id]);
    drop(s);
    let out = image(&["rm", "mini/busybox:1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = image(&["ls", "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");
}

/// A terminal session over the WebSocket on a native sandbox: pty size,
/// resize, typed input, and the exit code in the final message.
#[test]
fn websocket_tty_session_on_native() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as M;
    let dir = tempfile::tempdir().expect("tmp");
    let s = start(dir.path(), free_port());
    let out = s.cli(&["spawn"]);
    let id = text(&out.stdout).trim().to_string();
    let url = format!(
        "{}/api/v1/sandboxes/{id}/exec/ws",
        s.url.replace("http://", "ws://")
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let (output, done) = rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
        let start = serde_json::json!({"command": "stty size; read l; stty size; echo got:$l; exit 4", "tty": {"rows": 20, "cols": 70}});
        ws.send(M::Text(start.to_string().into())).await.expect("start");
        let mut output = String::new();
        let mut done = serde_json::Value::Null;
        let mut sent = false;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            let M::Text(t) = m else { continue };
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            if v["type"] == "done" {
                done = v;
                break;
            }
            output.push_str(v["data"].as_str().unwrap_or_default());
            if !sent && output.contains("20 70") {
                sent = true;
                ws.send(M::Text(serde_json::json!({"type": "resize", "rows": 50, "cols": 120}).to_string().into())).await.expect("resize");
                tokio::time::sleep(Duration::from_millis(100)).await;
                ws.send(M::Text(serde_json::json!({"type": "stdin", "data": "hi\n"}).to_string().into())).await.expect("stdin");
            }
        }
        (output, done)
    });
    assert!(
        output.contains("20 70") && output.contains("50 120") && output.contains("got:hi"),
        "{output:?}"
    );
    assert_eq!(done["exit_code"], 4, "{done}");
    s.cli(&["kill", &id]);
}

/// A server that is not root runs native sandboxes in a user namespace
/// (rootless mode): root inside is the server's uid outside, processes are
/// bounded by RLIMIT_NPROC (no delegated cgroup here), files land owned by
/// the server's uid, bridge networking is refused, and destroy removes
/// everything (overlayfs leaves a mode-000 work dir that an unprivileged
/// server must open up first).
#[test]
fn rootless_server_uses_a_user_namespace() {
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).expect("chown");
    let port = free_port();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BIN,
            "serve",
        ])
        .env("HOME", &data)
        .env("STACYVM_SERVER_HOST", "127.0.0.1")
        .env("STACYVM_SERVER_PORT", port.to_string())
        .env("STACYVM_SERVER_DATA_DIR", &data)
        .env("STACYVM_PROVIDERS_NATIVE_PIDS_LIMIT", "64")
        .env("STACYVM_LOGGING_LEVEL", "warn")
        .current_dir(&data)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("setpriv (util-linux)");
    let s = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        data: data.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "rootless serve did not listen: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = s.cli(&["spawn"]);
    assert!(
        out.status.success(),
        "{} / server log: {}",
        text(&out.stderr),
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let id = text(&out.stdout).trim().to_string();

    let out = s.cli(&[
        "exec",
        "--shell",
        &id,
        "--",
        "id -u; tr -s ' ' < /proc/self/uid_map; echo data > /workspace/f; ps -e | wc -l",
    ]);
    assert_eq!(
        text(&out.stdout),
        "0\n 0 65534 1\n5\n",
        "root inside maps to nobody outside; only the sandbox processes (ps header, agent, sh, ps, wc): {}",
        text(&out.stderr)
    );
    let upper = data
        .join("native/sandboxes")
        .join(&id)
        .join("upper/workspace/f");
    let meta = std::fs::metadata(&upper).expect("file in the upper dir");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        NOBODY,
        "files belong to the server's uid on the host"
    );

    // The security regressions hold in rootless mode too: no host /etc,
    // devices refused by the file API, setuid plants unreachable.
    let marker = format!("stacyvm-rootless-{}", std::process::id());
    std::fs::write(format!("/etc/{marker}"), "HOST-ETC").expect("marker");
    let out = s.cli(&[
        "exec",
        "--shell",
        &id,
        "--",
        &format!("cat /etc/{marker} 2>/dev/null || echo hidden; test -e /etc/shadow || echo no-shadow; cp /bin/sh /workspace/s && chmod 4755 /workspace/s && echo planted"),
    ]);
    let _ = std::fs::remove_file(format!("/etc/{marker}"));
    assert_eq!(
        text(&out.stdout),
        "hidden\nno-shadow\nplanted\n",
        "{}",
        text(&out.stderr)
    );
    let planted = data
        .join("native/sandboxes")
        .join(&id)
        .join("upper/workspace/s");
    let run = Command::new("su")
        .args(["nobody", "-s", "/bin/sh", "-c"])
        .arg(format!("{} -p -c 'id -u'", planted.display()))
        .output()
        .expect("su");
    assert!(
        !text(&run.stdout).trim().starts_with('0'),
        "a planted shell gave root: {}",
        text(&run.stdout)
    );
    let code = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg(format!(
            "{}/api/v1/sandboxes/{id}/files?path=/dev/zero",
            s.url
        ))
        .output()
        .expect("curl");
    assert_eq!(text(&code.stdout), "400", "/dev/zero through the file API");

    // A fork bomb stops at the pids limit; the server keeps serving.
    let out = s.cli(&[
        "exec",
        &id,
        "--",
        "python3",
        "-c",
        "import os, time\nn = 0\ntry:\n  while n < 1000:\n    if os.fork() == 0:\n      time.sleep(3); os._exit(0)\n    n += 1\nexcept OSError:\n  print('bounded', n < 64)",
    ]);
    assert_eq!(text(&out.stdout), "bounded True\n", "{}", text(&out.stderr));
    // Privileged operations still fail inside.
    let out = s.cli(&["exec", "--shell", &id, "--", "mount -t tmpfs x /mnt"]);
    assert_ne!(out.status.code(), Some(0));

    let out = s.cli(&["spawn", "--network", "bridge"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs a server running as root"),
        "{}",
        text(&out.stderr)
    );

    let out = s.cli(&["kill", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !data.join("native/sandboxes").join(&id).exists(),
        "sandbox state removed: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(log.contains("rootless mode"), "{log}");
    s.stop();
}

/// `stacyvm image pull` (registry) and `stacyvm image import --docker`
/// through the real binary: each prints the image id on stdout, and both
/// ways in give the same id for the same image. The image is loaded into
/// the real dockerd and pushed to Debian's docker-registry on loopback.
#[test]
fn image_pull_and_docker_import_through_the_cli() {
    let dir = tempfile::tempdir().expect("tmp");
    let archive = busybox_archive(dir.path());
    let docker = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .output()
            .expect("docker CLI (scripts/test installs docker.io)")
    };
    let loaded = docker(&["load", "-i", archive.to_str().expect("utf8")]);
    assert!(loaded.status.success(), "{}", text(&loaded.stderr));
    let registry = common::Registry::start(dir.path());
    let addr = &registry.addr;
    let remote = format!("{addr}/cli/mini:1");
    assert!(docker(&["tag", "mini/busybox:1", &remote]).status.success());
    let pushed = docker(&["push", &remote]);
    assert!(pushed.status.success(), "{}", text(&pushed.stderr));

    let data = dir.path().join("data");
    let image = |args: &[&str]| {
        Command::new(BIN)
            .arg("image")
            .args(args)
            .env("STACYVM_SERVER_DATA_DIR", &data)
            .output()
            .expect("image cmd")
    };
    let pulled = image(&["pull", &remote]);
    assert!(pulled.status.success(), "{}", text(&pulled.stderr));
    let pulled_id = text(&pulled.stdout).trim().to_string();
    assert!(pulled_id.starts_with("sha256:"), "{pulled_id}");
    let imported = image(&[
        "import",
        "--docker",
        "mini/busybox:1",
        "--name",
        "from-docker",
    ]);
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    assert_eq!(
        text(&imported.stdout).trim(),
        pulled_id,
        "the same image has the same id however it arrives"
    );
    let ls = image(&["ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("json");
    let names = list[0]["names"].to_string();
    assert!(
        names.contains(&remote) && names.contains("from-docker:latest"),
        "{names}"
    );
    let missing = image(&["pull", &format!("{addr}/cli/none:1")]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("not found"),
        "{}",
        text(&missing.stderr)
    );

    let _ = docker(&["rmi", &remote]);
    let _ = docker(&["rmi", "mini/busybox:1"]);
    drop(registry);
}

/// Completions and man pages come from the CLI's definition: every
/// subcommand is in them.
#[test]
fn completions_and_man_pages_cover_the_commands() {
    let bin = env!("CARGO_BIN_EXE_stacyvm");
    for (shell, marker) in [
        ("bash", "_stacyvm()"),
        ("zsh", "#compdef stacyvm"),
        ("fish", "complete -c stacyvm"),
    ] {
        let out = std::process::Command::new(bin)
            .args(["completion", shell])
            .output()
            .expect("completion");
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: no {marker}");
        for sub in ["spawn", "env", "snapshot", "volume", "doctor"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let out = std::process::Command::new(bin)
        .args(["completion", "tcsh"])
        .output()
        .expect("completion");
    assert!(!out.status.success(), "an unknown shell is an error");
    let dir = tempfile::tempdir().expect("dir");
    let out = std::process::Command::new(bin)
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .expect("man");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "stacyvm.1",
        "stacyvm-env-build.1",
        "stacyvm-volume-export.1",
        "stacyvm-serve.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).expect(page);
        let name = page.trim_end_matches(".1");
        assert!(
            text.contains(&format!(".TH {name} 1")),
            "{page}: {}",
            &text[..200.min(text.len())]
        );
    }
    assert!(
        std::fs::read_to_string(dir.path().join("stacyvm-env-build.1"))
            .expect("page")
            .contains("\\-\\-target"),
        "options are documented"
    );
}

/// The bug report template asks for commands that exist, with options
/// that exist.
#[test]
fn the_issue_templates_name_real_commands() {
    let bin = env!("CARGO_BIN_EXE_stacyvm");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join(".github/ISSUE_TEMPLATE/bug_report.yml"))
        .expect("bug_report.yml");
    let mut checked = 0;
    for cmd in text.split('`').skip(1).step_by(2) {
        let Some(rest) = cmd.strip_prefix("stacyvm ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let path: Vec<&str> = words
            .iter()
            .take_while(|w| !w.starts_with('-') && !w.contains('.'))
            .copied()
            .collect();
        let out = std::process::Command::new(bin)
            .args(&path)
            .arg("--help")
            .output()
            .expect("help");
        assert!(out.status.success(), "`stacyvm {rest}`: no such command");
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(flag),
                "`stacyvm {rest}`: {flag} is not an option"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "the template names the evidence commands ({checked})"
    );
}
