//! Guest mode: the agent as `/init` of a microVM's initramfs.
//!
//! The kernel runs `/init` as PID 1 with no arguments. The agent then
//! - mounts `/proc`, `/sys` and `/dev` (devtmpfs),
//! - loads the kernel modules listed in `/lib/modules/load` (one `.ko` file
//!   name per line, in dependency order; the host writes the list when it
//!   builds the initramfs, see `stacyvm-providers` `microvm::kernel`),
//! - with `stacyvm.root=<dev>` (e.g. `vda`) on the kernel command line,
//!   mounts that ext4 disk as the new root and moves into it (the
//!   initramfs stays behind, unreachable), then mounts `/tmp`, `/run`,
//!   `/dev/shm` (tmpfs) and `/dev/pts` (for ptys) in it,
//! - brings `lo` up and, with `stacyvm.net=<ip>/<len>,<gateway>` (and
//!   `stacyvm.dns=<ip>,…`), addresses `eth0` (see `guestnet`),
//! - sets the hostname from `stacyvm.hostname=` on the kernel command line,
//! - takes the handshake token from `stacyvm.token=` (hex) on the kernel
//!   command line,
//! - serves the agent protocol on the virtio-serial port named
//!   `org.stacyvm.agent` (found under `/sys/class/virtio-ports`), one host
//!   connection after another, and reaps every child as PID 1.
//!
//! The token on the command line is readable by every process of the guest
//! (`/proc/cmdline`). It proves to the host that the answering agent is the
//! one it booted; guest processes cannot answer in its place because a
//! virtio-serial port can be opened only once and the agent holds it.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::exec::Reaper;

/// The name of the agent's virtio-serial port (`virtserialport,name=…`).
pub const PORT_NAME: &str = "org.stacyvm.agent";

static GUEST: AtomicBool = AtomicBool::new(false);

/// Whether this agent is the init of a microVM.
pub fn is_guest() -> bool {
    GUEST.load(Ordering::Relaxed)
}

/// Syncs and powers the machine off; never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Boots the guest and serves the host; returns only on a setup failure
/// (and then PID 1 powers off rather than exit, which would panic the kernel).
pub fn run() -> ExitCode {
    GUEST.store(true, Ordering::Relaxed);
    if let Err(e) = setup() {
        eprintln!("stacyvm-agent: guest setup failed: {e}");
        power_off();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(dev) = cmdline_value(&cmdline, "stacyvm.root") {
        if let Err(e) = switch_root(dev) {
            eprintln!("stacyvm-agent: guest root: {e}");
            power_off();
        }
    }
    if let Err(e) = mount_runtime_dirs() {
        eprintln!("stacyvm-agent: guest setup failed: {e}");
        power_off();
    }
    if let Some(list) = cmdline_value(&cmdline, "stacyvm.volumes") {
        if let Err(e) = mount_volumes(list) {
            // The spawn fails (no agent answers) with this on the console.
            eprintln!("stacyvm-agent: guest volumes: {e}");
            power_off();
        }
    }
    if let Err(e) = crate::guestnet::loopback_up() {
        eprintln!("stacyvm-agent: bringing lo up: {e}");
    }
    if let Some(net) = cmdline_value(&cmdline, "stacyvm.net") {
        let dns = cmdline_value(&cmdline, "stacyvm.dns");
        if let Err(e) =
            crate::guestnet::from_cmdline(net, dns).and_then(|n| crate::guestnet::configure(&n))
        {
            // A VM asked to be on the network and is not: no agent answers,
            // so the spawn fails with this line on the console.
            eprintln!("stacyvm-agent: guest network: {e}");
            power_off();
        }
    }
    if let Some(name) = cmdline_value(&cmdline, "stacyvm.hostname") {
        if let Err(e) = nix::unistd::sethostname(name) {
            eprintln!("stacyvm-agent: setting the hostname: {e}");
        }
    }
    if let Some(token) = cmdline_value(&cmdline, "stacyvm.token") {
        match hex::decode(token) {
            Ok(t) if !t.is_empty() => crate::server::set_token(t),
            _ => eprintln!("stacyvm-agent: stacyvm.token is not hex"),
        }
    }
    if cmdline_value(&cmdline, "stacyvm.transport") == Some("vsock") {
        // Firecracker: no virtio-serial, the host reaches us over vsock.
        serve_vsock(VSOCK_PORT);
        power_off();
    }
    let port = match wait_for_port(PORT_NAME, Duration::from_secs(30)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("stacyvm-agent: {e}");
            power_off();
        }
    };
    serve_port(&port);
    power_off();
}

