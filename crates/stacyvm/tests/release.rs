//! Release trust, end to end with the real scripts and a throwaway
//! minisign key: `scripts/release` packs this build's binaries;
//! `scripts/verify-release` accepts the set and refuses it after one byte
//! changes, when re-signed by another key, truncated or unsigned; the OCI
//! archive loads into the engine and runs; `install.sh` installs into a
//! scratch root (fail-closed mode refuses an unsigned or tampered release,
//! a config is never overwritten); `stacyvm update` upgrades it only after
//! the new binary's rehearsal and a good signature; `stacyvm uninstall`
//! removes it.
//!
//! Needs minisign, docker and the static agent (`scripts/test` provides
//! them).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn agent() -> PathBuf {
    let p = std::env::var("STACYVM_AGENT_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/stacyvm/agent/stacyvm-agent"),
            PathBuf::from,
        );
    assert!(
        p.is_file(),
        "static agent {} missing: run scripts/build-agent /var/cache/stacyvm/agent",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?} failed: {}", text(&o));
    text(&o)
}

fn fails(cmd: &mut Command, says: &str) -> String {
    let o = run(cmd);
    let t = text(&o);
    assert!(!o.status.success(), "{cmd:?} must fail: {t}");
    assert!(t.contains(says), "{cmd:?} should say {says:?}: {t}");
    t
}

fn script(name: &str) -> Command {
    let mut c = Command::new(repo().join("scripts").join(name));
    c.current_dir(repo());
    c
}

fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (p, s) = (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    );
    ok(Command::new("minisign")
        .arg("-G")
        .arg("-W")
        .arg("-p")
        .arg(&p)
        .arg("-s")
        .arg(&s));
    (p, s)
}

fn release(out: &Path, key: Option<&Path>, bins: &Path, version: &str) {
    let mut c = script("release");
    c.arg("--out")
        .arg(out)
        .arg("--binaries")
        .arg(bins)
        .args(["--version", version]);
    match key {
        Some(k) => c.arg("--key").arg(k),
        None => c.arg("--unsigned"),
    };
    ok(&mut c);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn flip_byte(p: &Path, at: usize) {
    let mut b = std::fs::read(p).expect("read");
    b[at] ^= 0x01;
    std::fs::write(p, b).expect("write");
}

fn resum(dir: &Path) {
    let o = run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && rm -f SHA256SUMS.minisig && sha256sum -- *.tar.gz *.spdx.json *-oci.tar install.sh > SHA256SUMS",
        dir.display()
    )));
    assert!(o.status.success(), "{}", text(&o));
}

fn verify(dir: &Path, pubkey: &Path) -> Command {
    let mut c = script("verify-release");
    c.arg(dir).arg("--pubkey").arg(pubkey);
    c
}

fn install(from: &Path, root: &Path, pubkey: Option<&Path>) -> Command {
    let mut c = Command::new(repo().join("scripts/install.sh"));
    c.arg("--from").arg(from).arg("--root").arg(root);
    if let Some(p) = pubkey {
        c.arg("--pubkey").arg(p).arg("--require-signature");
    }
    c
}

