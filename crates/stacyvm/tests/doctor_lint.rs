//! `stacyvm doctor` and `stacyvm config lint` on the real binary: output
//! format, remediation lines, JSON, exit codes, and the docker checks
//! against a fake Engine API on a unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

fn stacyvm(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir).env("HOME", dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("STACYVM_") || k == "DOCKER_HOST" {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run stacyvm")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The status of check `name` in text output, e.g. `Some("FAIL")`.
fn status_of(o: &Output, name: &str) -> Option<String> {
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines().find_map(|l| {
        let (st, rest) = l.strip_prefix('[')?.split_once("] ")?;
        (rest.split_once(": ")?.0 == name).then(|| st.to_string())
    })
}

/// Every WARN/FAIL line is followed by a `      fix: …` line.
fn assert_fix_lines(o: &Output) {
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty(), "{}", text(o));
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("[WARN]") || l.starts_with("[FAIL]") {
            let next = lines.get(i + 1).copied().unwrap_or_default();
            assert!(
                next.starts_with("      fix: ") && next.len() > 12,
                "{l}\n{}",
                text(o)
            );
        } else if l.starts_with("[PASS]") {
            assert!(
                !lines
                    .get(i + 1)
                    .is_some_and(|n| n.starts_with("      fix:")),
                "{l}"
            );
        } else {
            assert!(l.starts_with("      fix: "), "unexpected line {l:?}");
        }
    }
}

/// A fake Docker engine answering `/version` and `/info`.
fn fake_engine(dir: &Path, runtimes: serde_json::Value) -> PathBuf {
    let sock = dir.join("docker.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let info = serde_json::json!({
        "Runtimes": runtimes,
        "SecurityOptions": ["name=seccomp,profile=builtin"],
    });
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).map_or(true, |n| n == 0) || l == "\r\n" {
                    break;
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or_default();
            let (status, body) = match path {
                "/version" => (
                    "200 OK",
                    serde_json::json!({"Version": "99.1.0", "ApiVersion": "1.99"}),
                ),
                "/info" => ("200 OK", info.clone()),
                _ => (
                    "404 Not Found",
                    serde_json::json!({"message": "page not found"}),
                ),
            };
            let body = body.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    sock
}

fn write_config(dir: &Path, yaml: &str) -> String {
    let p = dir.join("stacyvm.yaml");
    std::fs::write(&p, yaml).expect("write config");
    p.to_string_lossy().into_owned()
}