/// The vsock port the agent listens on (`stacyvm.transport=vsock`).
pub const VSOCK_PORT: u32 = 1024;

/// Starts the reaper thread every serving loop needs.
fn start_reaper() -> Option<Arc<Reaper>> {
    stacyvm_sandbox::tune_allocator(2 << 20, 4 << 20);
    let reaper = Arc::new(Reaper::default());
    let r = reaper.clone();
    if crate::spawn_thread(move || r.run()).is_err() {
        eprintln!("stacyvm-agent: cannot start the reaper thread");
        return None;
    }
    Some(reaper)
}

/// Serves host connections on vsock `port`, one at a time (the host holds
/// one connection per VM; a new one replaces a dead one).
fn serve_vsock(port: u32) {
    let Some(reaper) = start_reaper() else {
        return;
    };
    let listener = match stacyvm_sandbox::VsockListener::bind(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stacyvm-agent: vsock port {port}: {e} (are the vsock modules loaded?)");
            return;
        }
    };
    eprintln!(
        "stacyvm-agent {} ready (guest, vsock port {port})",
        env!("CARGO_PKG_VERSION")
    );
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("stacyvm-agent: vsock accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Ok(write) = conn.try_clone() else {
            continue;
        };
        crate::server::handle_stream(
            &conn,
            Box::new(write),
            &reaper,
            true,
            crate::server::Greeting::Expect,
        );
    }
}

fn setup() -> Result<(), String> {
    for (what, dir, fstype, flags) in [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        ),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID),
    ] {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {dir}: {e}"))?;
        match mount(Some(what), dir, Some(fstype), flags, None::<&str>) {
            // The kernel may have mounted devtmpfs itself (DEVTMPFS_MOUNT).
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(format!("mounting {fstype} on {dir}: {e}")),
        }
    }
    load_modules(Path::new("/lib/modules"))
}

