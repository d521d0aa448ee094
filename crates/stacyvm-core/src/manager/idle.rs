//! Idle timeouts and what a timeout does.
//!
//! A sandbox spawned with `idle_timeout` has an activity clock: every exec,
//! file operation and preview request touches it, and work in progress (a
//! running exec, an open preview tunnel or stream) holds it busy. The clock
//! lives in memory ([`Activity`]); each reaper pass writes the deadlines it
//! moved to the store (`idle_deadline`, forward only), so every control
//! plane of a cluster sees activity any of them served, one pass late at
//! most. A sandbox whose deadline has passed, that is not busy here and was
//! not touched since the last pass, times out.
//!
//! A timeout — idle or the time to live — does what the sandbox's
//! `on_timeout` says: `kill` (the default) destroys it, `pause` pauses it;
//! the next call or preview request resumes a paused sandbox, with a fresh
//! time to live when it was paused at its expiry.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use stacyvm_api::{state, GoDuration, SpawnRequest};

use super::{Caller, Manager};
use crate::error::{Error, Result};
use crate::provider::{capability, Provider};
use crate::store::SandboxRecord;

/// `on_timeout` values.
pub mod on_timeout {
    pub const KILL: &str = "kill";
    pub const PAUSE: &str = "pause";
}

/// The shortest idle timeout accepted.
const MIN_IDLE: i64 = 1;

/// Activity seen on this control plane since the last reaper pass, and
/// work in progress.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    at: DateTime<Utc>,
    idle: chrono::Duration,
    busy: u32,
}

impl Activity {
    /// Notes activity on `rec` now (nothing for a sandbox without an idle
    /// timeout).
    pub(crate) fn touch(&self, rec: &SandboxRecord) {
        if rec.idle_timeout_secs <= 0 {
            return;
        }
        let now = Utc::now();
        self.seen
            .lock()
            .entry(rec.id.clone())
            .and_modify(|s| s.at = now)
            .or_insert_with(|| Seen {
                at: now,
                idle: chrono::Duration::seconds(rec.idle_timeout_secs),
                busy: 0,
            });
    }

    /// Holds `rec` busy (not idle) until the guard drops; `None` for a
    /// sandbox without an idle timeout.
    pub(crate) fn busy(self: &Arc<Self>, rec: &SandboxRecord) -> Option<Busy> {
        if rec.idle_timeout_secs <= 0 {
            return None;
        }
        self.touch(rec);
        if let Some(s) = self.seen.lock().get_mut(&rec.id) {
            s.busy += 1;
        }
        Some(Busy {
            activity: Arc::clone(self),
            id: rec.id.clone(),
        })
    }

    /// The deadlines activity moved since the last call: busy sandboxes'
    /// move on to now plus their timeout. Forgets all but busy ones.
    fn drain(&self) -> Vec<(String, DateTime<Utc>)> {
        let now = Utc::now();
        let mut seen = self.seen.lock();
        let due = seen
            .iter()
            .map(|(id, s)| {
                let from = if s.busy > 0 { now } else { s.at };
                (id.clone(), from + s.idle)
            })
            .collect();
        seen.retain(|_, s| s.busy > 0);
        due
    }

    /// Whether `id` was touched since the last drain or is busy.
    fn active(&self, id: &str) -> bool {
        self.seen.lock().contains_key(id)
    }
}

/// Work in progress on a sandbox (see [`Activity::busy`]).
#[derive(Debug)]
pub(crate) struct Busy {
    activity: Arc<Activity>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut seen = self.activity.seen.lock();
        if let Some(s) = seen.get_mut(&self.id) {
            s.busy = s.busy.saturating_sub(1);
            s.at = Utc::now();
        }
    }
}

