//! Pause and resume: a paused sandbox's processes are frozen by its
//! provider ([`Provider::pause`]), its time to live stops, and the next
//! exec, file operation or preview request resumes it. The reaper leaves
//! paused sandboxes alone until `defaults.max_paused`.
//!
//! The moment of pausing is the record's `updated_at` (the state write
//! sets it); resuming moves `expires_at` on by the time spent paused.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use stacyvm_api::{state, GoDuration, Sandbox};

use super::{Caller, Manager, LEASE_GRACE};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, kind};
use crate::store::SandboxRecord;

impl Manager {
    /// Pauses a sandbox (idempotent).
    pub async fn pause(&self, id: &str, caller: &Caller) -> Result<Sandbox> {
        self.pause_because(id, caller, "request").await
    }

    /// Pauses a sandbox; `why` (`request`, `idle`, `ttl`) goes into the
    /// audit row and the `sandbox.paused` event.
    pub(crate) async fn pause_because(
        &self,
        id: &str,
        caller: &Caller,
        why: &str,
    ) -> Result<Sandbox> {
        let rec = self.get(id, caller).await?;
        super::vmpool::refuse_pooled(&rec, "be paused")?;
        let _turn = self.pause_lock.lock().await;
        let rec = self.fresh(&rec).await?;
        if rec.state == state::PAUSED {
            return Ok(self.to_api(&rec));
        }
        if rec.state != state::RUNNING {
            return Err(Error::conflict(format!(
                "sandbox {id} is {}, only a running sandbox can be paused",
                rec.state
            )));
        }
        let provider = self.provider_of(&rec).await?;
        let res = provider.pause(target(&rec)).await;
        self.audit(
            caller,
            &rec.owner_id,
            "sandbox.pause",
            id,
            &rec.image,
            &rec.provider,
            res.is_ok(),
            match &res {
                Ok(()) => format!("reason={why}"),
                Err(e) => e.to_string(),
            },
        );
        res?;
        // The lease must outlive the pause (the reaper ends a pause at
        // `defaults.max_paused`).
        let hold = self
            .cfg
            .defaults
            .max_paused
            .std()
            .max(std::time::Duration::from_secs(3600));
        self.renew(&rec, hold).await?;
        self.set_state_under_lease(id, self.holder_of(&rec), state::PAUSED)
            .await?;
        let mut updated = (*rec).clone();
        updated.state = state::PAUSED.into();
        updated.updated_at = crate::store::record_now();
        let api = self.to_api(&updated);
        self.cache.write().insert(id.to_string(), Arc::new(updated));
        self.events.publish(
            kind::SANDBOX_PAUSED,
            id,
            events::data([("state", json!(state::PAUSED)), ("reason", json!(why))]),
        );
        Ok(api)
    }

    /// Resumes a paused sandbox (idempotent); its expiry moves on by the
    /// time it spent paused. One paused at (or within a second of) its
    /// expiry — `on_timeout: pause` — gets a fresh time to live: `ttl` when
    /// given, else `defaults.ttl`. A running sandbox is left as it is (its
    /// time to live moves with `extend`).
    pub async fn resume(&self, id: &str, ttl: Option<&str>, caller: &Caller) -> Result<Sandbox> {
        let fresh = match ttl.map(str::trim) {
            None | Some("") => None,
            Some(t) => Some(self.parse_ttl(t)?),
        };
        if let Some(t) = fresh {
            self.check_ttl_allowed(t, &self.get(id, caller).await?.owner_id)
                .await?;
        }
        let rec = self.get(id, caller).await?;
        let rec = self.wake_with(rec, fresh, caller).await?;
        Ok(self.to_api(&rec))
    }

    /// `rec`, resumed first when it is paused (a `Conflict` when its
    /// `auto_resume` is off).
    pub(crate) async fn wake(
        &self,
        rec: Arc<SandboxRecord>,
        caller: &Caller,
    ) -> Result<Arc<SandboxRecord>> {
        if rec.state != state::PAUSED {
            return Ok(rec);
        }
        if !auto_resumes(&rec) {
            return Err(Error::conflict(format!(
                "sandbox {} is paused and resumes only when asked (auto_resume is off): POST /sandboxes/{}/resume first",
                rec.id, rec.id
            )));
        }
        self.wake_with(rec, None, caller).await
    }

