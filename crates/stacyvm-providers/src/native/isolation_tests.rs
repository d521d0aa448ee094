//! Escape attempts from inside a native sandbox. Each must fail.

use std::sync::Arc;
use std::time::Duration;

use stacyvm_core::paths;
use stacyvm_core::provider::{ExecSpec, Provider, SpawnSpec};

use super::tests::fixture;
use crate::conformance::{run_spec, sh, Ran};

async fn spawn_with(p: &dyn Provider, memory_mb: i64) -> String {
    spawn_net(p, memory_mb, "").await
}

pub(crate) async fn spawn_net(p: &dyn Provider, memory_mb: i64, network_mode: &str) -> String {
    let id = paths::new_sandbox_id();
    let spec = SpawnSpec {
        id: id.clone(),
        image: "host".into(),
        memory_mb,
        vcpus: 1,
        metadata: Default::default(),
        owner_id: String::new(),
        tenant_id: String::new(),
        expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
        network_mode: network_mode.into(),
        snapshot: None,
        egress: None,
        volumes: Vec::new(),
    };
    p.spawn(&spec).await.expect("spawn");
    id
}

async fn run(
    p: &dyn Provider,
    id: &str,
    script: &str,
    timeout: Duration,
) -> stacyvm_core::Result<Ran> {
    let argv = paths::build_argv("shell", script, &[]).expect("argv");
    run_spec(
        p,
        id,
        ExecSpec {
            argv,
            timeout: Some(timeout),
            ..Default::default()
        },
    )
    .await
}

