//! Redaction proofs on the real binary (gaps S-12, S-13): every
//! secret-bearing config key, environment variable and header is seeded
//! with a unique marker, and no marker may appear in the support bundle or
//! in anything a command prints.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

/// A marker: unique, long enough for every secret rule, easy to grep.
fn marker(name: &str) -> String {
    format!("MRK{name}x7f3a9c2e5b8d1f4a6c0e9b2d7a5f3c8e1")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn base_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir).env("HOME", dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("STACYVM_") || k == "DOCKER_HOST" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A fake server whose `/api/v1/diagnostics` echoes the request headers
/// and adds credentials of its own that the CLI cannot know.
fn fake_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut headers = serde_json::Map::new();
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).map_or(true, |n| n == 0) || l == "\r\n" {
                    break;
                }
                if let Some((k, v)) = l.trim_end().split_once(": ") {
                    headers.insert(k.to_ascii_lowercase(), v.into());
                }
            }
            let body = serde_json::json!({
                "request": first.trim(),
                "request_headers": headers,
                "echo": format!("called with X-API-Key: {}", headers.get("x-api-key").and_then(|v| v.as_str()).unwrap_or("")),
                "registry": {"username": "bot", "password": marker("SRVPASSWORD")},
                "log": [
                    format!("connecting with token={}", marker("SRVTOKEN")),
                    format!("Authorization: Bearer {}", marker("SRVBEARER")),
                    format!("upstream postgres://app:{}@db:5432/x", marker("SRVURLPW")),
                    format!("worker token stacyvm-worker-v1.{}.c2ln", marker("SRVWORKER")),
                    format!("openai key sk-{}", marker("SRVSK").to_lowercase()),
                ],
                "providers": ["native"],
            })
            .to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn support_bundle_contains_no_secret() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    std::fs::write(d.join("signing-key"), marker("SIGNINGKEYFILE")).expect("write");
    // Every secret-bearing key of the config (auth.worker_token comes from
    // the environment below; a file and an inline value cannot both be set).
    let yaml = format!(
        "server:
  data_dir: {data}
worker:
  control_plane_url: https://cp:{cpurl}@control.example:7423
auth:
  enabled: true
  api_key: {api}
  admin_api_key: {admin}
  worker_signing_key_file: {d}/signing-key
  worker_tokens:
    w1: {wt1}
    w2: {wt2}
  worker_signing_keys: [{rot1}, {rot2}]
  oidc_public_key: \"-----BEGIN PRIVATE KEY-----{oidc}-----END PRIVATE KEY-----\"
providers:
  custom:
    enabled: false
    base_url: https://user:{custompw}@custom.example
    api_key: {custom}
database:
  dsn: postgres://stacy:{dsnpw}@db.example:5432/stacyvm
",
        data = d.join("data").display(),
        d = d.display(),
        cpurl = marker("CPURLPW"),
        api = marker("APIKEY"),
        admin = marker("ADMINKEY"),
        wt1 = marker("WORKERTOKENS1"),
        wt2 = marker("WORKERTOKENS2"),
        rot1 = marker("ROTATION1"),
        rot2 = marker("ROTATION2"),
        // A private key pasted by mistake where the public key belongs.
        oidc = marker("OIDCPRIVATEKEY"),
        custompw = marker("CUSTOMURLPW"),
        custom = marker("CUSTOMKEY"),
        dsnpw = marker("DSNPW"),
    );
    std::fs::write(d.join("stacyvm.yaml"), yaml).expect("config");
    let server = fake_server();
    let out = base_cmd(d)
        .args([
            "support",
            "bundle",
            "bundle.json",
            "--config",
            "stacyvm.yaml",
            "--include-doctor",
            "--include-server",
            "--server",
            &server,
            "--api-key",
            &marker("HEADERAPIKEY"),
        ])
        // Secret environment variables: config overrides and direct reads.
        .env("STACYVM_AUTH_WORKER_TOKEN", marker("ENVWORKERTOKEN"))
        .env("STACYVM_PROVIDERS_E2B_API_KEY", marker("ENVE2BKEY"))
        .env("STACYVM_API_KEY", marker("ENVCLIAPIKEY"))
        .env("STACYVM_WORKER_BOOTSTRAP_ADMIN_KEY", marker("ENVBOOTSTRAP"))
        .env(
            "STACYVM_DATABASE_DSN",
            format!("postgres://u:{}@h/db", marker("ENVDSNPW")),
        )
        .env("STACYVM_REGISTRY_PASSWORD", marker("ENVREGISTRYPW"))
        .env("STACYVM_ADMIN_API_KEY", marker("ENVADMINKEY"))
        .env("STACYVM_REGISTRY_USERNAME", "bot")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("MRK"), "{}", text(&out));
    let path = d.join("bundle.json");
    let raw = std::fs::read_to_string(&path).expect("bundle");
    if let Some(i) = raw.find("MRK") {
        panic!(
            "a marker leaked into the bundle: …{}…",
            &raw[i.saturating_sub(80)..(i + 40).min(raw.len())]
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The bundle is still useful: structure and non-secret values remain,
    // and the secrets really were there to redact.
    let v: serde_json::Value = serde_json::from_str(&raw).expect("json");
    assert_eq!(v["config"]["server"]["port"], 7423);
    assert_eq!(v["config"]["auth"]["api_key"], "[REDACTED]");
    assert_eq!(v["config"]["auth"]["worker_signing_key"], "[REDACTED]");
    assert_eq!(v["config"]["auth"]["worker_signing_keys"], "[REDACTED]");
    assert_eq!(v["config"]["auth"]["worker_tokens"], "[REDACTED]");
    assert_eq!(v["config"]["providers"]["e2b"]["api_key"], "[REDACTED]");
    assert_eq!(
        v["config"]["providers"]["custom"]["base_url"],
        "https://[REDACTED]@custom.example"
    );
    assert_eq!(v["config"]["database"]["dsn"], "[REDACTED]");
    assert_eq!(v["environment"]["STACYVM_API_KEY"], "[REDACTED]");
    assert!(v["config_lint"]["checks"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    assert!(v["doctor"]["checks"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    let diag = &v["server_diagnostics"];
    assert_eq!(diag["request"], "GET /api/v1/diagnostics HTTP/1.1");
    assert_eq!(diag["request_headers"]["x-api-key"], "[REDACTED]");
    assert_eq!(diag["registry"]["username"], "bot");
    assert_eq!(diag["providers"][0], "native");
    assert!(v["redactions"].as_array().is_some_and(|r| r.len() >= 5));

    // Overwriting needs --force; a directory is refused.
    let out = base_cmd(d)
        .args([
            "support",
            "bundle",
            "bundle.json",
            "--config",
            "stacyvm.yaml",
        ])
        .output()
        .expect("run");
    assert!(
        !out.status.success() && text(&out).contains("--force"),
        "{}",
        text(&out)
    );
    std::fs::create_dir(d.join("adir")).expect("mkdir");
    let out = base_cmd(d)
        .args([
            "support",
            "bundle",
            "adir",
            "--config",
            "stacyvm.yaml",
            "--force",
        ])
        .output()
        .expect("run");
    assert!(
        !out.status.success() && text(&out).contains("is a directory"),
        "{}",
        text(&out)
    );
}

/// S-13: commands that handle a DSN never print its password.
#[test]
fn no_command_prints_a_dsn_password() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let pw = marker("DSNPASSWORD");
    let dsn = format!("postgres://stacy:{pw}@127.0.0.1:1/stacyvm");
    std::fs::write(
        d.join("stacyvm.yaml"),
        format!("database:\n  driver: postgres\n  dsn: {dsn}\n"),
    )
    .expect("config");
    let runs: Vec<Vec<&str>> = vec![
        vec!["doctor"],
        vec!["doctor", "--json"],
        vec!["config", "lint", "--production"],
        vec!["config", "lint", "--json"],
        vec!["db", "backup", "out.db"],
        vec!["db", "restore", "x.db", "--yes"],
        vec!["db", "check"],
        vec!["db", "pg-backup", "dump.sql"],
        vec!["upgrade", "rehearse"],
        vec!["upgrade", "rehearse", "--json"],
        vec!["support", "bundle", "b.json", "--include-doctor"],
    ];
    for args in runs {
        let out = base_cmd(d).args(&args).output().expect("run");
        assert!(
            !text(&out).contains(&pw),
            "{args:?} printed the password:\n{}",
            text(&out)
        );
        assert!(out.status.code().is_some(), "{args:?}");
    }
    let bundle = std::fs::read_to_string(d.join("b.json")).expect("bundle");
    assert!(!bundle.contains(&pw));
}

/// S-13 for `db pg-backup`: the password reaches pg_dump only through
/// PGPASSWORD (not its argv, which `ps` shows) and is never printed.
#[test]
fn pg_backup_hands_the_password_over_privately() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let bin = d.join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    // A stand-in pg_dump that records what it was given.
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > {d}/argv.txt\nprintf '%s' \"$PGPASSWORD\" > {d}/pgpassword.txt\nfor a in \"$@\"; do case \"$a\" in --file=*) echo dump > \"${{a#--file=}}\";; esac; done\necho \"pg_dump: connected to $3\" >&2\n",
        d = d.display()
    );
    std::fs::write(bin.join("pg_dump"), script).expect("script");
    std::fs::set_permissions(bin.join("pg_dump"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let pw = marker("PGPASSWORD");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = base_cmd(d)
        .args(["db", "pg-backup", "dump.sql"])
        .env("PATH", &path)
        .env(
            "STACYVM_DATABASE_DSN",
            format!("postgres://stacy:{pw}@db.example:5432/stacyvm"),
        )
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(&pw), "{}", text(&out));
    assert!(text(&out).contains("backup written: "), "{}", text(&out));
    let argv = std::fs::read_to_string(d.join("argv.txt")).expect("argv");
    assert!(!argv.contains(&pw), "{argv}");
    assert!(
        argv.contains("--dbname=postgres://stacy@db.example:5432/stacyvm"),
        "{argv}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("pgpassword.txt")).expect("pw"),
        pw
    );
    assert!(d.join("dump.sql").is_file());
    // Existing output needs --force.
    let out = base_cmd(d)
        .args([
            "db",
            "pg-backup",
            "dump.sql",
            "--dsn",
            &format!("host=db password={pw}"),
        ])
        .env("PATH", &path)
        .output()
        .expect("run");
    assert!(
        !out.status.success() && text(&out).contains("--force"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(&pw));
}