#[test]
fn doctor_checks_docker_firecracker_and_proot() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let sock = fake_engine(d, serde_json::json!({"runc": {"path": "runc"}}));
    let cfg = write_config(
        d,
        &format!(
            "server:\n  data_dir: {data}\nproviders:\n  docker:\n    enabled: true\n    socket: unix://{sock}\n    runtime: runsc\n  firecracker:\n    enabled: true\n    kernel_path: {d}/no-vmlinux\n    agent_path: {d}/no-agent\n  proot:\n    enabled: true\n    rootfs_path: {d}/no-rootfs\n    workspace_base: {d}\n",
            data = d.join("data").display(),
            sock = sock.display(),
            d = d.display()
        ),
    );
    let out = stacyvm(d, &["doctor", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("doctor found"), "{}", text(&out));
    assert_fix_lines(&out);
    for (name, want) in [
        ("config", "PASS"),
        ("docker.socket", "PASS"),
        ("docker.daemon", "PASS"),
        ("docker.runtime", "FAIL"),
        ("docker.seccomp", "PASS"),
        ("firecracker.kernel", "FAIL"),
        ("firecracker.agent", "FAIL"),
        ("proot.rootfs", "FAIL"),
        ("proot.workspace_base", "PASS"),
        ("auth.api_key", "WARN"),
    ] {
        assert_eq!(
            status_of(&out, name).as_deref(),
            Some(want),
            "{name}\n{}",
            text(&out)
        );
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("Docker 99.1.0"));

    // JSON carries the same checks, with a fix for every non-pass.
    let out = stacyvm(d, &["doctor", "--config", &cfg, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    let checks = v["checks"].as_array().expect("checks");
    assert!(checks
        .iter()
        .any(|c| c["name"] == "docker.runtime" && c["status"] == "fail"));
    for c in checks {
        assert_eq!(c["status"] != "pass", c.get("fix").is_some(), "{c}");
    }
}

#[test]
fn doctor_accepts_a_registered_runtime_and_flags_a_missing_socket() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let sock = fake_engine(
        d,
        serde_json::json!({"runc": {"path": "runc"}, "runsc": {"path": "/bin/sh", "runtimeArgs": ["--network=none"]}}),
    );
    let base = format!(
        "server:\n  data_dir: {}\nproviders:\n  docker:\n    enabled: true\n    runtime: runsc\n",
        d.join("data").display()
    );
    let cfg = write_config(d, &format!("{base}    socket: {}\n", sock.display()));
    let out = stacyvm(d, &["doctor", "--config", &cfg]);
    assert_eq!(
        status_of(&out, "docker.runtime").as_deref(),
        Some("PASS"),
        "{}",
        text(&out)
    );
    assert_eq!(
        status_of(&out, "docker.runsc").as_deref(),
        Some("PASS"),
        "{}",
        text(&out)
    );
    assert_eq!(
        status_of(&out, "docker.runsc_network").as_deref(),
        Some("PASS"),
        "{}",
        text(&out)
    );
    let cfg = write_config(d, &format!("{base}    socket: {}/nope.sock\n", d.display()));
    let out = stacyvm(d, &["doctor", "--config", &cfg]);
    assert_eq!(
        status_of(&out, "docker.socket").as_deref(),
        Some("FAIL"),
        "{}",
        text(&out)
    );
    assert_eq!(status_of(&out, "docker.daemon"), None, "{}", text(&out));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn doctor_exit_code_follows_production_mode() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    // Only the mock provider: no host requirement can fail, and the mock
    // provider is a production failure.
    let cfg = write_config(
        d,
        &format!(
            "server:\n  data_dir: {data}\nauth:\n  api_key: 0123456789abcdef0123456789abcdef\n  admin_api_key: fedcba9876543210fedcba9876543210\n  admin_fallback_enabled: false\ndatabase:\n  path: {data}/stacyvm.db\nproviders:\n  default: mock\n  mock:\n    enabled: true\n  native:\n    enabled: false\n",
            data = d.join("data").display()
        ),
    );
    std::fs::create_dir(d.join("data")).expect("mkdir");
    let out = stacyvm(d, &["doctor", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(status_of(&out, "providers.mock").as_deref(), Some("WARN"));
    assert_eq!(status_of(&out, "auth.api_key").as_deref(), Some("PASS"));
    assert_eq!(status_of(&out, "native").as_deref(), Some("WARN"));
    assert_fix_lines(&out);
    let out = stacyvm(d, &["doctor", "--production", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(status_of(&out, "providers.mock").as_deref(), Some("FAIL"));
    assert!(
        text(&out).contains("doctor found 1 failing check(s)"),
        "{}",
        text(&out)
    );

    // A corrupt database is a failure with a restore hint.
    std::fs::write(d.join("data/stacyvm.db"), vec![7u8; 4096]).expect("write");
    let out = stacyvm(d, &["doctor", "--config", &cfg]);
    assert_eq!(
        status_of(&out, "database.integrity").as_deref(),
        Some("FAIL"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("stacyvm db restore"), "{}", text(&out));
}

#[test]
fn doctor_explains_the_listen_address() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    std::fs::create_dir(d.join("data")).expect("mkdir");
    let base = format!(
        "server:\n  data_dir: {data}\n{{host}}providers:\n  default: mock\n  mock:\n    enabled: true\n  native:\n    enabled: false\n",
        data = d.join("data").display()
    );
    // No credential, no host: loopback only, and doctor says why.
    let cfg = write_config(d, &base.replace("{host}", ""));
    let out = stacyvm(d, &["doctor", "--production", "--config", &cfg]);
    assert_eq!(status_of(&out, "server.host").as_deref(), Some("PASS"));
    assert!(
        text(&out).contains("127.0.0.1:7423: no credential is configured"),
        "{}",
        text(&out)
    );
    // An explicit public host on an open server fails production.
    let cfg = write_config(d, &base.replace("{host}", "  host: 0.0.0.0\n"));
    let out = stacyvm(d, &["doctor", "--production", "--config", &cfg]);
    assert_eq!(
        status_of(&out, "server.host").as_deref(),
        Some("FAIL"),
        "{}",
        text(&out)
    );
    let out = stacyvm(d, &["config", "lint", "--production", "--file", &cfg]);
    assert_eq!(status_of(&out, "server.host").as_deref(), Some("FAIL"));
    assert_fix_lines(&out);
}

#[test]
fn doctor_reports_a_broken_config_as_its_only_check() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let cfg = write_config(d, "defaults:\n  ttl: forever\n");
    let out = stacyvm(d, &["doctor", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("[FAIL] config: "), "{}", text(&out));
    assert!(stdout.contains("defaults.ttl"), "{}", text(&out));
    assert_eq!(stdout.lines().filter(|l| l.starts_with('[')).count(), 1);
}

#[test]
fn config_lint_default_config_fails_production_with_every_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    // No file anywhere: the built-in defaults.
    let out = stacyvm(d, &["config", "lint"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_fix_lines(&out);
    let out = stacyvm(d, &["config", "lint", "--production"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_fix_lines(&out);
    for name in [
        "auth.enabled",
        "auth.api_key",
        "auth.admin_api_key",
        "auth.admin_fallback_enabled",
        "rate_limit.enabled",
        "defaults.sandbox_caps",
        "defaults.exec_timeouts",
        "logging.format",
    ] {
        assert_eq!(
            status_of(&out, name).as_deref(),
            Some("FAIL"),
            "{name}\n{}",
            text(&out)
        );
    }
    let fails = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("[FAIL]"))
        .count();
    assert!(
        text(&out).contains(&format!("config lint found {fails} failing check(s)")),
        "{}",
        text(&out)
    );

    // --file must exist; unknown keys warn; a hardened file passes.
    let out = stacyvm(d, &["config", "lint", "--file", "missing.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("missing.yaml"), "{}", text(&out));
    let good = "auth:\n  enabled: true\n  api_key: 0123456789abcdef0123456789abcdef-api\n  admin_api_key: 0123456789abcdef0123456789abcdef-adm\n  admin_fallback_enabled: false\n  admin_audit_retention: 720h\nserver:\n  cors_allowed_origins: [\"https://app.example.com\"]\n  colour: blue\nrate_limit:\n  enabled: true\ndatabase:\n  path: /var/lib/stacyvm/stacyvm.db\ndefaults:\n  max_sandboxes: 20\n  max_sandboxes_per_owner: 4\n  default_exec_timeout: 60s\nlogging:\n  format: json\n";
    std::fs::write(d.join("prod.yaml"), good).expect("write");
    let out = stacyvm(
        d,
        &[
            "config",
            "lint",
            "--production",
            "--file",
            "prod.yaml",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true);
    let unknown = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "config.unknown_keys")
        .expect("unknown keys check");
    assert!(unknown["message"]
        .as_str()
        .is_some_and(|m| m.contains("server.colour")));
    // Env overrides count, as they do for serve.
    let out = Command::new(BIN)
        .args(["config", "lint", "--production", "--file", "prod.yaml"])
        .current_dir(d)
        .env("HOME", d)
        .env("STACYVM_RATE_LIMIT_ENABLED", "false")
        .output()
        .expect("run");
    assert_eq!(
        status_of(&out, "rate_limit.enabled").as_deref(),
        Some("FAIL"),
        "{}",
        text(&out)
    );
}

/// Every operator command explains itself.
#[test]
fn operator_commands_have_help() {
    let dir = tempfile::tempdir().expect("tmp");
    for cmd in [
        &["doctor"][..],
        &["config", "lint"],
        &["db", "backup"],
        &["db", "restore"],
        &["db", "check"],
        &["db", "pg-backup"],
        &["upgrade", "rehearse"],
        &["support", "bundle"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = stacyvm(dir.path(), &args);
        assert!(out.status.success(), "{cmd:?}: {}", text(&out));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage: stacyvm"), "{cmd:?}: {help}");
        assert!(
            help.lines().next().is_some_and(|l| l.len() > 20),
            "{cmd:?}: {help}"
        );
    }
}

/// The microVM checks run the VMM: Firecracker's version, or QEMU's
/// machine list when only QEMU is there.
#[test]
fn doctor_probes_the_vmm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let bin = d.join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let script = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    };
    let fc = script("fc", "echo 'Firecracker v1.99.0'");
    std::fs::write(d.join("vmlinux"), b"\x7fELF kernel").expect("kernel");
    std::fs::write(d.join("agent"), b"agent").expect("agent");
    let cfg = |fc_path: &str| {
        write_config(
            d,
            &format!(
                "server:\n  data_dir: {d}/data\nproviders:\n  firecracker:\n    enabled: true\n    firecracker_path: {fc_path}\n    kernel_path: {d}/vmlinux\n    agent_path: {d}/agent\n    data_dir: {d}\n",
                d = d.display()
            ),
        )
    };
    let run = |config: &str, path: &str| {
        let mut cmd = Command::new(BIN);
        cmd.args(["doctor", "--config", config])
            .current_dir(d)
            .env("HOME", d)
            .env("PATH", path);
        for (k, _) in std::env::vars() {
            if k.starts_with("STACYVM_") {
                cmd.env_remove(k);
            }
        }
        cmd.output().expect("run")
    };
    let sys_path = std::env::var("PATH").unwrap_or_default();
    let with_bin = format!("{}:{sys_path}", bin.display());

    let c = cfg(fc.to_str().expect("utf8"));
    let out = run(&c, &sys_path);
    assert_eq!(
        status_of(&out, "firecracker.binary").as_deref(),
        Some("PASS"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("Firecracker v1.99.0"), "{}", text(&out));
    assert_eq!(
        status_of(&out, "firecracker.kernel").as_deref(),
        Some("PASS")
    );
    // No KVM that boots guests on CI hosts: the provider says so.
    assert_eq!(
        status_of(&out, "firecracker.provider").as_deref(),
        Some("WARN"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("not certified on this host: no KVM that boots guests"),
        "{}",
        text(&out)
    );
    assert_eq!(
        status_of(&out, "firecracker.agent").as_deref(),
        Some("PASS")
    );
    // A compressed bzImage is refused with how to get a vmlinux.
    let mut bz = vec![0u8; 0x300];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(d.join("vmlinux"), &bz).expect("bzImage");
    let out = run(&c, &sys_path);
    assert_eq!(
        status_of(&out, "firecracker.kernel").as_deref(),
        Some("FAIL")
    );
    assert!(text(&out).contains("extract-vmlinux"), "{}", text(&out));
    std::fs::write(d.join("vmlinux"), b"\x7fELF kernel").expect("kernel");
    assert_eq!(
        status_of(&out, "firecracker.data_dir").as_deref(),
        Some("PASS")
    );

    // No firecracker: QEMU with and without the microvm machine.
    let c = cfg(&format!("{}/no-firecracker", d.display()));
    script(
        "qemu-system-x86_64",
        "echo 'Supported machines are:'; echo 'microvm              microvm (i386)'; echo 'pc                   Standard PC'",
    );
    let out = run(&c, &with_bin);
    assert_eq!(
        status_of(&out, "firecracker.binary").as_deref(),
        Some("WARN"),
        "{}",
        text(&out)
    );
    assert_eq!(
        status_of(&out, "firecracker.qemu").as_deref(),
        Some("PASS"),
        "{}",
        text(&out)
    );
    script(
        "qemu-system-x86_64",
        "echo 'Supported machines are:'; echo 'pc  Standard PC'",
    );
    let out = run(&c, &with_bin);
    assert_eq!(
        status_of(&out, "firecracker.qemu").as_deref(),
        Some("FAIL"),
        "{}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(1));
    let broken = script("fc-broken", "echo 'bad exec format' >&2; exit 126");
    let out = run(&cfg(broken.to_str().expect("utf8")), &sys_path);
    assert_eq!(
        status_of(&out, "firecracker.binary").as_deref(),
        Some("FAIL"),
        "{}",
        text(&out)
    );
}