/// Runs a Python snippet and returns its stdout.
pub(crate) async fn py(p: &dyn Provider, id: &str, code: &str) -> Ran {
    let spec = ExecSpec {
        argv: vec!["python3".into(), "-c".into(), code.into()],
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    run_spec(p, id, spec).await.expect("python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_processes_and_files_are_invisible() {
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(fx.make());
    let id = spawn_with(p.as_ref(), 256).await;
    // A host process with a unique argument.
    let marker = format!(
        "{}.{}",
        3000 + std::process::id() % 1000,
        std::process::id()
    );
    let mut host_child = std::process::Command::new("sleep")
        .arg(&marker)
        .spawn()
        .expect("host sleep");
    let r = sh(
        p.as_ref(),
        &id,
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
    )
    .await;
    assert!(
        !r.stdout.contains(&marker),
        "host process visible: {}",
        r.stdout
    );
    let nprocs: usize = r
        .stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("count");
    assert!(
        nprocs < 10,
        "only the sandbox's processes are visible, saw {nprocs}"
    );
    let _ = host_child.kill();
    let _ = host_child.wait();
    // A file the test creates in /root on the host.
    let root_marker = format!("/root/stacyvm-isolation-{}", paths::new_sandbox_id());
    std::fs::write(&root_marker, "host secret").expect("write /root marker");
    let r = sh(
        p.as_ref(),
        &id,
        &format!("cat {root_marker}; ls -A /root | wc -l; ls -A /home; cat /etc/shadow | wc -c"),
    )
    .await;
    let _ = std::fs::remove_file(&root_marker);
    assert!(
        !r.stdout.contains("host secret"),
        "host /root readable: {r:?}"
    );
    assert_eq!(
        r.stdout.split_whitespace().collect::<Vec<_>>(),
        ["0", "user", "0"],
        "/root empty, /home only the image's own user, /etc/shadow masked: {r:?}"
    );
    assert_eq!(
        sh(p.as_ref(), &id, "hostname").await.stdout.trim(),
        id,
        "hostname is the sandbox id"
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_operations_fail() {
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(fx.make());
    let id = spawn_with(p.as_ref(), 256).await;
    for (what, script) in [
        ("mount", "mount -t tmpfs none /mnt"),
        ("umount", "umount /proc"),
        ("unshare", "unshare -m true"),
        ("unshare user ns", "unshare -U true"),
        ("write image layer", "touch /usr/bin/stacyvm-escape"),
        ("sysctl", "echo 1 > /proc/sys/kernel/panic"),
        ("ptrace pid 1 via /proc", "cat /proc/1/environ"),
        ("sysrq", "echo b > /proc/sysrq-trigger"),
        ("chroot", "chroot / true"),
        ("mknod", "mknod /tmp/sda b 8 0"),
    ] {
        let r = run(p.as_ref(), &id, script, Duration::from_secs(20))
            .await
            .expect(what);
        assert_ne!(r.code, 0, "{what} must fail: {r:?}");
    }
    // Syscalls straight from Python: each must return -1.
    let r = py(p.as_ref(), &id, r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
calls = {"init_module": (175, 0, 0, 0), "finit_module": (313, 0, 0, 0), "delete_module": (176, 0, 0),
         "ptrace_attach_pid1": (101, 16, 1, 0, 0), "unshare_net": (272, 0x40000000), "setns": (308, 0, 0),
         "mount": (165, 0, 0, 0, 0, 0), "kexec_load": (246, 0, 0, 0, 0), "bpf": (321, 0, 0, 0),
         "reboot": (169, 0xfee1dead, 672274793, 0x1234567, 0)}
print(" ".join(f"{k}={libc.syscall(*v)}" for k, v in calls.items()))
"#).await;
    for part in r.stdout.split_whitespace() {
        assert!(
            part.ends_with("=-1"),
            "syscall allowed: {part} ({})",
            r.stdout
        );
    }
    assert_eq!(r.stdout.split_whitespace().count(), 10, "{r:?}");
    // Raw sockets need CAP_NET_RAW, which is dropped.
    let r = py(p.as_ref(), &id, "import socket\ntry:\n  socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print('raw ok')\nexcept PermissionError: print('denied')").await;
    assert_eq!(r.stdout.trim(), "denied");
    // No dangerous capability is effective.
    let r = sh(p.as_ref(), &id, "grep CapEff /proc/self/status | cut -f2").await;
    let eff = u64::from_str_radix(r.stdout.trim(), 16).expect("hex caps");
    for bit in [
        21u32, /* SYS_ADMIN */
        19,    /* SYS_PTRACE */
        16,    /* SYS_MODULE */
        13,    /* NET_RAW */
        12,    /* NET_ADMIN */
        27,    /* MKNOD */
    ] {
        assert_eq!(
            eff & (1 << bit),
            0,
            "capability bit {bit} must be dropped (CapEff {eff:x})"
        );
    }
    let r = sh(
        p.as_ref(),
        &id,
        "grep NoNewPrivs /proc/self/status | cut -f2; grep Seccomp: /proc/self/status | cut -f2",
    )
    .await;
    assert_eq!(
        r.stdout.split_whitespace().collect::<Vec<_>>(),
        ["1", "2"],
        "no_new_privs and a seccomp filter"
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_has_only_loopback() {
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(fx.make());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("host listener");
    let port = listener.local_addr().expect("addr").port();
    let id = spawn_with(p.as_ref(), 256).await;
    let code = format!(
        "import socket\ns = socket.socket(); s.settimeout(3)\ntry:\n  s.connect(('127.0.0.1', {port})); print('reached host')\nexcept OSError as e: print('blocked', e.errno)\n\
         l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(); c = socket.create_connection(l.getsockname()); print('loopback ok')"
    );
    let r = py(p.as_ref(), &id, &code).await;
    assert!(r.stdout.contains("blocked"), "host port reachable: {r:?}");
    assert!(
        r.stdout.contains("loopback ok"),
        "sandbox loopback works: {r:?}"
    );
    let r = sh(p.as_ref(), &id, "tail -n +2 /proc/net/route | wc -l; ls /sys/class/net 2>/dev/null || cat /proc/net/dev | tail -n +3 | cut -d: -f1").await;
    assert_eq!(
        r.stdout.lines().next().map(str::trim),
        Some("0"),
        "no routes: {r:?}"
    );
    drop(listener);
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained() {
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(fx.make());
    let id = spawn_with(p.as_ref(), 256).await;
    let bombed = p.clone();
    let bomb_id = id.clone();
    // The bomb keeps replicating inside its pids limit; its exec ends with
    // an exit status or the timeout, never by taking the host down.
    let bomb = tokio::spawn(async move {
        run(
            bombed.as_ref(),
            &bomb_id,
            "bomb() { bomb | bomb & }; bomb 2>/dev/null; sleep 2; echo done",
            Duration::from_secs(5),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Meanwhile another sandbox works.
    let other = spawn_with(p.as_ref(), 256).await;
    assert_eq!(sh(p.as_ref(), &other, "echo fine").await.stdout, "fine\n");
    match bomb.await.expect("bomb task") {
        Ok(_) => {}
        Err(e) => assert!(
            matches!(
                e.kind(),
                stacyvm_core::ErrorKind::ExecTimeout | stacyvm_core::ErrorKind::ResourceLimit
            ),
            "{e}"
        ),
    }
    let meta = fx.make().meta(&id).expect("meta");
    let pids: Vec<u64> = meta
        .cgroups
        .iter()
        .filter_map(|d| {
            std::fs::read_to_string(d.join("pids.current"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    assert!(!pids.is_empty(), "pids cgroup present");
    assert!(pids.iter().all(|n| *n <= 512), "pids limit holds: {pids:?}");
    // Destroy ends the bomb completely.
    p.destroy(&id).await.expect("destroy bombed sandbox");
    assert!(!super::pid_alive(meta.init_pid));
    assert!(meta.cgroups.iter().all(|d| !d.exists()), "cgroups removed");
    p.destroy(&other).await.expect("destroy other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_a_clean_exec_result() {
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(fx.make());
    let id = spawn_with(p.as_ref(), 128).await;
    let r = py(
        p.as_ref(),
        &id,
        "x = bytearray(1024 * 1024 * 1024)\nprint('allocated', len(x))",
    )
    .await;
    assert_ne!(r.code, 0, "1 GiB in a 128 MiB sandbox must fail: {r:?}");
    assert!(!r.stdout.contains("allocated"));
    assert_eq!(
        sh(p.as_ref(), &id, "echo still alive").await.stdout,
        "still alive\n",
        "the agent survives the OOM"
    );
    p.destroy(&id).await.expect("destroy");
}

/// Host mounts under `dir` (other tests, e.g. Docker's, mount elsewhere
/// concurrently, so the whole table cannot be compared).
fn host_mounts_under(dir: &std::path::Path) -> Vec<String> {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)))
        .map(str::to_string)
        .collect()
}

fn cgroup_dirs_of(id: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let p = e.path();
                if p.file_name().is_some_and(|n| n == id) {
                    out.push(p.clone());
                }
                if p.components().count() < 12 {
                    stack.push(p);
                }
            }
        }
    }
    out
}

/// 100 spawn/exec/destroy cycles, every other one in `bridge` mode: every
/// sandbox's processes, cgroups, veth, address lease, state dir and mounts
/// are gone afterwards. (Counts are per sandbox so tests running in
/// parallel do not disturb them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_cycles_leak_nothing() {
    let fx = fixture();
    let p = fx.make();
    let mut seen = Vec::new();
    for i in 0..100 {
        let mode = if i % 2 == 0 { "none" } else { "bridge" };
        let id = spawn_net(&p, 64, mode).await;
        assert_eq!(sh(&p, &id, "echo x").await.stdout, "x\n");
        let meta = p.meta(&id).expect("meta");
        assert_eq!(meta.net.is_some(), mode == "bridge");
        p.destroy(&id).await.expect("destroy");
        seen.push((id, meta));
    }
    let leaked = host_mounts_under(&fx.state_dir());
    assert!(leaked.is_empty(), "host mounts leaked: {leaked:?}");
    for (id, meta) in &seen {
        assert!(!super::pid_alive(meta.init_pid), "init of {id} still alive");
        if let Some(att) = &meta.net {
            let veth = std::path::Path::new("/sys/class/net").join(&att.host_if);
            assert!(!veth.exists(), "veth of {id} leaked");
            let lease = std::path::Path::new("/run/stacyvm/net")
                .join(&att.bridge)
                .join(att.ip.to_string());
            assert!(!lease.exists(), "address lease of {id} leaked");
        }
        let dirs = cgroup_dirs_of(id);
        assert!(dirs.is_empty(), "cgroups of {id} leaked: {dirs:?}");
    }
    let left: Vec<_> = std::fs::read_dir(fx.state_dir().join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "sandbox dirs leaked: {left:?}");
}

/// Runs a command on the host; panics with its stderr on failure.
pub(crate) fn host(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test's own bridge and the world around it, all removed on drop.
///
/// Sandbox traffic from the lab's subnet is routed by a policy rule into a
/// table of the lab's own whose default route is `unreachable`: it can only
/// ever reach the namespaces below, never a real network, whatever address
/// a probe names. (Traffic *to* the subnet, such as the egress proxy's
/// replies, keeps the main table, where the bridge's route is; the proxy's
/// own connections leave from the bridge address and so take the lab's.)
/// - `outside` (netns): stands in for the internet; holds 192.88.99.n and
///   192.88.99.(n+1) (globally reachable per IANA, in no blocked range; the
///   second is listed in `egress_deny`), listening on TCP 8080;
/// - `lan` (netns): cloud metadata (169.254.169.254, 100.100.100.200),
///   private addresses (192.168.n.10 allowed, .12 allowed then denied, .20
///   not allowed) and a "resolver" at 172.31.n.53; every address listens on
///   TCP 53 and 80.
pub(crate) struct Lab {
    pub(crate) n: u32,
    pub(crate) bridge: String,
    table: u32,
    pub(crate) outside_ns: String,
    pub(crate) lan_ns: String,
    docker: Option<String>,
    children: Vec<std::process::Child>,
    _resolv: tempfile::NamedTempFile,
    resolv_path: std::path::PathBuf,
}

impl Lab {
    pub(crate) fn new() -> Lab {
        // One number per live lab on this host (tests of several providers
        // run labs at once): claimed with O_EXCL, freed on drop.
        std::fs::create_dir_all(LAB_CLAIMS).expect("lab claims dir");
        let start = std::process::id() % 200;
        let n = (0..200)
            .map(|i| (start + i) % 200 + 20)
            .find(|n| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(format!("{LAB_CLAIMS}/{n}"))
                    .is_ok()
            })
            .expect("a free lab number");
        let mut resolv = tempfile::NamedTempFile::new().expect("resolv.conf");
        std::io::Write::write_all(
            &mut resolv,
            format!("nameserver 172.31.{n}.53\nnameserver 127.0.0.53\n").as_bytes(),
        )
        .expect("write resolv.conf");
        let lab = Lab {
            n,
            bridge: format!("svmeg{n}"),
            table: 7100 + n,
            outside_ns: format!("svmt-out-{n}"),
            lan_ns: format!("svmt-lan-{n}"),
            docker: None,
            children: Vec::new(),
            resolv_path: resolv.path().to_path_buf(),
            _resolv: resolv,
        };
        lab.cleanup();
        host(&format!(
            "set -e
             ip rule add to 10.89.{n}.0/24 lookup main priority {t0}
             ip rule add from 10.89.{n}.0/24 lookup {t} priority {t}
             ip route add unreachable default table {t}
             ip netns add {o}
             ip link add svmto{n} type veth peer name eth0 netns {o}
             ip addr add 10.214.{n}.1/30 dev svmto{n}; ip link set svmto{n} up
             ip -n {o} addr add 10.214.{n}.2/30 dev eth0
             ip -n {o} addr add 192.88.99.{n}/32 dev eth0
             ip -n {o} addr add 192.88.99.{m}/32 dev eth0
             ip -n {o} link set eth0 up; ip -n {o} link set lo up
             ip route add 192.88.99.{n}/32 via 10.214.{n}.2 table {t}
             ip route add 192.88.99.{m}/32 via 10.214.{n}.2 table {t}
             ip netns add {l}
             ip link add svmtl{n} type veth peer name eth0 netns {l}
             ip addr add 10.215.{n}.1/30 dev svmtl{n}; ip link set svmtl{n} up
             ip -n {l} addr add 10.215.{n}.2/30 dev eth0
             ip route add 10.215.{n}.2/32 dev svmtl{n} table {t}
             for a in 169.254.169.254 100.100.100.200 192.168.{n}.10 192.168.{n}.12 192.168.{n}.20 172.31.{n}.53; do
               ip -n {l} addr add $a/32 dev eth0
               ip route add $a/32 via 10.215.{n}.2 table {t}
             done
             ip -n {l} link set eth0 up; ip -n {l} link set lo up
             ip -n {l} route add default via 10.215.{n}.1
             ip -n {o} route add default via 10.214.{n}.1",
            t = lab.table,
            t0 = lab.table - 1000,
            o = lab.outside_ns,
            l = lab.lan_ns,
            m = n + 1,
        ));
        lab
    }

    /// Starts a server in `ns` on every address: each TCP connection to one
    /// of `ports` gets `<peer address>\n` back.
    pub(crate) fn serve(&mut self, ns: &str, ports: &[u16]) {
        let code = format!(
            "import socket, threading\n\
             def serve(port):\n  l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n  \
             l.bind(('0.0.0.0', port)); l.listen(16)\n  while True:\n    c, a = l.accept(); c.sendall((a[0] + '\\n').encode()); c.close()\n\
             for p in {ports:?}: threading.Thread(target=serve, args=(p,)).start()\n"
        );
        self.spawn_in(ns, &code);
    }

    /// Runs a Python program in `ns` until the lab is dropped.
    pub(crate) fn spawn_in(&mut self, ns: &str, code: &str) {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", code])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("lab server");
        self.children.push(child);
    }

    /// A plain container on Docker's default bridge with a listener on
    /// 8080; its address. Needs dockerd (as the docker tests do).
    fn docker_listener(&mut self) -> String {
        let image = "stacyvm-test/native-egress-busybox:1";
        let has = std::process::Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .expect("docker CLI (apt-get install docker.io)");
        if !has.status.success() {
            // No pulls here: import busybox-static as a one-file image.
            host(&format!(
                "d=$(mktemp -d) && mkdir $d/bin && cp /bin/busybox $d/bin/ && \
                 tar -C $d -c . | docker import - {image} >/dev/null && rm -rf $d"
            ));
        }
        let name = format!("svmt-egress-{}", self.n);
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &name])
            .output();
        host(&format!(
            "docker run -d --name {name} --network bridge {image} /bin/busybox nc -ll -p 8080 -e /bin/busybox echo docker >/dev/null"
        ));
        self.docker = Some(name.clone());
        let ip = host(&format!(
            "docker inspect -f '{{{{.NetworkSettings.IPAddress}}}}' {name}"
        ))
        .trim()
        .to_string();
        assert!(!ip.is_empty(), "container {name} has no address");
        host(&format!(
            "ip route add {ip}/32 dev docker0 table {}",
            self.table
        ));
        ip
    }

    fn cleanup(&self) {
        let n = self.n;
        let quiet = |cmd: String| {
            let _ = std::process::Command::new("sh").args(["-c", &cmd]).output();
        };
        if let Some(name) = &self.docker {
            quiet(format!("docker rm -f {name}"));
        }
        quiet(format!(
            "ip netns del {}; ip netns del {}; ip link del svmto{n}; ip link del svmtl{n}",
            self.outside_ns, self.lan_ns
        ));
        quiet(format!(
            "iptables -w -D DOCKER-USER -i {} -d 192.88.99.{n}/32 -j DROP",
            self.bridge
        ));
        for spec in super::net::forward_rules(&self.bridge) {
            for _ in 0..8 {
                let ok = std::process::Command::new("iptables")
                    .args(["-w", "-D", "FORWARD"])
                    .args(&spec)
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !ok {
                    break;
                }
            }
        }
        // Rules of sandboxes a failed test left behind.
        crate::egress::prune(&self.bridge, |_| false);
        quiet(format!(
            "nft delete table inet stacyvm_{b}; nft delete table ip stacyvm_{b}; \
             nft delete table bridge stacyvm_{b}; \
             ip link del {b}; rm -rf /run/stacyvm/net/{b}",
            b = self.bridge
        ));
        // The rule goes last: until then nothing from the lab leaves the host.
        quiet(format!(
            "ip route flush table {t}; ip rule del priority {t}; ip rule del priority {t0}",
            t = self.table,
            t0 = self.table - 1000,
        ));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cleanup();
        let _ = std::fs::remove_file(format!("{LAB_CLAIMS}/{}", self.n));
    }
}

/// Where labs claim their numbers.
const LAB_CLAIMS: &str = "/run/stacyvm-test-labs";

impl Lab {
    /// The lab's bridge: subnet 10.89.n.0/24, 192.168.n.0/28 allowed,
    /// 192.168.n.12 and 192.88.99.(n+1) denied, the lab's resolver.
    pub(crate) fn bridge_options(&self) -> super::net::BridgeOptions {
        let n = self.n;
        let cidrs = |l: &[&str]| -> Vec<stacyvm_core::cidr::Cidr> {
            l.iter().map(|c| c.parse().expect("cidr")).collect()
        };
        super::net::BridgeOptions {
            name: self.bridge.clone(),
            subnet: super::net::Subnet::parse(&format!("10.89.{n}.0/24")).expect("subnet"),
            egress_allow: cidrs(&[&format!("192.168.{n}.0/28")]),
            egress_deny: cidrs(&[
                &format!("192.168.{n}.12/32"),
                &format!("192.88.99.{}", n + 1),
            ]),
            resolv_conf: self.resolv_path.clone(),
        }
    }
}

/// A provider like the fixture's, on the lab's bridge.
pub(crate) fn lab_provider(fx: &super::tests::Fixture, lab: &Lab) -> super::NativeProvider {
    super::NativeProvider::new(super::NativeOptions {
        state_dir: fx.state_dir(),
        agent_path: super::find_agent("").expect("stacyvm-agent next to the test binary"),
        pids_limit: 512,
        hidden: vec![],
        network_mode: "none".into(),
        bridge: lab.bridge_options(),
        warm_pool: 0,
        pool_memory_mb: 256,
        landlock: false,
        user_namespace: true,
        subordinate_ids: super::ids::IdRange::parse(super::ids::DEFAULT_RANGE).expect("range"),
        disk: fx.disk,
    })
    .expect("native provider on the lab bridge")
}

/// Connects, in parallel threads, to each `label=host:port` target (IPv6
/// hosts in brackets) and prints `label=<first line received>` or
/// `label=blocked`.
fn probe_script(targets: &[(String, String, u16)]) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|(l, h, p)| format!("({l:?}, {h:?}, {p})"))
        .collect();
    format!(
        "import socket, threading\nres = {{}}\n\
         def go(label, host, port):\n  try:\n    \
         c = socket.create_connection((host, port), timeout=3); res[label] = c.makefile().readline().strip() or 'connected'\n  \
         except OSError: res[label] = 'blocked'\n\
         ts = [threading.Thread(target=go, args=t) for t in [{}]]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n\
         print(' '.join(f'{{k}}={{v}}' for k, v in sorted(res.items())))",
        list.join(", ")
    )
}

/// `bridge` mode reaches the public internet and nothing else (F-7): from
/// a sandbox, an outside host (public address, through NAT) answers and
/// sees the host's address; cloud metadata, private and reserved ranges,
/// a Docker container, the host on any of its addresses (IPv4 or IPv6)
/// and another sandbox do not. `egress_allow` opens a private address,
/// `egress_deny` beats it and closes a public one, the configured resolver
/// answers on port 53 only, Docker's `DOCKER-USER` judges the traffic
/// before StacyVM's FORWARD accept. Destroy removes veth and lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_mode_reaches_only_the_public_internet() {
    let mut lab = Lab::new();
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(lab_provider(&fx, &lab));
    let n = lab.n;
    let (outside, lan) = (lab.outside_ns.clone(), lab.lan_ns.clone());
    lab.serve(&outside, &[8080]);
    lab.serve(&lan, &[53, 80]);
    let docker_ip = lab.docker_listener();
    let host_listener = std::net::TcpListener::bind("[::]:0").expect("host listener");
    let host_port = host_listener.local_addr().expect("addr").port();
    std::thread::sleep(Duration::from_millis(500));
    // Positive controls: the listeners answer where the filter does not apply.
    let r = host(&format!(
        "ip netns exec {lan} python3 -c \"import socket; print(socket.create_connection(('169.254.169.254', 80), timeout=3).makefile().readline().strip())\"; \
         busybox nc -w 3 {docker_ip} 8080 </dev/null"
    ));
    assert_eq!(
        r.split_whitespace().collect::<Vec<_>>(),
        ["169.254.169.254", "docker"],
        "{r}"
    );

    let a = spawn_net(p.as_ref(), 256, "bridge").await;
    let b = spawn_net(p.as_ref(), 256, "bridge").await;
    let addr_of = |r: &Ran| -> String {
        r.stdout
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_string()
    };
    let ra = sh(p.as_ref(), &a, "ip -4 -o addr show dev eth0").await;
    let ip_a = addr_of(&ra);
    let prefix = format!("10.89.{n}.");
    assert!(ip_a.starts_with(&prefix), "eth0 of a: {ra:?}");
    let rb = sh(p.as_ref(), &b, "ip -4 -o addr show dev eth0").await;
    let ip_b = addr_of(&rb);
    assert!(
        ip_b.starts_with(&prefix) && ip_b != ip_a,
        "eth0 of b: {rb:?}"
    );

    // No IPv6 on eth0 (not even link-local); loopback keeps ::1.
    let r = sh(p.as_ref(), &a, "cat /proc/net/if_inet6").await;
    assert!(!r.stdout.contains("eth0"), "IPv6 on eth0: {r:?}");
    assert!(r.stdout.contains(" lo"), "::1 on lo: {r:?}");

    // Every host address (IPv4 and IPv6), bridge link-local included.
    let mut targets: Vec<(String, String, u16)> = Vec::new();
    let addrs = host("ip -o addr show | awk '{print $2, $4}'");
    for line in addrs.lines() {
        let mut w = line.split_whitespace();
        let (Some(dev), Some(cidr)) = (w.next(), w.next()) else {
            continue;
        };
        let ip = cidr.split('/').next().unwrap_or_default();
        if dev == "lo" {
            continue;
        }
        let h = if ip.starts_with("fe80:") {
            format!("{ip}%eth0")
        } else {
            ip.to_string()
        };
        targets.push((format!("host-{dev}-{ip}"), h, host_port));
    }
    assert!(targets.iter().any(|t| t.0.contains("svmto")), "{addrs}");
    let public = format!("192.88.99.{n}");
    for (label, h, port) in [
        ("public", public.clone(), 8080),
        ("denied-public", format!("192.88.99.{}", n + 1), 8080),
        ("metadata", "169.254.169.254".to_string(), 80),
        ("alibaba-metadata", "100.100.100.200".to_string(), 80),
        ("allowed-private", format!("192.168.{n}.10"), 80),
        ("denied-private", format!("192.168.{n}.12"), 80),
        ("private", format!("192.168.{n}.20"), 80),
        ("lan-peer", format!("10.215.{n}.2"), 80),
        ("resolver-dns", format!("172.31.{n}.53"), 53),
        ("resolver-http", format!("172.31.{n}.53"), 80),
        ("docker", docker_ip.clone(), 8080),
        ("v6-metadata", "fd00:ec2::254".to_string(), 80),
    ] {
        targets.push((label.to_string(), h, port));
    }
    let r = py(p.as_ref(), &a, &probe_script(&targets)).await;
    let got: std::collections::BTreeMap<&str, &str> = r
        .stdout
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(got.len(), targets.len(), "{r:?}");
    for (label, _, _) in &targets {
        let v = got.get(label.as_str()).copied().unwrap_or_default();
        let want_open = matches!(
            label.as_str(),
            "public" | "allowed-private" | "resolver-dns"
        );
        if want_open {
            assert_ne!(v, "blocked", "{label} must be reachable: {r:?}");
        } else {
            assert_eq!(v, "blocked", "{label} must be unreachable: {r:?}");
        }
    }
    // Through NAT: the outside sees the host's address, not the sandbox's.
    assert_eq!(
        got.get("public"),
        Some(&format!("10.214.{n}.1").as_str()),
        "{r:?}"
    );

    // Docker's DOCKER-USER judges the bridge's traffic before StacyVM's
    // accept (which sits at the end of FORWARD).
    if host("iptables -w -S DOCKER-USER 2>/dev/null || true").contains("-N DOCKER-USER") {
        host(&format!(
            "iptables -w -I DOCKER-USER -i {} -d {public}/32 -j DROP",
            lab.bridge
        ));
        let one = [("public".to_string(), public.clone(), 8080)];
        let r = py(p.as_ref(), &a, &probe_script(&one)).await;
        assert_eq!(
            r.stdout.trim(),
            "public=blocked",
            "DOCKER-USER bypassed: {r:?}"
        );
        host(&format!(
            "iptables -w -D DOCKER-USER -i {} -d {public}/32 -j DROP",
            lab.bridge
        ));
        let r = py(p.as_ref(), &a, &probe_script(&one)).await;
        assert_ne!(r.stdout.trim(), "public=blocked", "{r:?}");
    }

    // Not the other sandbox, even though it listens on its eth0.
    let listen = format!(
        "import socket, time\nl = socket.socket(); l.bind(('{ip_b}', 9000)); l.listen(); l.settimeout(6)\n\
         try:\n  c, _ = l.accept(); print('accepted')\nexcept OSError: print('nobody')"
    );
    let pb = p.clone();
    let b2 = b.clone();
    let listening = tokio::spawn(async move { py(pb.as_ref(), &b2, &listen).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peer = [("peer".to_string(), ip_b.clone(), 9000)];
    let r = py(p.as_ref(), &a, &probe_script(&peer)).await;
    assert_eq!(r.stdout.trim(), "peer=blocked", "peer sandbox: {r:?}");
    let r = listening.await.expect("listener task");
    assert_eq!(r.stdout.trim(), "nobody", "{r:?}");
    // A sandbox has no NET_ADMIN: it can change neither its address nor IPv6.
    let r = sh(
        p.as_ref(),
        &a,
        &format!("ip addr add 10.89.{n}.250/24 dev eth0"),
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    let r = sh(
        p.as_ref(),
        &a,
        "echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6",
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    drop(host_listener);

    let if_a = super::net::host_if_name(&a);
    assert!(std::path::Path::new("/sys/class/net").join(&if_a).exists());
    for id in [&a, &b] {
        p.destroy(id).await.expect("destroy");
    }
    for (id, ip) in [(&a, &ip_a), (&b, &ip_b)] {
        let veth = super::net::host_if_name(id);
        assert!(
            !std::path::Path::new("/sys/class/net").join(&veth).exists(),
            "veth {veth} leaked"
        );
        let lease = std::path::Path::new("/run/stacyvm/net")
            .join(&lab.bridge)
            .join(ip);
        assert!(!lease.exists(), "lease {ip} leaked");
    }
}

/// An unknown network mode is a clear 400-class error, nothing created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_network_mode_is_rejected() {
    let fx = fixture();
    let p = fx.make();
    let spec = SpawnSpec {
        id: paths::new_sandbox_id(),
        image: "host".into(),
        memory_mb: 128,
        vcpus: 1,
        metadata: Default::default(),
        owner_id: String::new(),
        tenant_id: String::new(),
        expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
        network_mode: "host".into(),
        snapshot: None,
        egress: None,
        volumes: Vec::new(),
    };
    let e = p
        .spawn(&spec)
        .await
        .expect_err("host networking must be refused");
    assert_eq!(e.kind(), stacyvm_core::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("allowed: none, bridge"), "{e}");
    assert!(!fx.state_dir().join("sandboxes").join(&spec.id).exists());
}

/// Stats come from the sandbox's cgroups: a busy loop shows CPU, held
/// memory shows in the usage, the limit is the spawn's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_cpu_and_memory_from_cgroups() {
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(fx.make());
    let id = spawn_with(p.as_ref(), 256).await;
    let idle = p.stats(&id).await.expect("stats");
    assert_eq!(idle.mem_limit_bytes, 256 * 1024 * 1024);
    let p2 = p.clone();
    let id2 = id.clone();
    let busy = tokio::spawn(async move {
        py(
            p2.as_ref(),
            &id2,
            "import time
b = bytearray(64 << 20)
for i in range(0, len(b), 4096): b[i] = 1
end = time.time() + 2
while time.time() < end: pass
print(len(b))",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = p.stats(&id).await.expect("stats");
    let r = busy.await.expect("busy task");
    assert_eq!(r.stdout.trim(), (64 << 20).to_string(), "{r:?}");
    // A low bar: CI runs many tests on two cores; an idle sandbox reads 0.
    assert!(
        s.cpu_pct > 5.0 && idle.cpu_pct < 5.0,
        "busy loop shows CPU: {s:?} (idle {idle:?})"
    );
    assert!(
        s.mem_bytes >= 64 << 20 && s.mem_bytes > idle.mem_bytes,
        "held memory shows: {s:?} (idle {idle:?})"
    );
    p.destroy(&id).await.expect("destroy");
    let e = p.stats(&id).await.expect_err("destroyed");
    assert_eq!(e.kind(), stacyvm_core::ErrorKind::SandboxNotFound);
}