/// A spawn request's idle timeout (seconds, 0 for none) and `on_timeout`
/// (`""` for kill), checked against the time to live and the provider.
pub(crate) fn lifecycle(
    req: &SpawnRequest,
    ttl: GoDuration,
    provider: &dyn Provider,
) -> Result<(i64, String)> {
    let idle = match req.idle_timeout.trim() {
        "" | "0" | "0s" => 0,
        s => {
            let d = stacyvm_api::duration::parse(s)
                .map_err(|e| Error::invalid(format!("parsing idle_timeout: {e}")))?;
            if d < MIN_IDLE * 1_000_000_000 {
                return Err(Error::invalid(format!(
                    "idle_timeout must be at least {MIN_IDLE}s, got {s:?}"
                )));
            }
            if d > ttl.nanos() {
                return Err(Error::invalid(format!(
                    "idle_timeout {s} is longer than the time to live {ttl}: it could never apply"
                )));
            }
            // Whole seconds, rounded up.
            (d + 999_999_999) / 1_000_000_000
        }
    };
    let on = match req.on_timeout.trim() {
        "" | on_timeout::KILL => "",
        on_timeout::PAUSE => on_timeout::PAUSE,
        other => {
            return Err(Error::invalid(format!(
                "on_timeout must be \"kill\" or \"pause\", got {other:?}"
            )))
        }
    };
    if on == on_timeout::PAUSE
        && !provider
            .capabilities()
            .iter()
            .any(|c| c == capability::PAUSE)
    {
        return Err(Error::invalid(format!(
            "on_timeout \"pause\" needs a provider that can pause sandboxes; {} cannot (use \"kill\" or another provider)",
            provider.name()
        )));
    }
    Ok((idle, on.to_string()))
}

/// The API form of a record's idle timeout and `on_timeout`.
pub(crate) fn shown(rec: &SandboxRecord) -> (String, String) {
    let idle = if rec.idle_timeout_secs > 0 {
        GoDuration::from_secs(rec.idle_timeout_secs).to_string()
    } else {
        String::new()
    };
    let on = if rec.on_timeout == on_timeout::PAUSE {
        on_timeout::PAUSE.to_string()
    } else if rec.idle_timeout_secs > 0 {
        on_timeout::KILL.to_string()
    } else {
        String::new()
    };
    (idle, on)
}

impl Manager {
    /// Notes activity on a sandbox (see [`Activity`]).
    pub(crate) fn touch(&self, rec: &SandboxRecord) {
        self.activity.touch(rec);
    }

    /// Holds a sandbox busy while the guard lives.
    pub(crate) fn hold_busy(&self, rec: &SandboxRecord) -> Option<Busy> {
        self.activity.busy(rec)
    }

    /// `rx`, holding sandbox `id` busy until it ends or its reader goes
    /// (a download or a watch outlives the call that opened it). Without
    /// an idle timeout `rx` comes back as it is.
    pub(crate) fn busy_while<T: Send + 'static>(
        &self,
        id: &str,
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> tokio::sync::mpsc::Receiver<T> {
        let Some(busy) = self.preview_busy(id) else {
            return rx;
        };
        let (tx, out) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _busy = busy;
            loop {
                tokio::select! {
                    item = rx.recv() => match item {
                        Some(item) => {
                            if tx.send(item).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        out
    }

    /// Notes preview traffic to sandbox `id` (the proxy, per request).
    pub fn preview_activity(&self, id: &str) {
        if let Some(rec) = self.cache.read().get(id) {
            self.activity.touch(rec);
        }
    }

    /// Holds sandbox `id` busy while the guard lives (an open preview
    /// tunnel); `None` when it has no idle timeout.
    pub fn preview_busy(&self, id: &str) -> Option<impl Drop + Send + Sync + 'static> {
        let rec = self.cache.read().get(id).cloned()?;
        self.activity.busy(&rec)
    }

    /// One pass of the idle reaper: writes the deadlines activity moved,
    /// then applies `on_timeout` to every sandbox past its deadline.
    /// Returns how many timed out.
    pub(crate) async fn reap_idle(&self, system: &Caller) -> Result<u64> {
        let moved = self.activity.drain();
        self.store.set_idle_deadlines(&moved).await?;
        let mut n = 0;
        for rec in self.store.list_idle_sandboxes(Utc::now()).await? {
            // Touched since the drain above, or busy: not idle.
            if self.activity.active(&rec.id) {
                continue;
            }
            match self.time_out(&rec, "idle", system).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(sandbox_id = %rec.id, error = %e, "idle timeout failed")
                }
            }
        }
        Ok(n)
    }

    /// Applies `rec.on_timeout`: pauses or destroys.
    pub(crate) async fn time_out(
        &self,
        rec: &SandboxRecord,
        why: &str,
        system: &Caller,
    ) -> Result<()> {
        if rec.on_timeout == on_timeout::PAUSE && rec.state == state::RUNNING {
            self.pause_because(&rec.id, system, why).await.map(|_| ())
        } else {
            self.destroy_record(rec, system).await
        }
    }
}
