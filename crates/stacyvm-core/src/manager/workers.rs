//! Workers: registration by heartbeat, the list operators see, deletion,
//! and lease renewal on a worker's behalf. The rules live here; the routes
//! only map the wire.

use std::time::Duration;

use stacyvm_api::{Worker, WorkerHeartbeat};

use super::{Caller, Manager};
use crate::error::{Error, ErrorKind, Result};
use crate::paths;
use crate::store::{record_now, LeaseRecord, WorkerRecord};

/// A worker without a heartbeat for this long is stale: shown as such and
/// never chosen for a spawn.
pub const STALE_AFTER: Duration = Duration::from_secs(120);

/// Largest heartbeat `capacity` object, serialized (room for the image
/// list of [`crate::registry::MAX_IMAGE_LIST_BYTES`]).
const MAX_CAPACITY_BYTES: usize = 64 << 10;
/// Most provider or capability names in one heartbeat.
const MAX_NAMES: usize = 64;

/// Worker states a heartbeat may report.
pub mod status {
    /// Takes new sandboxes.
    pub const ONLINE: &str = "online";
    /// Serves its sandboxes, takes no new ones.
    pub const DRAINING: &str = "draining";
    /// Gone (set when it shuts down cleanly).
    pub const OFFLINE: &str = "offline";
}

/// The wire object for a worker row (`stale_after`: see
/// [`Manager::stale_after`]).
pub fn to_api(w: &WorkerRecord, stale_after: Duration) -> Worker {
    let stale = is_stale(w, stale_after);
    Worker {
        id: w.id.clone(),
        hostname: w.hostname.clone(),
        status: w.status.clone(),
        providers: w.providers.clone(),
        capabilities: w.capabilities.clone(),
        capacity: w.capacity.clone(),
        last_heartbeat: w.last_heartbeat,
        created_at: w.created_at,
        updated_at: w.updated_at,
        stale,
    }
}

/// Whether `w` has been silent longer than `stale_after`.
pub fn is_stale(w: &WorkerRecord, stale_after: Duration) -> bool {
    chrono::Utc::now()
        .signed_duration_since(w.last_heartbeat)
        .to_std()
        .is_ok_and(|age| age > stale_after)
}

/// The `rpc_url` a worker advertises, checked: `http(s)://host:port` with
/// nothing after the authority but an optional `/`.
pub fn check_rpc_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            Error::invalid(format!(
                "capacity.rpc_url {url:?} must start with https:// or http://"
            ))
        })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let ok = !authority.is_empty()
        && authority.len() <= 255
        && !authority.contains(['/', '?', '#', '@', ' '])
        && authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "capacity.rpc_url {url:?} must be scheme://host:port"
        )))
    }
}

fn check_names(what: &str, names: &[String]) -> Result<()> {
    if names.len() > MAX_NAMES {
        return Err(Error::invalid(format!("{what}: at most {MAX_NAMES} names")));
    }
    for n in names {
        if n.is_empty() || n.len() > 64 || n.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Error::invalid(format!("{what}: {n:?} is not a name")));
        }
    }
    Ok(())
}

impl Manager {
    /// How long a worker may be silent before it is stale
    /// (`worker.stale_after`, 2 minutes by default).
    pub fn stale_after(&self) -> Duration {
        let d = self.cfg.worker.stale_after.std();
        if d.is_zero() {
            STALE_AFTER
        } else {
            d
        }
    }