/// Mounts `/dev/<dev>` (ext4) and makes it `/`, moving `/proc`, `/sys`
/// and `/dev` along (what `switch_root` does; the initramfs is not freed,
/// it is small).
fn switch_root(dev: &str) -> Result<(), String> {
    if dev.is_empty() || dev.contains('/') || dev.starts_with('.') {
        return Err(format!("bad stacyvm.root device {dev:?}"));
    }
    let dev = Path::new("/dev").join(dev);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&dev).is_err() {
        if Instant::now() >= deadline {
            return Err(format!("{} did not appear", dev.display()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let new = Path::new("/newroot");
    std::fs::create_dir_all(new).map_err(|e| format!("creating /newroot: {e}"))?;
    mount(
        Some(&dev),
        new,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|e| format!("mounting {} (ext4): {e}", dev.display()))?;
    for d in ["proc", "sys", "dev"] {
        let target = new.join(d);
        std::fs::create_dir_all(&target).map_err(|e| format!("creating /{d} in the root: {e}"))?;
        mount(
            Some(Path::new("/").join(d).as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("moving /{d} into the root: {e}"))?;
    }
    std::env::set_current_dir(new).map_err(|e| format!("entering the root: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving the root to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("entering /: {e}"))
}

/// The guest's scratch filesystems (after any root switch): `/tmp`,
/// `/run` and `/dev/shm` as tmpfs, `/dev/pts` for ptys, `/workspace`.
fn mount_runtime_dirs() -> Result<(), String> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (what, dir, fstype, flags, data) in [
        ("tmpfs", "/tmp", "tmpfs", nosuid, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", nosuid, Some("mode=755")),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid, Some("mode=1777")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620"),
        ),
    ] {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {dir}: {e}"))?;
        match mount(Some(what), dir, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(format!("mounting {fstype} on {dir}: {e}")),
        }
    }
    // devtmpfs has its own ptmx node; ptys must come from /dev/pts.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    std::fs::create_dir_all("/workspace").map_err(|e| format!("creating /workspace: {e}"))
}

/// One volume disk of `stacyvm.volumes=`: `index:rw|ro:hexpath`.
#[derive(Debug, PartialEq, Eq)]
struct VolumeDisk {
    serial: String,
    read_only: bool,
    target: PathBuf,
}

fn parse_volumes(list: &str) -> Result<Vec<VolumeDisk>, String> {
    list.split(',')
        .map(|item| {
            let mut f = item.split(':');
            let (Some(i), Some(mode), Some(path), None) = (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(format!("bad volume entry {item:?}"));
            };
            let i: usize = i.parse().map_err(|_| format!("bad volume index {i:?}"))?;
            let read_only = match mode {
                "ro" => true,
                "rw" => false,
                m => return Err(format!("bad volume mode {m:?}")),
            };
            let path = hex::decode(path).map_err(|_| format!("bad volume path {path:?}"))?;
            let path = PathBuf::from(std::ffi::OsString::from_vec(path));
            if !path.is_absolute()
                || path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(format!("bad volume path {}", path.display()));
            }
            Ok(VolumeDisk {
                serial: format!("stacyvm_vol{i}"),
                read_only,
                target: path,
            })
        })
        .collect()
}

/// The `/dev` node of the virtio disk whose serial is `serial`.
fn disk_by_serial(serial: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/block").ok()?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("vd") {
            continue;
        }
        let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim_end_matches(['\0', '\n']) == serial {
            return Some(Path::new("/dev").join(name));
        }
    }
    None
}

/// Mounts each volume disk (ext4, its file system made by the host) at
/// its path: `nosuid,nodev`, read-only when asked.
fn mount_volumes(list: &str) -> Result<(), String> {
    for v in parse_volumes(list)? {
        let deadline = Instant::now() + Duration::from_secs(30);
        let dev = loop {
            if let Some(d) = disk_by_serial(&v.serial) {
                break d;
            }
            if Instant::now() >= deadline {
                return Err(format!("no disk with serial {} appeared", v.serial));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        std::fs::create_dir_all(&v.target)
            .map_err(|e| format!("creating {}: {e}", v.target.display()))?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
        if v.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(Some(&dev), &v.target, Some("ext4"), flags, None::<&str>)
            .map_err(|e| format!("mounting {} on {}: {e}", dev.display(), v.target.display()))?;
    }
    Ok(())
}

/// Sets the wall clock (see `Request::SetClock`).
pub fn set_clock(unix_nanos: i64) -> Result<(), String> {
    let ts = nix::sys::time::TimeSpec::new(
        unix_nanos.div_euclid(1_000_000_000),
        unix_nanos.rem_euclid(1_000_000_000),
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("setting the clock: {e}"))
}

/// A restored snapshot's new identity (see `Request::Reidentify`).
pub fn reidentify(
    hostname: &str,
    unix_nanos: i64,
    seed: &str,
    net: Option<&stacyvm_agent_proto::GuestNet>,
) -> Result<(), String> {
    if hostname.is_empty() || hostname.len() > 64 || hostname.contains(['/', '\0']) {
        return Err(format!("bad hostname {hostname:?}"));
    }
    nix::unistd::sethostname(hostname).map_err(|e| format!("setting the hostname: {e}"))?;
    set_clock(unix_nanos)?;
    let seed = hex::decode(seed).map_err(|e| format!("seed is not hex: {e}"))?;
    if seed.len() < 32 {
        return Err("the seed must be at least 32 bytes".into());
    }
    stacyvm_sandbox::reseed_random(&seed).map_err(|e| format!("reseeding the CRNG: {e}"))?;
    // systemd-style images keep an id per machine: a clone gets its own.
    if std::fs::metadata("/etc/machine-id").is_ok_and(|m| m.is_file()) {
        let mut id = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
            .map_err(|e| format!("reading /dev/urandom: {e}"))?;
        std::fs::write("/etc/machine-id", format!("{}\n", hex::encode(id)))
            .map_err(|e| format!("writing /etc/machine-id: {e}"))?;
    }
    if let Some(net) = net {
        crate::guestnet::configure(net).map_err(|e| format!("network: {e}"))?;
    }
    eprintln!("stacyvm-agent: restored from a snapshot as {hostname}");
    Ok(())
}

/// Loads the modules named in `dir/load`, in order. A module already
/// present (built in, or loaded twice) is not an error.
fn load_modules(dir: &Path) -> Result<(), String> {
    let list = match std::fs::read_to_string(dir.join("load")) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("reading {}/load: {e}", dir.display())),
    };
    let no_params = CString::default();
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let f = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        match nix::kmod::finit_module(&f, &no_params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("loading {}: {e}", path.display())),
        }
    }
    Ok(())
}

