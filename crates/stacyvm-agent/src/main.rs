//! `stacyvm-agent`: runs inside a sandbox and serves the StacyVM agent
//! protocol (docs/agent-protocol.md).
//!
//! Usage:
//!   stacyvm-agent boot --spec FILE   build a native sandbox and serve as its PID 1
//!   stacyvm-agent serve --socket PATH  serve on a unix socket (no setup)
//!   stacyvm-agent serve --socket PATH --pool-host
//!                                      the same, as a docker pool host (forks
//!                                      the slot factory, then drops every
//!                                      capability)
//!   stacyvm-agent serve --listen-fd 3  serve on an inherited listening socket
//!                                      (a proot sandbox's agent)
//!   stacyvm-agent proot --spec FILE    confine this process and become proot
//!                                      (host side of the proot provider)
//!   stacyvm-agent relay --socket PATH  copy stdin/stdout to and from an
//!                                      agent socket (for runtimes whose
//!                                      sockets the host cannot reach, e.g. gVisor)
//!   stacyvm-agent flatten --out DIR LAYER...
//!                                      copy the merged view of image layers
//!                                      (topmost first) into the new DIR, in
//!                                      a mount namespace of its own (root)
//!   stacyvm-agent guest                as /init of a microVM's initramfs: mount,
//!                                      load modules, serve on the virtio-serial
//!                                      port (also when run as PID 1 with no
//!                                      arguments, as the kernel runs /init)
//!   stacyvm-agent version

#![allow(clippy::print_stdout)]

mod exec;

/// Starts a thread without panicking when the sandbox is out of pids or
/// memory (the agent must survive a fork bomb).
pub fn spawn_thread<F: FnOnce() + Send + 'static>(f: F) -> std::io::Result<()> {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .map(|_| ())
}
mod files;
mod guest;
mod guestnet;
mod server;
mod slot;
mod tcp;
mod watch;

use std::os::unix::net::UnixListener;
use std::process::ExitCode;

use stacyvm_sandbox::{BootSpec, Booted};

const USAGE: &str = "usage: stacyvm-agent boot --spec FILE | serve (--socket PATH | --listen-fd 3) [--token-file FILE] [--pool-host] | proot --spec FILE | relay --socket PATH | flatten --out DIR LAYER... | guest | version";

/// Reads the handshake token from `path` and removes the file, so nothing
/// started later in the sandbox can read it.
/// `-` reads stdin (a proot sandbox: proot's view of `/proc/self/fd/0`
/// is not the pipe).
fn take_token_file(path: &str) -> Result<Vec<u8>, String> {
    let text = if path == "-" {
        use std::io::Read;
        let mut t = String::new();
        std::io::stdin()
            .lock()
            .take(4096)
            .read_to_string(&mut t)
            .map_err(|e| format!("reading the token from stdin: {e}"))?;
        t
    } else {
        let t = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
        let _ = std::fs::remove_file(path);
        t
    };
    hex::decode(text.trim()).map_err(|e| format!("token in {path} is not hex: {e}"))
}

