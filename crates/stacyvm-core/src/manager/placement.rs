//! Where a new sandbox runs.
//!
//! On one machine: here. In a cluster (a [`crate::cluster::Remote`] is
//! attached) every registered worker is a candidate, this control plane
//! included unless `worker.local_sandboxes` is off. A candidate must be
//! online, have heartbeated within `worker.stale_after`, offer the provider, be
//! under its `capacity.max_sandboxes`, and (for another machine) advertise
//! an `rpc_url`: a worker without one never receives a sandbox from here
//! (gaps C-9), and the caller's tenant policies must permit it (`worker`
//! rules, by worker id). Among candidates a worker that already has the
//! image (its heartbeat's `capacity.images`) wins over one that would have
//! to fetch it; then the least loaded (share of its capacity used, then
//! sandbox count); ties are broken by worker id, so the choice depends
//! only on the store's rows, never on iteration order.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use super::workers::status;
use super::Manager;
use crate::error::{Error, Result};
use crate::policy;
use crate::provider::{Profile, Provider};
use crate::store::{PolicyRecord, WorkerRecord};

/// What the sandbox to place needs besides its provider.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want<'a> {
    /// The image, for locality ("" = no preference).
    pub image: &'a str,
    /// The caller's policies (tenant and global); `worker` rules apply.
    pub policies: &'a [PolicyRecord],
}

/// The outcome of placement.
pub struct Placed {
    /// The worker that runs the sandbox (and holds its lease).
    pub worker_id: String,
    /// The provider to spawn with (local, or the worker's through RPC).
    pub provider: Arc<dyn Provider>,
    /// The provider's network modes and default.
    pub profile: Profile,
}

/// One candidate, for ordering.
struct Candidate<'a> {
    worker: &'a WorkerRecord,
    running: i64,
    max: i64,
    /// The worker reports the image as present.
    has_image: bool,
}

impl Candidate<'_> {
    fn load(&self) -> f64 {
        if self.max > 0 {
            self.running as f64 / self.max as f64
        } else {
            0.0
        }
    }

    fn cmp(&self, o: &Candidate<'_>) -> Ordering {
        o.has_image
            .cmp(&self.has_image)
            .then_with(|| {
                self.load()
                    .partial_cmp(&o.load())
                    .unwrap_or(Ordering::Equal)
            })
            .then(self.running.cmp(&o.running))
            .then(self.worker.id.cmp(&o.worker.id))
    }
}

fn offers(w: &WorkerRecord, provider: &str) -> bool {
    w.providers.iter().any(|p| p.eq_ignore_ascii_case(provider))
}

/// Whether a worker's heartbeat lists `image` (in any spelling).
fn has_image(w: &WorkerRecord, canonical: &str) -> bool {
    !canonical.is_empty()
        && w.capacity
            .get("images")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|l| {
                l.iter()
                    .filter_map(serde_json::Value::as_str)
                    .any(|i| policy::canonical_image(i) == canonical)
            })
}

impl Manager {
    /// Chooses where a sandbox of `provider` ("" = the default) runs.
    pub async fn place(&self, provider: &str, want: Want<'_>) -> Result<Placed> {
        let local = self.registry.get(provider);
        let remote = self.remote.read().clone();
        let Some(remote) = remote else {
            let p = local?;
            policy::check(want.policies, "worker", self.worker_id())?;
            return Ok(Placed {
                worker_id: self.worker_id().to_string(),
                profile: p.profile(),
                provider: p,
            });
        };
        // The provider's name: the local one when this control plane has
        // it (resolving "" to the default), else as asked.
        let name = match &local {
            Ok(p) => p.name().to_string(),
            Err(_) if provider.is_empty() => {
                return Err(Error::invalid("no default provider here: name one"))
            }
            Err(_) => provider.to_ascii_lowercase(),
        };
        let workers = self.store.list_workers().await?;
        let mut running: HashMap<&str, i64> = HashMap::new();
        let active = self.store.list_active_sandboxes().await?;
        for r in &active {
            *running.entry(r.worker_id.as_str()).or_default() += 1;
        }
        let now = chrono::Utc::now();
        let here = self.worker_id();
        let canonical = if want.image.is_empty() {
            String::new()
        } else {
            policy::canonical_image(want.image)
        };
        let mut best: Option<Candidate<'_>> = None;
        let mut refused_by_policy = 0;
        for w in &workers {
            let is_here = w.id == here;
            let max = w
                .capacity
                .get("max_sandboxes")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0);
            let count = running.get(w.id.as_str()).copied().unwrap_or(0);
            let eligible = if is_here {
                self.cfg.worker.local_sandboxes && local.is_ok()
            } else {
                let fresh = now
                    .signed_duration_since(w.last_heartbeat)
                    .to_std()
                    .map_or(true, |age| age <= self.stale_after());
                let rpc = w
                    .capacity
                    .get("rpc_url")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|u| !u.is_empty());
                w.status.eq_ignore_ascii_case(status::ONLINE) && fresh && rpc && offers(w, &name)
            };
            if !eligible || (max > 0 && count >= max) {
                continue;
            }
            if policy::check(want.policies, "worker", &w.id).is_err() {
                refused_by_policy += 1;
                continue;
            }
            let c = Candidate {
                worker: w,
                running: count,
                max,
                has_image: has_image(w, &canonical),
            };
            if best.as_ref().is_none_or(|b| c.cmp(b) == Ordering::Less) {
                best = Some(c);
            }
        }
        // This control plane before its first heartbeat is still here.
        if best.is_none()
            && self.cfg.worker.local_sandboxes
            && local.is_ok()
            && !workers.iter().any(|w| w.id == here)
            && policy::check(want.policies, "worker", here).is_ok()
        {
            let p = local?;
            return Ok(Placed {
                worker_id: here.to_string(),
                profile: p.profile(),
                provider: p,
            });
        }
        let Some(best) = best else {
            if refused_by_policy > 0 {
                return Err(Error::forbidden(format!(
                    "no worker the tenant's worker policies permit can take a sandbox of provider {name:?} ({refused_by_policy} eligible worker(s) are not permitted)"
                )));
            }
            return Err(Error::limit(format!(
                "no eligible worker available for provider {name:?} (online, heartbeating, with an rpc_url and free capacity)"
            )));
        };
        if best.worker.id == here {
            let p = local?;
            return Ok(Placed {
                worker_id: here.to_string(),
                profile: p.profile(),
                provider: p,
            });
        }
        let p = remote.provider(best.worker, &name).await?;
        // A worker's provider has the network modes of the same provider
        // here, when this control plane has it.
        let profile = match &local {
            Ok(l) => l.profile(),
            Err(_) => p.profile(),
        };
        Ok(Placed {
            worker_id: best.worker.id.clone(),
            provider: p,
            profile,
        })
    }
}
