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

async fn spawn_net(p: &dyn Provider, memory_mb: i64, network_mode: &str) -> String {
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
async fn py(p: &dyn Provider, id: &str, code: &str) -> Ran {
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
        &format!(
            "cat {root_marker}; ls -A /root | wc -l; ls -A /home | wc -l; cat /etc/shadow | wc -c"
        ),
    )
    .await;
    let _ = std::fs::remove_file(&root_marker);
    assert!(
        !r.stdout.contains("host secret"),
        "host /root readable: {r:?}"
    );
    assert_eq!(
        r.stdout.split_whitespace().collect::<Vec<_>>(),
        ["0", "0", "0"],
        "/root and /home empty, /etc/shadow masked: {r:?}"
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
fn host(cmd: &str) -> String {
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

/// A network namespace standing in for "the internet": a veth to the host
/// with its own /30, removed on drop.
struct Outside {
    ns: String,
    host_if: String,
    host_ip: String,
    peer_ip: String,
}

impl Outside {
    fn new() -> Outside {
        let n = std::process::id() % 250 + 1;
        let o = Outside {
            ns: format!("svmt-out-{n}"),
            host_if: format!("svmto{n}"),
            host_ip: format!("198.18.{n}.1"),
            peer_ip: format!("198.18.{n}.2"),
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &o.ns])
            .output();
        host(&format!(
            "ip netns add {ns} && ip link add {h} type veth peer name eth0 netns {ns} && \
             ip addr add {hip}/30 dev {h} && ip link set {h} up && \
             ip -n {ns} addr add {pip}/30 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
            ns = o.ns,
            h = o.host_if,
            hip = o.host_ip,
            pip = o.peer_ip
        ));
        o
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// `bridge` mode: the sandbox gets eth0 on the host bridge and reaches an
/// outside host through NAT (the peer sees the host's address), but
/// neither the host's own services nor another sandbox. Destroy removes
/// the veth and the address lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_mode_reaches_outside_through_nat_only() {
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(fx.make());
    let outside = Outside::new();
    // The outside host accepts one connection and prints the peer address
    // and the line it received.
    let server = std::process::Command::new("ip")
        .args(["netns", "exec", &outside.ns, "python3", "-c"])
        .arg(format!(
            "import socket\nl = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             l.bind(('{ip}', 8080)); l.listen(); l.settimeout(30)\nc, a = l.accept()\n\
             print(a[0], c.makefile().readline().strip(), flush=True)",
            ip = outside.peer_ip
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("outside server");
    std::thread::sleep(Duration::from_millis(300));
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").expect("host listener");
    let host_port = host_listener.local_addr().expect("addr").port();

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
    assert!(ip_a.starts_with("10.88."), "eth0 of a: {ra:?}");
    let rb = sh(p.as_ref(), &b, "ip -4 -o addr show dev eth0").await;
    let ip_b = addr_of(&rb);
    assert!(
        ip_b.starts_with("10.88.") && ip_b != ip_a,
        "eth0 of b: {rb:?}"
    );

    let r = py(
        p.as_ref(),
        &a,
        &format!(
            "import socket\nc = socket.create_connection(('{ip}', 8080), timeout=10)\nc.sendall(b'hello from {a}\\n'); c.close(); print('sent')",
            ip = outside.peer_ip
        ),
    )
    .await;
    assert_eq!(r.stdout.trim(), "sent", "{r:?}");
    let out = server.wait_with_output().expect("outside server output");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        line,
        format!("{} hello from {a}", outside.host_ip),
        "the outside host sees the masqueraded host address"
    );

    // Not the host itself, on the gateway or on any other host address.
    let probe = |ip: String, port: u16| {
        format!(
            "import socket\ns = socket.socket(); s.settimeout(2)\ntry:\n  s.connect(('{ip}', {port})); print('reached')\nexcept OSError as e: print('blocked')"
        )
    };
    let r = py(p.as_ref(), &a, &probe("10.88.0.1".into(), host_port)).await;
    assert_eq!(r.stdout.trim(), "blocked", "host via gateway: {r:?}");
    let r = py(p.as_ref(), &a, &probe(outside.host_ip.clone(), host_port)).await;
    assert_eq!(
        r.stdout.trim(),
        "blocked",
        "host via another address: {r:?}"
    );

    // Not the other sandbox, even though it listens on its eth0.
    let listen = format!(
        "import socket, time\nl = socket.socket(); l.bind(('{ip_b}', 9000)); l.listen(); l.settimeout(6)\n\
         try:\n  c, _ = l.accept(); print('accepted')\nexcept OSError: print('nobody')"
    );
    let pb = p.clone();
    let b2 = b.clone();
    let listening = tokio::spawn(async move { py(pb.as_ref(), &b2, &listen).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = py(p.as_ref(), &a, &probe(ip_b.clone(), 9000)).await;
    assert_eq!(r.stdout.trim(), "blocked", "peer sandbox: {r:?}");
    let r = listening.await.expect("listener task");
    assert_eq!(r.stdout.trim(), "nobody", "{r:?}");
    // A sandbox has no NET_ADMIN: it cannot change its own address.
    let r = sh(p.as_ref(), &a, "ip addr add 10.88.250.250/16 dev eth0").await;
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
        let lease = std::path::Path::new("/run/stacyvm/net/stacyvm0").join(ip);
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