/// The value of `key=value` on a kernel command line.
fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Finds the device of the virtio-serial port called `name`, waiting for
/// the driver to probe it and devtmpfs to create the node.
fn wait_for_port(name: &str, timeout: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let Ok(n) = std::fs::read_to_string(e.path().join("name")) else {
                    continue;
                };
                if n.trim() == name {
                    let dev = Path::new("/dev").join(e.file_name());
                    if std::fs::metadata(&dev).is_ok() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no virtio-serial port named {name}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Serves one host connection after another on the port. While no host is
/// connected a read of the port returns end-of-file at once (and `poll`
/// reports a hang-up), so the agent retries every 10 ms.
fn serve_port(port: &Path) {
    let Some(reaper) = start_reaper() else {
        return;
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("stacyvm-agent: opening {}: {e}", port.display());
            return;
        }
    };
    eprintln!(
        "stacyvm-agent {} ready (guest, port {})",
        env!("CARGO_PKG_VERSION"),
        port.display()
    );
    loop {
        let Ok(write) = file.try_clone() else {
            return;
        };
        crate::server::handle_stream(
            &file,
            Box::new(write),
            &reaper,
            true,
            crate::server::Greeting::Expect,
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_lists_are_parsed_and_checked() {
        let v = parse_volumes("0:rw:2f64617461,1:ro:2f6f70742f782079").expect("parsed");
        assert_eq!(
            v,
            vec![
                VolumeDisk {
                    serial: "stacyvm_vol0".into(),
                    read_only: false,
                    target: "/data".into()
                },
                VolumeDisk {
                    serial: "stacyvm_vol1".into(),
                    read_only: true,
                    target: "/opt/x y".into()
                },
            ]
        );
        for bad in [
            "0:rw",
            "0:rw:2f64:extra",
            "x:rw:2f64",
            "0:wr:2f64",
            "0:rw:zz",
            "0:rw:64617461",     // "data": not absolute
            "0:rw:2f2e2e2f6574", // "/../et"
        ] {
            assert!(parse_volumes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cmdline_values() {
        let c = "console=hvc0 quiet stacyvm.hostname=sb-1 stacyvm.token=abcd\n";
        assert_eq!(cmdline_value(c, "stacyvm.hostname"), Some("sb-1"));
        assert_eq!(cmdline_value(c, "stacyvm.token"), Some("abcd"));
        assert_eq!(cmdline_value(c, "stacyvm.host"), None);
        assert_eq!(cmdline_value(c, "quiet"), None);
    }

    #[test]
    fn a_missing_module_list_loads_nothing() {
        let d = tempfile_dir();
        assert_eq!(load_modules(&d), Ok(()));
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("stacyvm-guest-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("test step");
        d
    }
}