    /// Marks the sandboxes of stale workers `unhealthy` (their calls fail
    /// with a typed 503 meanwhile) and those of workers that came back
    /// `running` again. Returns how many records changed.
    pub async fn watch_workers(&self) -> Result<usize> {
        use stacyvm_api::state;
        let workers = self.store.list_workers().await?;
        let stale: std::collections::HashMap<&str, bool> = workers
            .iter()
            .map(|w| {
                (
                    w.id.as_str(),
                    is_stale(w, self.stale_after()) || w.status == status::OFFLINE,
                )
            })
            .collect();
        let mut changed = 0;
        for rec in self.store.list_active_sandboxes().await? {
            if self.owns(&rec) {
                continue;
            }
            let gone = stale.get(rec.worker_id.as_str()).copied().unwrap_or(true);
            let next = match (gone, rec.state.as_str()) {
                (true, state::RUNNING) => state::UNHEALTHY,
                (false, state::UNHEALTHY) => state::RUNNING,
                _ => continue,
            };
            // Under the worker's lease as read now: a sandbox whose lease
            // changes hands meanwhile is left to its new holder.
            match self
                .set_state_under_lease(&rec.id, &rec.worker_id, next)
                .await
            {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::NotFound) => continue,
                Err(e) => return Err(e),
            }
            self.cache.write().remove(&rec.id);
            let kind = if next == state::UNHEALTHY {
                crate::events::kind::SANDBOX_UNHEALTHY
            } else {
                crate::events::kind::SANDBOX_RUNNING
            };
            self.events.publish(
                kind,
                &rec.id,
                crate::events::data([("worker_id", serde_json::json!(rec.worker_id))]),
            );
            tracing::warn!(sandbox_id = %rec.id, worker = %rec.worker_id, state = next, "sandbox state follows its worker");
            changed += 1;
        }
        Ok(changed)
    }

    /// Every registered worker, by id.
    pub async fn workers(&self) -> Result<Vec<WorkerRecord>> {
        self.store.list_workers().await
    }

    /// One worker.
    pub async fn worker(&self, id: &str) -> Result<WorkerRecord> {
        self.store.get_worker(id).await.map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::not_found(format!("worker {id:?}")),
            _ => e,
        })
    }

    /// Records a worker's heartbeat (registering it the first time). A
    /// worker without `capacity.rpc_url` is registered but never given a
    /// sandbox from another machine.
    pub async fn worker_heartbeat(
        &self,
        id: &str,
        hb: WorkerHeartbeat,
        caller: &Caller,
    ) -> Result<WorkerRecord> {
        if !paths::is_worker_id(id) {
            return Err(Error::invalid(format!("{id:?} is not a valid worker id")));
        }
        let state = match hb.status.trim() {
            "" => status::ONLINE,
            s if s.eq_ignore_ascii_case(status::ONLINE) => status::ONLINE,
            s if s.eq_ignore_ascii_case(status::DRAINING) => status::DRAINING,
            s if s.eq_ignore_ascii_case(status::OFFLINE) => status::OFFLINE,
            s => {
                return Err(Error::invalid(format!(
                    "status {s:?} is not one of online, draining, offline"
                )))
            }
        };
        check_names("providers", &hb.providers)?;
        check_names("capabilities", &hb.capabilities)?;
        let capacity = match hb.capacity {
            serde_json::Value::Null => serde_json::json!({}),
            v @ serde_json::Value::Object(_) => v,
            _ => return Err(Error::invalid("capacity must be an object")),
        };
        if serde_json::to_vec(&capacity).map_or(0, |v| v.len()) > MAX_CAPACITY_BYTES {
            return Err(Error::too_large("capacity is larger than 64 KiB"));
        }
        let rpc_url = capacity
            .get("rpc_url")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if !rpc_url.is_empty() {
            check_rpc_url(&rpc_url)?;
        }
        if hb.hostname.len() > 255 || hb.hostname.chars().any(char::is_control) {
            return Err(Error::invalid("hostname is not a host name"));
        }
        let before = match self.store.get_worker(id).await {
            Ok(w) => Some(w),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let now = record_now();
        let rec = WorkerRecord {
            id: id.to_string(),
            hostname: hb.hostname,
            status: state.to_string(),
            providers: hb.providers,
            capabilities: hb.capabilities,
            capacity,
            last_heartbeat: now,
            created_at: now,
            updated_at: now,
        };
        let saved = self.store.upsert_worker(&rec).await?;
        // Audit what changes, not every beat.
        let old_url = before
            .as_ref()
            .and_then(|w| {
                w.capacity
                    .get("rpc_url")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let change = match &before {
            None => Some("registered".to_string()),
            Some(b) if b.status != saved.status => {
                Some(format!("{} -> {}", b.status, saved.status))
            }
            Some(_) if old_url != rpc_url => Some("rpc_url changed".to_string()),
            _ => None,
        };
        if let Some(change) = change {
            let detail = if rpc_url.is_empty() {
                format!("{change}; no rpc_url: takes no sandboxes from other machines")
            } else {
                format!("{change}; rpc_url {rpc_url}")
            };
            self.audit(caller, "", "worker.heartbeat", "", id, "", true, detail);
        }
        Ok(saved)
    }

    /// Forgets a worker (its leases stay and expire).
    pub async fn delete_worker(&self, id: &str, caller: &Caller) -> Result<()> {
        let r = self
            .store
            .delete_worker(id)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::not_found(format!("worker {id:?}")),
                _ => e,
            });
        self.audit(
            caller,
            "",
            "worker.delete",
            "",
            id,
            "",
            r.is_ok(),
            r.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        r
    }

    /// Renews a lease `worker` holds; a lease held by another worker or
    /// already expired is a conflict (the worker must stop acting on it).
    pub async fn renew_worker_lease(
        &self,
        worker: &str,
        resource: &str,
        ttl: Duration,
        caller: &Caller,
    ) -> Result<LeaseRecord> {
        if ttl.is_zero() {
            return Err(Error::invalid("ttl must be a positive duration"));
        }
        let r = self.store.renew_lease(resource, worker, ttl).await;
        if r.is_ok() {
            self.lease_changed(resource);
        }
        if let Err(e) = &r {
            self.audit(
                caller,
                "",
                "worker.lease_renew",
                resource,
                worker,
                "",
                false,
                e.to_string(),
            );
        }
        r
    }

    /// Audits a signed worker token's issue (its id, never the token).
    pub fn audit_worker_token(
        &self,
        caller: &Caller,
        worker: &str,
        token_id: &str,
        audience: &str,
    ) {
        self.audit(
            caller,
            "",
            "worker.token_issued",
            "",
            worker,
            "",
            true,
            format!("token id {token_id}, audience {audience}"),
        );
    }
}
