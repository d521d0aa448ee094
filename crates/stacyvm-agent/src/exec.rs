//! Process execution: spawning, output pumping with credit-based flow
//! control, timeouts that kill the whole process group, and the reaper
//! that collects every child (the agent is PID 1 of its sandbox).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use stacyvm_agent_proto::{AgentError, ErrorKind, Exit, Frame, Kind, INITIAL_WINDOW};

use crate::server::Conn;

/// Default environment of sandboxed commands.
const BASE_ENV: [(&str, &str); 5] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "xterm-256color"),
    ("SHELL", "/bin/sh"),
];

/// Exit statuses by pid, filled by the reaper.
#[derive(Default)]
pub struct Reaper {
    inner: Mutex<ReaperState>,
    cv: Condvar,
}

#[derive(Default)]
struct ReaperState {
    waiting: HashMap<i32, mpsc::Sender<WaitStatus>>,
    unclaimed: HashMap<i32, WaitStatus>,
    unclaimed_order: VecDeque<i32>,
    children: usize,
}

impl Reaper {
    /// Reaps every child forever; dispatches statuses to registered waiters.
    pub fn run(self: Arc<Self>) {
        loop {
            {
                let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                while st.children == 0 {
                    let (g, _) = self
                        .cv
                        .wait_timeout(st, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner());
                    st = g;
                    if st.children == 0 {
                        // Orphans re-parented to us are reaped here too.
                        drop(st);
                        reap_nonblocking(&self);
                        st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            match waitpid(Pid::from_raw(-1), None) {
                Ok(ws) => self.deliver(ws),
                Err(nix::errno::Errno::ECHILD) => {
                    let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                    st.children = 0;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    fn deliver(&self, ws: WaitStatus) {
        let Some(pid) = ws.pid() else { return };
        if !matches!(ws, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
            return;
        }
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = st.waiting.remove(&pid.as_raw()) {
            let _ = tx.send(ws);
        } else {
            st.unclaimed.insert(pid.as_raw(), ws);
            st.unclaimed_order.push_back(pid.as_raw());
            while st.unclaimed_order.len() > 4096 {
                if let Some(old) = st.unclaimed_order.pop_front() {
                    st.unclaimed.remove(&old);
                }
            }
        }
    }

    /// Spawns under the reaper's lock so the exit status cannot be missed.
    fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(std::process::Child, mpsc::Receiver<WaitStatus>)> {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = mpsc::channel();
        let pid = child.id() as i32;
        if let Some(ws) = st.unclaimed.remove(&pid) {
            let _ = tx.send(ws);
        } else {
            st.waiting.insert(pid, tx);
        }
        st.children += 1;
        self.cv.notify_all();
        Ok((child, rx))
    }
}

/// Spawns, retrying briefly while the sandbox is out of pids: processes that
/// just exited (an exec's pumps, zombies the reaper has not collected yet)
/// free theirs within milliseconds, and a caller cleaning up after a fork
/// bomb should not be refused for that. Bounded at about 300 ms; the reaper
/// lock is not held between attempts so exited children can be reaped.
fn spawn_retrying(
    reaper: &Reaper,
    cmd: &mut Command,
) -> std::io::Result<(std::process::Child, mpsc::Receiver<WaitStatus>)> {
    let mut delay = Duration::from_millis(10);
    let mut waited = Duration::ZERO;
    loop {
        match reaper.spawn(cmd) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && waited < Duration::from_millis(300) =>
            {
                std::thread::sleep(delay);
                waited += delay;
                delay = (delay * 2).min(Duration::from_millis(80));
            }
            r => return r,
        }
    }
}

fn reap_nonblocking(r: &Reaper) {
    while let Ok(ws) = waitpid(
        Pid::from_raw(-1),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    ) {
        if ws == WaitStatus::StillAlive {
            break;
        }
        r.deliver(ws);
    }
}

/// Output credit of one exec (bytes the agent may still send).
pub struct Window {
    credit: Mutex<u64>,
    cv: Condvar,
    cancelled: std::sync::atomic::AtomicBool,
}

impl Window {
    pub fn new() -> Arc<Window> {
        Arc::new(Window {
            credit: Mutex::new(INITIAL_WINDOW),
            cv: Condvar::new(),
            cancelled: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn grant(&self, n: u64) {
        let mut c = self.credit.lock().unwrap_or_else(|e| e.into_inner());
        *c = c.saturating_add(n);
        self.cv.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wakes every waiter; `take_within` returns `None` from now on.
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _c = self.credit.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// Like `take`, but gives up (`None`) when cancelled or when no credit
    /// arrives within `limit`.
    pub fn take_within(&self, want: u64, limit: Duration) -> Option<u64> {
        let deadline = std::time::Instant::now() + limit;
        let mut c = self.credit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.cancelled.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            if *c > 0 {
                let n = want.min(*c);
                *c -= n;
                return Some(n);
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            c = self
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for at least one byte of credit and takes up to `want`.
    fn take(&self, want: u64) -> u64 {
        let mut c = self.credit.lock().unwrap_or_else(|e| e.into_inner());
        while *c == 0 {
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        let n = want.min(*c);
        *c -= n;
        n
    }
}

/// Routes for a running exec (stdin and signals from the host).
pub struct ExecHandle {
    pub stdin: Option<mpsc::Sender<Vec<u8>>>,
    /// The pty master of a terminal exec (for resizes).
    pub pty: Mutex<Option<std::os::fd::OwnedFd>>,
    pub pgid: Arc<Mutex<Option<i32>>>,
    /// A signal that arrived before the process existed; delivered as soon
    /// as it does. Read and written only with `pgid` locked.
    pub pending_signal: Mutex<Option<i32>>,
    /// A terminal size that arrived before the pty existed; applied when it
    /// does. Read and written only with `pty` locked.
    pub pending_resize: Mutex<Option<(u16, u16)>>,
    pub window: Arc<Window>,
}

impl ExecHandle {
    /// Resizes the exec's terminal, or keeps the size for the terminal
    /// about to be made (a resize sent right after the start must not be
    /// lost).
    pub fn resize(&self, rows: u16, cols: u16) {
        let pty = self.pty.lock().unwrap_or_else(|e| e.into_inner());
        match pty.as_ref() {
            Some(m) => {
                let _ = stacyvm_sandbox::pty::resize(m, rows, cols);
            }
            None => {
                *self
                    .pending_resize
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((rows, cols));
            }
        }
    }

    /// Sends `sig` to the exec's process group, or keeps it for the
    /// process about to start (a kill sent right after the start must not
    /// be lost).
    pub fn signal(&self, sig: i32) {
        let pgid = self.pgid.lock().unwrap_or_else(|e| e.into_inner());
        match *pgid {
            Some(pg) => {
                if let Ok(s) = Signal::try_from(sig) {
                    let _ = killpg(Pid::from_raw(pg), s);
                }
            }
            None => {
                *self
                    .pending_signal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(sig);
            }
        }
    }
}

/// Parameters of an exec request.
pub struct ExecParams {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub stdin: bool,
    pub timeout: Option<Duration>,
    /// Run on a pseudo-terminal of (rows, cols).
    pub pty: Option<(u16, u16)>,
}

fn pump(
    mut r: impl Read,
    kind: Kind,
    id: u32,
    conn: Arc<Conn>,
    window: Arc<Window>,
    done: mpsc::Sender<()>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let want = window.take(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if n < want {
                    window.grant((want - n) as u64);
                }
                if conn.send(&Frame::new(kind, id, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    let _ = done.send(());
}

/// Sends SIGKILL to a process group until it no longer exists (≤ 2 s).
fn kill_group(pgid: i32) {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn exit_of(ws: WaitStatus) -> Exit {
    match ws {
        WaitStatus::Exited(_, code) => Exit {
            code,
            signal: None,
            timed_out: false,
        },
        WaitStatus::Signaled(_, sig, _) => Exit {
            code: 128 + sig as i32,
            signal: Some(sig as i32),
            timed_out: false,
        },
        _ => Exit {
            code: -1,
            signal: None,
            timed_out: false,
        },
    }
}

/// Runs one exec to completion, sending output and the final `Exit` frame.
pub fn run(
    id: u32,
    p: ExecParams,
    conn: Arc<Conn>,
    reaper: Arc<Reaper>,
    handle: Arc<ExecHandle>,
    stdin_rx: Option<mpsc::Receiver<Vec<u8>>>,
) {
    let result = start(id, &p, &conn, &reaper, &handle, stdin_rx);
    match result {
        Ok(exit) => {
            let _ = conn.send(&Frame::json(Kind::Exit, id, &exit));
        }
        Err(e) => conn.respond_err(id, e),
    }
    conn.forget_exec(id);
}

fn start(
    id: u32,
    p: &ExecParams,
    conn: &Arc<Conn>,
    reaper: &Arc<Reaper>,
    handle: &Arc<ExecHandle>,
    stdin_rx: Option<mpsc::Receiver<Vec<u8>>>,
) -> Result<Exit, AgentError> {
    let Some((prog, args)) = p.argv.split_first() else {
        return Err(AgentError::new(ErrorKind::InvalidInput, "empty command"));
    };
    let cwd = if p.cwd.is_empty() {
        "/workspace"
    } else {
        p.cwd.as_str()
    };
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        _ => {
            return Err(AgentError::new(
                ErrorKind::InvalidInput,
                format!("workdir {cwd:?} does not exist"),
            ))
        }
    }
    let mut cmd = Command::new(prog);
    cmd.args(args).env_clear().current_dir(cwd);
    for (k, v) in BASE_ENV {
        cmd.env(k, v);
    }
    if let Some(home) = crate::slot::home() {
        // A pool slot runs as its own uid: its home is its workspace.
        cmd.env("HOME", home);
    }
    cmd.envs(&p.env);
    switchable(p.uid, p.gid)?;
    if let Some(uid) = p.uid {
        cmd.uid(uid);
    }
    if let Some(gid) = p.gid {
        cmd.gid(gid);
    }
    let mut pty_master = None;
    match p.pty {
        Some((rows, cols)) => {
            let (master, slave) = stacyvm_sandbox::pty::open(rows, cols)
                .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))?;
            stacyvm_sandbox::pty::attach(&mut cmd, &slave)
                .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))?;
            pty_master = Some(master);
        }
        None => {
            // Its own process group, so timeouts and signals reach every child.
            // (A pty exec gets a whole new session from setsid instead.)
            cmd.process_group(0);
            cmd.stdin(if p.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
    }
    let (mut child, status_rx) = match spawn_retrying(reaper, &mut cmd) {
        Ok(c) => c,
        Err(e) => {
            let (code, what) = match e.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found"),
                std::io::ErrorKind::PermissionDenied => (126, "permission denied"),
                std::io::ErrorKind::WouldBlock => {
                    return Err(AgentError::new(
                        ErrorKind::ResourceExhausted,
                        "the sandbox's process limit is reached; wait for processes to exit or destroy the sandbox",
                    ))
                }
                _ => {
                    return Err(AgentError::new(
                        ErrorKind::Internal,
                        format!("starting {prog}: {e}"),
                    ))
                }
            };
            let msg = format!("stacyvm: {prog}: {what}\n");
            let _ = conn.send(&Frame::new(Kind::Stderr, id, msg.into_bytes()));
            return Ok(Exit {
                code,
                signal: None,
                timed_out: false,
            });
        }
    };
    let pid = child.id() as i32;
    if let Ok(mut g) = handle.pgid.lock() {
        *g = Some(pid);
        let pending = handle
            .pending_signal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(sig) = pending.and_then(|s| Signal::try_from(s).ok()) {
            let _ = killpg(Pid::from_raw(pid), sig);
        }
    }
    // Drop our copies of the slave (held by `cmd`) so EOF is seen on exit.
    drop(cmd);
    let mut stdin_rx = stdin_rx;
    let mut readers_from_pty = 0;
    let (done_tx, done_rx) = mpsc::channel();
    if let Some(master) = pty_master {
        let reader = std::fs::File::from(
            master
                .try_clone()
                .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))?,
        );
        let writer = std::fs::File::from(
            master
                .try_clone()
                .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))?,
        );
        if let Ok(mut g) = handle.pty.lock() {
            let pending = handle
                .pending_resize
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some((rows, cols)) = pending {
                let _ = stacyvm_sandbox::pty::resize(&master, rows, cols);
            }
            *g = Some(master);
        }
        if let Some(rx) = stdin_rx.take() {
            let mut writer = writer;
            let _ = crate::spawn_thread(move || {
                while let Ok(data) = rx.recv() {
                    if data.is_empty() {
                        // End of input on a terminal is ^D.
                        let _ = writer.write_all(&[4]);
                        continue;
                    }
                    if writer.write_all(&data).is_err() {
                        break;
                    }
                }
            });
        }
        let (c, w, d) = (conn.clone(), handle.window.clone(), done_tx.clone());
        if crate::spawn_thread(move || pump(reader, Kind::Stdout, id, c, w, d)).is_ok() {
            readers_from_pty = 1;
        }
    }
    if let (Some(mut stdin), Some(rx)) = (child.stdin.take(), stdin_rx) {
        let _ = crate::spawn_thread(move || {
            while let Ok(data) = rx.recv() {
                if data.is_empty() || stdin.write_all(&data).is_err() {
                    break;
                }
            }
        });
    }
    let mut readers = readers_from_pty;
    if let Some(out) = child.stdout.take() {
        let (c, w, d) = (conn.clone(), handle.window.clone(), done_tx.clone());
        if crate::spawn_thread(move || pump(out, Kind::Stdout, id, c, w, d)).is_ok() {
            readers += 1;
        }
    }
    if let Some(err) = child.stderr.take() {
        let (c, w, d) = (conn.clone(), handle.window.clone(), done_tx.clone());
        if crate::spawn_thread(move || pump(err, Kind::Stderr, id, c, w, d)).is_ok() {
            readers += 1;
        }
    }
    drop(done_tx);
    let deadline = p.timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let ws = loop {
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        match status_rx.recv_timeout(wait) {
            Ok(ws) => break ws,
            Err(mpsc::RecvTimeoutError::Timeout) if deadline.is_some() => {
                timed_out = true;
                kill_group(pid);
                match status_rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(ws) => break ws,
                    Err(_) => {
                        return Err(AgentError::new(
                            ErrorKind::Internal,
                            "process did not die after SIGKILL",
                        ))
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(AgentError::new(ErrorKind::Internal, "reaper stopped"))
            }
        }
    };
    if timed_out {
        // Everything in the group dies with the timeout; repeat until the
        // group is empty so processes forked during the kill die too.
        kill_group(pid);
    }
    // Drain output: pipes close once every holder exits. A background
    // process that keeps them open does not hold the exec hostage.
    let until = Instant::now() + Duration::from_millis(if timed_out { 200 } else { 2000 });
    for _ in 0..readers {
        if done_rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    let mut exit = exit_of(ws);
    exit.timed_out = timed_out;
    Ok(exit)
}

/// Fails with `Unsupported` when the command asks for another uid or gid
/// and the agent lacks the capability to switch (a container that drops
/// them all), rather than a bare "permission denied" from the spawn.
fn switchable(uid: Option<u32>, gid: Option<u32>) -> Result<(), AgentError> {
    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    static EFFECTIVE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let caps = *EFFECTIVE.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .unwrap_or(0)
    });
    let need = |cap: u32| caps & (1 << cap) == 0;
    let uid_change = uid.is_some_and(|u| u != nix::unistd::geteuid().as_raw());
    // std drops supplementary groups (setgroups) whenever a uid is given.
    let gid_change = gid.is_some_and(|g| g != nix::unistd::getegid().as_raw()) || uid_change;
    if (uid_change && need(CAP_SETUID)) || (gid_change && need(CAP_SETGID)) {
        return Err(AgentError::new(
            ErrorKind::Unsupported,
            "this sandbox cannot run commands as another user: its agent holds no CAP_SETUID/CAP_SETGID",
        ));
    }
    // In a user namespace only mapped ids exist (a rootless sandbox maps
    // one).
    for (what, id, map) in [("uid", uid, "uid_map"), ("gid", gid, "gid_map")] {
        if let Some(id) = id {
            if !mapped(id, map) {
                return Err(AgentError::new(
                    ErrorKind::Unsupported,
                    format!("{what} {id} does not exist in this sandbox's user namespace"),
                ));
            }
        }
    }
    Ok(())
}

/// Whether `id` is mapped in `/proc/self/<map>` (unreadable = assume so).
fn mapped(id: u32, map: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/self/{map}")) else {
        return true;
    };
    text.lines().any(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        f.len() == 3 && (f[0]..f[0] + f[2]).contains(&u64::from(id))
    })
}
