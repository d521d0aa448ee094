//! Resumable exec streams: every streamed exec gets an id and a bounded
//! output journal that clients read from any offset.
//!
//! The journal is the exec's only sink. Readers ("attachments") follow it
//! from an offset; the command keeps running while nobody is attached for
//! up to `exec.resume_window`, then it is killed.
//!
//! - Output nobody has read yet is never evicted; when `exec.buffer_bytes`
//!   of it are waiting the producer waits, which fills the command's pipe
//!   and pauses it, exactly as a slow client would.
//! - The last `exec.history_bytes` already handed to a reader stay as
//!   history: bytes the server wrote to a connection that then dropped
//!   (they were in socket buffers, never seen by the client) are read again
//!   from there. Older history is evicted, and a reader asking for it is
//!   told the gap.
//!
//! So one exec holds at most `buffer_bytes + history_bytes` (plus a chunk).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};
use crate::provider::StreamKind;
pub use stacyvm_api::ExecInfo;

/// Limits of the journal (`exec.*` in the config).
#[derive(Debug, Clone, Copy)]
pub struct JournalLimits {
    /// Unread output one exec may hold before the command waits.
    pub buffer_bytes: usize,
    /// Output already sent that one exec keeps for readers that resume.
    pub history_bytes: usize,
    /// How long a finished exec stays readable.
    pub keep_finished: Duration,
    /// Finished execs kept per sandbox (oldest dropped first).
    pub keep_per_sandbox: usize,
    /// Running streamed execs one sandbox may have, attached or not.
    pub max_running_per_sandbox: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        JournalLimits {
            buffer_bytes: 1024 * 1024,
            history_bytes: 4 * 1024 * 1024,
            keep_finished: Duration::from_secs(600),
            keep_per_sandbox: 8,
            max_running_per_sandbox: 16,
        }
    }
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Exit { code: i32, duration: Duration },
    Failed { kind: ErrorKind, message: String },
}

/// What a reader gets, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum JournalItem {
    /// Output starting at `offset` (bytes of stdout and stderr together,
    /// in the order the command wrote them).
    Output {
        offset: u64,
        stream: StreamKind,
        data: Bytes,
    },
    /// The bytes from `from` up to `to` were evicted before this reader
    /// got them; reading goes on at `to`.
    Gap { from: u64, to: u64 },
    /// The exec ended; nothing follows.
    End(Finish),
}

#[derive(Debug)]
struct Chunk {
    offset: u64,
    stream: StreamKind,
    data: Bytes,
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Chunk>,
    /// First offset still kept.
    base: u64,
    /// Offset after the last byte written.
    end: u64,
    /// Highest offset delivered to any reader.
    read_mark: u64,
    finish: Option<Finish>,
    finished_at: Option<(Instant, DateTime<Utc>)>,
    attached: usize,
    detached_since: Option<Instant>,
    kill: Option<String>,
}

/// One streamed exec.
#[derive(Debug)]
pub struct ExecEntry {
    pub id: String,
    pub sandbox_id: String,
    pub command: String,
    pub started_at: DateTime<Utc>,
    limit: usize,
    history: usize,
    state: Mutex<State>,
    /// Bumped on every change; readers, the producer and the reaper wait
    /// on it.
    version: watch::Sender<u64>,
}