fn main() -> ExitCode {
    stacyvm_sandbox::pool::set_slot_main(slot::main);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() && std::process::id() == 1 {
        return guest::run();
    }
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["boot", "--spec", path] => boot(path),
        ["proot", "--spec", path] => proot(path),
        ["serve", how, path, rest @ ..] if *how == "--socket" || *how == "--listen-fd" => {
            // Sandbox processes share the agent's uid (docker): without
            // this they could read /proc/1/environ and /proc/1/mem or
            // ptrace the agent and answer for it. Not under proot
            // (`--listen-fd`): an unprivileged tracer cannot read a
            // non-dumpable tracee's memory, so proot could not translate
            // a single path argument of the agent.
            let under_proot = *how == "--listen-fd";
            if let Err(e) = nix::sys::prctl::set_dumpable(under_proot) {
                eprintln!("stacyvm-agent: making the agent undumpable: {e}");
                return ExitCode::from(1);
            }
            let mut rest = rest;
            let mut pool_host = false;
            let mut token_file = None;
            loop {
                match rest {
                    [] => break,
                    ["--token-file", file, more @ ..] => {
                        token_file = Some(*file);
                        rest = more;
                    }
                    ["--pool-host", more @ ..] if !under_proot => {
                        pool_host = true;
                        rest = more;
                    }
                    _ => {
                        eprintln!("{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            if pool_host {
                // A docker pool host: the container has what making slots
                // takes; the factory keeps it, this agent gives it all up.
                let started = stacyvm_sandbox::pool::start_factory(
                    stacyvm_sandbox::pool::SlotPolicy {
                        seccomp: true,
                        landlock_write: Vec::new(),
                    },
                    &[],
                )
                .and_then(|()| stacyvm_sandbox::security::drop_all_caps());
                if let Err(e) = started {
                    eprintln!("stacyvm-agent: starting the slot factory: {e}");
                    return ExitCode::from(1);
                }
            }
            // Read after the factory is forked: neither it nor a slot ever
            // holds the token.
            if let Some(file) = token_file {
                match take_token_file(file) {
                    Ok(t) => server::set_token(t),
                    Err(e) => {
                        eprintln!("stacyvm-agent: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            let listener = if *how == "--listen-fd" {
                if *path != stacyvm_sandbox::proot::LISTEN_FD.to_string() {
                    eprintln!(
                        "stacyvm-agent: --listen-fd must be {}",
                        stacyvm_sandbox::proot::LISTEN_FD
                    );
                    return ExitCode::from(2);
                }
                stacyvm_sandbox::proot::inherited_listener().map_err(|e| e.to_string())
            } else {
                let _ = std::fs::remove_file(path);
                UnixListener::bind(path).map_err(|e| e.to_string())
            };
            match listener {
                Ok(l) => {
                    server::serve(l, false);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stacyvm-agent: binding {path}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ["relay", "--socket", path] => relay(path),
        ["flatten", "--out", out, layers @ ..] => {
            let layers: Vec<std::path::PathBuf> =
                layers.iter().map(std::path::PathBuf::from).collect();
            match stacyvm_sandbox::flatten::flatten(std::path::Path::new(out), &layers) {
                Ok(c) => {
                    println!("{} entries, {} bytes", c.entries, c.data);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stacyvm-agent: flattening into {out}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ["guest"] => guest::run(),
        ["version"] | ["--version"] => {
            println!(
                "stacyvm-agent {} (protocol {})",
                env!("CARGO_PKG_VERSION"),
                stacyvm_agent_proto::VERSION
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Confines this process as the proot provider's spec says and executes
/// proot (see `stacyvm_sandbox::proot`); returns only on failure.
fn proot(path: &str) -> ExitCode {
    let spec: stacyvm_sandbox::proot::ProotSpec = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stacyvm-agent: reading proot spec {path}: {e}");
            return ExitCode::from(1);
        }
    };
    let Err(e) = stacyvm_sandbox::proot::launch(&spec);
    eprintln!("stacyvm-agent: starting proot sandbox {}: {e}", spec.id);
    ExitCode::from(1)
}

fn boot(path: &str) -> ExitCode {
    let spec: BootSpec = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stacyvm-agent: reading boot spec {path}: {e}");
            return ExitCode::from(1);
        }
    };
    match stacyvm_sandbox::boot(&spec) {
        Ok(Booted::Parent(pending)) => {
            // The intermediate parent reports the init pid and leaves; the
            // sandbox lives on under the host's init, not under the server.
            // The init is committed only when the server says `commit` on
            // stdin (it has recorded the sandbox by then): if the server is
            // gone or says nothing, the init dies with us.
            use std::io::{BufRead, Write};
            let mut out = std::io::stdout().lock();
            let told = writeln!(out, "{}", pending.pid).and_then(|()| out.flush());
            if told.is_err() {
                return ExitCode::from(1);
            }
            let mut go = String::new();
            let heard = std::io::stdin().lock().read_line(&mut go);
            if heard.is_err() || go.trim() != "commit" {
                eprintln!("stacyvm-agent: the server did not commit the sandbox init");
                return ExitCode::from(1);
            }
            match pending.commit() {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("stacyvm-agent: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Ok(Booted::Init(listener)) => {
            if let Ok(t) = hex::decode(&spec.token) {
                if !t.is_empty() {
                    server::set_token(t);
                }
            }
            server::serve(listener, true);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stacyvm-agent: sandbox setup failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// Connects to an agent socket (waiting up to 10 s for it to appear) and
/// copies stdin to it and its output to stdout until either side closes.
/// A container runtime whose unix sockets stay inside its sandbox (gVisor,
/// Kata) reaches the agent through this relay, started by the engine's exec
/// API; the bytes are the agent protocol, unchanged.
fn relay(path: &str) -> ExitCode {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() >= deadline => {
                eprintln!("stacyvm-agent: connecting to {path}: {e}");
                return ExitCode::from(1);
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    };
    let Ok(mut to_agent) = stream.try_clone() else {
        return ExitCode::from(1);
    };
    // stdin → agent on a thread; EOF on stdin half-closes the socket.
    let copier = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_agent.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_agent.shutdown(std::net::Shutdown::Write);
    });
    // agent → stdout, flushed per read so frames are not held back.
    let mut from_agent = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from_agent.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(copier);
    ExitCode::SUCCESS
}