    async fn wake_with(
        &self,
        rec: Arc<SandboxRecord>,
        fresh_ttl: Option<GoDuration>,
        caller: &Caller,
    ) -> Result<Arc<SandboxRecord>> {
        if rec.state != state::PAUSED {
            return Ok(rec);
        }
        let _turn = self.pause_lock.lock().await;
        let rec = self.fresh(&rec).await?;
        if rec.state != state::PAUSED {
            return Ok(rec);
        }
        let id = rec.id.clone();
        let provider = self.provider_of(&rec).await?;
        let res = provider.resume(target(&rec)).await;
        let paused_for = (Utc::now() - rec.updated_at).max(chrono::Duration::zero());
        self.audit(
            caller,
            &rec.owner_id,
            "sandbox.resume",
            &id,
            &rec.image,
            &rec.provider,
            res.is_ok(),
            match &res {
                Ok(()) => format!(
                    "paused_for={}",
                    GoDuration::from_std(paused_for.to_std().unwrap_or_default())
                ),
                Err(e) => e.to_string(),
            },
        );
        res?;
        let now = Utc::now();
        let mut expires_at = rec.expires_at + paused_for;
        if let Some(t) = fresh_ttl {
            expires_at = now + chrono::Duration::nanoseconds(t.nanos());
        } else if expires_at <= now + chrono::Duration::seconds(1) {
            // Paused by its time to live running out: a fresh one.
            let t = self.parse_ttl("")?;
            expires_at = now + chrono::Duration::nanoseconds(t.nanos());
        }
        let left = (expires_at - now).to_std().unwrap_or_default();
        let lease = self.renew(&rec, left).await?;
        self.store
            .set_sandbox_expiry(&id, expires_at, Some(&lease.fence()))
            .await?;
        self.set_state_under_lease(&id, self.holder_of(&rec), state::RUNNING)
            .await?;
        let mut updated = (*rec).clone();
        updated.state = state::RUNNING.into();
        updated.expires_at = expires_at;
        updated.updated_at = crate::store::record_now();
        if updated.idle_timeout_secs > 0 {
            // The idle clock starts again from the resume.
            updated.idle_deadline = now + chrono::Duration::seconds(updated.idle_timeout_secs);
            self.store
                .set_idle_deadlines(&[(id.clone(), updated.idle_deadline)])
                .await?;
        }
        let updated = Arc::new(updated);
        self.cache.write().insert(id.clone(), updated.clone());
        self.events.publish(
            kind::SANDBOX_RESUMED,
            &id,
            events::data([("expires_at", json!(expires_at))]),
        );
        Ok(updated)
    }

    /// The stored record (another request may have changed it).
    pub(super) async fn fresh(&self, rec: &SandboxRecord) -> Result<Arc<SandboxRecord>> {
        match self.store.get_sandbox(&rec.id).await {
            Ok(r) if r.state == state::DESTROYED => Err(Error::sandbox_destroyed(&rec.id)),
            Ok(r) => Ok(Arc::new(r)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::sandbox_not_found(&rec.id)),
            Err(e) => Err(e),
        }
    }

    /// Renews (or takes back) the sandbox's lease for `ttl` plus grace.
    async fn renew(
        &self,
        rec: &SandboxRecord,
        ttl: std::time::Duration,
    ) -> Result<crate::store::LeaseRecord> {
        let holder = self.holder_of(rec).to_string();
        let ttl = ttl + LEASE_GRACE;
        let lease = match self.store.renew_lease(&rec.id, &holder, ttl).await {
            Ok(l) => l,
            Err(e) => self
                .store
                .acquire_lease(&rec.id, "sandbox", &holder, ttl)
                .await
                .map_err(|_| e)?,
        };
        self.lease_changed(&rec.id);
        Ok(lease)
    }
}

/// Hidden metadata: `"false"` keeps a paused sandbox paused until an
/// explicit resume (the spawn's `auto_resume: false`, E2B's `autoResume`).
pub const AUTO_RESUME_KEY: &str = "stacyvm.sys.auto_resume";

/// Whether the next call resumes the paused sandbox `rec`.
pub fn auto_resumes(rec: &SandboxRecord) -> bool {
    rec.metadata.get(AUTO_RESUME_KEY).map(String::as_str) != Some("false")
}

fn target(rec: &SandboxRecord) -> &str {
    if rec.vm_id.is_empty() {
        &rec.id
    } else {
        &rec.vm_id
    }
}
