//! `stacyvm update` and `stacyvm uninstall`: the upgrade and the inverse
//! of `scripts/install.sh` (same layout: binaries in `/usr/local/bin`, the
//! unit in `/etc/systemd/system`, config and keys in `/etc/stacyvm`, data
//! in `/var/lib/stacyvm`, all under `--root`).
//!
//! An update verifies the release as the installer does — the minisign
//! signature of `SHA256SUMS` when a public key is given (required with
//! `--require-signature`), the tarball's checksum always — then runs the
//! *new* binary's `upgrade rehearse` against this install's config and
//! database, and only then stops the service, keeps the old binaries as
//! `*.bak`, puts the new ones in place and starts the service again. Any
//! failure before the swap changes nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

const BINARIES: [&str; 2] = ["stacyvm", "stacyvm-agent"];
const UNIT: &str = "etc/systemd/system/stacyvm.service";

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The release: a directory or an http(s) URL holding SHA256SUMS, its
    /// .minisig and the tarball.
    #[arg(long)]
    from: String,
    /// Verify the signature with this minisign public key.
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Fail closed: refuse an unsigned release, or no --pubkey.
    #[arg(long)]
    require_signature: bool,
    /// The install's root (as `install.sh --root`).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The config `upgrade rehearse` checks (default:
    /// ROOT/etc/stacyvm/config.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The install's root (as `install.sh --root`).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Also delete the config, its keys and the data dir (the database,
    /// images, volumes). Needs --yes.
    #[arg(long)]
    purge: bool,
    /// Confirms --purge.
    #[arg(long)]
    yes: bool,
}

fn under(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn is_real_root(root: &Path) -> bool {
    root == Path::new("/")
}

/// Whether systemd manages this machine and the unit is active.
fn service_active() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && Command::new("systemctl")
            .args(["is-active", "--quiet", "stacyvm"])
            .status()
            .is_ok_and(|s| s.success())
}

/// Pids of processes running `bin` (a server started by hand).
fn running_from(bin: &Path) -> Vec<u32> {
    let deleted = PathBuf::from(format!("{} (deleted)", bin.display()));
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            (exe == bin || exe == deleted).then_some(pid)
        })
        .collect()
}

fn systemctl(args: &[&str]) -> Result<()> {
    let st = Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl")?;
    if !st.success() {
        bail!(
            "systemctl {} failed (journalctl -u stacyvm)",
            args.join(" ")
        );
    }
    Ok(())
}

/// Reads `name` of the release at `from` (a directory or a URL); `None`
/// when it is not there.
async fn fetch(from: &str, name: &str) -> Result<Option<Vec<u8>>> {
    if from.starts_with("http://") || from.starts_with("https://") {
        let url = format!("{}/{name}", from.trim_end_matches('/'));
        let resp = reqwest::get(&url)
            .await
            .with_context(|| format!("fetching {url}"))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            bail!("fetching {url}: {}", resp.status());
        }
        Ok(Some(resp.bytes().await?.to_vec()))
    } else {
        let p = Path::new(from).join(name);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!("reading {}: {e}", p.display())),
        }
    }
}

/// The tarball SHA256SUMS names and its checksum.
fn tarball_of(sums: &str) -> Result<(String, String)> {
    for line in sums.lines() {
        let Some((sum, name)) = line.split_once("  ") else {
            continue;
        };
        let ok_name = name.starts_with("stacyvm-")
            && name.ends_with("-linux-x86_64.tar.gz")
            && !name.contains('/');
        if ok_name && sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok((name.to_string(), sum.to_ascii_lowercase()));
        }
    }
    bail!("SHA256SUMS names no stacyvm-*-linux-x86_64.tar.gz")
}

/// Checks the minisign signature of `sums` (a `.minisig` file's text)
/// with the public key file `pubkey`.
pub fn verify_signature(sums: &[u8], minisig: &str, pubkey: &Path) -> Result<()> {
    let text = std::fs::read_to_string(pubkey)
        .with_context(|| format!("reading the public key {}", pubkey.display()))?;
    let line = text
        .lines()
        .find(|l| !l.starts_with("untrusted comment:") && !l.trim().is_empty())
        .ok_or_else(|| anyhow!("{} holds no minisign public key", pubkey.display()))?;
    let pk = minisign_verify::PublicKey::from_base64(line.trim())
        .map_err(|e| anyhow!("{} is not a minisign public key: {e}", pubkey.display()))?;
    let sig = minisign_verify::Signature::decode(minisig)
        .map_err(|e| anyhow!("SHA256SUMS.minisig is not a minisign signature: {e}"))?;
    pk.verify(sums, &sig, false).map_err(|_| {
        anyhow!(
            "REFUSED: the signature of SHA256SUMS does not verify with {} (tampered, or signed by another key)",
            pubkey.display()
        )
    })
}