impl ExecEntry {
    fn new(id: String, sandbox_id: &str, command: &str, limit: usize, history: usize) -> Self {
        ExecEntry {
            id,
            sandbox_id: sandbox_id.to_string(),
            command: command.to_string(),
            started_at: Utc::now(),
            limit: limit.max(1),
            history,
            state: Mutex::new(State {
                detached_since: Some(Instant::now()),
                ..State::default()
            }),
            version: watch::channel(0).0,
        }
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Appends output. Waits while `limit` bytes no reader has had are
    /// waiting (back-pressure on the command); returns `false` once the
    /// exec has been killed.
    pub async fn push(&self, stream: StreamKind, data: Vec<u8>) -> bool {
        if data.is_empty() {
            return true;
        }
        let data = Bytes::from(data);
        let len = data.len() as u64;
        let limit = self.limit as u64;
        let mut rx = self.version.subscribe();
        loop {
            {
                let mut s = self.state.lock();
                if s.kill.is_some() {
                    return false;
                }
                // History more than `history` behind the read mark goes.
                let keep_from = s.read_mark.saturating_sub(self.history as u64);
                while let Some(c) = s.chunks.front() {
                    let c_end = c.offset + c.data.len() as u64;
                    if c_end > keep_from {
                        break;
                    }
                    s.chunks.pop_front();
                    s.base = c_end;
                }
                let unread = s.end - s.read_mark;
                // An oversized chunk is taken whole when nothing is unread.
                if unread + len <= limit || unread == 0 {
                    let offset = s.end;
                    s.end += len;
                    if s.chunks.is_empty() {
                        s.base = offset;
                    }
                    s.chunks.push_back(Chunk {
                        offset,
                        stream,
                        data,
                    });
                    drop(s);
                    self.bump();
                    return true;
                }
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Records the end (once).
    pub fn finish(&self, f: Finish) {
        {
            let mut s = self.state.lock();
            if s.finish.is_some() {
                return;
            }
            s.finish = Some(f);
            s.finished_at = Some((Instant::now(), Utc::now()));
        }
        self.bump();
    }

    /// Asks the running exec to stop; `why` ends up in its failure.
    pub fn kill(&self, why: &str) -> bool {
        {
            let mut s = self.state.lock();
            if s.finish.is_some() || s.kill.is_some() {
                return false;
            }
            s.kill = Some(why.to_string());
        }
        self.bump();
        true
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().finish.is_some()
    }

    /// Resolves once the end is recorded.
    pub async fn wait_finished(&self) {
        let mut rx = self.version.subscribe();
        while !self.is_finished() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once the exec should stop: killed, or nobody attached for
    /// `window` (immediately when the window is zero). Returns the reason.
    pub async fn stop_requested(&self, window: Duration) -> String {
        let mut rx = self.version.subscribe();
        loop {
            let detached = {
                let s = self.state.lock();
                if let Some(why) = &s.kill {
                    return why.clone();
                }
                if s.attached > 0 {
                    None
                } else {
                    Some(s.detached_since.unwrap_or_else(Instant::now))
                }
            };
            match detached {
                Some(since) if since.elapsed() >= window => {
                    return if window.is_zero() {
                        "client disconnected".into()
                    } else {
                        format!(
                            "no client attached for {}",
                            stacyvm_api::GoDuration::from_std(window)
                        )
                    };
                }
                Some(since) => {
                    let at = tokio::time::Instant::from_std(since + window);
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        r = rx.changed() => if r.is_err() { return "journal closed".into() },
                    }
                }
                None => {
                    if rx.changed().await.is_err() {
                        return "journal closed".into();
                    }
                }
            }
        }
    }

    /// Starts reading at `offset` (clamped to what was written).
    pub fn attach(self: &Arc<Self>, offset: u64) -> Attachment {
        let pos = {
            let mut s = self.state.lock();
            s.attached += 1;
            s.detached_since = None;
            offset.min(s.end)
        };
        self.bump();
        Attachment {
            entry: Arc::clone(self),
            pos,
            rx: self.version.subscribe(),
            done: false,
        }
    }

    pub fn info(&self) -> ExecInfo {
        let s = self.state.lock();
        let (state, exit_code, error) = match (&s.finish, &s.kill) {
            (Some(Finish::Exit { code, .. }), _) => ("exited", Some(*code), None),
            (Some(Finish::Failed { message, .. }), Some(_)) => {
                ("killed", None, Some(message.clone()))
            }
            (Some(Finish::Failed { message, .. }), None) => ("failed", None, Some(message.clone())),
            (None, _) => ("running", None, None),
        };
        ExecInfo {
            id: self.id.clone(),
            sandbox_id: self.sandbox_id.clone(),
            command: self.command.clone(),
            state: state.into(),
            exit_code,
            error,
            started_at: self.started_at,
            finished_at: s.finished_at.map(|(_, t)| t),
            output_bytes: s.end,
            retained_from: s.base,
            attached: s.attached,
        }
    }

    fn finished_for(&self) -> Option<Duration> {
        self.state.lock().finished_at.map(|(t, _)| t.elapsed())
    }
}

/// A reader of one exec; detaches on drop.
#[derive(Debug)]
pub struct Attachment {
    entry: Arc<ExecEntry>,
    pos: u64,
    rx: watch::Receiver<u64>,
    done: bool,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        {
            let mut s = self.entry.state.lock();
            s.attached = s.attached.saturating_sub(1);
            if s.attached == 0 {
                s.detached_since = Some(Instant::now());
            }
        }
        self.entry.bump();
    }
}

impl Attachment {
    pub fn exec_id(&self) -> &str {
        &self.entry.id
    }

    /// The next item; `None` after [`JournalItem::End`].
    pub async fn next(&mut self) -> Option<JournalItem> {
        if self.done {
            return None;
        }
        loop {
            self.rx.borrow_and_update();
            if let Some(item) = self.poll_now() {
                if matches!(item, JournalItem::End(_)) {
                    self.done = true;
                }
                return Some(item);
            }
            if self.rx.changed().await.is_err() {
                self.done = true;
                return None;
            }
        }
    }

    fn poll_now(&mut self) -> Option<JournalItem> {
        let mut s = self.entry.state.lock();
        if self.pos > s.end {
            self.pos = s.end;
        }
        if self.pos < s.base {
            let from = self.pos;
            self.pos = s.base;
            return Some(JournalItem::Gap { from, to: s.base });
        }
        if self.pos < s.end {
            // Chunks are contiguous from `base`: find the one holding `pos`.
            let i = s
                .chunks
                .partition_point(|c| c.offset + c.data.len() as u64 <= self.pos);
            let c = &s.chunks[i];
            let skip = usize::try_from(self.pos - c.offset).unwrap_or(0);
            let item = JournalItem::Output {
                offset: self.pos,
                stream: c.stream,
                data: c.data.slice(skip..),
            };
            self.pos = c.offset + c.data.len() as u64;
            if self.pos > s.read_mark {
                s.read_mark = self.pos;
                drop(s);
                // The producer may be waiting for room.
                self.entry.bump();
            }
            return Some(item);
        }
        s.finish.clone().map(JournalItem::End)
    }
}

/// Every streamed exec of this control plane.
#[derive(Debug, Default)]
pub struct ExecJournal {
    limits: Mutex<JournalLimits>,
    entries: Mutex<HashMap<String, Arc<ExecEntry>>>,
}

impl ExecJournal {
    pub fn new(limits: JournalLimits) -> Self {
        ExecJournal {
            limits: Mutex::new(limits),
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> JournalLimits {
        *self.limits.lock()
    }

    /// Registers a new exec, after dropping expired finished ones. Refused
    /// (429) when the sandbox already runs its limit of streamed execs.
    pub fn start(&self, sandbox_id: &str, command: &str) -> Result<Arc<ExecEntry>> {
        let limits = self.limits();
        self.prune(&limits);
        let mut entries = self.entries.lock();
        let running = entries
            .values()
            .filter(|e| e.sandbox_id == sandbox_id && !e.is_finished())
            .count();
        if limits.max_running_per_sandbox > 0 && running >= limits.max_running_per_sandbox {
            return Err(Error::limit(format!(
                "sandbox {sandbox_id} already runs {running} streamed execs (exec.max_running_per_sandbox); \
                 wait for one to end or kill one with DELETE /sandboxes/{sandbox_id}/execs/{{exec_id}}"
            )));
        }
        let id = format!("ex-{}", hex::encode(rand::random::<[u8; 8]>()));
        let e = Arc::new(ExecEntry::new(
            id.clone(),
            sandbox_id,
            command,
            limits.buffer_bytes,
            limits.history_bytes,
        ));
        entries.insert(id, Arc::clone(&e));
        Ok(e)
    }

    /// The exec `exec_id` of sandbox `sandbox_id` (404 for any other
    /// sandbox's exec).
    pub fn get(&self, sandbox_id: &str, exec_id: &str) -> Result<Arc<ExecEntry>> {
        self.prune(&self.limits());
        self.entries
            .lock()
            .get(exec_id)
            .filter(|e| e.sandbox_id == sandbox_id)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!(
                    "exec {exec_id} of sandbox {sandbox_id} (finished execs are kept for exec.keep_finished, \
                     on the control plane that started them)"
                ))
            })
    }

    /// Running and recent execs of a sandbox, newest first.
    pub fn list(&self, sandbox_id: &str) -> Vec<ExecInfo> {
        self.prune(&self.limits());
        let mut v: Vec<ExecInfo> = self
            .entries
            .lock()
            .values()
            .filter(|e| e.sandbox_id == sandbox_id)
            .map(|e| e.info())
            .collect();
        v.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
        v
    }

    /// Forgets a destroyed sandbox's execs (running ones are told to stop).
    pub fn forget_sandbox(&self, sandbox_id: &str) {
        let gone: Vec<Arc<ExecEntry>> = {
            let mut entries = self.entries.lock();
            let ids: Vec<String> = entries
                .iter()
                .filter(|(_, e)| e.sandbox_id == sandbox_id)
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| entries.remove(k)).collect()
        };
        for e in gone {
            e.kill("sandbox destroyed");
        }
    }

    fn prune(&self, limits: &JournalLimits) {
        let mut entries = self.entries.lock();
        entries.retain(|_, e| {
            e.finished_for()
                .is_none_or(|age| age < limits.keep_finished)
        });
        // Per sandbox, keep the newest `keep_per_sandbox` finished ones.
        let mut finished: HashMap<String, Vec<(Instant, String)>> = HashMap::new();
        for (k, e) in entries.iter() {
            if let Some((at, _)) = e.state.lock().finished_at {
                finished
                    .entry(e.sandbox_id.clone())
                    .or_default()
                    .push((at, k.clone()));
            }
        }
        for (_, mut v) in finished {
            if v.len() > limits.keep_per_sandbox {
                v.sort();
                let excess = v.len() - limits.keep_per_sandbox;
                for (_, k) in v.into_iter().take(excess) {
                    entries.remove(&k);
                }
            }
        }
    }

    #[cfg(test)]
    fn set_limits(&self, l: JournalLimits) {
        *self.limits.lock() = l;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(item: Option<JournalItem>) -> (u64, Vec<u8>) {
        match item {
            Some(JournalItem::Output { offset, data, .. }) => (offset, data.to_vec()),
            other => panic!("expected output, got {other:?}"),
        }
    }

    fn small(buffer_bytes: usize) -> ExecJournal {
        ExecJournal::new(JournalLimits {
            buffer_bytes,
            history_bytes: buffer_bytes,
            ..JournalLimits::default()
        })
    }

    #[tokio::test]
    async fn a_reader_gets_everything_in_order_then_the_end() {
        let j = small(1024);
        let e = j.start("sb-1", "echo").expect("start");
        let mut a = e.attach(0);
        assert!(e.push(StreamKind::Stdout, b"hello ".to_vec()).await);
        assert!(e.push(StreamKind::Stderr, b"world".to_vec()).await);
        e.finish(Finish::Exit {
            code: 3,
            duration: Duration::from_millis(5),
        });
        assert_eq!(out(a.next().await), (0, b"hello ".to_vec()));
        assert_eq!(out(a.next().await), (6, b"world".to_vec()));
        assert!(matches!(
            a.next().await,
            Some(JournalItem::End(Finish::Exit { code: 3, .. }))
        ));
        assert_eq!(a.next().await, None);
        assert_eq!(e.info().state, "exited");
        assert_eq!(e.info().output_bytes, 11);
    }

    #[tokio::test]
    async fn a_second_reader_resumes_mid_chunk() {
        let j = small(1024);
        let e = j.start("sb-1", "x").expect("start");
        let mut a = e.attach(0);
        e.push(StreamKind::Stdout, b"abcdef".to_vec()).await;
        let _ = a.next().await;
        drop(a);
        let mut b = e.attach(2);
        assert_eq!(out(b.next().await), (2, b"cdef".to_vec()));
        // Past the end is clamped to the end (live).
        let mut c = e.attach(99);
        e.push(StreamKind::Stdout, b"g".to_vec()).await;
        assert_eq!(out(c.next().await), (6, b"g".to_vec()));
    }

    #[tokio::test]
    async fn unread_output_is_never_evicted_the_producer_waits() {
        let j = small(8);
        let e = j.start("sb-1", "x").expect("start");
        let mut a = e.attach(0);
        assert!(e.push(StreamKind::Stdout, b"12345678".to_vec()).await);
        // `limit` unread bytes: the next push must wait for the reader.
        let e2 = Arc::clone(&e);
        let producer =
            tokio::spawn(async move { e2.push(StreamKind::Stdout, b"9abc".to_vec()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!producer.is_finished(), "push went past a full journal");
        assert_eq!(out(a.next().await), (0, b"12345678".to_vec()));
        assert!(producer.await.expect("join"));
        assert_eq!(out(a.next().await), (8, b"9abc".to_vec()));
        // What was handed out stays as history, up to `limit` behind.
        let mut again = e.attach(0);
        assert_eq!(out(again.next().await), (0, b"12345678".to_vec()));
        drop(again);
        assert!(e.push(StreamKind::Stdout, b"defgh".to_vec()).await);
        assert_eq!(out(a.next().await), (12, b"defgh".to_vec()));
        // The read mark is now 17: the chunk ending at 8 is more than
        // `limit` behind and goes at the next push.
        assert!(e.push(StreamKind::Stdout, b"ij".to_vec()).await);
        let mut late = e.attach(0);
        assert_eq!(late.next().await, Some(JournalItem::Gap { from: 0, to: 8 }));
        assert_eq!(out(late.next().await), (8, b"9abc".to_vec()));
        let info = e.info();
        assert_eq!((info.retained_from, info.output_bytes), (8, 19));
    }

    #[tokio::test]
    async fn a_detached_exec_is_stopped_after_the_window_and_not_before() {
        let j = small(64);
        let e = j.start("sb-1", "x").expect("start");
        let a = e.attach(0);
        let e2 = Arc::clone(&e);
        let stop = tokio::spawn(async move { e2.stop_requested(Duration::from_millis(150)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stop.is_finished(), "stopped while a reader was attached");
        drop(a);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Re-attaching within the window resets it.
        let b = e.attach(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stop.is_finished(), "stopped although a reader came back");
        drop(b);
        let why = tokio::time::timeout(Duration::from_secs(2), stop)
            .await
            .expect("stopped in time")
            .expect("join");
        assert!(why.contains("no client attached"), "{why}");
    }

    #[tokio::test]
    async fn a_zero_window_stops_as_soon_as_the_client_goes() {
        let j = small(64);
        let e = j.start("sb-1", "x").expect("start");
        drop(e.attach(0));
        let why = tokio::time::timeout(Duration::from_secs(1), e.stop_requested(Duration::ZERO))
            .await
            .expect("immediate");
        assert_eq!(why, "client disconnected");
    }

    #[tokio::test]
    async fn kill_stops_a_waiting_producer_and_is_reported() {
        let j = small(4);
        let e = j.start("sb-1", "x").expect("start");
        let _a = e.attach(0);
        e.push(StreamKind::Stdout, b"1234".to_vec()).await;
        let e2 = Arc::clone(&e);
        let producer =
            tokio::spawn(async move { e2.push(StreamKind::Stdout, b"5".to_vec()).await });
        assert!(e.kill("killed by the caller"));
        assert!(!producer.await.expect("join"), "push after kill succeeded");
        assert_eq!(
            e.stop_requested(Duration::from_secs(60)).await,
            "killed by the caller"
        );
        e.finish(Finish::Failed {
            kind: ErrorKind::Conflict,
            message: "killed by the caller".into(),
        });
        assert_eq!(e.info().state, "killed");
        assert!(!e.kill("again"), "a finished exec cannot be killed");
    }

    #[tokio::test]
    async fn ids_are_scoped_to_their_sandbox_and_running_execs_are_capped() {
        let j = ExecJournal::new(JournalLimits {
            max_running_per_sandbox: 2,
            ..JournalLimits::default()
        });
        let a = j.start("sb-a", "one").expect("start");
        let _b = j.start("sb-a", "two").expect("start");
        let err = j.start("sb-a", "three").expect_err("over the cap");
        assert_eq!(err.kind(), ErrorKind::ResourceLimit);
        // Another sandbox has its own budget.
        j.start("sb-b", "one").expect("other sandbox");
        assert_eq!(
            j.get("sb-b", &a.id).expect_err("cross-sandbox").kind(),
            ErrorKind::NotFound
        );
        assert_eq!(j.get("sb-a", &a.id).expect("own").id, a.id);
        // A finished one frees its slot.
        a.finish(Finish::Exit {
            code: 0,
            duration: Duration::ZERO,
        });
        j.start("sb-a", "three").expect("slot freed");
        assert_eq!(j.list("sb-a").len(), 3);
        j.forget_sandbox("sb-a");
        assert!(j.list("sb-a").is_empty());
        assert_eq!(j.list("sb-b").len(), 1);
    }

    #[tokio::test]
    async fn finished_execs_expire_and_only_the_newest_are_kept() {
        let j = ExecJournal::new(JournalLimits {
            keep_per_sandbox: 2,
            ..JournalLimits::default()
        });
        for i in 0..4 {
            let e = j.start("sb-a", &format!("cmd {i}")).expect("start");
            e.finish(Finish::Exit {
                code: i,
                duration: Duration::ZERO,
            });
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let left: Vec<String> = j.list("sb-a").into_iter().map(|i| i.command).collect();
        assert_eq!(left, vec!["cmd 3", "cmd 2"]);
        j.set_limits(JournalLimits {
            keep_finished: Duration::ZERO,
            ..j.limits()
        });
        assert!(j.list("sb-a").is_empty());
    }
}
