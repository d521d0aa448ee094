//! `filesystem.Filesystem` watches: the streaming `WatchDir` (the async
//! SDKs) and the polled trio `CreateWatcher` / `GetWatcherEvents` /
//! `RemoveWatcher` (the sync Python SDK), both over the sandbox's
//! [`stacyvm_core::provider::SandboxIo::watch_dir`].
//!
//! Bounds: at most [`MAX_PER_SANDBOX`] watches of either kind per sandbox
//! and [`MAX_WATCHERS`] polled watchers in the server; a polled watcher
//! keeps at most [`MAX_PENDING`] unread events (later ones are dropped
//! until it is read), and one whose watch ended and that nobody read for
//! [`ENDED_TTL`] is forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::response::Response;
use serde_json::{json, Value};
use stacyvm_core::provider::{FsEvent, FsEvents, FsOp};

use super::{connect_stream, envelope, read_envelope, rpc_error, rpc_fail, Env};

/// Most watches (streamed and polled) one sandbox may have at once.
const MAX_PER_SANDBOX: usize = 32;
/// Most polled watchers in this server.
const MAX_WATCHERS: usize = 4096;
/// Most unread events a polled watcher keeps.
const MAX_PENDING: usize = 10_000;
/// How long an ended, unread polled watcher is kept.
const ENDED_TTL: Duration = Duration::from_secs(300);
/// Interval of keepalive messages on a quiet `WatchDir` stream.
const KEEPALIVE: Duration = Duration::from_secs(30);

fn event_type(op: FsOp) -> &'static str {
    match op {
        FsOp::Create => "EVENT_TYPE_CREATE",
        FsOp::Write => "EVENT_TYPE_WRITE",
        FsOp::Remove => "EVENT_TYPE_REMOVE",
        FsOp::Rename => "EVENT_TYPE_RENAME",
        FsOp::Chmod => "EVENT_TYPE_CHMOD",
    }
}

fn event_json(e: &FsEvent) -> Value {
    json!({"name": e.name, "type": event_type(e.op)})
}

/// One watch of either kind, for the per-sandbox count.
struct Watch {
    sandbox: String,
    /// Polled watchers only.
    polled: Option<Polled>,
}

struct Polled {
    pending: parking_lot::Mutex<Vec<Value>>,
    /// Why the watch ended (empty for a normal end), and when.
    ended: parking_lot::Mutex<Option<(String, Instant)>>,
    task: std::sync::OnceLock<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Registry {
    map: parking_lot::Mutex<HashMap<String, Arc<Watch>>>,
    next: AtomicU64,
}

static WATCHES: LazyLock<Registry> = LazyLock::new(Registry::default);

/// Removes a streamed watch from the registry when its stream ends.
struct Slot(String);

impl Drop for Slot {
    fn drop(&mut self) {
        WATCHES.map.lock().remove(&self.0);
    }
}

impl Registry {
    /// Reserves a slot for a watch of `sandbox`; forgets ended polled
    /// watchers nobody read.
    fn reserve(&self, sandbox: &str, polled: bool) -> Result<String, Response> {
        let mut map = self.map.lock();
        map.retain(|_, w| {
            w.polled.as_ref().is_none_or(|p| {
                p.ended
                    .lock()
                    .as_ref()
                    .is_none_or(|(_, at)| at.elapsed() < ENDED_TTL)
            })
        });
        if map.values().filter(|w| w.sandbox == sandbox).count() >= MAX_PER_SANDBOX {
            return Err(rpc_error(
                "resource_exhausted",
                format!("{MAX_PER_SANDBOX} watches already run in this sandbox"),
            ));
        }
        if polled && map.values().filter(|w| w.polled.is_some()).count() >= MAX_WATCHERS {
            return Err(rpc_error(
                "resource_exhausted",
                "the server holds too many watchers; remove some",
            ));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("w{n:x}-{:016x}", rand::random::<u64>());
        // A placeholder until the watch starts (counted meanwhile).
        map.insert(
            id.clone(),
            Arc::new(Watch {
                sandbox: sandbox.to_string(),
                polled: None,
            }),
        );
        Ok(id)
    }

    fn get(&self, sandbox: &str, id: &str) -> Option<Arc<Watch>> {
        self.map
            .lock()
            .get(id)
            .filter(|w| w.sandbox == sandbox && w.polled.is_some())
            .cloned()
    }
}

/// The watch request's fields: `path`, `recursive`.
fn parse(env: &Env, body: &Value) -> Result<(String, bool), Response> {
    let path = body
        .get("path")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| rpc_error("invalid_argument", "path is required"))?;
    let recursive = body.get("recursive").and_then(Value::as_bool) == Some(true);
    Ok((env.resolve(path), recursive))
}

impl Env {
    async fn start_watch(&self, body: &Value) -> Result<FsEvents, Response> {
        let (path, recursive) = parse(self, body)?;
        self.st
            .manager
            .watch_dir(&self.id, &path, recursive, &self.caller)
            .await
            .map_err(rpc_fail)
    }