/// Fetches and verifies a release; answers the unpacked tarball's
/// directory (inside `work`).
async fn fetch_verified(args: &UpdateArgs, work: &Path) -> Result<PathBuf> {
    let sums = fetch(&args.from, "SHA256SUMS")
        .await?
        .ok_or_else(|| anyhow!("no SHA256SUMS at {}", args.from))?;
    let minisig = fetch(&args.from, "SHA256SUMS.minisig").await?;
    match (&minisig, &args.pubkey) {
        (Some(sig), Some(pk)) => {
            verify_signature(&sums, &String::from_utf8_lossy(sig), pk)?;
            eprintln!("update: signature verified with {}", pk.display());
        }
        (None, _) if args.require_signature => {
            bail!("REFUSED: the release is not signed and --require-signature is set")
        }
        (Some(_), None) if args.require_signature => {
            bail!("REFUSED: --require-signature needs --pubkey")
        }
        (Some(_), None) => {
            eprintln!("update: WARNING: the release is signed but no --pubkey was given: the signature is NOT checked")
        }
        (None, _) => {
            eprintln!("update: WARNING: the release is not signed: only its checksum is checked")
        }
    }
    let (name, want) = tarball_of(&String::from_utf8_lossy(&sums))?;
    let tarball = fetch(&args.from, &name)
        .await?
        .ok_or_else(|| anyhow!("{name} is not at {}", args.from))?;
    let got = hex::encode(Sha256::digest(&tarball));
    if got != want {
        bail!("REFUSED: {name} does not match its checksum");
    }
    eprintln!("update: checksum of {name} verified");
    let mut gz = flate2::read::GzDecoder::new(&tarball[..]);
    let mut raw = Vec::new();
    gz.read_to_end(&mut raw)
        .with_context(|| format!("{name} is not a whole gzip stream"))?;
    let mut ar = tar::Archive::new(&raw[..]);
    ar.set_preserve_permissions(true);
    ar.unpack(work)
        .with_context(|| format!("unpacking {name}"))?;
    let dir = work.join(name.trim_end_matches(".tar.gz"));
    for b in BINARIES {
        if !dir.join("bin").join(b).is_file() {
            bail!("{name} holds no bin/{b}");
        }
    }
    Ok(dir)
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Puts `src` at `dest`, keeping a different file there as `dest.bak`.
fn replace(src: &Path, dest: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let same = std::fs::read(dest).ok() == std::fs::read(src).ok();
    if dest.exists() && !same {
        let bak = PathBuf::from(format!("{}.bak", dest.display()));
        std::fs::copy(dest, &bak).with_context(|| format!("keeping {}", bak.display()))?;
    }
    let tmp = PathBuf::from(format!("{}.new", dest.display()));
    std::fs::copy(src, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("replacing {}", dest.display()))?;
    Ok(())
}

pub async fn update(args: &UpdateArgs) -> Result<ExitCode> {
    let root = args.root.clone();
    let current = under(&root, "/usr/local/bin/stacyvm");
    if !current.is_file() {
        bail!(
            "no stacyvm under {} (install first: install.sh --from …)",
            root.display()
        );
    }
    let work = tempfile::tempdir()?;
    let new = fetch_verified(args, work.path()).await?;
    let new_bin = new.join("bin/stacyvm");
    let (old_v, new_v) = (version_of(&current), version_of(&new_bin));
    // The new binary checks this install's config and database, and
    // applies its migrations to a scratch copy.
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| under(&root, "/etc/stacyvm/config.yaml"));
    let loaded = stacyvm_core::config::load(Some(&config), std::env::vars())
        .map_err(|e| anyhow!("{}: {e}: nothing was changed", config.display()))?;
    let db = loaded.config.sqlite_path();
    let out = if loaded.config.database.driver == "postgres" || db.exists() {
        Command::new(&new_bin)
            .args(["upgrade", "rehearse", "--config"])
            .arg(&config)
            .output()
            .context("running the new binary's upgrade rehearse")?
    } else {
        // Installed, never started: no database to migrate; the new
        // binary still has to accept the config.
        eprintln!(
            "update: no database at {} yet (never started): checking the config only",
            db.display()
        );
        Command::new(&new_bin)
            .args(["config", "lint", "-f"])
            .arg(&config)
            .output()
            .context("running the new binary's config lint")?
    };
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("the new binary's checks failed: nothing was changed");
    }
    eprintln!("update: the new binary's checks passed");
    let was_running = is_real_root(&root) && service_active();
    if !was_running {
        let pids = running_from(&current);
        if !pids.is_empty() {
            bail!(
                "stacyvm runs from {} outside systemd (pid {pids:?}): stop it first; nothing was changed",
                current.display()
            );
        }
    }
    if was_running {
        eprintln!("update: stopping stacyvm");
        systemctl(&["stop", "stacyvm"])?;
    }
    for b in BINARIES {
        replace(
            &new.join("bin").join(b),
            &under(&root, &format!("/usr/local/bin/{b}")),
            0o755,
        )?;
    }
    replace(
        &new.join("packaging/stacyvm.service"),
        &under(&root, UNIT),
        0o644,
    )?;
    if was_running {
        systemctl(&["daemon-reload"])?;
        systemctl(&["start", "stacyvm"])?;
    }
    println!(
        "updated {} -> {} (the previous binaries are kept as *.bak){}",
        if old_v.is_empty() { "?" } else { &old_v },
        new_v,
        if was_running {
            "; stacyvm restarted"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn uninstall(args: &UninstallArgs) -> Result<ExitCode> {
    let root = &args.root;
    if args.purge && !args.yes {
        bail!(
            "--purge deletes the config, the keys and every sandbox's data: add --yes to confirm"
        );
    }
    let data = under(root, "/var/lib/stacyvm");
    if args.purge {
        // Sandboxes left running would lose their state under them.
        let live = std::fs::read_dir(data.join("native/sandboxes"))
            .map(|d| d.count())
            .unwrap_or(0);
        if live > 0 {
            bail!(
                "{live} native sandbox(es) still exist under {}: destroy them first (stacyvm list; stacyvm kill …)",
                data.display()
            );
        }
    }
    if is_real_root(root) && Path::new("/run/systemd/system").is_dir() {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "stacyvm"])
            .status();
    }
    let mut removed = Vec::new();
    for p in [
        "/usr/local/bin/stacyvm",
        "/usr/local/bin/stacyvm.bak",
        "/usr/local/bin/stacyvm-agent",
        "/usr/local/bin/stacyvm-agent.bak",
        "/etc/systemd/system/stacyvm.service",
        "/etc/systemd/system/stacyvm.service.bak",
    ] {
        let f = under(root, p);
        match std::fs::remove_file(&f) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", f.display()),
        }
    }
    if is_real_root(root) && Path::new("/run/systemd/system").is_dir() {
        let _ = Command::new("systemctl").arg("daemon-reload").status();
    }
    if args.purge {
        for d in ["/etc/stacyvm", "/var/lib/stacyvm"] {
            let p = under(root, d);
            if p.exists() {
                std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
                removed.push(d);
            }
        }
    }
    if removed.is_empty() {
        println!("nothing of stacyvm under {}", root.display());
    } else {
        println!("removed: {}", removed.join(", "));
    }
    if !args.purge {
        println!(
            "kept /etc/stacyvm (config, keys) and /var/lib/stacyvm (data); `stacyvm uninstall --purge --yes` deletes them"
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_name_one_tarball() {
        let sums = format!(
            "{}  install.sh\n{}  stacyvm-1.2.3-linux-x86_64.tar.gz\n",
            "a".repeat(64),
            "B".repeat(64)
        );
        let (name, sum) = tarball_of(&sums).expect("tarball");
        assert_eq!(name, "stacyvm-1.2.3-linux-x86_64.tar.gz");
        assert_eq!(sum, "b".repeat(64));
        for bad in [
            format!("{}  ../stacyvm-1-linux-x86_64.tar.gz\n", "a".repeat(64)),
            format!("{}  stacyvm-1-linux-x86_64.tar.gz\n", "a".repeat(63)),
            "garbage\n".to_string(),
        ] {
            assert!(tarball_of(&bad).is_err(), "{bad}");
        }
    }
}