#[test]
fn releases_are_signed_verified_installed_updated_and_removed() {
    let t = tempfile::tempdir().expect("tmp");
    let w = t.path();
    let bins = w.join("bins");
    std::fs::create_dir_all(&bins).expect("mkdir");
    std::fs::copy(BIN, bins.join("stacyvm")).expect("copy stacyvm");
    std::fs::copy(agent(), bins.join("stacyvm-agent")).expect("copy agent");
    let keys = w.join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let (pub_key, sec_key) = keypair(&keys, "release");
    let (evil_pub, evil_key) = keypair(&keys, "evil");

    // A secret key inside the repository is refused.
    fails(
        script("release")
            .arg("--out")
            .arg(w.join("never"))
            .arg("--key")
            .arg(repo().join("Cargo.toml"))
            .arg("--binaries")
            .arg(&bins),
        "inside the repository",
    );

    // The release and what it holds.
    let rel1 = w.join("rel1");
    release(&rel1, Some(&sec_key), &bins, "1.0.0");
    for f in [
        "SHA256SUMS",
        "SHA256SUMS.minisig",
        "stacyvm-1.0.0-linux-x86_64.tar.gz",
        "stacyvm-1.0.0.spdx.json",
        "stacyvm-1.0.0-oci.tar",
        "install.sh",
    ] {
        assert!(rel1.join(f).is_file(), "{f} missing");
    }
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rel1.join("stacyvm-1.0.0.spdx.json")).expect("sbom"))
            .expect("sbom is JSON");
    assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
    let pkgs = sbom["packages"].as_array().expect("packages");
    assert!(pkgs.len() > 100, "{} packages", pkgs.len());
    assert!(
        pkgs.iter().any(|p| p["name"] == "tokio"),
        "tokio is in the SBOM"
    );
    let listing = ok(Command::new("tar")
        .arg("-tzf")
        .arg(rel1.join("stacyvm-1.0.0-linux-x86_64.tar.gz")));
    for f in [
        "stacyvm-1.0.0-linux-x86_64/bin/stacyvm",
        "stacyvm-1.0.0-linux-x86_64/bin/stacyvm-agent",
        "stacyvm-1.0.0-linux-x86_64/LICENSE",
        "stacyvm-1.0.0-linux-x86_64/THIRD-PARTY-LICENSES.txt",
        "stacyvm-1.0.0-linux-x86_64/packaging/stacyvm.service",
        "stacyvm-1.0.0-linux-x86_64/install.sh",
        "stacyvm-1.0.0-linux-x86_64/docs/security.md",
    ] {
        assert!(listing.lines().any(|l| l == f), "{f} not in the tarball");
    }
    // Same inputs, same bytes.
    let again = w.join("rel1-again");
    release(&again, Some(&sec_key), &bins, "1.0.0");
    assert_eq!(
        std::fs::read(rel1.join("SHA256SUMS")).expect("sums"),
        std::fs::read(again.join("SHA256SUMS")).expect("sums"),
        "the release is reproducible"
    );

    // Verification, and what it refuses.
    let out = ok(&mut verify(&rel1, &pub_key));
    assert!(out.contains("verify-release: OK"), "{out}");
    fails(&mut verify(&rel1, &evil_pub), "does not verify");
    let tampered = w.join("tampered");
    copy_dir(&rel1, &tampered);
    flip_byte(&tampered.join("stacyvm-1.0.0-linux-x86_64.tar.gz"), 4096);
    fails(&mut verify(&tampered, &pub_key), "checksums do not match");
    let resigned = w.join("resigned");
    copy_dir(&tampered, &resigned);
    resum(&resigned);
    ok(Command::new("minisign")
        .arg("-S")
        .arg("-s")
        .arg(&evil_key)
        .arg("-m")
        .arg(resigned.join("SHA256SUMS")));
    fails(&mut verify(&resigned, &pub_key), "does not verify");
    let truncated = w.join("truncated");
    copy_dir(&rel1, &truncated);
    let tb = truncated.join("stacyvm-1.0.0-linux-x86_64.tar.gz");
    let whole = std::fs::read(&tb).expect("read");
    std::fs::write(&tb, &whole[..whole.len() / 2]).expect("truncate");
    resum(&truncated);
    fails(&mut verify(&truncated, &pub_key), "not signed");
    fails(
        verify(&truncated, &pub_key).arg("--allow-unsigned"),
        "not a whole tarball",
    );
    let oci_bad = w.join("oci-bad");
    copy_dir(&rel1, &oci_bad);
    let oci = oci_bad.join("stacyvm-1.0.0-oci.tar");
    let len = std::fs::metadata(&oci).expect("oci").len() as usize;
    flip_byte(&oci, len / 2);
    resum(&oci_bad);
    fails(
        verify(&oci_bad, &pub_key).arg("--allow-unsigned"),
        "not a consistent OCI archive",
    );

    // The OCI archive loads into the engine and its binaries run.
    ok(Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(rel1.join("stacyvm-1.0.0-oci.tar")));
    let out = ok(Command::new("docker").args([
        "run",
        "--rm",
        "--entrypoint",
        "/usr/local/bin/stacyvm-agent",
        "stacyvm:1.0.0",
        "version",
    ]));
    let _ = run(Command::new("docker").args(["rmi", "-f", "stacyvm:1.0.0"]));
    assert!(out.contains("stacyvm-agent"), "{out}");

    // Install: fail closed on what does not verify, nothing written then.
    let unsigned = w.join("unsigned");
    release(&unsigned, None, &bins, "1.0.0");
    let root0 = w.join("root0");
    fails(&mut install(&unsigned, &root0, Some(&pub_key)), "REFUSED");
    fails(&mut install(&tampered, &root0, Some(&pub_key)), "REFUSED");
    fails(&mut install(&resigned, &root0, Some(&pub_key)), "REFUSED");
    assert!(
        !root0.join("usr/local/bin/stacyvm").exists(),
        "a refused release installs nothing"
    );
    // Without a key the checksum still holds the line.
    fails(&mut install(&tampered, &root0, None), "REFUSED");

    let root = w.join("root");
    let out = ok(&mut install(&rel1, &root, Some(&pub_key)));
    assert!(out.contains("signature verified"), "{out}");
    for (f, mode) in [
        ("usr/local/bin/stacyvm", 0o755),
        ("usr/local/bin/stacyvm-agent", 0o755),
        ("etc/systemd/system/stacyvm.service", 0o644),
        ("etc/stacyvm/config.yaml", 0o600),
        ("etc/stacyvm/api.key", 0o600),
        ("etc/stacyvm/admin.key", 0o600),
    ] {
        let md = std::fs::metadata(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(md.permissions().mode() & 0o777, mode, "{f}");
    }
    let config = root.join("etc/stacyvm/config.yaml");
    let cfg_text = std::fs::read_to_string(&config).expect("config");
    let admin = std::fs::read_to_string(root.join("etc/stacyvm/admin.key")).expect("key");
    assert!(
        !cfg_text.contains(admin.trim()),
        "the config holds the key's hash, not the key"
    );
    ok(Command::new(BIN)
        .args(["config", "lint", "--production", "-f"])
        .arg(&config));
    // Again over the install: the config stays exactly as the operator left it.
    std::fs::write(&config, format!("{cfg_text}# edited by the operator\n")).expect("edit");
    let out = ok(&mut install(&rel1, &root, Some(&pub_key)));
    assert!(out.contains("kept the existing"), "{out}");
    assert!(std::fs::read_to_string(&config)
        .expect("config")
        .ends_with("# edited by the operator\n"));

    // A server running from the install: neither the installer nor an
    // update replaces its binary under it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut server = Command::new(root.join("usr/local/bin/stacyvm"))
        .arg("serve")
        .env("STACYVM_SERVER_HOST", "127.0.0.1")
        .env("STACYVM_SERVER_PORT", port.to_string())
        .env("STACYVM_SERVER_DATA_DIR", w.join("live-data"))
        .env("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the installed server");
    let up = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            up.elapsed() < std::time::Duration::from_secs(30),
            "server up"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    fails(&mut install(&rel1, &root, Some(&pub_key)), "stop it first");

    // Update: a new release of changed binaries, rehearsed first.
    let bins2 = w.join("bins2");
    copy_dir(&bins, &bins2);
    std::fs::write(w.join("note"), "stacyvm 2.0.0 test build").expect("note");
    std::fs::remove_file(bins2.join("stacyvm")).expect("rm");
    ok(Command::new("objcopy")
        .arg("--add-section")
        .arg(format!(".note.stacyvm-test={}", w.join("note").display()))
        .arg(bins.join("stacyvm"))
        .arg(bins2.join("stacyvm")));
    let rel2 = w.join("rel2");
    release(&rel2, Some(&sec_key), &bins2, "2.0.0");
    let data = root.join("var/lib/stacyvm");
    let installed = std::fs::read(root.join("usr/local/bin/stacyvm")).expect("bin");
    let update = |from: &Path, config: &Path| {
        let mut c = Command::new(BIN);
        c.args(["update", "--require-signature", "--from"])
            .arg(from)
            .arg("--pubkey")
            .arg(&pub_key)
            .arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(config)
            .env("STACYVM_SERVER_DATA_DIR", &data);
        c
    };
    let bad_config = w.join("bad.yaml");
    std::fs::write(&bad_config, "server:\n  port: not-a-port\n").expect("bad config");
    fails(&mut update(&rel2, &config), "stop it first");
    let _ = Command::new("kill")
        .args(["-15", &server.id().to_string()])
        .status();
    let _ = server.wait();
    fails(&mut update(&rel2, &bad_config), "nothing was changed");
    // A database written by an earlier version: the rehearsal migrates a
    // copy of it with the new binary.
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade/schema7/stacyvm.db"),
        data.join("stacyvm.db"),
    )
    .expect("fixture database");
    let mut evil2 = w.join("evil2");
    copy_dir(&rel2, &evil2);
    ok(Command::new("minisign")
        .arg("-S")
        .arg("-s")
        .arg(&evil_key)
        .arg("-m")
        .arg(evil2.join("SHA256SUMS")));
    fails(&mut update(&evil2, &config), "REFUSED");
    evil2 = w.join("unsigned2");
    release(&evil2, None, &bins2, "2.0.0");
    fails(&mut update(&evil2, &config), "REFUSED");
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/stacyvm")).expect("bin"),
        installed,
        "nothing changed after refused updates"
    );
    let out = ok(&mut update(&rel2, &config));
    assert!(out.contains("updated"), "{out}");
    let now = std::fs::read(root.join("usr/local/bin/stacyvm")).expect("bin");
    assert_ne!(now, installed, "the new binary is in place");
    assert!(
        now.windows(24).any(|w| w == b"stacyvm 2.0.0 test build"),
        "it is release 2's"
    );
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/stacyvm.bak")).expect("bak"),
        installed,
        "the previous binary is kept"
    );

    // Uninstall: binaries and unit go, config and data stay unless purged.
    fails(
        Command::new(BIN)
            .args(["uninstall", "--purge", "--root"])
            .arg(&root),
        "--yes",
    );
    let out = ok(Command::new(BIN).args(["uninstall", "--root"]).arg(&root));
    assert!(out.contains("kept /etc/stacyvm"), "{out}");
    assert!(!root.join("usr/local/bin/stacyvm").exists());
    assert!(!root.join("usr/local/bin/stacyvm.bak").exists());
    assert!(!root.join("etc/systemd/system/stacyvm.service").exists());
    assert!(config.exists());
    ok(Command::new(BIN)
        .args(["uninstall", "--purge", "--yes", "--root"])
        .arg(&root));
    assert!(!root.join("etc/stacyvm").exists());
    assert!(!data.exists());
}