    /// `filesystem.Filesystem/WatchDir`: `start`, then one `filesystem`
    /// message per change (keepalives while quiet) until the watch ends
    /// or the client goes away.
    pub(super) async fn watch_stream(&self, req: Request) -> Response {
        let body = match read_envelope(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let slot = match WATCHES.reserve(&self.id, false) {
            Ok(id) => Slot(id),
            Err(r) => return r,
        };
        let mut events = match self.start_watch(&body).await {
            Ok(e) => e,
            Err(r) => return r,
        };
        let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(16);
        tokio::spawn(async move {
            let _slot = slot;
            if tx
                .send(Ok(envelope(0, &json!({"start": {}}))))
                .await
                .is_err()
            {
                return;
            }
            let end = loop {
                let batch = tokio::select! {
                    b = tokio::time::timeout(KEEPALIVE, events.recv()) => b,
                    () = tx.closed() => return,
                };
                match batch {
                    Err(_) => {
                        if tx
                            .send(Ok(envelope(0, &json!({"keepalive": {}}))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => break json!({}),
                    Ok(Some(Err(e))) => {
                        break json!({"error": {"code": super::code_of(&e), "message": e.to_string()}})
                    }
                    Ok(Some(Ok(batch))) => {
                        for e in &batch {
                            let m = envelope(0, &json!({"filesystem": event_json(e)}));
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            let _ = tx.send(Ok(envelope(2, &end))).await;
        });
        connect_stream(out)
    }

    /// The polled watcher calls.
    pub(super) async fn watcher_call(&self, method: &str, body: &Value) -> Result<Value, Response> {
        match method {
            "CreateWatcher" => {
                let id = WATCHES.reserve(&self.id, true)?;
                let events = match self.start_watch(body).await {
                    Ok(e) => e,
                    Err(r) => {
                        WATCHES.map.lock().remove(&id);
                        return Err(r);
                    }
                };
                let watch = Arc::new(Watch {
                    sandbox: self.id.clone(),
                    polled: Some(Polled {
                        pending: parking_lot::Mutex::new(Vec::new()),
                        ended: parking_lot::Mutex::new(None),
                        task: std::sync::OnceLock::new(),
                    }),
                });
                // The task holds the watcher until the watch ends or the
                // watcher is removed (which aborts it).
                let task = tokio::spawn(collect(watch.clone(), events)).abort_handle();
                if let Some(p) = &watch.polled {
                    let _ = p.task.set(task);
                }
                WATCHES.map.lock().insert(id.clone(), watch);
                Ok(json!({"watcherId": id}))
            }
            "GetWatcherEvents" | "RemoveWatcher" => {
                let id = body
                    .get("watcherId")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let Some(w) = WATCHES.get(&self.id, id) else {
                    return Err(rpc_error("not_found", format!("watcher {id:?} not found")));
                };
                let Some(p) = &w.polled else {
                    return Err(rpc_error("not_found", "not a watcher"));
                };
                if method == "RemoveWatcher" {
                    if let Some(t) = p.task.get() {
                        t.abort();
                    }
                    WATCHES.map.lock().remove(id);
                    return Ok(json!({}));
                }
                let events = std::mem::take(&mut *p.pending.lock());
                if events.is_empty() {
                    if let Some((why, _)) = p.ended.lock().clone() {
                        WATCHES.map.lock().remove(id);
                        let msg = if why.is_empty() {
                            "the watched directory is gone".to_string()
                        } else {
                            why
                        };
                        return Err(rpc_error("not_found", format!("watcher ended: {msg}")));
                    }
                }
                Ok(json!({"events": events}))
            }
            _ => Err(rpc_error("unimplemented", "unknown watcher call")),
        }
    }
}

/// Moves a polled watcher's events into its buffer until the watch ends.
async fn collect(watch: Arc<Watch>, mut events: FsEvents) {
    let Some(p) = &watch.polled else { return };
    let why = loop {
        match events.recv().await {
            None => break String::new(),
            Some(Err(e)) => break e.to_string(),
            Some(Ok(batch)) => {
                let mut pending = p.pending.lock();
                for e in &batch {
                    if pending.len() < MAX_PENDING {
                        pending.push(event_json(e));
                    }
                }
            }
        }
    };
    *p.ended.lock() = Some((why, Instant::now()));
}
